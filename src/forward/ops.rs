//! Numeric kernels of the reference forward, all f32 row-major: GEMM through
//! the `gemm` crate, RMSNorm, SiLU and tanh GELU. The rotary embedding is part
//! of the model description ([`crate::model::Rope`]).

use gemm::Parallelism;

use crate::checkpoint::ModelConfig;
use crate::model::matrix::TILE_VALUES;
use crate::model::Matrix;

/// `x [rows, w.cols] @ w^T -> [rows, w.rows]`. A 4-bit weight written at
/// an accuracy level that rounds its activations has them rounded first, as
/// `MatMulNBits` does ([`crate::model::Q4::round_activations`]).
pub fn matmul_t(x: &[f32], rows: usize, w: &Matrix) -> Vec<f32> {
    let mut out = vec![0f32; rows * w.rows];
    let rounded;
    let x = match w.int4.as_deref().filter(|q| q.rounds_activations()) {
        Some(q) => {
            rounded = q.round_activations(x);
            &rounded
        }
        None => x,
    };
    // A weight not in memory is widened a tile of output rows at a time,
    // each tile's product written to its columns of `out`.
    w.for_each_tile(TILE_VALUES, |outputs, tile| {
        gemm_into(&mut out, w.rows, outputs.start, x, rows, tile, w.cols)
    });
    out
}

/// `out[:, col0..col0 + n] = x [m, k] @ w^T` for the `[n, k]` weight rows `w`,
/// `out` having `out_cols` columns.
fn gemm_into(
    out: &mut [f32],
    out_cols: usize,
    col0: usize,
    x: &[f32],
    m: usize,
    w: &[f32],
    k: usize,
) {
    let n = w.len() / k.max(1);
    assert_eq!(x.len(), m * k, "matmul input has the wrong size");
    assert_eq!(out.len(), m * out_cols, "matmul output has the wrong size");
    assert!(col0 + n <= out_cols, "matmul tile outside the output");
    if m == 0 || n == 0 {
        return;
    }
    let parallelism = if m * n * k >= 1 << 16 {
        Parallelism::Rayon(0)
    } else {
        Parallelism::None
    };
    // SAFETY: dst is m rows of out_cols starting at column col0, of which the
    // n columns written lie inside (asserted); lhs is m*k row-major; rhs =
    // w^T read column-wise from the n*k row-major tile.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr().add(col0),
            1,
            out_cols as isize,
            false,
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            k as isize,
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

/// General strided product `dst[m, n] = lhs[m, k] @ rhs[k, n]`, single-threaded
/// (callers parallelise over heads). Strides are (row, column) in elements.
#[allow(clippy::too_many_arguments)]
pub fn gemm_strided(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_strides: (usize, usize),
    lhs: &[f32],
    lhs_strides: (usize, usize),
    rhs: &[f32],
    rhs_strides: (usize, usize),
) {
    let last =
        |(rs, cs): (usize, usize), r: usize, c: usize| (r.max(1) - 1) * rs + (c.max(1) - 1) * cs;
    assert!(m == 0 || n == 0 || last(dst_strides, m, n) < dst.len());
    assert!(m == 0 || k == 0 || last(lhs_strides, m, k) < lhs.len());
    assert!(k == 0 || n == 0 || last(rhs_strides, k, n) < rhs.len());
    // SAFETY: the asserts above keep every strided access inside its slice.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            dst_strides.1 as isize,
            dst_strides.0 as isize,
            false,
            lhs.as_ptr(),
            lhs_strides.1 as isize,
            lhs_strides.0 as isize,
            rhs.as_ptr(),
            rhs_strides.1 as isize,
            rhs_strides.0 as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            Parallelism::None,
        );
    }
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

/// `RMSNorm_w(x) = x / sqrt(mean(x^2) + eps) * w`, row by row.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f64) -> Vec<f32> {
    let h = weight.len();
    let mut out = vec![0f32; x.len()];
    for (row, o) in x.chunks_exact(h).zip(out.chunks_exact_mut(h)) {
        let ms = row.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / h as f64;
        let inv = (1.0 / (ms + eps).sqrt()) as f32;
        for ((o, &v), &w) in o.iter_mut().zip(row).zip(weight) {
            *o = w * (v * inv);
        }
    }
    out
}

pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// GELU, tanh approximation (`gelu_pytorch_tanh`).
pub fn gelu_tanh(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)).tanh())
}

/// The MLP gate activation of `cfg`.
pub fn activation(cfg: &ModelConfig) -> fn(f32) -> f32 {
    match cfg.activation {
        crate::checkpoint::config::Activation::Silu => silu,
        crate::checkpoint::config::Activation::GeluTanh => gelu_tanh,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Int4, Q4};

    /// A product computed a tile of output rows at a time equals the whole
    /// to float rounding: each output is the same sum over the inputs, but
    /// the GEMM's blocking of it may follow the number of outputs (measured
    /// here: 3.1e-6 of a largest value of 2.5, 13 units in the last place).
    #[test]
    fn tiled_product_equals_the_whole() {
        let (m, n, k) = (7, 203, 576);
        let w = Matrix::new(
            n,
            k,
            (0..n * k)
                .map(|i| ((i * 7919) % 1013) as f32 / 1013.0 - 0.5)
                .collect(),
        );
        let w = Matrix::from_codes(Q4::quantize(
            &w,
            Int4 {
                accuracy_level: 0,
                ..Int4::default()
            },
        ));
        let x: Vec<f32> = (0..m * k)
            .map(|i| ((i * 31) % 97) as f32 / 97.0 - 0.5)
            .collect();
        let whole = {
            let mut out = vec![0f32; m * n];
            gemm_into(&mut out, n, 0, &x, m, &w.values(), k);
            out
        };
        let scale = whole.iter().fold(0f32, |a, v| a.max(v.abs()));
        for rows_per_tile in [1, 16, 50, 203] {
            let mut out = vec![0f32; m * n];
            w.widen_tiles(rows_per_tile * k, |outputs, tile| {
                gemm_into(&mut out, n, outputs.start, &x, m, tile, k)
            });
            let diff = out
                .iter()
                .zip(&whole)
                .fold(0f32, |a, (p, q)| a.max((p - q).abs()));
            assert!(
                diff <= 4e-6 * scale,
                "tiles of {rows_per_tile} rows: {diff} of {scale}"
            );
        }
    }
}
