//! Rotary position embedding (RoPE) of a layer, as part of the model
//! description: the reference forward rotates with it and the graph writes its
//! `cos`/`sin` tables. Hugging Face's `rotate_half` convention: a head's first
//! and second halves form the rotated pairs.

use crate::checkpoint::{ModelConfig, RopeScaling};

/// Rotary position embedding: `inv_freq` per rotated pair, as transformers
/// computes it (with Llama 3 scaling where configured).
#[derive(Debug)]
pub struct Rope {
    pub inv_freq: Vec<f32>,
    /// `cos` and `sin` of each position seen so far, `[positions, 2 * half]`
    /// (all cosines, then all sines), computed once for every layer that
    /// shares this rotation.
    angles: std::sync::RwLock<Vec<f32>>,
}

impl Clone for Rope {
    fn clone(&self) -> Rope {
        Rope {
            inv_freq: self.inv_freq.clone(),
            angles: Default::default(),
        }
    }
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
            angles: Default::default(),
        }
    }

    /// Extend the cached angles to every position below `positions`: the
    /// f32 product of position and frequency, then its `cos` and `sin`, as
    /// transformers computes them in float32.
    fn cover(&self, positions: usize) {
        let half = self.inv_freq.len();
        let have = self.angles.read().unwrap_or_else(|e| e.into_inner()).len() / (2 * half).max(1);
        if have >= positions {
            return;
        }
        let mut angles = self.angles.write().unwrap_or_else(|e| e.into_inner());
        let mut pos = angles.len() / (2 * half).max(1);
        while pos < positions {
            let (sin, cos): (Vec<f32>, Vec<f32>) = self
                .inv_freq
                .iter()
                .map(|&f| (pos as f32 * f).sin_cos())
                .unzip();
            angles.extend_from_slice(&cos);
            angles.extend_from_slice(&sin);
            pos += 1;
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

    /// Rotate every head of the queries `q [T, q_heads*head_dim]` and the
    /// keys `k [T, k_heads*head_dim]` in place; row `t` is at position
    /// `start + t`. Rows split over the thread pool when there are many,
    /// each row's angles computed once for both.
    pub fn apply(
        &self,
        q: &mut [f32],
        q_heads: usize,
        k: &mut [f32],
        k_heads: usize,
        start: usize,
    ) {
        use rayon::prelude::*;
        let half = self.inv_freq.len();
        let head_dim = 2 * half;
        let rows = q.len() / (q_heads * head_dim).max(1);
        self.cover(start + rows);
        let angles = self.angles.read().unwrap_or_else(|e| e.into_inner());
        let rotate = |(t, (qr, kr)): (usize, (&mut [f32], &mut [f32]))| {
            let at = (start + t) * 2 * half;
            let (cos, sin) = angles[at..at + 2 * half].split_at(half);
            for head in qr
                .chunks_exact_mut(head_dim)
                .chain(kr.chunks_exact_mut(head_dim))
            {
                let (a, b) = head.split_at_mut(half);
                for i in 0..half {
                    let (x1, x2) = (a[i], b[i]);
                    a[i] = x1 * cos[i] - x2 * sin[i];
                    b[i] = x2 * cos[i] + x1 * sin[i];
                }
            }
        };
        let (qw, kw) = (q_heads * head_dim, k_heads * head_dim);
        if q.len() + k.len() >= 1 << 14 {
            q.par_chunks_exact_mut(qw)
                .zip(k.par_chunks_exact_mut(kw))
                .enumerate()
                .for_each(rotate);
        } else {
            q.chunks_exact_mut(qw)
                .zip(k.chunks_exact_mut(kw))
                .enumerate()
                .for_each(rotate);
        }
    }
}
