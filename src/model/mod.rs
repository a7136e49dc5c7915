//! Architecture description and weights of a Llama-family decoder, found by
//! their Hugging Face names through a prefix scope (`model.layers.3.self_attn`)
//! and shape-checked at load; errors name the file and the tensor.
//!
//! Biases, q/k norms or extra sublayer norms of other families belong here as
//! optional fields of [`Attention`], [`Mlp`] and [`DecoderLayer`].

pub mod int4;
pub mod matrix;
pub mod panels;
pub mod rope;

use rayon::prelude::*;

pub use int4::{Int4, Int4Source, Q4};
pub use matrix::{Matrix, WeightCache, DEFAULT_WIDEN_BUDGET};
pub use rope::Rope;

use std::borrow::Cow;
use std::sync::Arc;

use crate::checkpoint::{ModelConfig, TensorSource};
use crate::{Error, Result};

/// `y = x W^T (+ b)`.
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Matrix,
    /// `[out_features]` (Qwen2's q/k/v, `attention_bias`).
    pub bias: Option<Vec<f32>>,
}

#[derive(Debug, Clone)]
pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    /// RMS norm weights `[head_dim]` over each query / key head (Qwen3).
    pub q_norm: Option<Vec<f32>>,
    pub k_norm: Option<Vec<f32>>,
}

/// SwiGLU: `down(silu(gate(x)) * up(x))`.
#[derive(Debug, Clone)]
pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

/// One pre-norm decoder block. Norm weights are held as applied: Gemma's
/// stored `w` is held as `1 + w`.
#[derive(Debug, Clone)]
pub struct DecoderLayer {
    pub input_layernorm: Vec<f32>,
    pub self_attn: Attention,
    /// The MLP's input norm (Llama's name; Gemma's `pre_feedforward_layernorm`).
    pub post_attention_layernorm: Vec<f32>,
    pub mlp: Mlp,
    /// Gemma: the norm of the attention output (its `post_attention_layernorm`).
    pub attn_out_norm: Option<Vec<f32>>,
    /// Gemma: the norm of the MLP output (`post_feedforward_layernorm`).
    pub mlp_out_norm: Option<Vec<f32>>,
}

/// A Llama / Mistral causal LM with f32 weights.
#[derive(Clone)]
pub struct Model {
    pub config: ModelConfig,
    pub embed_tokens: Matrix,
    pub layers: Vec<DecoderLayer>,
    pub norm: Vec<f32>,
    /// `None` when tied to `embed_tokens`.
    pub lm_head: Option<Matrix>,
    /// What its matrices' widened values are kept in.
    pub weight_cache: Arc<WeightCache>,
}

/// A weight of [`Model::named_tensors`]: values in memory, or a matrix
/// widened when asked.
pub enum Tensor<'a> {
    Values(&'a [f32]),
    Matrix(&'a Matrix),
}

impl Tensor<'_> {
    pub fn values(&self) -> Cow<'_, [f32]> {
        match self {
            Tensor::Values(v) => Cow::Borrowed(v),
            Tensor::Matrix(m) => m.values(),
        }
    }
}

/// A prefix scope over a [`TensorSource`].
#[derive(Clone, Copy)]
pub struct Weights<'a> {
    source: &'a Arc<dyn TensorSource>,
    prefix: &'a str,
    cache: &'a Arc<WeightCache>,
}

impl<'a> Weights<'a> {
    pub fn new(source: &'a Arc<dyn TensorSource>, cache: &'a Arc<WeightCache>) -> Self {
        Weights {
            source,
            prefix: "",
            cache,
        }
    }

    fn full(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    /// Check that `prefix.name` exists with `shape` and that its rows can
    /// be read; its full name.
    fn check(&self, name: &str, shape: &[usize]) -> Result<String> {
        let full = self.full(name);
        let file = self.source.file_of(&full);
        let info = self.source.info(&full).ok_or_else(|| {
            let why = self
                .source
                .unsupported(&full)
                .unwrap_or_else(|| format!("missing (expected shape {shape:?})"));
            Error::tensor(&file, &full, why)
        })?;
        if info.shape != shape {
            return Err(Error::tensor(
                &file,
                &full,
                format!(
                    "shape {:?} does not match the expected {shape:?} from the config",
                    info.shape
                ),
            ));
        }
        // Reading no rows runs every check a read makes (block layout, head split).
        self.source.read_rows(&full, 0..0, &mut [])?;
        Ok(full)
    }

    /// Load `prefix.name` as f32 and check its shape.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let full = self.check(name, shape)?;
        self.source.load_f32(&full)
    }

