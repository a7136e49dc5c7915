//! The packed-panel layout in which a weight kept widened is held
//! (docs/DESIGN.md section 10): panels of 48 output columns, each `k`
//! (rounded up to 16) rows of 48 values, in cache-line-aligned memory. The
//! forward's products (`forward::gemm`) read weights in this
//! layout, and pack the rows of weights not kept into it as they use them;
//! [`super::matrix`] keeps weights in it and reads rows back from it.
//!
//! On a CPU with AVX-512 a panel is packed with 16 x 16 transposes in
//! registers ([`transpose16`]); elsewhere value by value, to the same bits.

/// One 64-byte cache line of values.
#[derive(Clone, Copy, Default)]
#[repr(C, align(64))]
struct Line([f32; 16]);

/// f32 values that start on a cache line, so that the forward's 16-wide
/// loads of widened weights never straddle two lines
/// (`forward::gemm`).
#[derive(Clone, Default)]
pub struct AlignedF32 {
    lines: Vec<Line>,
    len: usize,
}

impl AlignedF32 {
    pub fn zeroed(len: usize) -> AlignedF32 {
        AlignedF32 {
            lines: vec![Line::default(); len.div_ceil(16)],
            len,
        }
    }

    /// Make it `len` values long; values kept are unchanged, new ones zero.
    pub fn resize_zeroed(&mut self, len: usize) {
        self.lines.resize(len.div_ceil(16), Line::default());
        if len > self.len {
            let old = self.len;
            self.len = len;
            self[old..].fill(0.0);
        }
        self.len = len;
    }
}

impl std::ops::Deref for AlignedF32 {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        // SAFETY: `lines` holds at least `len` contiguous f32 values.
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr().cast::<f32>(), self.len) }
    }
}

impl std::ops::DerefMut for AlignedF32 {
    fn deref_mut(&mut self) -> &mut [f32] {
        // SAFETY: as in `deref`, borrowed mutably through `self`.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr().cast::<f32>(), self.len) }
    }
}

/// Output columns of a packed panel: three 16-lane vectors.
pub const PANEL_COLS: usize = 48;

/// Values in the packed panels of a weight `[n, k]`: `n / 48` panels
/// (rounded up) of `k` rounded up to 16 rows of 48.
pub fn panels_len(n: usize, k: usize) -> usize {
    panel_at(n.next_multiple_of(PANEL_COLS), k)
}

/// Where the packed panel holding weight row (output column) `j` starts,
/// for a weight of `k` terms ([`pack_panels`]); column `j` is at
/// `panel_at(j, k) + p * 48 + j % 48`.
pub fn panel_at(j: usize, k: usize) -> usize {
    j / PANEL_COLS * k.next_multiple_of(16) * PANEL_COLS
}

/// The rows of `w [n, k]` packed as the kernel reads them: panel `q` (rows
/// `48 q .. 48 q + 48`) holds `w[48 q + c, p]` at `p * 48 + c`, panels `k`
/// rounded up to 16 rows apart; rows past `n` and terms past `k` are zero.
/// A weight kept widened is kept this way, so that its products pack
/// nothing.
pub fn pack_panels(w: &[f32], n: usize, k: usize, out: &mut [f32]) {
    assert_eq!(w.len(), n * k, "weight rows do not match their shape");
    assert_eq!(out.len(), panels_len(n, k), "panels of the wrong size");
    let kp = k.next_multiple_of(16);
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        for (q, panel) in out.chunks_exact_mut(kp * PANEL_COLS).enumerate() {
            let j0 = q * PANEL_COLS;
            // SAFETY: avx512f was just detected; `pack` reads rows
            // j0..j0 + nr of `w` and writes kp rows of 48 into `panel`.
            unsafe {
                pack(
                    w.as_ptr().add(j0 * k),
                    k,
                    (n - j0).min(PANEL_COLS),
                    k,
                    panel.as_mut_ptr(),
                )
            };
        }
        return;
    }
    out.fill(0.0);
    for (j, row) in w.chunks_exact(k.max(1)).enumerate().take(n) {
        let panel = (j / PANEL_COLS) * kp * PANEL_COLS;
        for (p, &v) in row.iter().enumerate() {
            out[panel + p * PANEL_COLS + j % PANEL_COLS] = v;
        }
    }
}

