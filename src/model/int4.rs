//! 4-bit weights as ONNX Runtime's `MatMulNBits` holds them (docs/DESIGN.md
//! section 8): each row of a linear weight `[out, in]` (one output feature)
//! cut into blocks of `block_size` inputs, each block one float scale and
//! `block_size` 4-bit codes `q`, the weight being `(q - 8) * scale`.
//!
//! Quantisation is symmetric round-to-nearest, the rule of ONNX Runtime's
//! blockwise quantiser with the settings of the onnxruntime-genai model
//! builder's int4 export (`is_symmetric`, block 32): the scale is the
//! block's value of largest magnitude divided by -8, and
//! `q = clamp(round(w / scale + 8), 0, 15)`. `tests/python/int4_quantizer.py`
//! checks the codes and scales byte for byte against ONNX Runtime's own.
//!
//! A quantised [`Model`] holds the codes, for emission, and reads their
//! dequantised values as its f32 weights ([`Matrix::from_codes`], widened
//! when used like any stored weight), so that the reference forward runs
//! exactly the weights the ONNX model holds.

use std::sync::Arc;

use rayon::prelude::*;
use serde::Serialize;

use super::{Linear, Matrix, Model, WeightCache};
use crate::checkpoint::dequant::FourBitBlocks;
use crate::{Error, Result};

/// The block size the builder uses for CPU.
pub const DEFAULT_BLOCK_SIZE: usize = 32;
/// Block sizes `MatMulNBits` accepts (powers of two from 16).
pub const BLOCK_SIZES: [usize; 5] = [16, 32, 64, 128, 256];
/// `MatMulNBits` `accuracy_level` of the builder's CPU export: activations are
/// quantised to int8 inside the kernel.
pub const DEFAULT_ACCURACY_LEVEL: u8 = 4;

/// Where the 4-bit weights come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Int4Source {
    /// Round-to-nearest of the float weights (every checkpoint).
    Rtn,
    /// The checkpoint's own 4-bit blocks of 32 where it has them (GGUF Q4_0,
    /// Q4_1, Q4_K), unchanged; round-to-nearest for the other tensors and for
    /// weights the fused form folds norms into.
    Gguf,
}

impl Int4Source {
    pub fn name(self) -> &'static str {
        match self {
            Int4Source::Rtn => "rtn",
            Int4Source::Gguf => "gguf",
        }
    }
}

/// How a model's linear weights are quantised to 4 bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Int4 {
    pub block_size: usize,
    /// `MatMulNBits`' `accuracy_level`: 0 computes in the activations' float
    /// type, 4 in int8 (what the builder writes for CPU).
    pub accuracy_level: u8,
    pub source: Int4Source,
}

impl Default for Int4 {
    fn default() -> Self {
        Int4 {
            block_size: DEFAULT_BLOCK_SIZE,
            accuracy_level: DEFAULT_ACCURACY_LEVEL,
            source: Int4Source::Rtn,
        }
    }
}

impl Int4 {
    pub fn check(&self) -> Result<()> {
        // ONNX Runtime's CPU kernels compute in float32 (0-3) or int8 (4);
        // the reference forward follows those two.
        if !BLOCK_SIZES.contains(&self.block_size) {
            return Err(Error::Input(format!(
                "int4 block size {} is not one of {BLOCK_SIZES:?}",
                self.block_size
            )));
        }
        if self.source == Int4Source::Gguf && self.block_size != 32 {
            return Err(Error::Input(format!(
                "--int4-source gguf keeps the checkpoint's blocks of 32; --block-size {} \
                 would re-quantise them",
                self.block_size
            )));
        }
        if ![0, 4].contains(&self.accuracy_level) {
            return Err(Error::Input(format!(
                "int4 accuracy level {} is not 0 (float32) or 4 (int8)",
                self.accuracy_level
            )));
        }
        Ok(())
    }
}

