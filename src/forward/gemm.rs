//! The products of the reference forward, all of one shape: `out = x w^T`,
//! where `x [m, k]` and `w [n, k]` are both read along the shared dimension
//! `k`: a linear layer's input rows against its weight rows (stored
//! `[out_features, in_features]`), a query head against the keys, the
//! attention weights against the transposed values.
//!
//! On a CPU with AVX-512 each output is a dot product computed by one kernel:
//! 4 rows of `x` against 4 rows of `w`, 16 lanes of `k` per step into 16
//! accumulators, reduced by one fixed tree into a vector of the 16 outputs
//! (docs/DESIGN.md section 10). Neither operand is packed: the weights are
//! read in place, in blocks of rows that stay in the L1 cache while every
//! row of `x` passes them. An output's arithmetic depends only on `k`, never
//! on `m`, on which outputs share a kernel call or a thread, or on the tile of
//! weight rows it is in: one token's logits are the same bits in a batch of
//! 256 and alone in a decode step. Elsewhere the `gemm` crate computes the
//! same products.

use std::cell::RefCell;

use crate::model::matrix::AlignedF32;

/// Causal structure of a product whose rows are consecutive positions
/// `first, first + 1, ...` (attention): what row `i` needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Causal {
    /// Every output, every term.
    None,
    /// Row `i` needs only outputs `j <= first + i` (scores against keys);
    /// the others are left unwritten.
    Outputs { first: usize },
    /// Row `i`'s terms `p > first + i` are zero (attention weights against
    /// values) and are skipped.
    Terms { first: usize },
}

/// `x [m, k]` read with a row stride, and `w [n, k]` the same way.
#[derive(Debug, Clone, Copy)]
pub struct Nt<'a> {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub x: &'a [f32],
    pub x_stride: usize,
    pub w: &'a [f32],
    pub w_stride: usize,
}

/// Products below this many multiply-adds run on the calling thread.
const PARALLEL_WORK: usize = 1 << 16;

impl<'a> Nt<'a> {
    /// `x [m, k]` and `w [n, k]` stored without gaps (`n = w.len() / k`).
    pub fn rows(m: usize, k: usize, x: &'a [f32], w: &'a [f32]) -> Nt<'a> {
        Nt {
            m,
            n: w.len() / k.max(1),
            k,
            x,
            x_stride: k,
            w,
            w_stride: k,
        }
    }

    /// This product's raw operands, with `x` as `with_aligned_rows` gave it.
    #[cfg(target_arch = "x86_64")]
    fn job(
        &self,
        x: &[f32],
        x_stride: usize,
        out: &mut [f32],
        out_stride: usize,
        causal: Causal,
    ) -> Job {
        Job {
            m: self.m,
            n: self.n,
            k: self.k,
            x: x.as_ptr(),
            x_stride,
            w: self.w.as_ptr(),
            w_stride: self.w_stride,
            out: out.as_mut_ptr(),
            out_stride,
            causal,
        }
    }

    fn check(&self, out: &[f32], out_stride: usize) {
        let last = |rows: usize, stride: usize, cols: usize| (rows - 1) * stride + cols;
        if self.m == 0 || self.n == 0 {
            return;
        }
        assert!(self.k == 0 || last(self.m, self.x_stride, self.k) <= self.x.len());
        assert!(self.k == 0 || last(self.n, self.w_stride, self.k) <= self.w.len());
        assert!(last(self.m, out_stride, self.n) <= out.len());
    }

    /// `out[i * out_stride + j] = sum_p x[i, p] w[j, p]`, split over the
    /// thread pool by blocks of `w`'s rows when `parallel` and large enough.
    pub fn run(&self, out: &mut [f32], out_stride: usize, parallel: bool, causal: Causal) {
        self.check(out, out_stride);
        if self.m == 0 || self.n == 0 {
            return;
        }
        if self.k == 0 {
            for i in 0..self.m {
                out[i * out_stride..i * out_stride + self.n].fill(0.0);
            }
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            return self.run_avx512(out, out_stride, parallel, causal);
        }
        self.run_portable(out, out_stride, parallel);
    }

    fn run_portable(&self, out: &mut [f32], out_stride: usize, parallel: bool) {
        let parallelism = if parallel && self.m * self.n * self.k >= PARALLEL_WORK {
            gemm::Parallelism::Rayon(0)
        } else {
            gemm::Parallelism::None
        };
        // SAFETY: `check` keeps every strided access inside its slice.
        unsafe {
            gemm::gemm(
                self.m,
                self.n,
                self.k,
                out.as_mut_ptr(),
                1,
                out_stride as isize,
                false,
                self.x.as_ptr(),
                1,
                self.x_stride as isize,
                self.w.as_ptr(),
                self.w_stride as isize,
                1,
                0.0,
                1.0,
                false,
                false,
                false,
                parallelism,
            );
        }
    }

    #[cfg(target_arch = "x86_64")]
    fn run_avx512(&self, out: &mut [f32], out_stride: usize, parallel: bool, causal: Causal) {
        with_aligned_rows(self.x, self.m, self.k, self.x_stride, |x, x_stride| {
            run_jobs(&[self.job(x, x_stride, out, out_stride, causal)], parallel);
        })
    }
}

