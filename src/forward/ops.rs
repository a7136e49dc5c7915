//! Numeric kernels of the reference forward, all f32 row-major: products
//! ([`super::gemm`]), RMSNorm, SiLU and tanh GELU. The rotary embedding is part
//! of the model description ([`crate::model::Rope`]).

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::gemm::{products, Weight};
use crate::checkpoint::config::Activation;
use crate::model::Matrix;

/// `x [rows, w.cols] @ w^T -> [rows, w.rows]`. A 4-bit weight written at
/// an accuracy level that rounds its activations has them rounded first, as
/// `MatMulNBits` does ([`crate::model::Q4::round_activations`]).
pub fn matmul_t(x: &[f32], rows: usize, w: &Matrix) -> Vec<f32> {
    let rounded;
    let x = match w.int4.as_deref().filter(|q| q.rounds_activations()) {
        Some(q) => {
            rounded = q.round_activations(x);
            &rounded
        }
        None => x,
    };
    let [out] = products_of(x, rows, &[w]).try_into().expect("one product");
    out
}

/// How a product reads `w`: packed panels when kept widened, its rows when
/// computed in memory, else widened a panel at a time by the thread that
/// uses it ([`super::gemm::WidenRows`]), never as a whole.
fn weight(w: &Matrix) -> Weight<'_> {
    if let Some(values) = w.kept_panels() {
        Weight::Panels { values, n: w.rows }
    } else if let Some(values) = w.row_values() {
        Weight::Rows(values)
    } else {
        Weight::Widened { rows: w, n: w.rows }
    }
}

impl super::gemm::WidenRows for Matrix {
    fn widen_rows(&self, rows: std::ops::Range<usize>, out: &mut [f32]) {
        self.read_rows_in_use(rows, out);
    }
}

/// `x [rows, k] @ w^T` for each of `ws` (all `[_, k]`), their output
/// blocks shared out over the thread pool together
/// ([`super::gemm::products`]).
fn products_of(x: &[f32], rows: usize, ws: &[&Matrix]) -> Vec<Vec<f32>> {
    let k = ws.first().map_or(0, |w| w.cols);
    assert!(
        ws.iter().all(|w| w.cols == k),
        "weights of different widths"
    );
    assert_eq!(x.len(), rows * k, "matmul input has the wrong size");
    let weights: Vec<Weight> = ws.iter().map(|w| weight(w)).collect();
    let mut outs: Vec<Vec<f32>> = ws
        .iter()
        .map(|w| {
            let mut o = Vec::with_capacity(rows * w.rows);
            advise_huge_pages(o.spare_capacity_mut());
            o
        })
        .collect();
    let mut views: Vec<&mut [MaybeUninit<f32>]> = outs
        .iter_mut()
        .zip(ws)
        .map(|(o, w)| &mut o.spare_capacity_mut()[..rows * w.rows])
        .collect();
    products(x, rows, k, &weights, &mut views);
    for (o, w) in outs.iter_mut().zip(ws) {
        // SAFETY: `products` writes every output.
        unsafe { o.set_len(rows * w.rows) };
    }
    outs
}