/// A linear weight `[n, k]` in 4-bit blocks along `k`.
#[derive(Debug, Clone, PartialEq)]
pub struct Q4 {
    pub n: usize,
    pub k: usize,
    pub block_size: usize,
    /// The `MatMulNBits` accuracy level the weight is written with.
    pub accuracy_level: u8,
    /// `[n, blocks, block_size / 2]`, two codes a byte, the first in the low nibble.
    pub packed: Arc<[u8]>,
    /// `[n, blocks]`.
    pub scales: Arc<[f32]>,
    /// `[n, blocks]` float zero points (a checkpoint's blocks with a minimum,
    /// GGUF Q4_1 and Q4_K); `None`: code 8 is zero.
    pub zero_points: Option<Arc<[f32]>>,
}

impl Q4 {
    pub fn blocks(&self) -> usize {
        self.k.div_ceil(self.block_size)
    }

    fn row_bytes(&self) -> usize {
        self.blocks() * self.block_size / 2
    }

    /// Symmetric round-to-nearest of `w` (`[n, k]`, row-major). A last,
    /// partial block is padded with code 8 (zero).
    pub fn quantize(w: &Matrix, int4: Int4) -> Q4 {
        let block_size = int4.block_size;
        let (n, k) = (w.rows, w.cols);
        let blocks = k.div_ceil(block_size);
        let row_bytes = blocks * block_size / 2;
        let mut packed = vec![0x88u8; n * row_bytes];
        let mut scales = vec![0f32; n * blocks];
        w.visit_tiles(super::matrix::TILE_VALUES, |rows, values| {
            packed[rows.start * row_bytes..rows.end * row_bytes]
                .par_chunks_mut(row_bytes)
                .zip(scales[rows.start * blocks..rows.end * blocks].par_chunks_mut(blocks))
                .enumerate()
                .for_each(|(r, (bytes, sc))| {
                    let row = &values[r * k..(r + 1) * k];
                    for (b, chunk) in row.chunks(block_size).enumerate() {
                        let (mut min, mut max) = (f32::MAX, -f32::MAX);
                        for &v in chunk {
                            min = min.min(v);
                            max = max.max(v);
                        }
                        // The value of largest magnitude (the smaller one on a tie), over -8.
                        let extreme = if max.abs() > min.abs() { max } else { min };
                        let scale = extreme / -8.0;
                        let recip = if scale != 0.0 { 1.0 / scale } else { 0.0 };
                        sc[b] = scale;
                        let out = &mut bytes[b * block_size / 2..(b + 1) * block_size / 2];
                        for (i, &v) in chunk.iter().enumerate() {
                            let q = (v * recip + 8.0).round().clamp(0.0, 15.0) as u8;
                            let byte = &mut out[i / 2];
                            *byte = if i % 2 == 0 {
                                (*byte & 0xf0) | q
                            } else {
                                (*byte & 0x0f) | (q << 4)
                            };
                        }
                    }
                });
        });
        Q4 {
            n,
            k,
            block_size,
            accuracy_level: int4.accuracy_level,
            packed: packed.into(),
            scales: scales.into(),
            zero_points: None,
        }
    }

    /// A checkpoint's own blocks of 32 (`scale * code + offset`, see
    /// [`FourBitBlocks`]) for the `[n, k]` weight, unchanged: a block whose
    /// offset is `-8 * scale` (all of Q4_0) needs no zero point, the others
    /// get `-offset / scale`. `None` when a block cannot be written so (a zero
    /// scale with a non-zero offset).
    pub fn from_blocks(b: &FourBitBlocks, n: usize, k: usize) -> Option<Q4> {
        if !k.is_multiple_of(32) || b.codes.len() != n * k {
            return None;
        }
        let symmetric = b
            .scales
            .iter()
            .zip(&b.offsets)
            .all(|(&s, &o)| o == -8.0 * s);
        let zero_points = if symmetric {
            None
        } else {
            let zp: Option<Vec<f32>> = b
                .scales
                .iter()
                .zip(&b.offsets)
                .map(|(&s, &o)| match (s != 0.0, o == 0.0) {
                    (true, _) => Some(-o / s),
                    (false, true) => Some(8.0),
                    (false, false) => None,
                })
                .collect();
            Some(Arc::from(zp?))
        };
        let packed = b
            .codes
            .chunks_exact(2)
            .map(|p| p[0] | (p[1] << 4))
            .collect();
        Some(Q4 {
            n,
            k,
            block_size: 32,
            accuracy_level: 0,
            packed,
            scales: b.scales.as_slice().into(),
            zero_points,
        })
    }