/// Several products of one `x [m, k]`: `outs[p] [m, n_p] = x w_p^T` for
/// the `[n_p, k]` weights `ws[p]` (a layer's query, key and value
/// projections; its gate and up projections), their output blocks shared
/// out over the thread pool together.
pub fn products(x: &[f32], m: usize, k: usize, ws: &[&[f32]], outs: &mut [&mut [f32]]) {
    assert_eq!(ws.len(), outs.len(), "one output per weight");
    let parts: Vec<Nt> = ws.iter().map(|w| Nt::rows(m, k, x, w)).collect();
    for (p, out) in parts.iter().zip(outs.iter()) {
        p.check(out, p.n);
    }
    #[cfg(target_arch = "x86_64")]
    if k > 0 && m > 0 && std::arch::is_x86_feature_detected!("avx512f") {
        return with_aligned_rows(x, m, k, k, |xa, x_stride| {
            let jobs: Vec<Job> = parts
                .iter()
                .zip(outs.iter_mut())
                .map(|(p, out)| p.job(xa, x_stride, out, p.n, Causal::None))
                .collect();
            run_jobs(&jobs, true);
        });
    }
    for (p, out) in parts.iter().zip(outs.iter_mut()) {
        p.run(out, p.n, true, Causal::None);
    }
}

/// Run `f` on `x`'s `m` rows of `k` values with each row on a cache line
/// (copied when they are not), so that its loads never straddle two lines;
/// the weights are read where they are (widened weights are aligned, see
/// [`AlignedF32`]).
fn with_aligned_rows<R>(
    x: &[f32],
    m: usize,
    k: usize,
    x_stride: usize,
    f: impl FnOnce(&[f32], usize) -> R,
) -> R {
    if (x.as_ptr() as usize).is_multiple_of(64) && x_stride.is_multiple_of(16) {
        return f(x, x_stride);
    }
    let stride = k.next_multiple_of(16);
    let mut buf = PACKED.with(|p| p.take());
    buf.resize_zeroed(m * stride);
    for i in 0..m {
        buf[i * stride..i * stride + k].copy_from_slice(&x[i * x_stride..i * x_stride + k]);
    }
    let r = f(&buf, stride);
    PACKED.with(|p| p.replace(buf));
    r
}

/// The jobs' output columns in blocks, shared over the thread pool (about 4
/// blocks a thread) when `parallel` and large enough. Blocks after a job's
/// first start on a cache line of its output and are a multiple of 16
/// columns, so that two threads never write the same line of a row whose
/// length is a multiple of 16.
#[cfg(target_arch = "x86_64")]
fn run_jobs(jobs: &[Job], parallel: bool) {
    let threads = rayon::current_num_threads();
    let work: usize = jobs.iter().map(|j| j.m * j.n * j.k).sum();
    let total: usize = jobs.iter().map(|j| j.n).sum();
    let split = parallel && threads > 1 && work >= PARALLEL_WORK;
    let per = total.div_ceil(threads * 4).next_multiple_of(16);
    let mut blocks: Vec<(&Job, usize, usize)> = Vec::new();
    for j in jobs {
        if !split {
            blocks.push((j, 0, j.n));
            continue;
        }
        // Columns before the output's first cache line boundary.
        let lead = (16 - (j.out as usize / 4) % 16) % 16;
        let mut f0 = 0;
        let mut f1 = lead + per;
        while f1 < j.n {
            blocks.push((j, f0, f1));
            (f0, f1) = (f1, f1 + per);
        }
        blocks.push((j, f0, j.n));
    }
    // SAFETY: avx512f was detected by the caller; each job's pointers cover
    // its checked shapes, and blocks write disjoint output columns.
    let run = |&(job, f0, f1): &(&Job, usize, usize)| unsafe { job.block(f0, f1) };
    if blocks.len() > 1 {
        use rayon::prelude::*;
        blocks.par_iter().for_each(run);
    } else {
        blocks.iter().for_each(run);
    }
}