/// Ask Linux to back the whole 2 MiB pages of a large buffer (at least
/// 4 MiB) with huge pages, before anything is written to it. Each 4 KiB
/// page of a fresh allocation costs a page fault when first written: a
/// forward's logits (`[256, 49,152]` f32 for SmolLM2, 48 MiB, allocated
/// afresh each time) took 12,288 faults and about 19 ms of system time per
/// forward on 2 cores, against 24 faults with huge pages. Elsewhere, and
/// where the kernel declines, nothing changes.
fn advise_huge_pages<T>(buf: &[T]) {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let (ptr, bytes) = (buf.as_ptr() as usize, std::mem::size_of_val(buf));
        let (start, end) = (ptr.next_multiple_of(HUGE), (ptr + bytes) / HUGE * HUGE);
        if bytes >= 2 * HUGE && end > start {
            // SAFETY: the range lies inside `buf`'s allocation; the advice
            // changes how its pages are backed, never their contents.
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = buf;
}

/// `x [rows, k] @ w^T` for each of `ws` (all `[_, k]`), computed together
/// ([`super::gemm::products`]) when none rounds its activations; one by one
/// otherwise.
pub fn matmul_t_many(x: &[f32], rows: usize, ws: &[&Matrix]) -> Vec<Vec<f32>> {
    if ws
        .iter()
        .any(|w| w.int4.as_deref().is_some_and(|q| q.rounds_activations()))
    {
        return ws.iter().map(|w| matmul_t(x, rows, w)).collect();
    }
    products_of(x, rows, ws)
}

/// Index of the first largest value of a row (greedy decoding, top-1).
pub fn argmax<T: PartialOrd + Copy>(row: &[T]) -> usize {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best
}

/// `RMSNorm_w(x) = x / sqrt(mean(x^2) + eps) * w`, row by row (rows split
/// over the thread pool).
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f64) -> Vec<f32> {
    let h = weight.len();
    assert!(
        x.len().is_multiple_of(h),
        "rms_norm input is not whole rows"
    );
    let mut out = Vec::with_capacity(x.len());
    let norm = |(row, o): (&[f32], &mut [MaybeUninit<f32>])| {
        let ms = dot_f64(row, row) / h as f64;
        let inv = (1.0 / (ms + eps).sqrt()) as f32;
        for ((o, &v), &w) in o.iter_mut().zip(row).zip(weight) {
            o.write(w * (v * inv));
        }
    };
    let spare = &mut out.spare_capacity_mut()[..x.len()];
    if x.len() >= PARALLEL_VALUES {
        x.par_chunks_exact(h)
            .zip(spare.par_chunks_exact_mut(h))
            .for_each(norm);
    } else {
        x.chunks_exact(h)
            .zip(spare.chunks_exact_mut(h))
            .for_each(norm);
    }
    // SAFETY: every row was written.
    unsafe { out.set_len(x.len()) };
    out
}

/// Elementwise work below this many values stays on the calling thread.
const PARALLEL_VALUES: usize = 1 << 14;

pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// GELU, tanh approximation (`gelu_pytorch_tanh`).
pub fn gelu_tanh(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)).tanh())
}

/// The MLP's gated product in place: `up = act(gate) * up` (SwiGLU, GeGLU),
/// split over the thread pool.
pub fn gate(up: &mut [f32], gate: &[f32], act: Activation) {
    assert_eq!(up.len(), gate.len(), "gate and up differ in size");
    let run = |(u, g): (&mut [f32], &[f32])| {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: avx512f was just detected.
            return unsafe { simd::gate(u, g, act) };
        }
        let f = match act {
            Activation::Silu => silu,
            Activation::GeluTanh => gelu_tanh,
        };
        u.iter_mut().zip(g).for_each(|(u, &g)| *u *= f(g));
    };
    if up.len() >= PARALLEL_VALUES {
        up.par_chunks_mut(PARALLEL_VALUES)
            .zip(gate.par_chunks(PARALLEL_VALUES))
            .for_each(run);
    } else {
        run((up, gate));
    }
}

/// Softmax in place of `row[lo..=hi]`; every other entry becomes 0 (the
/// masked positions of causal and sliding-window attention).
pub fn softmax_within(row: &mut [f32], lo: usize, hi: usize) {
    let kept = &mut row[lo..=hi];
    let max = kept.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let inv = 1.0 / exp_shifted(kept, max);
    kept.iter_mut().for_each(|v| *v *= inv);
    row[..lo].fill(0.0);
    row[hi + 1..].fill(0.0);
}

/// `sum_i exp(v_i - shift)` accumulated in f64 (each term in f32, within
/// about an ulp): the normaliser of a softmax over a vocabulary.
pub fn sum_exp(v: &[f32], shift: f32) -> f64 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: avx512f was just detected.
        return unsafe { simd::sum_exp(v, shift) };
    }
    v.iter().map(|&x| ((x - shift) as f64).exp()).sum()
}

/// `sum_i a_i b_i` accumulated in f64.
pub fn dot_f64(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "dot product of different lengths");
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: avx512f was just detected.
        return unsafe { simd::dot_f64(a, b) };
    }
    a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
}

/// `v = exp(v - max)` in place; returns the sum.
fn exp_shifted(v: &mut [f32], max: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: avx512f was just detected.
        return unsafe { simd::exp_shifted(v, max) };
    }
    let mut sum = 0f32;
    for x in v.iter_mut() {
        *x = (*x - max).exp();
        sum += *x;
    }
    sum
}

