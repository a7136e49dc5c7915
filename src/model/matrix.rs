//! A weight matrix, and where its f32 values come from (docs/DESIGN.md
//! section 9): computed in memory, or kept in the checkpoint's stored form
//! (the mapped bytes: BF16, F16, Q8_0, Q4_K, Q6_K, ...) or as 4-bit codes
//! and widened to f32 when used.
//!
//! Widened values are kept between uses, packed into the forward's panels
//! ([`super::panels::pack_panels`]), while the model's [`WeightCache`] has
//! room, first come first kept: a forward
//! pass reads the matrices in the same order every time, so the first ones
//! stay. The forward's products read the rest from their stored blocks, a
//! panel of rows at a time on the thread that uses it ([`Matrix::read_rows`]
//! through `forward::gemm::WidenRows`). A small model fits the budget whole
//! and runs exactly as if loaded as f32; a large one is held in its stored
//! size plus the budget, at the same bits.

use std::borrow::Cow;
use std::cell::RefCell;
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use super::panels::AlignedF32;
use super::Q4;
use crate::checkpoint::{Pages, TensorSource};

/// The widening budget unless set otherwise: 1 GiB.
pub const DEFAULT_WIDEN_BUDGET: usize = 1 << 30;

/// How many bytes of widened f32 weights may be kept between uses, and how
/// many are: one value shared by every matrix of a model and of the models
/// made from it (and, in the command line tool, by every model a command
/// loads). A kept matrix gives its bytes back when dropped.
#[derive(Debug)]
pub struct WeightCache {
    budget: usize,
    kept: AtomicUsize,
}

impl WeightCache {
    /// The budget for the machine at hand: half of the memory available
    /// now ([`crate::measure::available_memory_bytes`]), at least
    /// [`DEFAULT_WIDEN_BUDGET`]; [`DEFAULT_WIDEN_BUDGET`] where the kernel
    /// does not say. Weights are kept only as they are used, so a model
    /// smaller than this keeps just its own size.
    pub fn budget_for_this_machine() -> usize {
        crate::measure::available_memory_bytes().map_or(DEFAULT_WIDEN_BUDGET, |b| {
            usize::try_from(b / 2)
                .unwrap_or(usize::MAX)
                .max(DEFAULT_WIDEN_BUDGET)
        })
    }

    pub fn new(budget_bytes: usize) -> Arc<WeightCache> {
        Arc::new(WeightCache {
            budget: budget_bytes,
            kept: AtomicUsize::new(0),
        })
    }

    pub fn budget(&self) -> usize {
        self.budget
    }

    /// Bytes of widened weights kept now.
    pub fn kept_bytes(&self) -> usize {
        self.kept.load(Ordering::SeqCst)
    }

    fn reserve(&self, bytes: usize) -> bool {
        self.kept
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |kept| {
                (kept + bytes <= self.budget).then_some(kept + bytes)
            })
            .is_ok()
    }

    fn give_back(&self, bytes: usize) {
        self.kept.fetch_sub(bytes, Ordering::SeqCst);
    }
}

thread_local! {
    /// The buffer a matrix not kept is widened into, reused across uses.
    static SCRATCH: RefCell<AlignedF32> = RefCell::new(AlignedF32::default());
}

/// Run `f` on a scratch buffer of `len` values (contents unspecified).
fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    let mut buf = SCRATCH.with(|s| s.take());
    if buf.len() < len {
        buf.resize_zeroed(len);
    }
    let r = f(&mut buf[..len]);
    SCRATCH.with(|s| s.replace(buf));
    r
}

/// A row-major `[rows, cols]` matrix; a linear weight is `[out_features, in_features]`.
#[derive(Clone)]
pub struct Matrix {
    pub rows: usize,
    pub cols: usize,
    values: Values,
    /// The 4-bit codes the values are ([`crate::model::Model::to_int4`]).
    pub int4: Option<Arc<Q4>>,
}

