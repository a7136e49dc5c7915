//! Numeric kernels of the reference forward, all f32 row-major: GEMM through
//! the `gemm` crate, RMSNorm, SiLU and tanh GELU. The rotary embedding is part
//! of the model description ([`crate::model::Rope`]).

use gemm::Parallelism;

use crate::checkpoint::ModelConfig;
use crate::model::Matrix;

/// `x [rows, w.cols] @ w^T -> [rows, w.rows]`. A 4-bit weight written at
/// an accuracy level that rounds its activations has them rounded first, as
/// `MatMulNBits` does ([`crate::model::Q4::round_activations`]).
pub fn matmul_t(x: &[f32], rows: usize, w: &Matrix) -> Vec<f32> {
    let mut out = vec![0f32; rows * w.rows];
    match w.int4.as_deref().filter(|q| q.rounds_activations()) {
        Some(q) => gemm_into(&mut out, &q.round_activations(x), rows, w, true),
        None => gemm_into(&mut out, x, rows, w, true),
    }
    out
}

fn gemm_into(out: &mut [f32], x: &[f32], rows: usize, w: &Matrix, parallel: bool) {
    let (m, n, k) = (rows, w.rows, w.cols);
    assert_eq!(x.len(), m * k, "matmul input has the wrong size");
    assert_eq!(out.len(), m * n, "matmul output has the wrong size");
    let parallelism = if parallel && m * n * k >= 1 << 16 {
        Parallelism::Rayon(0)
    } else {
        Parallelism::None
    };
    // SAFETY: the three buffers hold exactly m*n, m*k and n*k elements laid out
    // with the strides given (dst and lhs row-major, rhs = w^T read column-wise).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            false,
            x.as_ptr(),
            1,
            k as isize,
            w.data.as_ptr(),
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
