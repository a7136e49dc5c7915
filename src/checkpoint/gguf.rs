//! GGUF v3 reader (llama.cpp `gguf.md`): header, typed metadata, tensor table,
//! data section aligned to `general.alignment`. Tensors are exposed under
//! Hugging Face names and shapes: GGUF lists dims fastest-first (reversed
//! here), and llama.cpp permutes the rows of `attn_q` / `attn_k` for its
//! interleaved RoPE, undone here (docs/DESIGN.md section 3).

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use rayon::prelude::*;

use super::config::{self, Activation, Family, ModelConfig, RopeScaling};
use super::tokenizer::Tokenizer;
use super::{dequant, DType, Pages, TensorInfo, TensorSource};
use crate::{Error, Result};

/// A metadata value.
#[derive(Debug, Clone)]
pub enum Value {
    U64(u64),
    I64(i64),
    F64(f64),
    Bool(bool),
    Str(String),
    Array(Vec<Value>),
}

impl Value {
    pub fn as_u64(&self) -> Option<u64> {
        match self {
            Value::U64(v) => Some(*v),
            Value::I64(v) if *v >= 0 => Some(*v as u64),
            _ => None,
        }
    }
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::F64(v) => Some(*v),
            Value::U64(v) => Some(*v as f64),
            Value::I64(v) => Some(*v as f64),
            _ => None,
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(v) => Some(v),
            _ => None,
        }
    }
}

/// One entry of the tensor table, in GGUF terms.
#[derive(Debug, Clone)]
pub struct GgufTensor {
    pub name: String,
    /// Dims as stored: fastest-varying first.
    pub dims: Vec<usize>,
    pub ggml_type: u32,
    /// Offset relative to the start of the data section.
    pub offset: usize,
}

/// A parsed, memory-mapped GGUF file.
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: Vec<GgufTensor>,
    /// Each metadata value's type and where its bytes lie in the file, to be
    /// copied as stored ([`GgufFile::raw_value`]).
    raw: BTreeMap<String, (u32, Range<usize>)>,
    mmap: Mmap,
    data_start: usize,
}

fn ggml_type_name(t: u32) -> String {
    let name = match t {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        6 => "Q5_0",
        7 => "Q5_1",
        8 => "Q8_0",
        9 => "Q8_1",
        10 => "Q2_K",
        11 => "Q3_K",
        12 => "Q4_K",
        13 => "Q5_K",
        14 => "Q6_K",
        15 => "Q8_K",
        30 => "BF16",
        _ => return format!("ggml type {t}"),
    };
    name.to_string()
}

fn ggml_dtype(t: u32) -> Option<DType> {
    match t {
        0 => Some(DType::F32),
        1 => Some(DType::F16),
        2 => Some(DType::Q4_0),
        3 => Some(DType::Q4_1),
        6 => Some(DType::Q5_0),
        7 => Some(DType::Q5_1),
        8 => Some(DType::Q8_0),
        12 => Some(DType::Q4_K),
        13 => Some(DType::Q5_K),
        14 => Some(DType::Q6_K),
        30 => Some(DType::BF16),
        _ => None,
    }
}

