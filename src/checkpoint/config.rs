//! Model configuration, parsed in two steps: a raw serde struct mirroring
//! `config.json` (every field optional), then [`RawHfConfig::into_config`]
//! into a validated [`ModelConfig`]. GGUF metadata fills the same struct.

use std::path::Path;

use serde::Deserialize;

use crate::{Error, Result};

/// Architecture family. Llama and Mistral share one block structure; other
/// families add biases or norms as local variations of the same description.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    Llama,
    Mistral,
    /// Qwen2 / Qwen2.5: biases on the q, k and v projections.
    Qwen2,
    /// Qwen3: RMS norms over each query and key head, before the rotary embedding.
    Qwen3,
    /// Gemma 3: embedding scaled by sqrt(hidden), `(1 + w)` norms, a norm after each
    /// sublayer too, q/k head norms, GeGLU (tanh GELU), sliding-window layers with
    /// their own RoPE base interleaved with global ones.
    Gemma3,
}

/// The MLP's gate activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// SwiGLU.
    Silu,
    /// GeGLU with the tanh approximation (`gelu_pytorch_tanh`).
    GeluTanh,
}

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Mistral => "mistral",
            Family::Qwen2 => "qwen2",
            Family::Qwen3 => "qwen3",
            Family::Gemma3 => "gemma3",
        }
    }
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(tag = "rope_type", rename_all = "lowercase")]
pub enum RopeScaling {
    None,
    /// Llama 3.x frequency-dependent scaling of `inv_freq`.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

/// What both readers assume when a checkpoint does not say: the defaults of
/// transformers' `LlamaConfig` (`rms_norm_eps` 1e-6, `rope_theta` 10000,
/// `max_position_embeddings` 2048).
pub const DEFAULT_RMS_NORM_EPS: f64 = 1e-6;
pub const DEFAULT_ROPE_THETA: f64 = 10000.0;
pub const DEFAULT_MAX_POSITION_EMBEDDINGS: usize = 2048;

/// Validated configuration of a decoder-only transformer.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelConfig {
    pub family: Family,
    pub num_hidden_layers: usize,
    pub hidden_size: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub intermediate_size: usize,
    pub vocab_size: usize,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub rms_norm_eps: f64,
    pub tie_word_embeddings: bool,
    pub max_position_embeddings: usize,
    /// Mistral's sliding attention window, if any.
    pub sliding_window: Option<usize>,
    /// Biases on q_proj, k_proj and v_proj (Qwen2; `attention_bias`).
    pub qkv_bias: bool,
    /// A bias on o_proj (`attention_bias` of Llama and Qwen3).
    pub o_bias: bool,
    /// Per-head RMS norms `q_norm` / `k_norm` (Qwen3, Gemma 3).
    pub qk_norm: bool,
    pub activation: Activation,
    /// Gemma: the embedding is multiplied by sqrt(hidden_size).
    pub embed_scale: Option<f32>,
    /// Gemma: norm weights are stored as `w` and applied as `1 + w`. The
    /// [`Model`](crate::model::Model) holds the applied `1 + w`.
    pub norm_plus_one: bool,
    /// Gemma: an RMS norm on each sublayer's output, before the residual add
    /// (`post_attention_layernorm`, `post_feedforward_layernorm`).
    pub sandwich_norms: bool,
    /// Scale of the attention scores (`query_pre_attn_scalar ** -0.5`, else
    /// `head_dim ** -0.5`).
    pub query_scale: f64,
    /// Per layer, whether it attends through `sliding_window` (Gemma's local
    /// layers); `None`: every layer does when a window is set (Mistral).
    pub sliding_layers: Option<Vec<bool>>,
    /// RoPE base of the sliding-window layers, when it differs (Gemma 3: 10000).
    pub rope_local_theta: Option<f64>,
    /// Windows start with the BOS token (Gemma needs it).
    pub add_bos: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    fn first(&self) -> Option<u32> {
        match self {
            TokenIds::One(i) => Some(*i),
            TokenIds::Many(v) => v.first().copied(),
        }
    }
}

#[derive(Debug, Deserialize)]
struct RawRopeScaling {
    rope_type: Option<String>,
    #[serde(rename = "type")]
    legacy_type: Option<String>,
    rope_theta: Option<f64>,
    factor: Option<f64>,
    low_freq_factor: Option<f64>,
    high_freq_factor: Option<f64>,
    original_max_position_embeddings: Option<f64>,
}