    /// The matrix `prefix.name`, shape-checked and kept as stored.
    pub fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Matrix> {
        let full = self.check(name, &[rows, cols])?;
        Ok(Matrix::stored(
            rows,
            cols,
            self.source.clone(),
            full,
            self.cache,
        ))
    }

    pub fn linear(
        &self,
        name: &str,
        out_features: usize,
        in_features: usize,
        bias: bool,
    ) -> Result<Linear> {
        Ok(Linear {
            weight: self.matrix(&format!("{name}.weight"), out_features, in_features)?,
            bias: if bias {
                Some(self.get(&format!("{name}.bias"), &[out_features])?)
            } else {
                None
            },
        })
    }

    /// An RMS norm weight of `len`, as applied (`1 + w` where the family
    /// stores `w`).
    pub fn norm(&self, name: &str, len: usize, plus_one: bool) -> Result<Vec<f32>> {
        let mut w = self.get(name, &[len])?;
        if plus_one {
            w.iter_mut().for_each(|v| *v += 1.0);
        }
        Ok(w)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.source.info(&self.full(name)).is_some()
    }
}

impl Attention {
    fn load(w: Weights, cfg: &ModelConfig) -> Result<Self> {
        let (h, q, kv) = (
            cfg.hidden_size,
            cfg.num_attention_heads * cfg.head_dim,
            cfg.num_key_value_heads * cfg.head_dim,
        );
        let norm = |name: &str| -> Result<Option<Vec<f32>>> {
            cfg.qk_norm
                .then(|| w.norm(name, cfg.head_dim, cfg.norm_plus_one))
                .transpose()
        };
        Ok(Attention {
            q_proj: w.linear("q_proj", q, h, cfg.qkv_bias)?,
            k_proj: w.linear("k_proj", kv, h, cfg.qkv_bias)?,
            v_proj: w.linear("v_proj", kv, h, cfg.qkv_bias)?,
            o_proj: w.linear("o_proj", h, q, cfg.o_bias)?,
            q_norm: norm("q_norm.weight")?,
            k_norm: norm("k_norm.weight")?,
        })
    }
}

impl Mlp {
    fn load(w: Weights, cfg: &ModelConfig) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Mlp {
            gate_proj: w.linear("gate_proj", i, h, false)?,
            up_proj: w.linear("up_proj", i, h, false)?,
            down_proj: w.linear("down_proj", h, i, false)?,
        })
    }
}

impl DecoderLayer {
    fn load(w: Weights, cfg: &ModelConfig) -> Result<Self> {
        let h = cfg.hidden_size;
        let attn_prefix = format!("{}.self_attn", w.prefix);
        let mlp_prefix = format!("{}.mlp", w.prefix);
        let norm = |name: &str| w.norm(name, h, cfg.norm_plus_one);
        // Gemma: pre and post norms around each sublayer.
        let (mlp_in, attn_out, mlp_out) = if cfg.sandwich_norms {
            (
                "pre_feedforward_layernorm.weight",
                Some(norm("post_attention_layernorm.weight")?),
                Some(norm("post_feedforward_layernorm.weight")?),
            )
        } else {
            ("post_attention_layernorm.weight", None, None)
        };
        Ok(DecoderLayer {
            input_layernorm: norm("input_layernorm.weight")?,
            attn_out_norm: attn_out,
            mlp_out_norm: mlp_out,
            self_attn: Attention::load(
                Weights {
                    prefix: &attn_prefix,
                    ..w
                },
                cfg,
            )?,
            post_attention_layernorm: norm(mlp_in)?,
            mlp: Mlp::load(
                Weights {
                    prefix: &mlp_prefix,
                    ..w
                },
                cfg,
            )?,
        })
    }
}

