//! The products of the reference forward, in two shapes: `out = x w^T`
//! ([`Nt`]), where `x [m, k]` and `w [n, k]` are both read along the shared
//! dimension `k` (a linear layer's input rows against its weight rows, stored
//! `[out_features, in_features]`), and `out = x b` ([`Nn`]) for `b [k, n]`
//! (a query head against the transposed keys, the attention weights against
//! the values).
//!
//! On a CPU with AVX-512 one kernel computes both: 8 rows of `x` against a
//! panel of 48 output columns (three 16-lane vectors), one term per step:
//! each row's `x` value is broadcast and multiplied into the panel's three
//! vectors, 24 accumulators in registers (docs/DESIGN.md section 10). `x` is
//! first packed term by term in blocks of 8 rows ([`pack_rows`]), so that a
//! step reads its 8 values from one place. The
//! panel of `b` is read where it is; a weight kept widened is kept packed
//! into panels ([`pack_panels`](crate::model::panels::pack_panels)); other rows of `w` are transposed into a
//! panel (`k x 48`) as they are used, which every row of `x` then passes. Each output is
//! one chain of fused multiply-adds over `p = 0, 1, ..., k - 1` from zero:
//! its arithmetic depends only on its own row and column, never on `m`, on
//! which outputs share a kernel call, a panel or a thread, or on the tile of
//! weight rows it is in. One token's logits are the same bits in a batch of
//! 256 and alone in a decode step. Elsewhere the `gemm` crate computes the
//! same products.

#[cfg(target_arch = "x86_64")]
use std::cell::RefCell;
use std::mem::MaybeUninit;

#[cfg(target_arch = "x86_64")]
use crate::model::panels::{lanes, pack, transpose16, AlignedF32};
use crate::model::panels::{panel_at, panels_len, PANEL_COLS};

/// Causal structure of a product whose rows are consecutive positions
/// `first, first + 1, ...` (attention): what row `i` needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Causal {
    /// Every output, every term.
    None,
    /// Row `i` needs only outputs `j <= first + i` (scores against keys);
    /// the others may be left unwritten.
    Outputs { first: usize },
    /// Row `i`'s terms `p > first + i` are zero (attention weights against
    /// values) and are skipped.
    Terms { first: usize },
}

/// `x [m, k]` read with a row stride, and `w [n, k]` the same way:
/// `out = x w^T`.
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

/// `x [m, k]` read with a row stride, and `b [k, n]` the same way:
/// `out = x b`.
#[derive(Debug, Clone, Copy)]
pub struct Nn<'a> {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub x: &'a [f32],
    pub x_stride: usize,
    pub b: &'a [f32],
    pub b_stride: usize,
}

/// Products below this many multiply-adds run on the calling thread.
const PARALLEL_WORK: usize = 1 << 16;

/// The last index read of `rows` rows of `cols` values `stride` apart, plus one.
fn extent(rows: usize, stride: usize, cols: usize) -> usize {
    (rows - 1) * stride + cols
}

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

    fn check(&self, out_len: usize, out_stride: usize) {
        if self.m == 0 || self.n == 0 {
            return;
        }
        assert!(self.k == 0 || extent(self.m, self.x_stride, self.k) <= self.x.len());
        assert!(self.k == 0 || extent(self.n, self.w_stride, self.k) <= self.w.len());
        assert!(extent(self.m, out_stride, self.n) <= out_len);
    }

    fn job(&self, out: *mut f32, out_stride: usize, causal: Causal) -> Job<'a> {
        Job {
            m: self.m,
            n: self.n,
            k: self.k,
            x: self.x.as_ptr(),
            x_stride: self.x_stride,
            w: self.w.as_ptr(),
            w_stride: self.w_stride,
            layout: Layout::Rows,
            out,
            out_stride,
            causal,
        }
    }

    /// `out[i * out_stride + j] = sum_p x[i, p] w[j, p]`, split over the
    /// thread pool by blocks of `w`'s rows when `parallel` and large enough.
    pub fn run(&self, out: &mut [f32], out_stride: usize, parallel: bool, causal: Causal) {
        self.check(out.len(), out_stride);
        let job = self.job(out.as_mut_ptr(), out_stride, causal);
        // SAFETY: `check` keeps every strided access inside its slice.
        unsafe { job.run(parallel) }
    }

    /// [`Nt::run`] (every output) into memory not yet written: each
    /// `out[i * out_stride + j]`, `i < m`, `j < n`, is written.
    pub fn run_uninit(&self, out: &mut [MaybeUninit<f32>], out_stride: usize, parallel: bool) {
        self.check(out.len(), out_stride);
        let job = self.job(out.as_mut_ptr().cast(), out_stride, Causal::None);
        // SAFETY: as in `run`; the kernels only write the outputs.
        unsafe { job.run(parallel) }
    }
}

impl<'a> Nn<'a> {
    fn check(&self, out_len: usize, out_stride: usize) {
        if self.m == 0 || self.n == 0 {
            return;
        }
        assert!(self.k == 0 || extent(self.m, self.x_stride, self.k) <= self.x.len());
        assert!(self.k == 0 || extent(self.k, self.b_stride, self.n) <= self.b.len());
        assert!(extent(self.m, out_stride, self.n) <= out_len);
    }