#[derive(Clone)]
enum Values {
    /// Computed in memory (a folded norm, a test's matrix).
    F32(Arc<Vec<f32>>),
    /// Widened when used.
    Lazy(Arc<Lazy>),
}

struct Lazy {
    from: Origin,
    /// The widened values while the budget keeps them, packed into the
    /// forward's panels ([`super::panels::pack_panels`]).
    kept: OnceLock<AlignedF32>,
    cache: Arc<WeightCache>,
}

enum Origin {
    /// A checkpoint tensor in its stored type.
    Stored {
        source: Arc<dyn TensorSource>,
        name: String,
    },
    /// Dequantised 4-bit codes.
    Codes(Arc<Q4>),
}

impl Drop for Lazy {
    fn drop(&mut self) {
        if let Some(v) = self.kept.get() {
            self.cache.give_back(std::mem::size_of_val(&v[..]));
        }
    }
}

impl std::fmt::Debug for Matrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let held = match &self.values {
            Values::F32(_) => "f32".to_string(),
            Values::Lazy(l) => match &l.from {
                Origin::Stored { name, .. } => format!("stored `{name}`"),
                Origin::Codes(_) => "4-bit codes".to_string(),
            },
        };
        write!(f, "Matrix[{}, {}] ({held})", self.rows, self.cols)
    }
}

/// Rows per tile when a matrix is widened a tile at a time: tiles of at most
/// this many values (64 MiB).
pub const TILE_VALUES: usize = 1 << 24;

impl Matrix {
    /// The very same weights (one matrix cloned, not equal values): a
    /// cheap test that a model derived from another left this one as it was.
    pub fn is(&self, other: &Matrix) -> bool {
        let values = match (&self.values, &other.values) {
            (Values::F32(a), Values::F32(b)) => Arc::ptr_eq(a, b),
            (Values::Lazy(a), Values::Lazy(b)) => Arc::ptr_eq(a, b),
            _ => false,
        };
        let int4 = match (&self.int4, &other.int4) {
            (None, None) => true,
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            _ => false,
        };
        self.rows == other.rows && self.cols == other.cols && values && int4
    }

    pub fn new(rows: usize, cols: usize, data: Vec<f32>) -> Matrix {
        assert_eq!(
            data.len(),
            rows * cols,
            "matrix data does not match its shape"
        );
        Matrix {
            rows,
            cols,
            values: Values::F32(Arc::new(data)),
            int4: None,
        }
    }

    /// The checkpoint tensor `name` of `source`, kept in its stored form. The
    /// caller has checked its shape and that its rows can be read
    /// ([`crate::model::Weights::matrix`]), so widening it cannot fail.
    pub fn stored(
        rows: usize,
        cols: usize,
        source: Arc<dyn TensorSource>,
        name: String,
        cache: &Arc<WeightCache>,
    ) -> Matrix {
        Matrix {
            rows,
            cols,
            values: Values::Lazy(Arc::new(Lazy {
                from: Origin::Stored { source, name },
                kept: OnceLock::new(),
                cache: cache.clone(),
            })),
            int4: None,
        }
    }

    /// The checkpoint bytes this matrix holds unchanged (rows in Hugging Face
    /// order) and their type; `None` for values computed in memory.
    pub fn stored_bytes(&self) -> Option<crate::Result<(crate::checkpoint::DType, Vec<u8>)>> {
        match &self.values {
            Values::Lazy(l) => match &l.from {
                Origin::Stored { source, name } => source.stored(name),
                Origin::Codes(_) => None,
            },
            Values::F32(_) => None,
        }
    }

    /// The matrix `q`'s codes stand for, the codes kept beside it.
    pub fn from_codes(q: Q4, cache: &Arc<WeightCache>) -> Matrix {
        let q = Arc::new(q);
        Matrix {
            rows: q.n,
            cols: q.k,
            values: Values::Lazy(Arc::new(Lazy {
                from: Origin::Codes(q.clone()),
                kept: OnceLock::new(),
                cache: cache.clone(),
            })),
            int4: Some(q),
        }
    }