struct Cursor<'a> {
    path: &'a Path,
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        if n > self.bytes.len() - self.pos {
            return Err(Error::format(
                self.path,
                format!(
                    "truncated: {what} at byte {} needs {n} bytes, file has {}",
                    self.pos,
                    self.bytes.len()
                ),
            ));
        }
        let s = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(
            self.take(4, what)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(
            self.take(8, what)?.try_into().expect("8 bytes"),
        ))
    }
    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.u64(what)? as usize;
        let b = self.take(n, what)?;
        String::from_utf8(b.to_vec())
            .map_err(|_| Error::format(self.path, format!("{what} is not UTF-8")))
    }
    fn value(&mut self, ty: u32, key: &str, depth: usize) -> Result<Value> {
        Ok(match ty {
            0 => Value::U64(self.take(1, key)?[0] as u64),
            1 => Value::I64(self.take(1, key)?[0] as i8 as i64),
            2 => Value::U64(u16::from_le_bytes(self.take(2, key)?.try_into().expect("2")) as u64),
            3 => Value::I64(i16::from_le_bytes(self.take(2, key)?.try_into().expect("2")) as i64),
            4 => Value::U64(self.u32(key)? as u64),
            5 => Value::I64(self.u32(key)? as i32 as i64),
            6 => Value::F64(f32::from_le_bytes(self.take(4, key)?.try_into().expect("4")) as f64),
            7 => Value::Bool(self.take(1, key)?[0] != 0),
            8 => Value::Str(self.string(key)?),
            9 => {
                if depth > 2 {
                    return Err(Error::format(
                        self.path,
                        format!("metadata `{key}`: arrays nested too deep"),
                    ));
                }
                let elem = self.u32(key)?;
                let n = self.u64(key)? as usize;
                // Each element takes at least one byte: reject counts the file cannot hold.
                if n > self.bytes.len() - self.pos {
                    return Err(Error::format(
                        self.path,
                        format!(
                            "truncated: metadata `{key}` claims {n} elements at byte {}",
                            self.pos
                        ),
                    ));
                }
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.value(elem, key, depth + 1)?);
                }
                Value::Array(v)
            }
            10 => Value::U64(self.u64(key)?),
            11 => Value::I64(self.u64(key)? as i64),
            12 => Value::F64(f64::from_le_bytes(
                self.take(8, key)?.try_into().expect("8"),
            )),
            t => {
                return Err(Error::format(
                    self.path,
                    format!(
                        "metadata `{key}` has unknown value type {t} at byte {}",
                        self.pos
                    ),
                ))
            }
        })
    }
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<GgufFile> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: read-only mapping of a file we do not modify.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let mut c = Cursor {
            path,
            bytes: &mmap,
            pos: 0,
        };
        let magic = c.take(4, "magic")?;
        if magic != b"GGUF" {
            return Err(Error::format(
                path,
                "not a GGUF file (bad magic; expected a .gguf file or a model directory)",
            ));
        }
        let version = c.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(Error::format(
                path,
                format!("GGUF version {version} is not supported (2 or 3)"),
            ));
        }
        let n_tensors = c.u64("tensor count")? as usize;
        let n_kv = c.u64("metadata count")? as usize;
        let mut metadata = BTreeMap::new();
        let mut raw = BTreeMap::new();
        for _ in 0..n_kv {
            let key = c.string("metadata key")?;
            let ty = c.u32(&key)?;
            let start = c.pos;
            let v = c.value(ty, &key, 0)?;
            raw.insert(key.clone(), (ty, start..c.pos));
            metadata.insert(key, v);
        }
        if n_tensors > mmap.len() {
            return Err(Error::format(
                path,
                format!("tensor count {n_tensors} is impossible for this file size"),
            ));
        }
        let mut tensors = Vec::with_capacity(n_tensors);
        for _ in 0..n_tensors {
            let name = c.string("tensor name")?;
            let n_dims = c.u32(&name)? as usize;
            if n_dims == 0 || n_dims > 4 {
                return Err(Error::tensor(
                    path,
                    &name,
                    format!("{n_dims} dimensions (1 to 4 allowed)"),
                ));
            }
            let mut dims = Vec::with_capacity(n_dims);
            for _ in 0..n_dims {
                dims.push(c.u64(&name)? as usize);
            }
            let ggml_type = c.u32(&name)?;
            let offset = c.u64(&name)? as usize;
            tensors.push(GgufTensor {
                name,
                dims,
                ggml_type,
                offset,
            });
        }
        let alignment = metadata
            .get("general.alignment")
            .and_then(Value::as_u64)
            .unwrap_or(32) as usize;
        if alignment == 0 || !alignment.is_power_of_two() {
            return Err(Error::format(
                path,
                format!("general.alignment {alignment} is not a power of two"),
            ));
        }
        let data_start = c.pos.div_ceil(alignment) * alignment;
        let data_len = mmap.len().saturating_sub(data_start);
        for t in &tensors {
            let numel = t.dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
            let size = match (ggml_dtype(t.ggml_type), numel) {
                (Some(dt), Some(n)) => dequant::byte_size(dt, n),
                (None, _) => continue, // reported when (if) the tensor is loaded
                _ => None,
            };
            let Some(size) = size else {
                return Err(Error::tensor(
                    path,
                    &t.name,
                    format!(
                        "dims {:?} are not whole blocks of {}",
                        t.dims,
                        ggml_type_name(t.ggml_type)
                    ),
                ));
            };
            if t.offset.checked_add(size).is_none_or(|end| end > data_len) {
                return Err(Error::tensor(
                    path,
                    &t.name,
                    format!("data [{}, +{size}) lies beyond the {data_len} data bytes (truncated file?)", t.offset),
                ));
            }
        }
        Ok(GgufFile {
            path: path.to_path_buf(),
            version,
            metadata,
            tensors,
            raw,
            mmap,
            data_start,
        })
    }

    /// Metadata `key`'s GGUF value type and its bytes as stored (after the
    /// type), for copying into another file unchanged.
    pub fn raw_value(&self, key: &str) -> Option<(u32, &[u8])> {
        let (ty, range) = self.raw.get(key)?;
        Some((*ty, &self.mmap[range.clone()]))
    }

    /// The bytes of tensor `t` as stored, or `None` for a type depthc does
    /// not read.
    pub fn stored_bytes(&self, t: &GgufTensor) -> Option<&[u8]> {
        Some(self.tensor_bytes(t, ggml_dtype(t.ggml_type)?))
    }

    pub fn architecture(&self) -> Result<&str> {
        self.metadata
            .get("general.architecture")
            .and_then(Value::as_str)
            .ok_or_else(|| Error::config(&self.path, "metadata `general.architecture` is missing"))
    }

    fn meta_u64(&self, key: &str) -> Result<usize> {
        self.metadata
            .get(key)
            .and_then(Value::as_u64)
            .map(|v| v as usize)
            .ok_or_else(|| {
                Error::config(
                    &self.path,
                    format!("metadata `{key}` is missing or not an integer"),
                )
            })
    }

    /// Model configuration from `{arch}.*` metadata.
    pub fn model_config(&self) -> Result<ModelConfig> {
        let arch = self.architecture()?.to_string();
        let family = match arch.as_str() {
            "llama" => Family::Llama,
            "qwen2" => Family::Qwen2,
            "qwen3" => Family::Qwen3,
            "gemma3" => Family::Gemma3,
            other => {
                return Err(Error::config(
                    &self.path,
                    format!(
                        "unknown GGUF architecture `{other}` (supported: {})",
                        SUPPORTED_ARCHITECTURES.join(", ")
                    ),
                ))
            }
        };
        let gemma = family == Family::Gemma3;
        let k = |s: &str| format!("{arch}.{s}");
        let hidden_size = self.meta_u64(&k("embedding_length"))?;
        let num_attention_heads = self.meta_u64(&k("attention.head_count"))?;
        let num_key_value_heads = self
            .meta_u64(&k("attention.head_count_kv"))
            .unwrap_or(num_attention_heads);
        let head_dim = self
            .meta_u64(&k("attention.key_length"))
            .or_else(|_| self.meta_u64(&k("rope.dimension_count")))
            .unwrap_or(hidden_size / num_attention_heads.max(1));
        let vocab_size = match self.meta_u64(&k("vocab_size")) {
            Ok(v) => v,
            Err(_) => self
                .tensors
                .iter()
                .find(|t| t.name == "token_embd.weight")
                .and_then(|t| t.dims.get(1).copied())
                .ok_or_else(|| Error::tensor(&self.path, "token_embd.weight", "not found"))?,
        };
        let get_f = |key: &str| self.metadata.get(&k(key)).and_then(Value::as_f64);
        let rope_scaling = match self
            .metadata
            .get(&k("rope.scaling.type"))
            .and_then(Value::as_str)
        {
            None | Some("none") => RopeScaling::None,
            Some(other) => {
                return Err(Error::config(
                    &self.path,
                    format!("rope scaling `{other}` is not supported in GGUF"),
                ))
            }
        };
        let bos = self
            .metadata
            .get("tokenizer.ggml.bos_token_id")
            .and_then(Value::as_u64);
        let eos = self
            .metadata
            .get("tokenizer.ggml.eos_token_id")
            .and_then(Value::as_u64);
        let num_hidden_layers = self.meta_u64(&k("block_count"))?;
        let sliding_window = self.meta_u64(&k("attention.sliding_window")).ok();
        let config = ModelConfig {
            family,
            num_hidden_layers,
            hidden_size,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            intermediate_size: self.meta_u64(&k("feed_forward_length"))?,
            vocab_size,
            rope_theta: get_f("rope.freq_base").unwrap_or(config::DEFAULT_ROPE_THETA),
            rope_scaling,
            rms_norm_eps: get_f("attention.layer_norm_rms_epsilon")
                .unwrap_or(config::DEFAULT_RMS_NORM_EPS),
            tie_word_embeddings: !self.tensors.iter().any(|t| t.name == "output.weight"),
            max_position_embeddings: self
                .meta_u64(&k("context_length"))
                .unwrap_or(config::DEFAULT_MAX_POSITION_EMBEDDINGS),
            // llama.cpp's gemma3: every 6th layer global, the others local with
            // RoPE base 10000; the scores scaled by head_dim ** -0.5.
            sliding_window: if gemma { sliding_window } else { None },
            sliding_layers: gemma
                .then(|| (0..num_hidden_layers).map(|i| (i + 1) % 6 != 0).collect()),
            rope_local_theta: gemma.then_some(10000.0),
            qkv_bias: family == Family::Qwen2,
            o_bias: false,
            qk_norm: gemma || family == Family::Qwen3,
            activation: if gemma {
                Activation::GeluTanh
            } else {
                Activation::Silu
            },
            embed_scale: gemma.then(|| (hidden_size as f64).sqrt() as f32),
            norm_plus_one: gemma,
            sandwich_norms: gemma,
            query_scale: (head_dim as f64).powf(-0.5),
            add_bos: gemma,
            bos_token_id: bos.map(|v| v as u32),
            eos_token_id: eos.map(|v| v as u32),
        };
        config.validate(&self.path)?;
        Ok(config)
    }

    /// The byte-level BPE tokenizer stored in `tokenizer.ggml.*`, if any.
    pub fn tokenizer(&self) -> Result<Option<Tokenizer>> {
        let Some(model) = self
            .metadata
            .get("tokenizer.ggml.model")
            .and_then(Value::as_str)
        else {
            return Ok(None);
        };
        let strings = |key: &str| -> Result<Vec<String>> {
            let arr = self
                .metadata
                .get(key)
                .and_then(Value::as_array)
                .ok_or_else(|| Error::config(&self.path, format!("metadata `{key}` is missing")))?;
            arr.iter()
                .map(|v| v.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| {
                    Error::config(
                        &self.path,
                        format!("metadata `{key}` is not a string array"),
                    )
                })
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let token_types: Vec<u64> = self
            .metadata
            .get("tokenizer.ggml.token_type")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_u64).collect())
            .unwrap_or_default();
        match model {
            "gpt2" => {}
            "llama" if self.metadata.contains_key("tokenizer.ggml.merges") => {
                return Err(Error::Tokenizer {
                    path: self.path.clone(),
                    msg: "a SentencePiece (`llama`) tokenizer with stored merges is not supported"
                        .into(),
                })
            }
            "llama" => return Tokenizer::from_gguf_spm(&self.path, tokens, &token_types).map(Some),
            _ => {
                return Err(Error::Tokenizer {
                    path: self.path.clone(),
                    msg: format!(
                        "tokenizer.ggml.model `{model}` is not supported (gpt2 byte-level BPE, \
                         llama SentencePiece BPE)"
                    ),
                })
            }
        }
        // A vocabulary of single symbols needs no merges; writers may omit the key.
        let merges = if self.metadata.contains_key("tokenizer.ggml.merges") {
            strings("tokenizer.ggml.merges")?
        } else {
            Vec::new()
        };
        let pre = self
            .metadata
            .get("tokenizer.ggml.pre")
            .and_then(Value::as_str)
            .unwrap_or("default");
        Tokenizer::from_gguf_bpe(&self.path, tokens, merges, &token_types, pre).map(Some)
    }

    fn tensor_bytes(&self, t: &GgufTensor, dtype: DType) -> &[u8] {
        let numel: usize = t.dims.iter().product();
        let size = dequant::byte_size(dtype, numel).expect("checked at open");
        let begin = self.data_start + t.offset;
        &self.mmap[begin..begin + size]
    }
}