/// `config.json` as written by transformers 4.x and 5.x.
#[derive(Debug, Deserialize)]
pub struct RawHfConfig {
    architectures: Option<Vec<String>>,
    model_type: Option<String>,
    num_hidden_layers: Option<usize>,
    hidden_size: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    intermediate_size: Option<usize>,
    vocab_size: Option<usize>,
    rope_theta: Option<f64>,
    rope_scaling: Option<RawRopeScaling>,
    /// transformers 5 keeps `rope_theta` and the scaling here; Gemma 3 nests
    /// one such dict per layer type (`full_attention`, `sliding_attention`).
    rope_parameters: Option<serde_json::Value>,
    rms_norm_eps: Option<f64>,
    tie_word_embeddings: Option<bool>,
    max_position_embeddings: Option<usize>,
    sliding_window: Option<usize>,
    bos_token_id: Option<TokenIds>,
    eos_token_id: Option<TokenIds>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    hidden_act: Option<String>,
    hidden_activation: Option<String>,
    use_sliding_window: Option<bool>,
    query_pre_attn_scalar: Option<f64>,
    layer_types: Option<Vec<String>>,
    sliding_window_pattern: Option<usize>,
    rope_local_base_freq: Option<f64>,
    final_logit_softcapping: Option<f64>,
    attn_logit_softcapping: Option<f64>,
}