/// The mask of the first `left` of 16 lanes (all of them past 16).
#[cfg(target_arch = "x86_64")]
#[inline]
pub(crate) fn lanes(left: usize) -> u16 {
    if left >= 16 {
        0xffff
    } else {
        ((1u32 << left) - 1) as u16
    }
}

/// `panel[p * 48 + j] = w[j * w_stride + p]` for `j < nr`, `p < k`
/// (columns `nr..48` become zero, rows up to `k` rounded up to 16 are
/// written with anything), 16 x 16 blocks transposed in registers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn pack(w: *const f32, w_stride: usize, nr: usize, k: usize, panel: *mut f32) {
    use std::arch::x86_64::*;
    for j0 in (0..PANEL_COLS).step_by(16) {
        let rows = nr.saturating_sub(j0).min(16);
        let mut p0 = 0;
        while p0 < k {
            let cols = lanes(k - p0);
            let mut r = [_mm512_setzero_ps(); 16];
            for (q, v) in r.iter_mut().enumerate() {
                let mask = if q < rows { cols } else { 0 };
                // Rows past `nr` are not read (their mask is empty).
                let at = w.wrapping_add((j0 + q) * w_stride + p0);
                *v = _mm512_maskz_loadu_ps(mask, at);
            }
            for (q, v) in transpose16(r).into_iter().enumerate() {
                _mm512_storeu_ps(panel.add((p0 + q) * PANEL_COLS + j0), v);
            }
            p0 += 16;
        }
    }
}

/// The transpose of 16 vectors of 16: lane `l` of output `c` is lane `c`
/// of input `l`.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
pub(crate) fn transpose16(r: [std::arch::x86_64::__m512; 16]) -> [std::arch::x86_64::__m512; 16] {
    use std::arch::x86_64::*;
    let z = _mm512_setzero_ps();
    // 32-bit interleaves of row pairs, then 64-bit interleaves of those: in
    // each 128-bit lane `L`, u[4q + c] holds column `4L + c` of rows 4q..4q+4.
    let mut t = [z; 16];
    for q in 0..8 {
        t[2 * q] = _mm512_unpacklo_ps(r[2 * q], r[2 * q + 1]);
        t[2 * q + 1] = _mm512_unpackhi_ps(r[2 * q], r[2 * q + 1]);
    }
    let mut u = [z; 16];
    let pd = _mm512_castps_pd;
    let ps = _mm512_castpd_ps;
    for q in 0..4 {
        let (a, b, c, d) = (t[4 * q], t[4 * q + 1], t[4 * q + 2], t[4 * q + 3]);
        u[4 * q] = ps(_mm512_unpacklo_pd(pd(a), pd(c)));
        u[4 * q + 1] = ps(_mm512_unpackhi_pd(pd(a), pd(c)));
        u[4 * q + 2] = ps(_mm512_unpacklo_pd(pd(b), pd(d)));
        u[4 * q + 3] = ps(_mm512_unpackhi_pd(pd(b), pd(d)));
    }
    // 128-bit lanes: even and odd lanes of row groups (0, 1) and (2, 3),
    // then of those.
    let even = |a, b| _mm512_shuffle_f32x4::<0b10_00_10_00>(a, b);
    let odd = |a, b| _mm512_shuffle_f32x4::<0b11_01_11_01>(a, b);
    let mut out = [z; 16];
    for c in 0..4 {
        let (va, vb) = (even(u[c], u[4 + c]), odd(u[c], u[4 + c]));
        let (wa, wb) = (even(u[8 + c], u[12 + c]), odd(u[8 + c], u[12 + c]));
        out[c] = even(va, wa);
        out[8 + c] = odd(va, wa);
        out[4 + c] = even(vb, wb);
        out[12 + c] = odd(vb, wb);
    }
    out
}