/// AVX-512 forms of the elementwise functions, 16 values at a time.
#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    use super::Activation;

    /// `exp(x)` to about 1 ulp: `x = n ln 2 + r` with `|r| <= ln 2 / 2`,
    /// a degree-6 polynomial for `exp(r)` (Cephes' `expf` coefficients, the
    /// last of which is 0.5 in f32),
    /// scaled by `2^n`. Saturates to 0 and to `f32::MAX`-ish at the ends
    /// of the range; NaN stays NaN.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub fn exp(x: __m512) -> __m512 {
        let x = _mm512_min_ps(_mm512_set1_ps(88.376_26), x);
        let x = _mm512_max_ps(_mm512_set1_ps(-103.972_08), x);
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm512_set1_ps(1.987_569_1e-4);
        for c in [
            1.398_199_9e-3,
            8.333_452e-3,
            4.166_579_6e-2,
            1.666_666_5e-1,
            0.5,
        ] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        let r2 = _mm512_mul_ps(r, r);
        let p = _mm512_fmadd_ps(p, r2, _mm512_add_ps(r, _mm512_set1_ps(1.0)));
        _mm512_scalef_ps(p, n)
    }

    /// Apply `f` to `v` 16 values at a time, the tail masked.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn each(v: &mut [f32], g: &[f32], f: impl Fn(__m512, __m512) -> __m512) {
        let mut i = 0;
        while i < v.len() {
            let mask = lanes(v.len() - i);
            let a = _mm512_maskz_loadu_ps(mask, v.as_ptr().add(i));
            let b = _mm512_maskz_loadu_ps(mask, g.as_ptr().add(i));
            _mm512_mask_storeu_ps(v.as_mut_ptr().add(i), mask, f(a, b));
            i += 16;
        }
    }

    /// `up = act(gate) * up`.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn gate(up: &mut [f32], gate: &[f32], act: Activation) {
        let one = _mm512_set1_ps(1.0);
        match act {
            // g / (1 + exp(-g))
            Activation::Silu => each(up, gate, |u, g| {
                let e = exp(_mm512_sub_ps(_mm512_setzero_ps(), g));
                _mm512_mul_ps(u, _mm512_div_ps(g, _mm512_add_ps(one, e)))
            }),
            // 0.5 g (1 + tanh(y)) = g / (1 + exp(-2y)), y = sqrt(2/pi) (g + 0.044715 g^3):
            // no cancellation where the GELU is small
            Activation::GeluTanh => each(up, gate, |u, g| {
                let g3 = _mm512_mul_ps(_mm512_mul_ps(g, g), g);
                let minus_2y = _mm512_mul_ps(
                    _mm512_set1_ps(-2.0 * 0.797_884_6),
                    _mm512_fmadd_ps(_mm512_set1_ps(0.044715), g3, g),
                );
                let gelu = _mm512_div_ps(g, _mm512_add_ps(one, exp(minus_2y)));
                _mm512_mul_ps(u, gelu)
            }),
        }
    }

    /// The mask of the first `left` of 16 lanes (all of them past 16).
    #[inline]
    fn lanes(left: usize) -> __mmask16 {
        if left >= 16 {
            0xffff
        } else {
            ((1u32 << left) - 1) as __mmask16
        }
    }

    /// `sum exp(v - shift)`: exponentials in f32, sums in 8 f64 lanes.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn sum_exp(v: &[f32], shift: f32) -> f64 {
        let s = _mm512_set1_ps(shift);
        let (mut lo, mut hi) = (_mm512_setzero_pd(), _mm512_setzero_pd());
        let mut i = 0;
        while i < v.len() {
            let mask = lanes(v.len() - i);
            let x = _mm512_maskz_loadu_ps(mask, v.as_ptr().add(i));
            let e = _mm512_maskz_mov_ps(mask, exp(_mm512_sub_ps(x, s)));
            lo = _mm512_add_pd(lo, _mm512_cvtps_pd(_mm512_castps512_ps256(e)));
            hi = _mm512_add_pd(
                hi,
                _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(
                    _mm512_castps_pd(e),
                ))),
            );
            i += 16;
        }
        _mm512_reduce_add_pd(_mm512_add_pd(lo, hi))
    }

    /// `sum a b` in two sets of 8 f64 lanes (16 values a step).
    #[target_feature(enable = "avx512f")]
    pub unsafe fn dot_f64(a: &[f32], b: &[f32]) -> f64 {
        let (mut lo, mut hi) = (_mm512_setzero_pd(), _mm512_setzero_pd());
        let halves = |v: __m512| {
            (
                _mm512_cvtps_pd(_mm512_castps512_ps256(v)),
                _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(
                    _mm512_castps_pd(v),
                ))),
            )
        };
        let mut i = 0;
        while i < a.len() {
            let mask = lanes(a.len() - i);
            let (x0, x1) = halves(_mm512_maskz_loadu_ps(mask, a.as_ptr().add(i)));
            let (y0, y1) = halves(_mm512_maskz_loadu_ps(mask, b.as_ptr().add(i)));
            lo = _mm512_fmadd_pd(x0, y0, lo);
            hi = _mm512_fmadd_pd(x1, y1, hi);
            i += 16;
        }
        _mm512_reduce_add_pd(_mm512_add_pd(lo, hi))
    }

    /// `v = exp(v - max)`; returns the sum (in 16 lanes, then across them).
    #[target_feature(enable = "avx512f")]
    pub unsafe fn exp_shifted(v: &mut [f32], max: f32) -> f32 {
        let shift = _mm512_set1_ps(max);
        let mut sum = _mm512_setzero_ps();
        let mut i = 0;
        while i < v.len() {
            let mask = lanes(v.len() - i);
            let x = _mm512_maskz_loadu_ps(mask, v.as_ptr().add(i));
            let e = _mm512_maskz_mov_ps(mask, exp(_mm512_sub_ps(x, shift)));
            _mm512_mask_storeu_ps(v.as_mut_ptr().add(i), mask, e);
            sum = _mm512_add_ps(sum, e);
            i += 16;
        }
        _mm512_reduce_add_ps(sum)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spread(len: usize, scale: f32) -> Vec<f32> {
        (0..len)
            .map(|i| scale * (((i * 7919) % 2001) as f32 / 1000.0 - 1.0))
            .collect()
    }

    /// The gated product (vector form where the CPU has it) against the
    /// activations computed in f64, over a range that reaches both
    /// saturations: within 3e-7 relative, plus what rounding the exponent's
    /// argument `a` to f32 costs (`|a| 2^-23`), plus 1e-30 absolute.
    #[test]
    fn gate_matches_the_scalar_activations() {
        for act in [Activation::Silu, Activation::GeluTanh] {
            let g = spread(40_001, 95.0);
            let u = spread(40_001, 1.5);
            let mut out = u.clone();
            gate(&mut out, &g, act);
            for ((&o, &u), &g) in out.iter().zip(&u).zip(&g) {
                let g64 = g as f64;
                let arg = match act {
                    Activation::Silu => g64.abs(),
                    Activation::GeluTanh => {
                        (2.0 * 0.797_884_6 * (g64 + 0.044715 * g64.powi(3))).abs()
                    }
                };
                let want = u as f64
                    * match act {
                        Activation::Silu => g64 / (1.0 + (-g64).exp()),
                        // 0.5 g (1 + tanh(y)), as g sigmoid(2y): no cancellation
                        Activation::GeluTanh => {
                            let y = (2.0 / std::f64::consts::PI).sqrt()
                                * (g64 + 0.044715 * g64.powi(3));
                            g64 / (1.0 + (-2.0 * y).exp())
                        }
                    };
                assert!(
                    (o as f64 - want).abs() <= (3e-7 + arg * 1.2e-7) * want.abs() + 1e-30,
                    "{act:?}({g}) * {u}: {o} against {want}"
                );
            }
        }
    }

    /// Softmax of a window of a row against f64, zeros outside it; f32
    /// rounds `v - max` itself, by up to 2^-24 of it.
    #[test]
    fn softmax_within_a_window() {
        let row0 = spread(300, 30.0);
        let (lo, hi) = (17, 260);
        let mut row = row0.clone();
        softmax_within(&mut row, lo, hi);
        let max = row0[lo..=hi].iter().fold(f64::MIN, |m, &v| m.max(v as f64));
        let z: f64 = row0[lo..=hi].iter().map(|&v| (v as f64 - max).exp()).sum();
        for (j, (&p, &v)) in row.iter().zip(&row0).enumerate() {
            let want = if (lo..=hi).contains(&j) {
                (v as f64 - max).exp() / z
            } else {
                0.0
            };
            let shifted = (v as f64 - max).abs();
            assert!(
                (p as f64 - want).abs() <= (1e-6 + shifted * 1.2e-7) * want + 1e-38,
                "{j}: {p} against {want}"
            );
        }
    }
}