impl RawHfConfig {
    pub fn into_config(self, path: &Path) -> Result<ModelConfig> {
        let err = |msg: String| Error::config(path, msg);
        let arch = self
            .architectures
            .as_ref()
            .and_then(|a| a.first().cloned())
            .or_else(|| self.model_type.clone())
            .ok_or_else(|| err("neither `architectures` nor `model_type` is set".into()))?;
        let family = match arch.as_str() {
            "LlamaForCausalLM" | "llama" => Family::Llama,
            "MistralForCausalLM" | "mistral" => Family::Mistral,
            "Qwen2ForCausalLM" | "qwen2" => Family::Qwen2,
            "Qwen3ForCausalLM" | "qwen3" => Family::Qwen3,
            "Gemma3ForCausalLM" | "gemma3_text" => Family::Gemma3,
            other => {
                return Err(err(format!(
                    "unknown architecture `{other}` (supported: LlamaForCausalLM, \
                     MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, Gemma3ForCausalLM)"
                )))
            }
        };
        let gemma = family == Family::Gemma3;
        for (key, v) in [
            ("final_logit_softcapping", self.final_logit_softcapping),
            ("attn_logit_softcapping", self.attn_logit_softcapping),
        ] {
            if v.is_some() {
                return Err(err(format!("`{key}` is not supported")));
            }
        }
        if self.mlp_bias == Some(true) {
            return Err(err("mlp_bias = true is not supported".into()));
        }
        if matches!(family, Family::Qwen2 | Family::Qwen3) && self.use_sliding_window == Some(true)
        {
            return Err(err(
                "use_sliding_window = true is not supported for Qwen (its window applies to \
                 some layers only)"
                    .into(),
            ));
        }
        let attention_bias = self.attention_bias == Some(true);
        let qkv_bias = family == Family::Qwen2 || attention_bias;
        let o_bias = family != Family::Qwen2 && attention_bias;
        let activation = match self
            .hidden_activation
            .as_deref()
            .or(self.hidden_act.as_deref())
        {
            None if gemma => Activation::GeluTanh,
            None | Some("silu") => Activation::Silu,
            Some("gelu_pytorch_tanh") => Activation::GeluTanh,
            Some(other) => {
                return Err(err(format!(
                    "hidden activation `{other}` is not supported (silu, gelu_pytorch_tanh)"
                )))
            }
        };
        let need = |v: Option<usize>, key: &str| v.ok_or_else(|| err(format!("missing `{key}`")));
        let num_hidden_layers = need(self.num_hidden_layers, "num_hidden_layers")?;
        let hidden_size = need(self.hidden_size, "hidden_size")?;
        let num_attention_heads = need(self.num_attention_heads, "num_attention_heads")?;
        let intermediate_size = need(self.intermediate_size, "intermediate_size")?;
        let vocab_size = need(self.vocab_size, "vocab_size")?;
        let num_key_value_heads = self.num_key_value_heads.unwrap_or(num_attention_heads);
        if num_attention_heads == 0
            || hidden_size % num_attention_heads != 0 && self.head_dim.is_none()
        {
            return Err(err(format!(
                "hidden_size {hidden_size} is not divisible by num_attention_heads {num_attention_heads}"
            )));
        }
        let head_dim = self.head_dim.unwrap_or(hidden_size / num_attention_heads);
        // transformers 5 moves rope_theta and the scaling dict under rope_parameters,
        // per layer type for Gemma 3.
        let rope_dict = |v: &serde_json::Value| -> Result<RawRopeScaling> {
            serde_json::from_value(v.clone()).map_err(|e| err(format!("rope_parameters: {e}")))
        };
        let (global, local) = match &self.rope_parameters {
            Some(v) if v.get("full_attention").is_some() => (
                Some(rope_dict(&v["full_attention"])?),
                v.get("sliding_attention").map(rope_dict).transpose()?,
            ),
            Some(v) => (Some(rope_dict(v)?), None),
            None => (None, None),
        };
        let params = global.as_ref().or(self.rope_scaling.as_ref());
        let rope_theta = self
            .rope_theta
            .or_else(|| global.as_ref().and_then(|p| p.rope_theta))
            .unwrap_or(DEFAULT_ROPE_THETA);
        let rope_local_theta = local
            .as_ref()
            .and_then(|p| p.rope_theta)
            .or(self.rope_local_base_freq)
            .or(gemma.then_some(10000.0));
        if let Some(kind) = local
            .as_ref()
            .and_then(|p| p.rope_type.as_deref())
            .filter(|k| *k != "default")
        {
            return Err(err(format!(
                "rope scaling `{kind}` of the sliding layers is not supported"
            )));
        }
        let sliding_layers = match (&self.layer_types, self.sliding_window_pattern) {
            (Some(types), _) => Some(
                types
                    .iter()
                    .map(|t| match t.as_str() {
                        "sliding_attention" => Ok(true),
                        "full_attention" => Ok(false),
                        other => Err(err(format!("layer type `{other}` is not supported"))),
                    })
                    .collect::<Result<Vec<bool>>>()?,
            ),
            (None, Some(p)) if gemma && p > 0 => {
                Some((0..num_hidden_layers).map(|i| (i + 1) % p != 0).collect())
            }
            (None, _) if gemma => Some((0..num_hidden_layers).map(|i| (i + 1) % 6 != 0).collect()),
            _ => None,
        };
        if sliding_layers
            .as_ref()
            .is_some_and(|s| s.len() != num_hidden_layers)
        {
            return Err(err(format!(
                "layer_types lists {} layers, num_hidden_layers is {num_hidden_layers}",
                sliding_layers.as_ref().map_or(0, Vec::len)
            )));
        }
        let rope_scaling = match params {
            None => RopeScaling::None,
            Some(p) => {
                let kind = p.rope_type.clone().or_else(|| p.legacy_type.clone());
                match kind.as_deref() {
                    None | Some("default") => RopeScaling::None,
                    Some("llama3") => {
                        let get = |v: Option<f64>, key: &str| {
                            v.ok_or_else(|| err(format!("rope_scaling llama3: missing `{key}`")))
                        };
                        RopeScaling::Llama3 {
                            factor: get(p.factor, "factor")?,
                            low_freq_factor: get(p.low_freq_factor, "low_freq_factor")?,
                            high_freq_factor: get(p.high_freq_factor, "high_freq_factor")?,
                            original_max_position_embeddings: get(
                                p.original_max_position_embeddings,
                                "original_max_position_embeddings",
                            )?,
                        }
                    }
                    Some(other) => {
                        return Err(err(format!(
                            "rope scaling `{other}` is not supported (supported: none, llama3)"
                        )))
                    }
                }
            }
        };
        let config = ModelConfig {
            family,
            num_hidden_layers,
            hidden_size,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            intermediate_size,
            vocab_size,
            rope_theta,
            rope_scaling,
            rms_norm_eps: self.rms_norm_eps.unwrap_or(DEFAULT_RMS_NORM_EPS),
            tie_word_embeddings: self.tie_word_embeddings.unwrap_or(false),
            max_position_embeddings: self
                .max_position_embeddings
                .unwrap_or(DEFAULT_MAX_POSITION_EMBEDDINGS),
            sliding_window: if matches!(family, Family::Mistral | Family::Gemma3) {
                self.sliding_window
            } else {
                None
            },
            qkv_bias,
            o_bias,
            qk_norm: matches!(family, Family::Qwen3 | Family::Gemma3),
            activation,
            embed_scale: gemma.then(|| (hidden_size as f64).sqrt() as f32),
            norm_plus_one: gemma,
            sandwich_norms: gemma,
            query_scale: self
                .query_pre_attn_scalar
                .unwrap_or(head_dim as f64)
                .powf(-0.5),
            sliding_layers,
            rope_local_theta: if gemma { rope_local_theta } else { None },
            add_bos: gemma,
            bos_token_id: self.bos_token_id.as_ref().and_then(TokenIds::first),
            eos_token_id: self.eos_token_id.as_ref().and_then(TokenIds::first),
        };
        config.validate(path)?;
        Ok(config)
    }
}