    /// Whether `MatMulNBits` rounds the activations this weight multiplies:
    /// at accuracy level 4, int8 per block of `block_size` inputs. ONNX
    /// Runtime's CPU kernel computes weights with float zero points in float32
    /// at every level.
    pub fn rounds_activations(&self) -> bool {
        self.accuracy_level == 4 && self.zero_points.is_none()
    }

    /// `x` (`[rows, k]`) as `MatMulNBits` at accuracy level 4 sees it: each
    /// row's blocks of `block_size` inputs rounded to int8 steps of their
    /// largest magnitude over 127, ties to even (ONNX Runtime's CPU kernels
    /// quantise the activation row this way before the integer dot products).
    pub fn round_activations(&self, x: &[f32]) -> Vec<f32> {
        let mut out = x.to_vec();
        out.par_chunks_mut(self.k).for_each(|row| {
            for blk in row.chunks_mut(self.block_size) {
                let amax = blk.iter().fold(0f32, |m, v| m.max(v.abs()));
                let scale = amax / 127.0;
                let inv = if amax != 0.0 { 127.0 / amax } else { 0.0 };
                for v in blk {
                    *v = (*v * inv).round_ties_even() * scale;
                }
            }
        });
        out
    }

    /// The weights the codes stand for, `[n, k]` row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.n * self.k];
        self.dequantize_rows(0..self.n, &mut out);
        out
    }

    /// Rows `rows` of [`Q4::dequantize`] into `out`.
    pub fn dequantize_rows(&self, rows: std::ops::Range<usize>, out: &mut [f32]) {
        let (blocks, row_bytes, bs) = (self.blocks(), self.row_bytes(), self.block_size);
        assert_eq!(out.len(), rows.len() * self.k, "dequantised rows' size");
        if out.is_empty() {
            return;
        }
        let serial = crate::checkpoint::dequant::SERIAL_ROWS;
        out.par_chunks_mut(self.k)
            .enumerate()
            .with_min_len(serial)
            .for_each(|(i, row)| {
                let r = rows.start + i;
                let bytes = &self.packed[r * row_bytes..(r + 1) * row_bytes];
                let sc = &self.scales[r * blocks..(r + 1) * blocks];
                let zp = self
                    .zero_points
                    .as_ref()
                    .map(|z| &z[r * blocks..(r + 1) * blocks]);
                for (i, v) in row.iter_mut().enumerate() {
                    let byte = bytes[i / 2];
                    let q = if i % 2 == 0 { byte & 0x0f } else { byte >> 4 };
                    let zero = zp.map_or(8.0, |z| z[i / bs]);
                    *v = (q as f32 - zero) * sc[i / bs];
                }
            });
    }

    /// Weights side by side along the outputs (`[q | k | v]`): their rows
    /// one after another.
    pub fn concat_outputs(parts: &[&Q4]) -> Q4 {
        let first = parts[0];
        assert!(
            parts.iter().all(|p| p.k == first.k
                && p.block_size == first.block_size
                && p.accuracy_level == first.accuracy_level),
            "output-concatenated int4 weights need one input size and block size"
        );
        Q4 {
            n: parts.iter().map(|p| p.n).sum(),
            k: first.k,
            block_size: first.block_size,
            accuracy_level: first.accuracy_level,
            packed: parts
                .iter()
                .flat_map(|p| p.packed.iter().copied())
                .collect(),
            scales: parts
                .iter()
                .flat_map(|p| p.scales.iter().copied())
                .collect(),
            zero_points: parts
                .iter()
                .any(|p| p.zero_points.is_some())
                .then(|| parts.iter().flat_map(|p| p.zero_point_rows()).collect()),
        }
    }

    /// Weights stacked along the inputs (one MatMul sums their products):
    /// each output row is the parts' rows one after another, which keeps
    /// every block only when each part's input size is a whole number of
    /// blocks ([`Model::to_int4`] checks that before anything is written).
    pub fn concat_inputs(parts: &[&Q4]) -> Q4 {
        let first = parts[0];
        assert!(
            parts.iter().all(|p| p.n == first.n
                && p.block_size == first.block_size
                && p.accuracy_level == first.accuracy_level
                && p.k.is_multiple_of(p.block_size)),
            "input-stacked int4 weights need one output size and whole blocks"
        );
        let mut packed = Vec::with_capacity(parts.iter().map(|p| p.packed.len()).sum());
        let mut scales = Vec::with_capacity(parts.iter().map(|p| p.scales.len()).sum());
        for r in 0..first.n {
            for p in parts {
                let (rb, b) = (p.row_bytes(), p.blocks());
                packed.extend_from_slice(&p.packed[r * rb..(r + 1) * rb]);
                scales.extend_from_slice(&p.scales[r * b..(r + 1) * b]);
            }
        }
        let zero_points = parts.iter().any(|p| p.zero_points.is_some()).then(|| {
            let rows: Vec<Vec<f32>> = parts.iter().map(|p| p.zero_point_rows()).collect();
            let mut z = Vec::with_capacity(scales.len());
            for r in 0..first.n {
                for (p, zr) in parts.iter().zip(&rows) {
                    z.extend_from_slice(&zr[r * p.blocks()..(r + 1) * p.blocks()]);
                }
            }
            z
        });
        Q4 {
            n: first.n,
            k: parts.iter().map(|p| p.k).sum(),
            block_size: first.block_size,
            accuracy_level: first.accuracy_level,
            packed: packed.into(),
            scales: scales.into(),
            zero_points: zero_points.map(Arc::from),
        }
    }

    /// The zero point of every block, 8 where there are none.
    fn zero_point_rows(&self) -> Vec<f32> {
        self.zero_points
            .as_deref()
            .map_or_else(|| vec![8.0; self.scales.len()], <[f32]>::to_vec)
    }
}