    /// `out[i * out_stride + j] = sum_p x[i, p] b[p, j]`, split over the
    /// thread pool by blocks of `b`'s columns when `parallel` and large enough.
    pub fn run(&self, out: &mut [f32], out_stride: usize, parallel: bool, causal: Causal) {
        self.check(out.len(), out_stride);
        let job = Job {
            m: self.m,
            n: self.n,
            k: self.k,
            x: self.x.as_ptr(),
            x_stride: self.x_stride,
            w: self.b.as_ptr(),
            w_stride: self.b_stride,
            layout: Layout::Cols,
            out: out.as_mut_ptr(),
            out_stride,
            causal,
        };
        // SAFETY: `check` keeps every strided access inside its slice.
        unsafe { job.run(parallel) }
    }
}

/// A weight `[n, k]` for [`products`]: its rows as stored, packed into
/// panels by [`pack_panels`](crate::model::panels::pack_panels), or widened
/// from another form as its products use them.
#[derive(Clone, Copy)]
pub enum Weight<'a> {
    Rows(&'a [f32]),
    Panels { values: &'a [f32], n: usize },
    Widened { rows: &'a dyn WidenRows, n: usize },
}

/// A weight `[n, k]` held in another form than f32 (a checkpoint's stored
/// blocks, 4-bit codes), widened a panel of 48 rows at a time by the thread
/// that computes that panel's products, into a buffer of its own, right
/// before them. The values are the ones the whole matrix would widen to, so
/// each output is the same chain of multiply-adds as from f32 rows: the
/// same bits.
pub trait WidenRows: Sync {
    /// Rows `rows` as f32 into `out` (`rows.len() * k` values), on the
    /// calling thread.
    fn widen_rows(&self, rows: std::ops::Range<usize>, out: &mut [f32]);
}

/// Several products of one `x [m, k]`: `outs[p] [m, n_p] = x w_p^T` for
/// the weights `ws[p]` (a layer's query, key and value projections; its
/// gate and up projections), their output blocks shared out over the thread
/// pool together. Every output is written.
pub fn products(
    x: &[f32],
    m: usize,
    k: usize,
    ws: &[Weight],
    outs: &mut [&mut [MaybeUninit<f32>]],
) {
    assert_eq!(ws.len(), outs.len(), "one output per weight");
    let jobs: Vec<Job> = ws
        .iter()
        .zip(outs.iter_mut())
        .map(|(w, out)| match *w {
            Weight::Rows(w) => {
                let p = Nt::rows(m, k, x, w);
                p.check(out.len(), p.n);
                p.job(out.as_mut_ptr().cast(), p.n, Causal::None)
            }
            Weight::Panels { values, n } => {
                assert!(m * n <= out.len(), "product output too short");
                assert!(
                    k == 0 || extent(m, k, k) <= x.len(),
                    "product input too short"
                );
                assert!(values.len() >= panels_len(n, k), "panels too short");
                Job {
                    m,
                    n,
                    k,
                    x: x.as_ptr(),
                    x_stride: k,
                    w: values.as_ptr(),
                    w_stride: PANEL_COLS,
                    layout: Layout::Panels,
                    out: out.as_mut_ptr().cast(),
                    out_stride: n,
                    causal: Causal::None,
                }
            }
            Weight::Widened { rows, n } => {
                assert!(m * n <= out.len(), "product output too short");
                assert!(
                    k == 0 || extent(m, k, k) <= x.len(),
                    "product input too short"
                );
                Job {
                    m,
                    n,
                    k,
                    x: x.as_ptr(),
                    x_stride: k,
                    w: std::ptr::null(),
                    w_stride: k,
                    layout: Layout::Widened(rows),
                    out: out.as_mut_ptr().cast(),
                    out_stride: n,
                    causal: Causal::None,
                }
            }
        })
        .collect();
    #[cfg(target_arch = "x86_64")]
    if k > 0 && m > 0 && std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: avx512f was just detected; every shape was checked.
        return unsafe { run_jobs(&jobs, true) };
    }
    for job in &jobs {
        // SAFETY: every shape was checked.
        unsafe { job.run(true) };
    }
}

/// `dst[c * dst_stride + r] = src[r * src_stride + c]` for `r < rows`,
/// `c < cols` (the keys of attention into `[head_dim, S]`); 16 x 16 blocks
/// in registers on a CPU with AVX-512.
pub fn transpose(
    src: &[f32],
    src_stride: usize,
    rows: usize,
    cols: usize,
    dst: &mut [f32],
    dst_stride: usize,
) {
    if rows == 0 || cols == 0 {
        return;
    }
    assert!(
        extent(rows, src_stride, cols) <= src.len(),
        "transpose source too short"
    );
    assert!(
        extent(cols, dst_stride, rows) <= dst.len(),
        "transpose target too short"
    );
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: avx512f was just detected; the asserts cover every access.
        return unsafe { transpose_avx512(src, src_stride, rows, cols, dst, dst_stride) };
    }
    for r in 0..rows {
        for c in 0..cols {
            dst[c * dst_stride + r] = src[r * src_stride + c];
        }
    }
}