    fn numel(&self) -> usize {
        self.rows * self.cols
    }

    /// The values when they are in memory as rows (computed in memory;
    /// widened values are kept as panels, not rows).
    pub fn row_values(&self) -> Option<&[f32]> {
        match &self.values {
            Values::F32(v) => Some(v),
            Values::Lazy(_) => None,
        }
    }

    /// Rows `rows` into `out` (`rows.len() * cols` values).
    pub fn read_rows(&self, rows: Range<usize>, out: &mut [f32]) {
        self.read_rows_with(rows, out, Pages::Release);
    }

    /// [`Matrix::read_rows`] of a panel a product is about to use: a stored
    /// tensor's file pages stay resident ([`Pages::Keep`]).
    pub fn read_rows_in_use(&self, rows: Range<usize>, out: &mut [f32]) {
        self.read_rows_with(rows, out, Pages::Keep);
    }

    fn read_rows_with(&self, rows: Range<usize>, out: &mut [f32], pages: Pages) {
        assert!(rows.end <= self.rows && out.len() == rows.len() * self.cols);
        if let Some(v) = self.row_values() {
            out.copy_from_slice(&v[rows.start * self.cols..rows.end * self.cols]);
            return;
        }
        let Values::Lazy(l) = &self.values else {
            unreachable!("f32 values are resident")
        };
        if let Some(panels) = l.kept.get() {
            // Row r is column r mod 48 of its panel.
            use super::panels::{panel_at, PANEL_COLS};
            for (r, row) in rows.zip(out.chunks_exact_mut(self.cols.max(1))) {
                let panel = &panels[panel_at(r, self.cols)..];
                for (p, v) in row.iter_mut().enumerate() {
                    *v = panel[p * PANEL_COLS + r % PANEL_COLS];
                }
            }
            return;
        }
        match &l.from {
            Origin::Stored { source, name } => source
                .read_rows_with(name, rows, out, pages)
                .unwrap_or_else(|e| panic!("checked when loaded: {e}")),
            Origin::Codes(q) => q.dequantize_rows(rows, out),
        }
    }

    /// The values to keep, packed into the forward's panels, a tile of
    /// whole panels' rows at a time.
    fn widen_panels(&self) -> AlignedF32 {
        use super::panels::{pack_panels, panel_at, panels_len, PANEL_COLS};
        let (n, k) = (self.rows, self.cols);
        let mut panels = AlignedF32::zeroed(panels_len(n, k));
        // Tiles of about 1 MiB of rows, so that packing needs no large
        // scratch buffer beside the panels.
        let per_tile = ((1 << 18) / k.max(1) / PANEL_COLS).max(1) * PANEL_COLS;
        with_scratch(per_tile.min(n) * k, |buf| {
            for r0 in (0..n).step_by(per_tile) {
                let r1 = (r0 + per_tile).min(n);
                let rows = &mut buf[..(r1 - r0) * k];
                self.read_rows(r0..r1, rows);
                let at = panel_at(r0, k);
                pack_panels(
                    rows,
                    r1 - r0,
                    k,
                    &mut panels[at..at + panels_len(r1 - r0, k)],
                );
            }
        });
        panels
    }

    /// The values for a caller to own.
    fn widen_vec(&self) -> Vec<f32> {
        let mut v = vec![0f32; self.numel()];
        self.read_rows(0..self.rows, &mut v);
        v
    }

    /// The values as the forward's packed panels
    /// ([`super::panels::pack_panels`]): widened, packed and kept if
    /// the budget has room (or kept already); `None` when they are not kept,
    /// and for values computed in memory.
    pub fn kept_panels(&self) -> Option<&[f32]> {
        let Values::Lazy(l) = &self.values else {
            return None;
        };
        if let Some(v) = l.kept.get() {
            return Some(v);
        }
        let bytes = super::panels::panels_len(self.rows, self.cols) * 4;
        if !l.cache.reserve(bytes) {
            return None;
        }
        if l.kept.set(self.widen_panels()).is_err() {
            l.cache.give_back(bytes); // another thread kept it first
        }
        l.kept.get().map(|v| &v[..])
    }