impl ModelConfig {
    pub fn from_hf_dir(dir: &Path) -> Result<ModelConfig> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        Self::from_hf_json(&path, &text)
    }

    /// Parse the text of a Hugging Face `config.json` read from `path`.
    pub fn from_hf_json(path: &Path, text: &str) -> Result<ModelConfig> {
        let raw: RawHfConfig = serde_json::from_str(text)
            .map_err(|e| Error::format(path, format!("invalid JSON: {e}")))?;
        raw.into_config(path)
    }

    pub fn validate(&self, path: &Path) -> Result<()> {
        let err = |msg: String| Err(Error::config(path, msg));
        if self.num_hidden_layers == 0 || self.hidden_size == 0 || self.vocab_size == 0 {
            return err("num_hidden_layers, hidden_size and vocab_size must be positive".into());
        }
        if self.num_key_value_heads == 0
            || !self
                .num_attention_heads
                .is_multiple_of(self.num_key_value_heads)
        {
            return err(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return err(format!(
                "head_dim {} must be even and positive",
                self.head_dim
            ));
        }
        if self.rope_theta.is_nan()
            || self.rope_theta <= 0.0
            || self.rms_norm_eps.is_nan()
            || self.rms_norm_eps <= 0.0
        {
            return err("rope_theta and rms_norm_eps must be positive".into());
        }
        Ok(())
    }

    /// Number of parameters, counting a tied lm_head once.
    pub fn parameter_count(&self) -> usize {
        let h = self.hidden_size;
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        let per_layer = h * q + 2 * h * kv + q * h + 3 * h * self.intermediate_size + 2 * h;
        let embed = self.vocab_size * h;
        let head = if self.tie_word_embeddings { 0 } else { embed };
        embed + head + h + per_layer * self.num_hidden_layers
    }
}

impl ModelConfig {
    /// A Hugging Face `config.json` describing this model (transformers 4.x
    /// layout with a top-level `rope_theta`, which transformers 5 also reads).
    /// The token each calibration or evaluation window starts with, for the
    /// families that need one (Gemma: `<bos>`).
    pub fn window_bos(&self) -> Option<u32> {
        self.bos_token_id.filter(|_| self.add_bos)
    }

    /// The attention window of layer `l`, if it has one.
    pub fn window_of(&self, l: usize) -> Option<usize> {
        match &self.sliding_layers {
            Some(s) if !s[l] => None,
            _ => self.sliding_window,
        }
    }

    /// The RoPE base of layer `l`.
    pub fn rope_theta_of(&self, l: usize) -> f64 {
        match (&self.sliding_layers, self.rope_local_theta) {
            (Some(s), Some(local)) if s[l] => local,
            _ => self.rope_theta,
        }
    }

    pub fn to_hf_json(&self) -> serde_json::Value {
        let (arch, model_type) = match self.family {
            Family::Llama => ("LlamaForCausalLM", "llama"),
            Family::Mistral => ("MistralForCausalLM", "mistral"),
            Family::Qwen2 => ("Qwen2ForCausalLM", "qwen2"),
            Family::Qwen3 => ("Qwen3ForCausalLM", "qwen3"),
            Family::Gemma3 => ("Gemma3ForCausalLM", "gemma3_text"),
        };
        let rope_scaling = match &self.rope_scaling {
            RopeScaling::None => serde_json::Value::Null,
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                serde_json::json!({
                    "rope_type": "llama3", "factor": factor, "low_freq_factor": low_freq_factor,
                    "high_freq_factor": high_freq_factor,
                    "original_max_position_embeddings": original_max_position_embeddings,
                })
            }
        };
        let mut v = serde_json::json!({
            "architectures": [arch],
            "model_type": model_type,
            "num_hidden_layers": self.num_hidden_layers,
            "hidden_size": self.hidden_size,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size,
            "vocab_size": self.vocab_size,
            "rope_theta": self.rope_theta,
            "rope_scaling": rope_scaling,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": match self.activation {
                Activation::Silu => "silu",
                Activation::GeluTanh => "gelu_pytorch_tanh",
            },
            "attention_bias": self.o_bias,
            "mlp_bias": false,
            "torch_dtype": "float32",
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
        });
        if let Some(w) = self.sliding_window {
            v["sliding_window"] = serde_json::json!(w);
        }
        if self.family == Family::Gemma3 {
            v["hidden_activation"] = v["hidden_act"].clone();
            v["query_pre_attn_scalar"] = serde_json::json!(self.query_scale.powi(-2).round());
            v["rope_local_base_freq"] = serde_json::json!(self.rope_local_theta);
            if let Some(s) = &self.sliding_layers {
                let types: Vec<&str> = s
                    .iter()
                    .map(|&w| {
                        if w {
                            "sliding_attention"
                        } else {
                            "full_attention"
                        }
                    })
                    .collect();
                v["layer_types"] = serde_json::json!(types);
            }
        }
        v
    }
}