/// `w` in 4 bits: the checkpoint's own blocks when `int4` asks for them and
/// `w` has them (and is as loaded), else round-to-nearest.
fn to_4bit(w: &Matrix, int4: Int4, as_loaded: bool, cache: &Arc<WeightCache>) -> Matrix {
    let stored = (int4.source == Int4Source::Gguf && as_loaded)
        .then(|| w.stored_four_bit())
        .flatten();
    match stored {
        Some(q) => Matrix::from_codes(
            Q4 {
                accuracy_level: int4.accuracy_level,
                ..q
            },
            cache,
        ),
        None => Matrix::from_codes(Q4::quantize(w, int4), cache),
    }
}

/// Fold an RMSNorm weight `g` into the inputs of `lin` (`W diag(g)`).
fn fold(lin: &mut Linear, g: &[f32]) {
    let cols = lin.weight.cols;
    lin.weight
        .values_mut()
        .par_chunks_mut(cols)
        .for_each(|row| row.iter_mut().zip(g).for_each(|(w, &s)| *w *= s));
}

impl Model {
    /// This model with 4-bit weights: every linear projection and the LM
    /// head quantised. A tied embedding shares the LM head's codes (the
    /// builder's `GatherBlockQuantized`); an untied one stays float, as the
    /// builder writes it for CPU.
    ///
    /// `folded` are the layers whose norm weights the written graph folds into
    /// their projections (the fused form: input norm into q/k/v, the MLP's
    /// norm into gate/up). Quantisation comes after the fold, so those
    /// layers' norms become ones here and the folded products are what is
    /// quantised: the graph and the reference forward then hold the same
    /// weights.
    pub fn to_int4(&self, folded: &[usize], int4: Int4) -> Result<Model> {
        int4.check()?;
        let cfg = &self.config;
        let bs = int4.block_size;
        // A fused group stacks o_proj and down_proj along their inputs.
        if !folded.is_empty() {
            for (what, k) in [
                ("attention width", cfg.num_attention_heads * cfg.head_dim),
                ("intermediate size", cfg.intermediate_size),
            ] {
                if !k.is_multiple_of(bs) {
                    return Err(Error::Input(format!(
                        "int4 with block size {bs}: the fused form stacks weights along the \
                         {what} ({k}), which is not a whole number of blocks; use --form \
                         branches or another --block-size"
                    )));
                }
            }
        }
        let mut model = Model {
            config: self.config.clone(),
            embed_tokens: self.embed_tokens.clone(),
            layers: self.layers.clone(),
            norm: self.norm.clone(),
            lm_head: None,
            weight_cache: self.weight_cache.clone(),
        };
        for &l in folded {
            let layer = &mut model.layers[l];
            let g = std::mem::replace(&mut layer.input_layernorm, vec![1.0; cfg.hidden_size]);
            let a = &mut layer.self_attn;
            for lin in [&mut a.q_proj, &mut a.k_proj, &mut a.v_proj] {
                fold(lin, &g);
            }
            let g = std::mem::replace(
                &mut layer.post_attention_layernorm,
                vec![1.0; cfg.hidden_size],
            );
            fold(&mut layer.mlp.gate_proj, &g);
            fold(&mut layer.mlp.up_proj, &g);
        }
        for (l, layer) in model.layers.iter_mut().enumerate() {
            // A folded layer's q/k/v and gate/up are no longer the stored weights.
            let unfolded = !folded.contains(&l);
            let a = &mut layer.self_attn;
            let m = &mut layer.mlp;
            for (lin, as_loaded) in [
                (&mut a.q_proj, unfolded),
                (&mut a.k_proj, unfolded),
                (&mut a.v_proj, unfolded),
                (&mut a.o_proj, true),
                (&mut m.gate_proj, unfolded),
                (&mut m.up_proj, unfolded),
                (&mut m.down_proj, true),
            ] {
                lin.weight = to_4bit(&lin.weight, int4, as_loaded, &self.weight_cache);
            }
        }
        let lm_head = to_4bit(self.lm_head(), int4, true, &self.weight_cache);
        let shareable = lm_head
            .int4
            .as_ref()
            .is_some_and(|q| q.zero_points.is_none());
        if self.lm_head.is_none() && self.config.hidden_size.is_multiple_of(bs) && shareable {
            // Tied: the embedding reads the LM head's codes (as the builder's
            // export shares them), so its rows are the dequantised ones too;
            // the model stays tied, one matrix for both.
            model.embed_tokens = lm_head;
        } else {
            model.lm_head = Some(lm_head);
        }
        Ok(model)
    }