    /// Run `f` on the values, tile by tile: `f(rows, values of those rows)`.
    /// Values computed in memory come in one tile; others are widened into
    /// the thread's scratch buffer, `max_tile` values at a time, never kept
    /// (quantisation and emission; the forward's products use
    /// [`Matrix::kept_panels`] or widen a panel at a time).
    pub fn visit_tiles(&self, max_tile: usize, mut f: impl FnMut(Range<usize>, &[f32])) {
        match self.row_values() {
            Some(v) => f(0..self.rows, v),
            None => self.widen_tiles(max_tile, f),
        }
    }

    /// [`Matrix::visit_tiles`] of values not in memory: widened into the
    /// thread's scratch buffer, `max_tile` values (whole rows, at least one)
    /// at a time.
    pub(crate) fn widen_tiles(&self, max_tile: usize, mut f: impl FnMut(Range<usize>, &[f32])) {
        let per_tile = (max_tile / self.cols.max(1)).clamp(1, self.rows.max(1));
        with_scratch(per_tile.min(self.rows) * self.cols, |buf| {
            for r0 in (0..self.rows).step_by(per_tile) {
                let r1 = (r0 + per_tile).min(self.rows);
                let part = &mut buf[..(r1 - r0) * self.cols];
                self.read_rows(r0..r1, part);
                f(r0..r1, part);
            }
        });
    }

    /// The values, borrowed when in memory, else widened for the caller.
    pub fn values(&self) -> Cow<'_, [f32]> {
        match self.row_values() {
            Some(v) => Cow::Borrowed(v),
            None => Cow::Owned(self.widen_vec()),
        }
    }

    /// The values to change in place: widened into memory of this matrix's
    /// own (no longer the stored tensor, nor any codes).
    pub fn values_mut(&mut self) -> &mut [f32] {
        if !matches!(self.values, Values::F32(_)) {
            self.values = Values::F32(Arc::new(self.widen_vec()));
        }
        self.int4 = None;
        match &mut self.values {
            Values::F32(v) => Arc::make_mut(v).as_mut_slice(),
            Values::Lazy(_) => unreachable!("made f32 above"),
        }
    }

    /// The checkpoint's own 4-bit blocks of this matrix as stored (GGUF
    /// Q4_0, Q4_1, Q4_K), if it is a stored tensor of those types.
    pub fn stored_four_bit(&self) -> Option<Q4> {
        let Values::Lazy(l) = &self.values else {
            return None;
        };
        let Origin::Stored { source, name } = &l.from else {
            return None;
        };
        let blocks = source
            .load_four_bit(name)?
            .unwrap_or_else(|e| panic!("checked when loaded: {e}"));
        Q4::from_blocks(&blocks, self.rows, self.cols)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_cover_every_row_once_in_order() {
        let q = Q4::quantize(
            &Matrix::new(5, 32, (0..160).map(|i| (i as f32 * 0.1).sin()).collect()),
            crate::model::Int4::default(),
        );
        let m = Matrix::from_codes(q.clone(), &WeightCache::new(DEFAULT_WIDEN_BUDGET));
        let want = q.dequantize();
        let mut seen = Vec::new();
        m.widen_tiles(64, |rows, v| {
            assert_eq!(rows.len(), 2.min(5 - rows.start));
            assert_eq!(v, &want[rows.start * 32..rows.end * 32]);
            seen.extend(rows);
        });
        assert_eq!(seen, (0..5).collect::<Vec<_>>());
        assert_eq!(m.values().as_ref(), want.as_slice());
        let mut row = vec![0f32; 32];
        m.read_rows(3..4, &mut row);
        assert_eq!(row, &want[96..128]);
    }
}