impl DecoderLayer {
    /// The very same weights as `other` ([`Matrix::is`]; norms and biases
    /// equal).
    fn is(&self, other: &DecoderLayer) -> bool {
        let lin = |a: &Linear, b: &Linear| a.weight.is(&b.weight) && a.bias == b.bias;
        let (a, b) = (&self.self_attn, &other.self_attn);
        let (m, n) = (&self.mlp, &other.mlp);
        lin(&a.q_proj, &b.q_proj)
            && lin(&a.k_proj, &b.k_proj)
            && lin(&a.v_proj, &b.v_proj)
            && lin(&a.o_proj, &b.o_proj)
            && a.q_norm == b.q_norm
            && a.k_norm == b.k_norm
            && lin(&m.gate_proj, &n.gate_proj)
            && lin(&m.up_proj, &n.up_proj)
            && lin(&m.down_proj, &n.down_proj)
            && self.input_layernorm == other.input_layernorm
            && self.post_attention_layernorm == other.post_attention_layernorm
            && self.attn_out_norm == other.attn_out_norm
            && self.mlp_out_norm == other.mlp_out_norm
    }
}

impl Model {
    /// Leading layers (and the embedding) `self` holds as the very same
    /// weights as `other`, as a model derived from another by healing does
    /// before the first layer it corrected: both run them to the same bits.
    pub fn same_layers_as(&self, other: &Model) -> usize {
        if !self.embed_tokens.is(&other.embed_tokens) {
            return 0;
        }
        self.layers
            .iter()
            .zip(&other.layers)
            .take_while(|(a, b)| a.is(b))
            .count()
    }