    /// How the model's linear weights are held: `Some` once [`Model::to_int4`]
    /// quantised them.
    pub fn int4_block_size(&self) -> Option<usize> {
        self.lm_head().int4.as_ref().map(|q| q.block_size)
    }

    /// This int4 model's weights written at another `MatMulNBits` accuracy
    /// level: the same codes and values, only how the forward treats
    /// activations changes ([`Q4::rounds_activations`]).
    pub fn set_accuracy_level(&mut self, level: u8) {
        let set = |m: &mut Matrix| {
            if let Some(q) = m.int4.as_mut() {
                Arc::make_mut(q).accuracy_level = level;
            }
        };
        for layer in &mut self.layers {
            let a = &mut layer.self_attn;
            let mlp = &mut layer.mlp;
            for lin in [
                &mut a.q_proj,
                &mut a.k_proj,
                &mut a.v_proj,
                &mut a.o_proj,
                &mut mlp.gate_proj,
                &mut mlp.up_proj,
                &mut mlp.down_proj,
            ] {
                set(&mut lin.weight);
            }
        }
        set(&mut self.embed_tokens);
        if let Some(head) = self.lm_head.as_mut() {
            set(head);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const B32: Int4 = Int4 {
        block_size: 32,
        accuracy_level: 0,
        source: Int4Source::Rtn,
    };

    fn matrix(rows: usize, cols: usize, f: impl Fn(usize) -> f32) -> Matrix {
        Matrix::new(rows, cols, (0..rows * cols).map(f).collect())
    }

    #[test]
    fn codes_round_trip_and_extreme_maps_to_code_zero() {
        let w = matrix(3, 64, |i| ((i * 37 % 101) as f32 - 50.0) / 7.0);
        let q = Q4::quantize(&w, B32);
        assert_eq!(q.packed.len(), 3 * 2 * 16);
        let d = q.dequantize();
        for (r, (row, deq)) in w.values().chunks(64).zip(d.chunks(64)).enumerate() {
            for b in 0..2 {
                let blk = &row[b * 32..(b + 1) * 32];
                let s = q.scales[r * 2 + b].abs();
                for (i, (&v, &x)) in blk.iter().zip(&deq[b * 32..]).enumerate() {
                    // Half a step, or one step where the code range (-8..=7
                    // steps) clips the side opposite the extreme.
                    let bound = if (v / s).abs() <= 7.0 { s / 2.0 } else { s };
                    assert!((v - x).abs() <= bound + 1e-6, "row {r} block {b} item {i}");
                }
            }
        }
        // A block whose extreme is negative has it exactly (code 0).
        let w = matrix(1, 32, |i| if i == 5 { -4.0 } else { 0.5 });
        let q = Q4::quantize(&w, B32);
        assert_eq!(q.scales[0], 0.5);
        assert_eq!(q.dequantize()[5], -4.0);
        // An all-zero block: scale 0, every code 8.
        let q = Q4::quantize(&matrix(1, 32, |_| 0.0), B32);
        assert_eq!((q.scales[0], q.packed[0]), (0.0, 0x88));
    }

    #[test]
    fn concatenations_keep_every_block() {
        let a = Q4::quantize(&matrix(4, 64, |i| (i as f32).sin()), B32);
        let b = Q4::quantize(&matrix(4, 32, |i| (i as f32).cos()), B32);
        let c = Q4::quantize(&matrix(2, 64, |i| (i as f32 * 0.3).cos()), B32);
        let rows = Q4::concat_inputs(&[&a, &b]);
        let (da, db, dr) = (a.dequantize(), b.dequantize(), rows.dequantize());
        for r in 0..4 {
            assert_eq!(&dr[r * 96..r * 96 + 64], &da[r * 64..(r + 1) * 64]);
            assert_eq!(&dr[r * 96 + 64..(r + 1) * 96], &db[r * 32..(r + 1) * 32]);
        }
        let cols = Q4::concat_outputs(&[&a, &c]);
        assert_eq!(cols.dequantize(), [da, c.dequantize()].concat());
    }

    #[test]
    fn stored_blocks_keep_their_values_with_or_without_zero_points() {
        let codes: Vec<u8> = (0..128).map(|i| (i * 7 % 16) as u8).collect();
        let scales = vec![0.5, 0.25, 2.0, 0.125];
        // Q4_0: offset -8 * scale, no zero points; Q4_1-like: any offset.
        for offsets in [
            scales.iter().map(|s| -8.0 * s).collect::<Vec<f32>>(),
            vec![0.3, -1.7, 0.0, 4.5],
        ] {
            let b = FourBitBlocks {
                codes: codes.clone(),
                scales: scales.clone(),
                offsets: offsets.clone(),
            };
            let q = Q4::from_blocks(&b, 2, 64).unwrap();
            assert_eq!(q.zero_points.is_none(), offsets[3] == -8.0 * scales[3]);
            assert!(!q.rounds_activations()); // accuracy level 0
            for (i, v) in q.dequantize().iter().enumerate() {
                let want = scales[i / 32] * codes[i] as f32 + offsets[i / 32];
                assert!(
                    (v - want).abs() <= 1e-6 * want.abs().max(1.0),
                    "{i}: {v} {want}"
                );
            }
        }
        // A zero scale with a non-zero offset has no MatMulNBits form.
        let b = FourBitBlocks {
            codes: vec![0; 32],
            scales: vec![0.0],
            offsets: vec![1.0],
        };
        assert!(Q4::from_blocks(&b, 1, 32).is_none());
    }

    #[test]
    fn activations_round_to_int8_steps_per_block() {
        let q = Q4::quantize(&matrix(1, 64, |_| 1.0), B32);
        let x: Vec<f32> = (0..64).map(|i| (i as f32 - 20.0) * 0.37).collect();
        let r = q.round_activations(&x);
        for (blk, rblk) in x.chunks(32).zip(r.chunks(32)) {
            let amax = blk.iter().fold(0f32, |m, v| m.max(v.abs()));
            let step = amax / 127.0;
            for (&v, &w) in blk.iter().zip(rblk) {
                assert!((v - w).abs() <= step / 2.0 + 1e-6);
                let code = w / step;
                assert!(
                    (code - code.round()).abs() < 1e-3,
                    "{w} is not on the int8 grid"
                );
            }
        }
        // The largest magnitude is kept (up to the float rounding of 127 / amax).
        assert!((r[63] - x[63]).abs() <= x[63].abs() * 1e-6);
    }
}