/// The `general.architecture` values depthc reads.
pub const SUPPORTED_ARCHITECTURES: [&str; 4] = ["llama", "qwen2", "qwen3", "gemma3"];

/// Hugging Face name of a GGUF llama, qwen2, qwen3 or gemma3 tensor.
fn hf_name(gguf: &str, family: Family) -> Option<String> {
    let fixed = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(n) = fixed {
        return Some(n.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, tail) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let gemma = family == Family::Gemma3;
    let sub = match tail {
        "attn_norm.weight" => "input_layernorm.weight",
        // Llama's MLP input norm; Gemma names its norms by their place.
        "ffn_norm.weight" if gemma => "pre_feedforward_layernorm.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        "post_attention_norm.weight" if gemma => "post_attention_layernorm.weight",
        "post_ffw_norm.weight" if gemma => "post_feedforward_layernorm.weight",
        "attn_q_norm.weight" => "self_attn.q_norm.weight",
        "attn_k_norm.weight" => "self_attn.k_norm.weight",
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_q.bias" => "self_attn.q_proj.bias",
        "attn_k.bias" => "self_attn.k_proj.bias",
        "attn_v.bias" => "self_attn.v_proj.bias",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{sub}"))
}

struct Mapped {
    info: TensorInfo,
    /// Index into `GgufFile::tensors`.
    index: usize,
    /// Heads to un-permute the rows of (q: attention heads, k: KV heads).
    unpermute_heads: Option<usize>,
    /// Gemma: llama.cpp stores the applied `1 + w` of a norm; Hugging Face
    /// (and this source) give `w`.
    minus_one: bool,
}

/// The tensors of a GGUF llama file under Hugging Face names.
pub struct GgufSource {
    file: GgufFile,
    mapped: BTreeMap<String, Mapped>,
    /// Tensors with a type depthc cannot dequantise, reported when loaded.
    unsupported: BTreeMap<String, String>,
}

impl GgufSource {
    pub fn new(file: GgufFile, config: &ModelConfig) -> Result<GgufSource> {
        let mut mapped = BTreeMap::new();
        let mut unsupported = BTreeMap::new();
        for (index, t) in file.tensors.iter().enumerate() {
            let Some(name) = hf_name(&t.name, config.family) else {
                continue;
            };
            let shape: Vec<usize> = t.dims.iter().rev().copied().collect();
            let Some(dtype) = ggml_dtype(t.ggml_type) else {
                unsupported.insert(
                    name,
                    format!("{} (GGUF `{}`)", ggml_type_name(t.ggml_type), t.name),
                );
                continue;
            };
            // llama.cpp permutes q/k rows for Llama's interleaved RoPE only.
            let llama = config.family == Family::Llama;
            let unpermute_heads = if !llama {
                None
            } else if name.ends_with("q_proj.weight") {
                Some(config.num_attention_heads)
            } else if name.ends_with("k_proj.weight") {
                Some(config.num_key_value_heads)
            } else {
                None
            };
            mapped.insert(
                name.clone(),
                Mapped {
                    minus_one: config.norm_plus_one && name.ends_with("norm.weight"),
                    info: TensorInfo { name, dtype, shape },
                    index,
                    unpermute_heads,
                },
            );
        }
        Ok(GgufSource {
            file,
            mapped,
            unsupported,
        })
    }

    pub fn file(&self) -> &GgufFile {
        &self.file
    }

    fn check_heads(&self, name: &str, heads: usize, rows: usize) -> Result<()> {
        if heads == 0 || !rows.is_multiple_of(heads) || !(rows / heads).is_multiple_of(2) {
            return Err(Error::tensor(
                &self.file.path,
                name,
                format!("{rows} rows cannot be split into {heads} heads of even size"),
            ));
        }
        Ok(())
    }
}

/// The GGUF row holding Hugging Face row `row` of a q/k weight llama.cpp
/// permuted (heads of `head_dim` rows): see [`unpermute_rows`].
fn permuted_row(row: usize, head_dim: usize) -> usize {
    let half = head_dim / 2;
    let (h, within) = (row / head_dim, row % head_dim);
    let (s, i) = (within / half, within % half);
    h * head_dim + 2 * i + s
}

/// Undo llama.cpp's `permute`: GGUF row `h*d + 2i + s` holds HF row `h*d + s*d/2 + i`.
fn unpermute_rows<T: Copy>(data: &[T], heads: usize, rows: usize, cols: usize) -> Vec<T> {
    let head_dim = rows / heads;
    let mut out = Vec::with_capacity(data.len());
    for dst in 0..rows {
        let src = permuted_row(dst, head_dim);
        out.extend_from_slice(&data[src * cols..(src + 1) * cols]);
    }
    out
}

impl TensorSource for GgufSource {
    fn tensors(&self) -> Vec<&TensorInfo> {
        self.mapped.values().map(|m| &m.info).collect()
    }
    fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.mapped.get(name).map(|m| &m.info)
    }
    fn unsupported_tensors(&self) -> Vec<(String, String)> {
        self.unsupported
            .keys()
            .filter_map(|name| Some((name.clone(), self.unsupported(name)?)))
            .collect()
    }
    fn unsupported(&self, name: &str) -> Option<String> {
        self.unsupported.get(name).map(|ty| {
            format!("quantisation {ty} is not supported (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K)")
        })
    }
    fn load_four_bit(&self, name: &str) -> Option<Result<dequant::FourBitBlocks>> {
        let m = self.mapped.get(name)?;
        let t = &self.file.tensors[m.index];
        let bytes = self.file.tensor_bytes(t, m.info.dtype);
        let mut b = dequant::four_bit_blocks(m.info.dtype, bytes)?;
        let begin = self.file.data_start + t.offset;
        super::release_pages(&self.file.mmap, begin, begin + bytes.len(), Pages::Release);
        if let (Some(heads), &[rows, cols]) = (m.unpermute_heads, m.info.shape.as_slice()) {
            if let Err(e) = self.check_heads(name, heads, rows) {
                return Some(Err(e));
            }
            b.codes = unpermute_rows(&b.codes, heads, rows, cols);
            b.scales = unpermute_rows(&b.scales, heads, rows, cols / 32);
            b.offsets = unpermute_rows(&b.offsets, heads, rows, cols / 32);
        }
        Some(Ok(b))
    }
    fn stored(&self, name: &str) -> Option<Result<(DType, Vec<u8>)>> {
        let m = self.mapped.get(name)?;
        if m.minus_one {
            return None;
        }
        let t = &self.file.tensors[m.index];
        let dtype = m.info.dtype;
        let bytes = self.file.tensor_bytes(t, dtype);
        let (rows, cols) = super::rows_cols(&m.info.shape);
        let row_bytes = dequant::byte_size(dtype, cols)?;
        let out = match m.unpermute_heads {
            None => bytes.to_vec(),
            Some(heads) => {
                if let Err(e) = self.check_heads(name, heads, rows) {
                    return Some(Err(e));
                }
                let head_dim = rows / heads;
                (0..rows)
                    .flat_map(|r| {
                        let src = permuted_row(r, head_dim);
                        &bytes[src * row_bytes..(src + 1) * row_bytes]
                    })
                    .copied()
                    .collect()
            }
        };
        let begin = self.file.data_start + t.offset;
        super::release_pages(&self.file.mmap, begin, begin + bytes.len(), Pages::Release);
        Some(Ok((dtype, out)))
    }
    fn read_rows_with(
        &self,
        name: &str,
        rows: Range<usize>,
        out: &mut [f32],
        pages: Pages,
    ) -> Result<()> {
        let Some(m) = self.mapped.get(name) else {
            let why = self.unsupported(name);
            return Err(Error::tensor(
                &self.file.path,
                name,
                why.unwrap_or_else(|| "not found".into()),
            ));
        };
        let t = &self.file.tensors[m.index];
        let shape = super::rows_cols(&m.info.shape);
        super::check_rows(&self.file.path, name, shape, &rows, out)?;
        let (total, cols) = shape;
        let dtype = m.info.dtype;
        let row_bytes = dequant::byte_size(dtype, cols).ok_or_else(|| {
            Error::tensor(
                &self.file.path,
                name,
                format!("rows of {cols} are not whole {} blocks", dtype.name()),
            )
        })?;
        let bytes = self.file.tensor_bytes(t, dtype);
        let begin = self.file.data_start + t.offset;
        match m.unpermute_heads {
            None => {
                let rb = &bytes[rows.start * row_bytes..rows.end * row_bytes];
                dequant::rows_to_f32(dtype, rb, cols, out);
                super::release_pages(
                    &self.file.mmap,
                    begin + rows.start * row_bytes,
                    begin + rows.end * row_bytes,
                    pages,
                );
            }
            Some(heads) => {
                self.check_heads(name, heads, total)?;
                let head_dim = total / heads;
                out.par_chunks_mut(cols)
                    .enumerate()
                    .with_min_len(dequant::SERIAL_ROWS)
                    .for_each(|(i, row)| {
                        let src = permuted_row(rows.start + i, head_dim);
                        dequant::to_f32(dtype, &bytes[src * row_bytes..(src + 1) * row_bytes], row);
                    });
                super::release_pages(&self.file.mmap, begin, begin + bytes.len(), pages);
            }
        }
        if m.minus_one {
            out.iter_mut().for_each(|v| *v -= 1.0);
        }
        Ok(())
    }
    fn file_of(&self, _name: &str) -> PathBuf {
        self.file.path.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// llama.cpp's convert script: reshape(heads, 2, d/2, cols).swapaxes(1, 2).
    fn permute_rows(data: &[f32], heads: usize, rows: usize, cols: usize) -> Vec<f32> {
        let d = rows / heads;
        let mut out = vec![0f32; data.len()];
        for h in 0..heads {
            for s in 0..2 {
                for i in 0..d / 2 {
                    let src = h * d + s * d / 2 + i; // index in (heads, 2, d/2)
                    let dst = h * d + i * 2 + s; // index in (heads, d/2, 2)
                    out[dst * cols..(dst + 1) * cols]
                        .copy_from_slice(&data[src * cols..(src + 1) * cols]);
                }
            }
        }
        out
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        let (heads, rows, cols) = (3, 12, 2);
        let hf: Vec<f32> = (0..rows * cols).map(|x| x as f32).collect();
        let gguf = permute_rows(&hf, heads, rows, cols);
        assert_ne!(gguf, hf);
        assert_eq!(unpermute_rows(&gguf, heads, rows, cols), hf);
    }

    #[test]
    fn names_map_to_hugging_face() {
        assert_eq!(
            hf_name("blk.12.attn_output.weight", Family::Llama).as_deref(),
            Some("model.layers.12.self_attn.o_proj.weight")
        );
        assert_eq!(
            hf_name("token_embd.weight", Family::Llama).as_deref(),
            Some("model.embed_tokens.weight")
        );
        assert_eq!(hf_name("rope_freqs.weight", Family::Llama), None);
    }
}