/// [`transpose`] by 16 x 16 blocks, the edges masked.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn transpose_avx512(
    src: &[f32],
    src_stride: usize,
    rows: usize,
    cols: usize,
    dst: &mut [f32],
    dst_stride: usize,
) {
    use std::arch::x86_64::*;
    for r0 in (0..rows).step_by(16) {
        let rr = (rows - r0).min(16);
        for c0 in (0..cols).step_by(16) {
            let cc = (cols - c0).min(16);
            let mut v = [_mm512_setzero_ps(); 16];
            for (q, v) in v.iter_mut().enumerate() {
                let mask = if q < rr { lanes(cc) } else { 0 };
                // Rows past `rr` are not read (their mask is empty).
                let at = src.as_ptr().wrapping_add((r0 + q) * src_stride + c0);
                *v = _mm512_maskz_loadu_ps(mask, at);
            }
            for (q, t) in transpose16(v).into_iter().enumerate().take(cc) {
                let at = dst.as_mut_ptr().add((c0 + q) * dst_stride + r0);
                _mm512_mask_storeu_ps(at, lanes(rr), t);
            }
        }
    }
}

/// How a product's second operand is stored.
#[derive(Clone, Copy)]
enum Layout<'a> {
    /// `w [n, k]`, rows `w_stride` apart: packed into panels as it is used.
    Rows,
    /// `b [k, n]`, rows `w_stride` apart: read in place.
    Cols,
    /// Packed panels ([`pack_panels`](crate::model::panels::pack_panels)).
    Panels,
    /// `[n, k]` rows widened by their [`WidenRows`] as they are used, then
    /// packed as [`Layout::Rows`] are (`w` is unused).
    Widened(&'a dyn WidenRows),
}

/// One product's raw operands, shared by the threads computing its blocks.
#[derive(Clone, Copy)]
struct Job<'a> {
    m: usize,
    n: usize,
    k: usize,
    x: *const f32,
    x_stride: usize,
    w: *const f32,
    w_stride: usize,
    layout: Layout<'a>,
    out: *mut f32,
    out_stride: usize,
    causal: Causal,
}

// SAFETY: the pointers are only dereferenced within the shapes `check`
// verified, and each thread writes its own output columns.
unsafe impl Send for Job<'_> {}
unsafe impl Sync for Job<'_> {}

impl Job<'_> {
    /// Columns before the output's first cache line boundary, where a split
    /// over threads starts its second block (packed panels split at their
    /// own edges instead).
    #[cfg(target_arch = "x86_64")]
    fn lead(&self) -> usize {
        if matches!(self.layout, Layout::Panels) {
            0
        } else {
            (16 - (self.out as usize / 4) % 16) % 16
        }
    }

    /// # Safety
    /// The operands must cover the job's shapes.
    unsafe fn run(&self, parallel: bool) {
        if self.m == 0 || self.n == 0 {
            return;
        }
        if self.k == 0 {
            for i in 0..self.m {
                std::ptr::write_bytes(self.out.add(i * self.out_stride), 0, self.n);
            }
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            return run_jobs(std::slice::from_ref(self), parallel);
        }
        self.run_portable(parallel);
    }

    /// # Safety
    /// As for [`Job::run`].
    unsafe fn run_portable(&self, parallel: bool) {
        let parallelism = if parallel && self.m * self.n * self.k >= PARALLEL_WORK {
            gemm::Parallelism::Rayon(0)
        } else {
            gemm::Parallelism::None
        };
        if let Layout::Widened(source) = self.layout {
            // Tiles of whole panels' rows (about 4 MiB), each widened and
            // then multiplied as rows.
            let per_tile = ((1 << 20) / self.k / PANEL_COLS).max(1) * PANEL_COLS;
            let mut rows = vec![0f32; per_tile.min(self.n) * self.k];
            for j0 in (0..self.n).step_by(per_tile) {
                let j1 = (j0 + per_tile).min(self.n);
                let tile = &mut rows[..(j1 - j0) * self.k];
                source.widen_rows(j0..j1, tile);
                let job = Job {
                    n: j1 - j0,
                    w: tile.as_ptr(),
                    layout: Layout::Rows,
                    out: self.out.add(j0),
                    ..*self
                };
                job.run_portable(parallel);
            }
            return;
        }
        // The right-hand side `[k, n]` of each part: its columns, where it
        // starts, its strides (column, row).
        let parts: Vec<(std::ops::Range<usize>, *const f32, isize, isize)> = match self.layout {
            Layout::Rows => vec![(0..self.n, self.w, self.w_stride as isize, 1)],
            Layout::Widened(_) => unreachable!("widened above"),
            Layout::Cols => vec![(0..self.n, self.w, 1, self.w_stride as isize)],
            Layout::Panels => (0..self.n)
                .step_by(PANEL_COLS)
                .map(|j0| {
                    let panel = self.w.add(panel_at(j0, self.k));
                    (
                        j0..(j0 + PANEL_COLS).min(self.n),
                        panel,
                        1,
                        PANEL_COLS as isize,
                    )
                })
                .collect(),
        };
        for (cols, rhs, rhs_cs, rhs_rs) in parts {
            gemm::gemm(
                self.m,
                cols.len(),
                self.k,
                self.out.add(cols.start),
                1,
                self.out_stride as isize,
                false,
                self.x,
                1,
                self.x_stride as isize,
                rhs,
                rhs_cs,
                rhs_rs,
                0.0,
                1.0,
                false,
                false,
                false,
                parallelism,
            );
        }
    }
}