thread_local! {
    /// Where a misaligned `x` is copied, reused across products.
    static PACKED: RefCell<AlignedF32> = RefCell::new(AlignedF32::default());
}

/// One product's raw operands, shared by the threads computing its blocks.
#[derive(Clone, Copy)]
struct Job {
    m: usize,
    n: usize,
    k: usize,
    x: *const f32,
    x_stride: usize,
    w: *const f32,
    w_stride: usize,
    out: *mut f32,
    out_stride: usize,
    causal: Causal,
}

// SAFETY: the pointers are only dereferenced within the shapes `Nt::check`
// verified, and each thread writes its own output columns.
unsafe impl Send for Job {}
unsafe impl Sync for Job {}

/// Most terms per pass over a weight block: a larger `k` is split into
/// equal passes (multiples of 16 terms), each adding to the outputs of the
/// one before.
#[cfg(target_arch = "x86_64")]
const DEPTH_BLOCK: usize = 768;
/// Bytes of weight rows one block keeps in the L1 cache.
#[cfg(target_arch = "x86_64")]
const BLOCK_BYTES: usize = 32 << 10;

#[cfg(target_arch = "x86_64")]
impl Job {
    /// Outputs `f0..f1` of every row.
    #[target_feature(enable = "avx512f")]
    unsafe fn block(&self, f0: usize, f1: usize) {
        let passes = self.k.div_ceil(DEPTH_BLOCK);
        let kc_max = self.k.div_ceil(passes).next_multiple_of(16);
        let mut kb = 0;
        while kb < self.k {
            let kc = kc_max.min(self.k - kb);
            let nb = (BLOCK_BYTES / 4 / kc).max(4) / 4 * 4;
            let mut fg = f0;
            while fg < f1 {
                let fe = (fg + nb).min(f1);
                // The next block's weight rows are fetched into the L2 cache
                // while this block computes, a share at each row step, so that
                // weights streamed from memory do not stall the kernel.
                let next = fe..(fe + nb).min(f1);
                let lines_per_row = kc.div_ceil(16);
                let lines = next.len() * lines_per_row;
                let per_step = lines.div_ceil(self.m.div_ceil(4)).max(1);
                let mut fetched = 0;
                let mut i = 0;
                while i < self.m {
                    let mr = (self.m - i).min(4);
                    let until = (fetched + per_step).min(lines);
                    for line in fetched..until {
                        let row = next.start + line / lines_per_row;
                        let at = self
                            .w
                            .add(row * self.w_stride + kb + (line % lines_per_row) * 16);
                        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(
                            at.cast::<i8>(),
                        );
                    }
                    fetched = until;
                    // The last row of the block decides what it computes.
                    let (j_end, terms) = match self.causal {
                        Causal::None => (fe, kc),
                        Causal::Outputs { first } => (fe.min(first + i + mr), kc),
                        Causal::Terms { first } => {
                            (fe, kc.min((first + i + mr).saturating_sub(kb)))
                        }
                    };
                    let mut j = fg;
                    while j < j_end {
                        let nr = (j_end - j).min(4);
                        let x = self.x.add(i * self.x_stride + kb);
                        let w = self.w.add(j * self.w_stride + kb);
                        let out = self.out.add(i * self.out_stride + j);
                        let tile = Tile {
                            x,
                            x_stride: self.x_stride,
                            w,
                            w_stride: self.w_stride,
                            k: terms,
                            out,
                            out_stride: self.out_stride,
                            add: kb > 0,
                        };
                        match (mr, nr) {
                            (4, 4) => tile.kernel::<4, 4>(),
                            (4, 3) => tile.kernel::<4, 3>(),
                            (4, 2) => tile.kernel::<4, 2>(),
                            (4, _) => tile.kernel::<4, 1>(),
                            (3, 4) => tile.kernel::<3, 4>(),
                            (3, 3) => tile.kernel::<3, 3>(),
                            (3, 2) => tile.kernel::<3, 2>(),
                            (3, _) => tile.kernel::<3, 1>(),
                            (2, 4) => tile.kernel::<2, 4>(),
                            (2, 3) => tile.kernel::<2, 3>(),
                            (2, 2) => tile.kernel::<2, 2>(),
                            (2, _) => tile.kernel::<2, 1>(),
                            (_, 4) => tile.kernel::<1, 4>(),
                            (_, 3) => tile.kernel::<1, 3>(),
                            (_, 2) => tile.kernel::<1, 2>(),
                            _ => tile.kernel::<1, 1>(),
                        }
                        j += nr;
                    }
                    i += mr;
                }
                fg = fe;
            }
            kb += kc;
        }
    }
}