    /// Open every weight, checking names and shapes: norms and biases are
    /// read as f32, matrices kept as stored ([`Matrix::stored`]) and their
    /// widened values kept in `weight_cache` while it has room.
    pub fn load(
        source: &Arc<dyn TensorSource>,
        config: &ModelConfig,
        weight_cache: &Arc<WeightCache>,
    ) -> Result<Model> {
        let w = Weights::new(source, weight_cache);
        let (v, h) = (config.vocab_size, config.hidden_size);
        let embed_tokens = w.matrix("model.embed_tokens.weight", v, h)?;
        let layers = (0..config.num_hidden_layers)
            .into_par_iter()
            .map(|i| {
                let prefix = format!("model.layers.{i}");
                DecoderLayer::load(
                    Weights {
                        prefix: &prefix,
                        ..w
                    },
                    config,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let norm = w.norm("model.norm.weight", h, config.norm_plus_one)?;
        let lm_head = if config.tie_word_embeddings && !w.contains("lm_head.weight") {
            None
        } else {
            Some(w.matrix("lm_head.weight", v, h)?)
        };
        Ok(Model {
            config: config.clone(),
            embed_tokens,
            layers,
            norm,
            lm_head,
            weight_cache: weight_cache.clone(),
        })
    }

    /// This model with only the layers `kept` (ascending original indices),
    /// renumbered `0..kept.len()`: what a plan that drops layers leaves
    /// ([`crate::plan::Plan::without_dropped`]). Its config counts the kept
    /// layers and keeps their own attention kinds (Gemma's sliding layers).
    pub fn keep_layers(&self, kept: &[usize]) -> Model {
        let mut config = self.config.clone();
        config.num_hidden_layers = kept.len();
        if let Some(s) = &config.sliding_layers {
            config.sliding_layers = Some(kept.iter().map(|&l| s[l]).collect());
        }
        Model {
            config,
            embed_tokens: self.embed_tokens.clone(),
            layers: kept.iter().map(|&l| self.layers[l].clone()).collect(),
            norm: self.norm.clone(),
            lm_head: self.lm_head.clone(),
            weight_cache: self.weight_cache.clone(),
        }
    }

    /// The output projection (the embedding when tied).
    pub fn lm_head(&self) -> &Matrix {
        self.lm_head.as_ref().unwrap_or(&self.embed_tokens)
    }

    /// Every weight under its Hugging Face name, norms as applied (see
    /// [`Model::write_hf_dir`] for the stored `w` of Gemma).
    pub fn named_tensors(&self) -> Vec<(String, Vec<usize>, Tensor<'_>)> {
        fn m(name: String, x: &Matrix) -> (String, Vec<usize>, Tensor<'_>) {
            (name, vec![x.rows, x.cols], Tensor::Matrix(x))
        }
        let mut out: Vec<(String, Vec<usize>, Tensor<'_>)> = Vec::new();
        out.push(m("model.embed_tokens.weight".into(), &self.embed_tokens));
        for (i, l) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            let h = l.input_layernorm.len();
            out.push((
                format!("{p}.input_layernorm.weight"),
                vec![h],
                Tensor::Values(&l.input_layernorm),
            ));
            let a = &l.self_attn;
            for (name, lin) in [
                ("q_proj", &a.q_proj),
                ("k_proj", &a.k_proj),
                ("v_proj", &a.v_proj),
                ("o_proj", &a.o_proj),
            ] {
                out.push(m(format!("{p}.self_attn.{name}.weight"), &lin.weight));
                if let Some(b) = &lin.bias {
                    out.push((
                        format!("{p}.self_attn.{name}.bias"),
                        vec![b.len()],
                        Tensor::Values(b),
                    ));
                }
            }
            for (name, norm) in [("q_norm", &a.q_norm), ("k_norm", &a.k_norm)] {
                if let Some(w) = norm {
                    out.push((
                        format!("{p}.self_attn.{name}.weight"),
                        vec![w.len()],
                        Tensor::Values(w),
                    ));
                }
            }
            let mlp_in = if l.attn_out_norm.is_some() {
                "pre_feedforward_layernorm"
            } else {
                "post_attention_layernorm"
            };
            out.push((
                format!("{p}.{mlp_in}.weight"),
                vec![h],
                Tensor::Values(&l.post_attention_layernorm),
            ));
            for (name, norm) in [
                ("post_attention_layernorm", &l.attn_out_norm),
                ("post_feedforward_layernorm", &l.mlp_out_norm),
            ] {
                if let Some(w) = norm {
                    out.push((format!("{p}.{name}.weight"), vec![h], Tensor::Values(w)));
                }
            }
            out.push(m(
                format!("{p}.mlp.gate_proj.weight"),
                &l.mlp.gate_proj.weight,
            ));
            out.push(m(format!("{p}.mlp.up_proj.weight"), &l.mlp.up_proj.weight));
            out.push(m(
                format!("{p}.mlp.down_proj.weight"),
                &l.mlp.down_proj.weight,
            ));
        }
        out.push((
            "model.norm.weight".into(),
            vec![self.norm.len()],
            Tensor::Values(&self.norm),
        ));
        if let Some(head) = &self.lm_head {
            out.push(m("lm_head.weight".into(), head));
        }
        out
    }
}

impl Model {
    /// Write a Hugging Face directory (`config.json`, `model.safetensors`, and
    /// `tokenizer.json` when given). Built under a hidden temporary name beside
    /// `dir` and renamed at the end, so `dir` never exists half-written.
    pub fn write_hf_dir(
        &self,
        dir: &std::path::Path,
        tokenizer_json: Option<&str>,
        store: crate::checkpoint::safetensors::StoreType,
    ) -> Result<()> {
        crate::output::new_directory(dir, |tmp| {
            let config =
                serde_json::to_string_pretty(&self.config.to_hf_json()).expect("JSON value");
            let path = tmp.join("config.json");
            std::fs::write(&path, config).map_err(|e| Error::io(&path, e))?;
            if let Some(t) = tokenizer_json {
                let path = tmp.join("tokenizer.json");
                std::fs::write(&path, t).map_err(|e| Error::io(&path, e))?;
            }
            // One tensor widened at a time, as it is written. Gemma stores
            // `w` for a norm applied as `1 + w`.
            let tensors = self.named_tensors();
            let specs: Vec<(String, Vec<usize>)> = tensors
                .iter()
                .map(|(n, shape, _)| (n.clone(), shape.clone()))
                .collect();
            let values = |i: usize| {
                let (name, _, t) = &tensors[i];
                let v = t.values();
                if self.config.norm_plus_one && name.ends_with("norm.weight") {
                    Cow::Owned(v.iter().map(|x| x - 1.0).collect())
                } else {
                    v
                }
            };
            crate::checkpoint::safetensors::write_with(
                &tmp.join("model.safetensors"),
                &specs,
                values,
                store,
            )
        })
    }
}