/// Output columns per panel: three vectors of 16.
#[cfg(target_arch = "x86_64")]
const NR: usize = PANEL_COLS;
/// Rows of `x` per kernel call.
#[cfg(target_arch = "x86_64")]
const MR: usize = 8;
/// Terms ahead of the one in use that the kernel fetches into L1.
#[cfg(target_arch = "x86_64")]
const PREFETCH_TERMS: usize = 8;
/// Terms of a weight panel per pass over the rows of `x`.
#[cfg(target_arch = "x86_64")]
const KC: usize = 2048;

/// The jobs' output columns in blocks, shared over the thread pool (about 8
/// blocks a thread) when `parallel` and large enough. Blocks after a job's
/// first start on a cache line of its output and are a multiple of 48
/// columns, so that two threads never write the same line of a row whose
/// length is a multiple of 16, and panels stay whole.
///
/// # Safety
/// avx512f must be present; each job's pointers must cover its shapes.
#[cfg(target_arch = "x86_64")]
unsafe fn run_jobs(jobs: &[Job<'_>], parallel: bool) {
    let threads = rayon::current_num_threads();
    let work: usize = jobs.iter().map(|j| j.m * j.n * j.k).sum();
    let total: usize = jobs.iter().map(|j| j.n).sum();
    let split = parallel && threads > 1 && work >= PARALLEL_WORK;
    let per = total.div_ceil(threads * 8).next_multiple_of(NR);
    // Each distinct `x` packed once ([`pack_rows`]), shared by the jobs
    // that read it (a layer's projections of one input).
    let mut packed = PACKED_X.with(|p| p.take());
    let mut inputs: Vec<(*const f32, usize, usize, usize)> = Vec::new();
    let mut which = Vec::with_capacity(jobs.len());
    for j in jobs {
        let key = (j.x, j.x_stride, j.m, j.k);
        which.push(match inputs.iter().position(|&i| i == key) {
            Some(at) => at,
            None => {
                inputs.push(key);
                inputs.len() - 1
            }
        });
    }
    if packed.len() < inputs.len() {
        packed.resize_with(inputs.len(), AlignedF32::default);
    }
    for (&(x, x_stride, m, k), buf) in inputs.iter().zip(packed.iter_mut()) {
        let len = packed_len(m, k);
        if buf.len() < len {
            buf.resize_zeroed(len);
        }
        pack_rows(x, x_stride, m, k, &mut buf[..len], split);
    }
    // Each block: its job, its output columns, where its packed `x` starts.
    let mut blocks: Vec<(&Job<'_>, usize, usize, usize)> = Vec::new();
    for (j, &at) in jobs.iter().zip(&which) {
        let xp = packed[at].as_ptr() as usize;
        if !split {
            blocks.push((j, 0, j.n, xp));
            continue;
        }
        let mut f0 = 0;
        let mut f1 = j.lead() + per;
        while f1 < j.n {
            blocks.push((j, f0, f1, xp));
            (f0, f1) = (f1, f1 + per);
        }
        blocks.push((j, f0, j.n, xp));
    }
    // SAFETY: as the caller promised; blocks write disjoint output columns;
    // each packed `x` holds its job's `m` rows of `k` terms.
    let run = |&(job, f0, f1, xp): &(&Job<'_>, usize, usize, usize)| unsafe {
        let xp = xp as *const f32;
        // The first block's leading columns form a narrow panel of their
        // own, so that the rest fall on whole panels after a cache line.
        let lead = if f0 == 0 && split { job.lead() } else { 0 };
        if lead > 0 && lead < f1 {
            job.block(0, lead, xp);
            job.block(lead, f1, xp);
        } else {
            job.block(f0, f1, xp);
        }
    };
    if blocks.len() > 1 {
        use rayon::prelude::*;
        blocks.par_iter().for_each(run);
    } else {
        blocks.iter().for_each(run);
    }
    PACKED_X.with(|p| p.replace(packed));
}

/// Values of `x [m, k]` packed by [`pack_rows`]: `m` rounded up to [`MR`]
/// rows of `k` terms.
#[cfg(target_arch = "x86_64")]
fn packed_len(m: usize, k: usize) -> usize {
    m.next_multiple_of(MR) * k
}

/// `x [m, k]` (rows `x_stride` apart) in blocks of [`MR`] rows, each block
/// term by term: row `i`'s term `p` at `(i / MR) * k * MR + p * MR + i % MR`,
/// so that the kernel broadcasts a term's rows from one run of 8 values
/// with one pointer. Rows past `m` are zero. Pairs of blocks are
/// transposed 16 x 16 in registers, on the thread pool when `parallel`.
///
/// # Safety
/// avx512f must be present; `x` must hold `m` rows of `k` values
/// `x_stride` apart.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn pack_rows(
    x: *const f32,
    x_stride: usize,
    m: usize,
    k: usize,
    out: &mut [f32],
    parallel: bool,
) {
    use rayon::prelude::*;
    use std::arch::x86_64::*;
    let group = 2 * MR * k;
    let x = x as usize;
    // SAFETY (of each group): rows 16 g .. 16 g + 16 below `m` are read,
    // and the group's own part of `out` is written.
    let pack_group = |(g, dst): (usize, &mut [f32])| unsafe {
        let x = x as *const f32;
        let rows = (m - 2 * MR * g).min(2 * MR);
        let mut p0 = 0;
        while p0 < k {
            let cols = lanes(k - p0);
            let mut r = [_mm512_setzero_ps(); 16];
            for (q, v) in r.iter_mut().enumerate().take(rows) {
                *v = _mm512_maskz_loadu_ps(cols, x.add((2 * MR * g + q) * x_stride + p0));
            }
            let t = crate::model::panels::transpose16(r);
            let (lo, hi) = dst.split_at_mut(MR * k);
            for (c, v) in t.iter().enumerate().take(k - p0) {
                let at = (p0 + c) * MR;
                _mm256_storeu_ps(lo.as_mut_ptr().add(at), _mm512_castps512_ps256(*v));
                if rows > MR {
                    let upper = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(*v)));
                    _mm256_storeu_ps(hi.as_mut_ptr().add(at), upper);
                }
            }
            p0 += 16;
        }
    };
    let out = &mut out[..packed_len(m, k)];
    if parallel && m * k >= 1 << 16 {
        out.par_chunks_mut(group).enumerate().for_each(pack_group);
    } else {
        out.chunks_mut(group).enumerate().for_each(pack_group);
    }
}