/// Up to 4 rows of `x` against up to 4 rows of `w` over `k` terms.
#[cfg(target_arch = "x86_64")]
struct Tile {
    x: *const f32,
    x_stride: usize,
    w: *const f32,
    w_stride: usize,
    k: usize,
    out: *mut f32,
    out_stride: usize,
    /// Add to the outputs (a later depth block) instead of writing them.
    add: bool,
}

#[cfg(target_arch = "x86_64")]
impl Tile {
    /// `out[i, j] (+)= sum_p x[i, p] w[j, p]` for `i < MR`, `j < NR`.
    /// Accumulator `4 i + j` holds lanes `p mod 16` of output `(i, j)`;
    /// lanes past `k` are loaded as zeros, and unused accumulators stay zero.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn kernel<const MR: usize, const NR: usize>(&self) {
        use std::arch::x86_64::*;
        let mut acc = [_mm512_setzero_ps(); 16];
        let steps = self.k / 16;
        let step = |acc: &mut [__m512; 16], p: usize, mask: __mmask16| {
            let mut xv = [_mm512_setzero_ps(); MR];
            for (i, v) in xv.iter_mut().enumerate() {
                *v = _mm512_maskz_loadu_ps(mask, self.x.add(i * self.x_stride + p));
            }
            for j in 0..NR {
                let wv = _mm512_maskz_loadu_ps(mask, self.w.add(j * self.w_stride + p));
                for (i, &v) in xv.iter().enumerate() {
                    acc[i * 4 + j] = _mm512_fmadd_ps(v, wv, acc[i * 4 + j]);
                }
            }
        };
        for s in 0..steps {
            step(&mut acc, s * 16, 0xffff);
        }
        let rest = self.k - steps * 16;
        if rest > 0 {
            step(&mut acc, steps * 16, ((1u32 << rest) - 1) as __mmask16);
        }
        // The reduction tree: after it, lane r is the sum of accumulator r.
        // Pairs of accumulators, then pairs of those, by 32-bit, 64-bit and
        // 128-bit interleaves; every output goes through the same adds.
        let mut pairs = [_mm512_setzero_ps(); 8];
        for (q, c) in pairs.iter_mut().enumerate() {
            let (a, b) = (acc[2 * q], acc[2 * q + 1]);
            *c = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
        }
        let mut quads = [_mm512_setzero_ps(); 4];
        for (q, e) in quads.iter_mut().enumerate() {
            let (a, b) = (
                _mm512_castps_pd(pairs[2 * q]),
                _mm512_castps_pd(pairs[2 * q + 1]),
            );
            *e = _mm512_add_ps(
                _mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
                _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)),
            );
        }
        let half = |a: __m512, b: __m512| {
            _mm512_add_ps(
                _mm512_shuffle_f32x4::<0b10_00_10_00>(a, b),
                _mm512_shuffle_f32x4::<0b11_01_11_01>(a, b),
            )
        };
        let sums = half(half(quads[0], quads[1]), half(quads[2], quads[3]));
        let mut lanes = [0f32; 16];
        _mm512_storeu_ps(lanes.as_mut_ptr(), sums);
        for i in 0..MR {
            let row = self.out.add(i * self.out_stride);
            for j in 0..NR {
                let v = lanes[i * 4 + j];
                if self.add {
                    *row.add(j) += v;
                } else {
                    *row.add(j) = v;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(len: usize, seed: usize) -> Vec<f32> {
        (0..len)
            .map(|i| ((i * 7919 + seed * 104_729) % 2003) as f32 / 2003.0 - 0.5)
            .collect()
    }

    /// The product in f64, the reference every path is held to.
    fn reference(p: &Nt) -> Vec<f64> {
        let mut out = vec![0f64; p.m * p.n];
        for i in 0..p.m {
            for j in 0..p.n {
                out[i * p.n + j] = (0..p.k)
                    .map(|q| p.x[i * p.x_stride + q] as f64 * p.w[j * p.w_stride + q] as f64)
                    .sum();
            }
        }
        out
    }

    /// Every tail of rows, outputs and terms, strided operands, a misaligned
    /// `x`, depth blocks and the thread split, against the f64 product:
    /// within 1e-6 of the sum of absolute terms (f32 rounding of k terms).
    #[test]
    fn products_match_f64() {
        for (m, n, k, xs, ws) in [
            (1, 1, 1, 1, 1),
            (3, 5, 17, 17, 17),
            (7, 9, 64, 80, 70),
            (5, 13, 33, 40, 33),
            (9, 203, 576, 576, 576),
            (2, 6, 1600, 1600, 1601),
            (33, 70, 2100, 2100, 2100),
        ] {
            let xb = values(m * xs + 1, 1);
            let x = &xb[1..]; // not on a cache line
            let w = values(n * ws, 2);
            let p = Nt {
                m,
                n,
                k,
                x,
                x_stride: xs,
                w: &w,
                w_stride: ws,
            };
            let want = reference(&p);
            for parallel in [false, true] {
                let mut out = vec![f32::NAN; m * n];
                p.run(&mut out, n, parallel, Causal::None);
                for (o, r) in out.iter().zip(&want) {
                    assert!(
                        (*o as f64 - r).abs() <= 1e-6 * k as f64,
                        "{m}x{n}x{k}: {o} against {r}"
                    );
                }
            }
        }
    }

    /// An output is the same bits whatever else is computed with it: one row
    /// alone equals that row in a batch, a tile of weight rows equals those
    /// columns of the whole, threads or not.
    #[test]
    fn outputs_do_not_depend_on_their_neighbours() {
        let (m, n, k) = (11, 37, 700);
        let x = values(m * k, 3);
        let w = values(n * k, 4);
        let whole = |m: usize, x: &[f32], w: &[f32], n: usize, parallel: bool| {
            let mut out = vec![0f32; m * n];
            Nt::rows(m, k, x, w).run(&mut out, n, parallel, Causal::None);
            out
        };
        let all = whole(m, &x, &w, n, true);
        assert_eq!(all, whole(m, &x, &w, n, false));
        for i in 0..m {
            let row = whole(1, &x[i * k..(i + 1) * k], &w, n, false);
            assert_eq!(row, &all[i * n..(i + 1) * n], "row {i}");
        }
        let cols = whole(m, &x, &w[5 * k..12 * k], 7, false);
        for i in 0..m {
            assert_eq!(&cols[i * 7..(i + 1) * 7], &all[i * n + 5..i * n + 12]);
        }
    }

    /// The causal forms compute exactly what the full product does where
    /// they are asked to: scores up to each row's position, and weighted
    /// sums whose later terms are zero.
    #[test]
    fn causal_forms_equal_the_full_product() {
        let (t, s, d) = (10, 13, 40); // 10 rows at positions 3..13
        let first = s - t;
        let q = values(t * d, 5);
        let keys = values(s * d, 6);
        let nt = Nt::rows(t, d, &q, &keys);
        let mut full = vec![0f32; t * s];
        nt.run(&mut full, s, false, Causal::None);
        let mut causal = vec![f32::NAN; t * s];
        nt.run(&mut causal, s, false, Causal::Outputs { first });
        for i in 0..t {
            assert_eq!(
                &causal[i * s..i * s + first + i + 1],
                &full[i * s..i * s + first + i + 1]
            );
        }
        let mut weights = values(t * s, 7);
        for i in 0..t {
            weights[i * s + first + i + 1..(i + 1) * s].fill(0.0);
        }
        let vt = values(d * s, 8);
        let pv = Nt::rows(t, s, &weights, &vt);
        let mut full = vec![0f32; t * d];
        pv.run(&mut full, d, false, Causal::None);
        let mut causal = vec![0f32; t * d];
        pv.run(&mut causal, d, false, Causal::Terms { first });
        assert_eq!(causal, full);
    }
}
