//! Numeric kernels of the reference forward, all f32 row-major: GEMM through
//! the `gemm` crate, RMSNorm, rotary embeddings (Hugging Face `rotate_half`
//! convention) and SiLU.

use gemm::Parallelism;

use crate::checkpoint::{ModelConfig, RopeScaling};
use crate::model::Matrix;

/// `x [rows, w.cols] @ w^T -> [rows, w.rows]`.
pub fn matmul_t(x: &[f32], rows: usize, w: &Matrix) -> Vec<f32> {
    let mut out = vec![0f32; rows * w.rows];
    gemm_into(&mut out, x, rows, w, true);
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

/// Rotary position embedding: `inv_freq` per rotated pair, as transformers
/// computes it (with Llama 3 scaling where configured).
#[derive(Debug, Clone)]
pub struct Rope {
    pub inv_freq: Vec<f32>,
}

impl Rope {
    /// The rotation of layer `l` (its RoPE base: Gemma's local layers differ).
    pub fn of_layer(cfg: &ModelConfig, l: usize) -> Rope {
        Self::with_theta(cfg, cfg.rope_theta_of(l))
    }

    pub fn new(cfg: &ModelConfig) -> Rope {
        Self::with_theta(cfg, cfg.rope_theta)
    }

    fn with_theta(cfg: &ModelConfig, theta: f64) -> Rope {
        let dim = cfg.head_dim;
        let mut inv_freq: Vec<f64> = (0..dim / 2)
            .map(|i| 1.0 / theta.powf((2 * i) as f64 / dim as f64))
            .collect();
        if let RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings: old,
        } = cfg.rope_scaling
        {
            let low_wavelen = old / low_freq_factor;
            let high_wavelen = old / high_freq_factor;
            for f in inv_freq.iter_mut() {
                let wavelen = 2.0 * std::f64::consts::PI / *f;
                if wavelen > low_wavelen {
                    *f /= factor;
                } else if wavelen >= high_wavelen {
                    let smooth =
                        (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                    *f = (1.0 - smooth) * *f / factor + smooth * *f;
                }
            }
        }
        Rope {
            inv_freq: inv_freq.into_iter().map(|f| f as f32).collect(),
        }
    }

    /// `cos` (or `sin`) of every position below `positions`, `[positions,
    /// head_dim]` with the two halves equal, as `apply` computes them.
    pub fn table(&self, positions: usize, sin: bool) -> Vec<f32> {
        let half = self.inv_freq.len();
        let mut out = Vec::with_capacity(positions * 2 * half);
        for pos in 0..positions {
            let row: Vec<f32> = self
                .inv_freq
                .iter()
                .map(|&f| {
                    let angle = pos as f32 * f;
                    if sin {
                        angle.sin()
                    } else {
                        angle.cos()
                    }
                })
                .collect();
            out.extend_from_slice(&row);
            out.extend_from_slice(&row);
        }
        out
    }

    /// Rotate every head of `x [T, heads*head_dim]` in place; row `t` is at
    /// position `start + t`.
    pub fn apply(&self, x: &mut [f32], heads: usize, start: usize) {
        let half = self.inv_freq.len();
        let head_dim = 2 * half;
        let width = heads * head_dim;
        let mut cos = vec![0f32; half];
        let mut sin = vec![0f32; half];
        for (t, row) in x.chunks_exact_mut(width).enumerate() {
            let pos = (start + t) as f32;
            for i in 0..half {
                // f32 product then cos/sin, as transformers does in float32.
                let angle = pos * self.inv_freq[i];
                cos[i] = angle.cos();
                sin[i] = angle.sin();
            }
            for head in row.chunks_exact_mut(head_dim) {
                let (a, b) = head.split_at_mut(half);
                for i in 0..half {
                    let (x1, x2) = (a[i], b[i]);
                    a[i] = x1 * cos[i] - x2 * sin[i];
                    b[i] = x2 * cos[i] + x1 * sin[i];
                }
            }
        }
    }
}