#[cfg(target_arch = "x86_64")]
thread_local! {
    /// The packed panel of `w` rows, reused across products.
    static PANEL: RefCell<AlignedF32> = RefCell::new(AlignedF32::default());
    /// The rows of a widened weight's panel before packing, reused likewise.
    static WIDENED: RefCell<AlignedF32> = RefCell::new(AlignedF32::default());
    /// The products' inputs packed by [`pack_rows`], reused likewise.
    static PACKED_X: RefCell<Vec<AlignedF32>> = const { RefCell::new(Vec::new()) };
}

#[cfg(target_arch = "x86_64")]
impl Job<'_> {
    /// Outputs `f0..f1` of every row, a panel of 48 columns at a time, each
    /// over all `k` terms, reading `x` as [`pack_rows`] left it at `xp`.
    #[target_feature(enable = "avx512f")]
    unsafe fn block(&self, f0: usize, f1: usize, xp: *const f32) {
        let mut panel = PANEL.with(|p| p.take());
        let mut widened = AlignedF32::default();
        let kp = self.k.next_multiple_of(16);
        if matches!(self.layout, Layout::Rows | Layout::Widened(_)) && panel.len() < kp * NR {
            panel.resize_zeroed(kp * NR);
        }
        if matches!(self.layout, Layout::Widened(_)) {
            widened = WIDENED.with(|p| p.take());
            if widened.len() < self.k * NR {
                widened.resize_zeroed(self.k * NR);
            }
        }
        let mut jp = f0;
        while jp < f1 {
            // A packed weight's panels end at multiples of 48 columns.
            let nr = match self.layout {
                Layout::Panels => ((jp / NR + 1) * NR).min(f1) - jp,
                Layout::Rows | Layout::Cols | Layout::Widened(_) => NR.min(f1 - jp),
            };
            let (b, b_stride) = match self.layout {
                Layout::Rows => {
                    pack(
                        self.w.add(jp * self.w_stride),
                        self.w_stride,
                        nr,
                        self.k,
                        panel.as_mut_ptr(),
                    );
                    (panel.as_ptr(), NR)
                }
                Layout::Widened(source) => {
                    let rows = &mut widened[..nr * self.k];
                    source.widen_rows(jp..jp + nr, rows);
                    pack(rows.as_ptr(), self.k, nr, self.k, panel.as_mut_ptr());
                    (panel.as_ptr(), NR)
                }
                Layout::Cols => (self.w.add(jp), self.w_stride),
                Layout::Panels => (self.w.add(panel_at(jp, self.k) + jp % NR), NR),
            };
            // The next panel's weight lines, a share at each row step, are
            // fetched into the L2 cache while this panel computes, so that
            // weights streamed from memory do not stall its packing or its
            // first rows: where they start, lines per row, rows, row stride.
            let next = jp + nr;
            let (start, lines_per_row, next_rows, row_stride) = match self.layout {
                Layout::Rows if next < self.n => (
                    self.w.wrapping_add(next * self.w_stride),
                    ((self.w as usize / 4) % 16 + self.k).div_ceil(16),
                    NR.min(self.n - next),
                    self.w_stride,
                ),
                Layout::Panels if next < self.n => (
                    self.w.wrapping_add(panel_at(next, self.k)),
                    kp * NR / 16,
                    1,
                    0,
                ),
                _ => (self.w, 1, 0, 0),
            };
            // A long panel is used in passes of `KC` terms, each over every
            // row of `x`, so that the part in use stays in L2 beside the
            // next panel's; a pass after the first continues each output's
            // chain of multiply-adds from the value the last one stored.
            let chunk = if self.causal == Causal::None {
                KC
            } else {
                self.k
            };
            let passes = self.k.div_ceil(chunk);
            let lines = next_rows * lines_per_row;
            let per_step = lines.div_ceil(self.m.div_ceil(MR) * passes).max(1);
            // The next line to fetch: its row in the next panel, its line in the row.
            let (mut row, mut line) = (0, 0);
            for p0 in (0..self.k).step_by(chunk) {
                let p1 = (p0 + chunk).min(self.k);
                let mut i = 0;
                while i < self.m {
                    let mr = MR.min(self.m - i);
                    for _ in 0..per_step {
                        if row >= next_rows {
                            break;
                        }
                        let at = start.wrapping_add(row * row_stride + line * 16);
                        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(
                            at.cast::<i8>(),
                        );
                        line += 1;
                        if line == lines_per_row {
                            (row, line) = (row + 1, 0);
                        }
                    }
                    // The last row of the block decides what it computes.
                    let (cols, terms) = match self.causal {
                        Causal::None => (nr, p1 - p0),
                        Causal::Outputs { first } => {
                            (nr.min((first + i + mr).saturating_sub(jp)), self.k)
                        }
                        Causal::Terms { first } => (nr, self.k.min(first + i + mr)),
                    };
                    if cols > 0 {
                        let tile = Tile {
                            x: xp.add(i * self.k + p0 * MR),
                            b: b.add(p0 * b_stride),
                            b_stride,
                            k: terms,
                            out: self.out.add(i * self.out_stride + jp),
                            out_stride: self.out_stride,
                            cols,
                            continued: p0 > 0,
                        };
                        tile.dispatch(mr);
                    }
                    i += mr;
                }
            }
            jp += nr;
        }
        PANEL.with(|p| p.replace(panel));
        if matches!(self.layout, Layout::Widened(_)) {
            WIDENED.with(|p| p.replace(widened));
        }
    }
}

/// Up to 8 rows of `x` (packed: row `i`'s term `p` at `x[p * 8 + i]`)
/// against up to 48 columns of a panel of `b` (`b[p * b_stride + j]`)
/// over `k` terms.
#[cfg(target_arch = "x86_64")]
struct Tile {
    x: *const f32,
    b: *const f32,
    b_stride: usize,
    k: usize,
    out: *mut f32,
    out_stride: usize,
    /// Output columns, 1 to 48.
    cols: usize,
    /// Whether the outputs hold the sums of the terms before these (a
    /// later pass over a long panel), to be continued rather than started.
    continued: bool,
}

#[cfg(target_arch = "x86_64")]
impl Tile {
    /// The kernel for `mr` rows and this tile's columns.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn dispatch(&self, mr: usize) {
        macro_rules! by_rows {
            ($nv:literal) => {
                match mr {
                    8 => self.kernel::<8, $nv>(),
                    7 => self.kernel::<7, $nv>(),
                    6 => self.kernel::<6, $nv>(),
                    5 => self.kernel::<5, $nv>(),
                    4 => self.kernel::<4, $nv>(),
                    3 => self.kernel::<3, $nv>(),
                    2 => self.kernel::<2, $nv>(),
                    _ => self.kernel::<1, $nv>(),
                }
            };
        }
        match self.cols.div_ceil(16) {
            3 => by_rows!(3),
            2 => by_rows!(2),
            _ => by_rows!(1),
        }
    }

    /// `out[i, j] = sum_p x[i, p] b[p, j]`, adding the terms in turn from
    /// `p = 0`: accumulator `(i, v)` holds outputs `16 v .. 16 v + 16` of row
    /// `i`; lanes past `cols` are never stored.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn kernel<const R: usize, const V: usize>(&self) {
        use std::arch::x86_64::*;
        let mut mask = [0xffffu16; V];
        mask[V - 1] = lanes(self.cols - 16 * (V - 1));
        let mut acc = [[_mm512_setzero_ps(); V]; R];
        if self.continued {
            for (i, row) in acc.iter_mut().enumerate() {
                for (v, a) in row.iter_mut().enumerate() {
                    *a = _mm512_maskz_loadu_ps(mask[v], self.out.add(i * self.out_stride + 16 * v));
                }
            }
        }
        let mut x = self.x;
        let mut b = self.b;
        for _ in 0..self.k {
            // The panel's lines a few terms ahead, into L1 (prefetches past
            // the panel's end fetch lines never read, and never fault).
            for v in 0..V {
                _mm_prefetch::<_MM_HINT_T0>(
                    b.wrapping_add(PREFETCH_TERMS * self.b_stride + 16 * v)
                        .cast::<i8>(),
                );
            }
            let mut bv = [_mm512_setzero_ps(); V];
            for (v, c) in bv.iter_mut().enumerate() {
                *c = _mm512_maskz_loadu_ps(mask[v], b.add(16 * v));
            }
            for (i, row) in acc.iter_mut().enumerate() {
                let xv = _mm512_set1_ps(*x.add(i));
                for (a, &c) in row.iter_mut().zip(&bv) {
                    *a = _mm512_fmadd_ps(xv, c, *a);
                }
            }
            x = x.add(MR);
            b = b.add(self.b_stride);
        }
        for (i, row) in acc.iter().enumerate() {
            for (v, &a) in row.iter().enumerate() {
                _mm512_mask_storeu_ps(self.out.add(i * self.out_stride + 16 * v), mask[v], a);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::panels::pack_panels;

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

    /// Within 1e-6 k of the f64 product: f32 rounding of `k` terms.
    fn assert_near(out: &[f32], want: &[f64], k: usize, what: &str) {
        for (o, r) in out.iter().zip(want) {
            assert!(
                (*o as f64 - r).abs() <= 1e-6 * k as f64,
                "{what}: {o} against {r}"
            );
        }
    }

    /// `w [n, k]` (rows `ws` apart) as `b [k, n]`, rows `bs` apart, NaN in
    /// the gaps.
    fn as_columns(w: &[f32], n: usize, k: usize, ws: usize, bs: usize) -> Vec<f32> {
        let mut b = vec![f32::NAN; k * bs];
        for j in 0..n {
            for q in 0..k {
                b[q * bs + j] = w[j * ws + q];
            }
        }
        b
    }

    /// `x [m, k]` times the second operand `w` as `layout` says, through the
    /// path without AVX-512 (the `gemm` crate).
    fn portable(
        x: &[f32],
        (m, n, k): (usize, usize, usize),
        w: &[f32],
        w_stride: usize,
        layout: Layout,
    ) -> Vec<f32> {
        let mut out = vec![f32::NAN; m * n];
        let job = Job {
            m,
            n,
            k,
            x: x.as_ptr(),
            x_stride: k,
            w: w.as_ptr(),
            w_stride,
            layout,
            out: out.as_mut_ptr(),
            out_stride: n,
            causal: Causal::None,
        };
        // SAFETY: the callers' operands cover the shapes.
        unsafe { job.run_portable(false) };
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
            // The same product as `x b`: `b [k, n]` with a row stride of n + 3.
            let bs = n + 3;
            let b = as_columns(&w, n, k, ws, bs);
            let nn = Nn {
                m,
                n,
                k,
                x,
                x_stride: xs,
                b: &b,
                b_stride: bs,
            };
            for parallel in [false, true] {
                let mut out = vec![f32::NAN; m * n];
                p.run(&mut out, n, parallel, Causal::None);
                let mut out_nn = vec![f32::NAN; m * n];
                nn.run(&mut out_nn, n, parallel, Causal::None);
                assert_near(&out, &want, k, &format!("{m}x{n}x{k}"));
                assert_eq!(out_nn, out, "{m}x{n}x{k}: x b against x w^T");
            }
        }
    }

    /// The path without AVX-512 (the `gemm` crate) reads both operand
    /// layouts the same way: within 1e-6 k of the f64 product.
    #[test]
    fn portable_path_matches_f64() {
        let (m, n, k) = (9, 37, 70);
        let x = values(m * k, 10);
        let w = values(n * k, 11);
        let want = reference(&Nt::rows(m, k, &x, &w));
        let b = as_columns(&w, n, k, k, n);
        for (operand, stride, layout) in [(&w, k, Layout::Rows), (&b, n, Layout::Cols)] {
            let out = portable(&x, (m, n, k), operand, stride, layout);
            assert_near(&out, &want, k, "portable");
        }
    }

    /// A weight held as rows that only [`WidenRows`] reads, recording the
    /// largest number of rows widened at once.
    struct Held {
        w: Vec<f32>,
        k: usize,
        most: std::sync::atomic::AtomicUsize,
    }

    impl WidenRows for Held {
        fn widen_rows(&self, rows: std::ops::Range<usize>, out: &mut [f32]) {
            use std::sync::atomic::Ordering;
            self.most.fetch_max(rows.len(), Ordering::SeqCst);
            out.copy_from_slice(&self.w[rows.start * self.k..rows.end * self.k]);
        }
    }

    /// A weight widened a panel at a time as its products use it gives the
    /// same products, bit for bit, as its rows in memory (threads or not,
    /// beside other weights), never widening more than a panel's rows at
    /// once; the path without AVX-512 within 1e-6 k of the f64 product.
    #[test]
    fn widened_rows_give_the_same_products() {
        for (m, n, k) in [(1, 1, 1), (9, 203, 70), (33, 96, 576), (5, 50, 33)] {
            let x = values(m * k, 12);
            let w = values(n * k, 13);
            let held = Held {
                w: w.clone(),
                k,
                most: Default::default(),
            };
            let product = |weights: &[Weight]| {
                let mut outs = vec![vec![MaybeUninit::new(f32::NAN); m * n]; weights.len()];
                let mut views: Vec<&mut [MaybeUninit<f32>]> =
                    outs.iter_mut().map(|o| o.as_mut_slice()).collect();
                products(&x, m, k, weights, &mut views);
                outs.into_iter()
                    .map(|o| {
                        // SAFETY: initialised above, and written since.
                        o.into_iter().map(|v| unsafe { v.assume_init() }).collect()
                    })
                    .collect::<Vec<Vec<f32>>>()
            };
            let widened = Weight::Widened { rows: &held, n };
            let rows = product(&[Weight::Rows(&w)]);
            assert_eq!(product(&[widened]), rows, "{m}x{n}x{k}");
            assert_eq!(
                product(&[Weight::Rows(&w), widened]),
                [rows[0].clone(), rows[0].clone()],
                "{m}x{n}x{k}, beside another weight"
            );
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx512f") {
                let most = held.most.load(std::sync::atomic::Ordering::SeqCst);
                assert!(most <= PANEL_COLS, "{most} rows widened at once");
            }
            let mut out = vec![f32::NAN; m * n];
            let job = Job {
                m,
                n,
                k,
                x: x.as_ptr(),
                x_stride: k,
                w: std::ptr::null(),
                w_stride: k,
                layout: Layout::Widened(&held),
                out: out.as_mut_ptr(),
                out_stride: n,
                causal: Causal::None,
            };
            // SAFETY: the operands cover the shapes.
            unsafe { job.run_portable(false) };
            assert_near(&out, &reference(&Nt::rows(m, k, &x, &w)), k, "portable");
        }
    }

    /// A weight packed once into panels gives the same products, bit for
    /// bit, as its rows packed as they are used (threads or not); the path
    /// without AVX-512 reads the panels within 1e-6 k of the f64 product.
    #[test]
    fn packed_panels_give_the_same_products() {
        for (m, n, k) in [(1, 1, 1), (9, 203, 70), (33, 96, 576), (5, 50, 33)] {
            let x = values(m * k, 12);
            let w = values(n * k, 13);
            let mut panels = vec![f32::NAN; panels_len(n, k)];
            pack_panels(&w, n, k, &mut panels);
            assert!(panels.iter().all(|v| v.is_finite()), "every value written");
            let nt = Nt::rows(m, k, &x, &w);
            let mut want = vec![0f32; m * n];
            nt.run(&mut want, n, false, Causal::None);
            let mut got = vec![MaybeUninit::new(f32::NAN); m * n];
            let weight = Weight::Panels { values: &panels, n };
            products(&x, m, k, &[weight], &mut [&mut got]);
            // SAFETY: initialised above.
            let got: Vec<f32> = got
                .into_iter()
                .map(|v| unsafe { v.assume_init() })
                .collect();
            assert_eq!(got, want, "{m}x{n}x{k}");
            let out = portable(&x, (m, n, k), &panels, PANEL_COLS, Layout::Panels);
            assert_near(&out, &reference(&nt), k, "portable panels");
        }
    }

    /// The transpose, edges and strides included, against indexing.
    #[test]
    fn transpose_moves_every_value() {
        for (rows, cols, ss, ds) in [
            (1, 1, 1, 1),
            (37, 21, 23, 40),
            (16, 64, 192, 16),
            (256, 64, 192, 256),
        ] {
            let src = values(rows * ss, 9);
            let mut dst = vec![f32::NAN; cols * ds];
            transpose(&src, ss, rows, cols, &mut dst, ds);
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(
                        dst[c * ds + r],
                        src[r * ss + c],
                        "{rows}x{cols}: ({r}, {c})"
                    );
                }
            }
            // Each row of dst past its first `rows` values is untouched.
            for c in 0..cols {
                assert!(dst[c * ds + rows..(c + 1) * ds].iter().all(|v| v.is_nan()));
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

    /// A weight longer than a pass ([`KC`] terms) is used in passes, each
    /// continuing the outputs' chains: the same bits as one pass over all
    /// terms (a product whose causal terms reach past `k` runs in one).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn passes_over_a_long_panel_equal_one_pass() {
        for (m, n, k) in [(9, 100, 2 * KC + 37), (1, 48, KC + 1), (17, 5, 3 * KC)] {
            let x = values(m * k, 14);
            let w = values(n * k, 15);
            let p = Nt::rows(m, k, &x, &w);
            let mut passes = vec![f32::NAN; m * n];
            p.run(&mut passes, n, true, Causal::None);
            let mut one = vec![f32::NAN; m * n];
            p.run(&mut one, n, true, Causal::Terms { first: k });
            assert_eq!(passes, one, "{m}x{n}x{k}");
            assert_near(&passes, &reference(&p), k, "passes");
        }
    }

    /// The causal forms compute exactly what the full product does where
    /// they are asked to: scores up to each row's position, and weighted
    /// sums whose later terms are zero.
    #[test]
    fn causal_forms_equal_the_full_product() {
        let (t, s, d) = (70, 103, 40); // 70 rows at positions 33..103
        let first = s - t;
        let q = values(t * d, 5);
        let keys_t = values(d * s, 6);
        let scores = |out: &mut [f32], causal| {
            let nn = Nn {
                m: t,
                n: s,
                k: d,
                x: &q,
                x_stride: d,
                b: &keys_t,
                b_stride: s,
            };
            nn.run(out, s, false, causal)
        };
        let mut full = vec![0f32; t * s];
        scores(&mut full, Causal::None);
        let mut causal = vec![f32::NAN; t * s];
        scores(&mut causal, Causal::Outputs { first });
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
        let v = values(s * d, 8);
        let pv = Nn {
            m: t,
            n: d,
            k: s,
            x: &weights,
            x_stride: s,
            b: &v,
            b_stride: d,
        };
        let mut full = vec![0f32; t * d];
        pv.run(&mut full, d, false, Causal::None);
        let mut causal = vec![0f32; t * d];
        pv.run(&mut causal, d, false, Causal::Terms { first });
        assert_eq!(causal, full);
    }
}
