//! Layer-Parallel models for llama.cpp: a plan written as a GGUF of
//! architecture `deci` (docs/DESIGN.md section 14), which reads every layer's
//! attention head count, KV head count and FFN width from per-layer arrays.
//!
//! A parallel group is written in the fused form of [`crate::graph::lp`]:
//! one layer with the group's heads, KV heads and FFN widths side by side.
//! Its input norms fold into the rows of q/k/v and gate/up (the layer's own
//! norm weights become ones), which changes those matrices, so they are
//! encoded again ([`Encoding`]); its o_proj and down_proj are the layers'
//! matrices side by side along their inputs, copied as stored when every
//! layer stores them alike. Layers outside groups keep their tensors as
//! stored; a dropped layer is not written. Q and K rows are written in the
//! order llama.cpp's interleaved rotation expects (its converter's
//! `permute`): the reader hands Hugging Face order, whatever the source.
//!
//! [`weights_as_written`] is the model with exactly the values the file
//! holds: the reference forward that the llama.cpp tests compare against.

use std::path::Path;

use crate::checkpoint::config::Activation;
use crate::checkpoint::gguf::GgufFile;
use crate::checkpoint::gguf_writer::{encode, GgufWriter, Meta, TensorData};
use crate::checkpoint::tokenizer::Tokenizer;
use crate::checkpoint::{dequant, DType, Family, RopeScaling};
use crate::model::{Matrix, Model};
use crate::plan::{Plan, Step};
use crate::{Error, Result};

/// How the matrices a fused group changes are encoded (q/k/v and gate/up
/// with the norms folded in), and any other matrix not copied as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Q8_0,
    F16,
    F32,
    Q4_0,
    Q4_1,
}

impl Encoding {
    pub fn dtype(self) -> DType {
        match self {
            Encoding::Q8_0 => DType::Q8_0,
            Encoding::F16 => DType::F16,
            Encoding::F32 => DType::F32,
            Encoding::Q4_0 => DType::Q4_0,
            Encoding::Q4_1 => DType::Q4_1,
        }
    }
    pub fn name(self) -> &'static str {
        self.dtype().name()
    }
}

/// Why llama.cpp's `deci` graph cannot run `model` under `plan`, if it
/// cannot: one line naming what stands in the way.
pub fn check(model: &Model, plan: &Plan) -> Result<()> {
    let cfg = &model.config;
    check_config(cfg)?;
    for g in plan.groups() {
        crate::graph::lp::fusable(cfg, &g.layers)
            .map_err(|why| Error::Input(format!("--format gguf: {why}")))?;
    }
    Ok(())
}

/// What [`check`] asks of the model's family and configuration.
pub fn check_config(cfg: &crate::checkpoint::ModelConfig) -> Result<()> {
    let refuse = |why: String| Err(Error::Input(format!("--format gguf: {why}")));
    match cfg.family {
        Family::Llama | Family::Mistral | Family::Qwen2 => {}
        Family::Qwen3 => {
            return refuse(
                "Qwen3 normalises each query and key head (q_norm, k_norm) and llama.cpp's \
                 `deci` graph, the one with per-layer head counts, has no such norms; write \
                 ONNX instead"
                    .into(),
            )
        }
        Family::Gemma3 => {
            return refuse(
                "Gemma 3 normalises each sublayer's output before the residual sum, so a \
                 group is not one wider layer, and llama.cpp's `deci` graph has neither those \
                 norms nor Gemma's scaled embedding and sliding windows; write ONNX instead"
                    .into(),
            )
        }
    }
    if cfg.activation != Activation::Silu || cfg.qk_norm || cfg.sandwich_norms {
        return refuse(
            "llama.cpp's `deci` layers are Llama's: SwiGLU, no q/k norms, no post-sublayer norms"
                .into(),
        );
    }
    if let Some(w) = cfg
        .sliding_window
        .filter(|&w| w < cfg.max_position_embeddings)
    {
        return refuse(format!(
            "the model attends over a sliding window of {w} tokens and llama.cpp's `deci` \
             graph attends over the whole context"
        ));
    }
    if cfg.rope_scaling != RopeScaling::None {
        return refuse(
            "RoPE scaling (Llama 3 frequency factors) is not written for `deci` yet".into(),
        );
    }
    let d = cfg.head_dim as f64;
    if (cfg.query_scale - 1.0 / d.sqrt()).abs() > 1e-9 / d.sqrt() {
        return refuse("llama.cpp's `deci` graph scales attention by 1/sqrt(head_dim) only".into());
    }
    Ok(())
}

/// One layer of the file: its tensors under their `blk.N.` suffixes, its
/// head counts and FFN width.
struct LayerOut {
    tensors: Vec<(&'static str, Vec<usize>, DType, Vec<u8>)>,
    heads: usize,
    kv_heads: usize,
    ffn: usize,
}

/// What [`assemble`] produces.
struct Assembled {
    layers: Vec<LayerOut>,
    /// The model with the values the file holds.
    written: Model,
    /// Matrices encoded again (names for the report), and copied as stored.
    encoded: usize,
    copied: usize,
}

/// llama.cpp's `permute` of q/k rows for its interleaved rotation: Hugging
/// Face row `h*d + s*d/2 + i` goes to `h*d + 2i + s`; whole rows of
/// `row_bytes` move (any encoding).
fn permute_rows(bytes: &[u8], heads: usize, rows: usize, row_bytes: usize) -> Vec<u8> {
    let d = rows / heads;
    let half = d / 2;
    let mut out = vec![0u8; bytes.len()];
    for src in 0..rows {
        let (h, within) = (src / d, src % d);
        let (s, i) = (within / half, within % half);
        let dst = h * d + 2 * i + s;
        out[dst * row_bytes..(dst + 1) * row_bytes]
            .copy_from_slice(&bytes[src * row_bytes..(src + 1) * row_bytes]);
    }
    out
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    encode(DType::F32, v).expect("f32 always encodes")
}

/// A matrix's bytes (rows in Hugging Face order): as stored when it is a
/// checkpoint tensor unchanged, else its values in `enc`; and the values
/// those bytes hold when they are not the matrix's own.
fn matrix_bytes(
    m: &Matrix,
    enc: Encoding,
    what: &str,
) -> Result<(DType, Vec<u8>, Option<Vec<f32>>)> {
    if let Some(stored) = m.stored_bytes() {
        let (dtype, bytes) = stored?;
        return Ok((dtype, bytes, None));
    }
    let values = m.values();
    encoded(&values, enc, what)
}

/// `values` in `enc`, with the values the bytes decode to.
fn encoded(
    values: &[f32],
    enc: Encoding,
    what: &str,
) -> Result<(DType, Vec<u8>, Option<Vec<f32>>)> {
    let dtype = enc.dtype();
    let bytes = encode(dtype, values).ok_or_else(|| {
        Error::Input(format!(
            "--format gguf: {what}: rows of {} values are not whole {} blocks; choose another \
             --gguf-encoding",
            values.len(),
            dtype.name()
        ))
    })?;
    let mut back = vec![0f32; values.len()];
    dequant::to_f32(dtype, &bytes, &mut back);
    Ok((dtype, bytes, Some(back)))
}

/// `w` with each row multiplied by `g` elementwise (a norm weight folded in).
fn folded(w: &Matrix, g: &[f32]) -> Vec<f32> {
    let mut v = w.values().into_owned();
    for row in v.chunks_exact_mut(w.cols) {
        row.iter_mut().zip(g).for_each(|(x, s)| *x *= s);
    }
    v
}

/// The rows of `parts` (each `[rows, cols_i]`, same rows) side by side.
fn side_by_side(parts: &[(usize, Vec<u8>)], rows: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(parts.iter().map(|p| p.1.len()).sum());
    for r in 0..rows {
        for (row_bytes, bytes) in parts {
            out.extend_from_slice(&bytes[r * row_bytes..(r + 1) * row_bytes]);
        }
    }
    out
}

fn assemble(model: &Model, plan: &Plan, enc: Encoding) -> Result<Assembled> {
    check(model, plan)?;
    let cfg = &model.config;
    let hidden = cfg.hidden_size;
    let mut written = model.clone();
    let (mut encoded_n, mut copied_n) = (0, 0);
    let mut layers = Vec::new();
    for step in &plan.steps {
        // A dropped layer is not written: the file has one layer per step
        // that computes.
        if step.is_dropped() {
            continue;
        }
        let ls = step.layers();
        let fused = matches!(step, Step::Parallel(_));
        let k = ls.len();
        let (h, kv, ff) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.intermediate_size,
        );
        let mut t: Vec<(&'static str, Vec<usize>, DType, Vec<u8>)> = Vec::new();
        let norm = |l: usize, attn: bool| -> Vec<f32> {
            let layer = &model.layers[l];
            if fused {
                vec![1.0; hidden]
            } else if attn {
                layer.input_layernorm.clone()
            } else {
                layer.post_attention_layernorm.clone()
            }
        };
        // Input projections: stacked rows per layer (q/k permuted per layer).
        // `proj` picks the matrix, `heads` its heads to permute (0: none),
        // `attn` its norm.
        type Pick = fn(&crate::model::DecoderLayer) -> &crate::model::Linear;
        let inputs: [(&'static str, Pick, usize, bool); 5] = [
            ("attn_q", |l| &l.self_attn.q_proj, h, true),
            ("attn_k", |l| &l.self_attn.k_proj, kv, true),
            ("attn_v", |l| &l.self_attn.v_proj, 0, true),
            ("ffn_gate", |l| &l.mlp.gate_proj, 0, false),
            ("ffn_up", |l| &l.mlp.up_proj, 0, false),
        ];
        for (name, pick, heads, attn) in inputs {
            let mut dtype0 = None;
            let mut parts = Vec::new();
            let mut rows = 0;
            for &l in ls {
                let lin = pick(&model.layers[l]);
                let w = &lin.weight;
                let what = format!("layer {l} {name}");
                let (dtype, bytes, values) = if fused {
                    let g = if attn {
                        &model.layers[l].input_layernorm
                    } else {
                        &model.layers[l].post_attention_layernorm
                    };
                    encoded(&folded(w, g), enc, &what)?
                } else {
                    matrix_bytes(w, enc, &what)?
                };
                if let Some(v) = values {
                    encoded_n += 1;
                    let target = pick_mut(&mut written.layers[l], name);
                    target.weight = Matrix::new(w.rows, w.cols, v);
                } else {
                    copied_n += 1;
                }
                // A group's are all encoded alike; a single layer has one.
                dtype0 = Some(dtype);
                let row_bytes = bytes.len() / w.rows;
                let bytes = if heads > 0 {
                    permute_rows(&bytes, heads, w.rows, row_bytes)
                } else {
                    bytes
                };
                rows += w.rows;
                parts.push(bytes);
            }
            let cols = hidden;
            t.push((
                leak_suffix(name, "weight"),
                vec![cols, rows],
                dtype0.expect("a step has a layer"),
                parts.concat(),
            ));
            // Biases (Qwen2's q/k/v), permuted like their rows.
            let biases: Vec<&Vec<f32>> = ls
                .iter()
                .filter_map(|&l| pick(&model.layers[l]).bias.as_ref())
                .collect();
            if !biases.is_empty() {
                let mut all = Vec::new();
                for b in biases {
                    let bytes = f32_bytes(b);
                    all.extend(if heads > 0 {
                        permute_rows(&bytes, heads, b.len(), 4)
                    } else {
                        bytes
                    });
                }
                t.push((
                    leak_suffix(name, "bias"),
                    vec![all.len() / 4],
                    DType::F32,
                    all,
                ));
            }
        }
        // Output projections: the layers' matrices side by side along their
        // inputs, so that one product sums the group.
        type PickOut = fn(&crate::model::DecoderLayer) -> &crate::model::Linear;
        let outputs: [(&'static str, PickOut); 2] = [
            ("attn_output", |l| &l.self_attn.o_proj),
            ("ffn_down", |l| &l.mlp.down_proj),
        ];
        for (name, pick) in outputs {
            let mats: Vec<&Matrix> = ls.iter().map(|&l| &pick(&model.layers[l]).weight).collect();
            let stored: Vec<Option<(DType, Vec<u8>)>> = mats
                .iter()
                .map(|m| m.stored_bytes().transpose())
                .collect::<Result<_>>()?;
            let dtypes: Vec<Option<DType>> =
                stored.iter().map(|s| s.as_ref().map(|x| x.0)).collect();
            let cols: usize = mats.iter().map(|m| m.cols).sum();
            let same = dtypes[0].is_some() && dtypes.iter().all(|d| *d == dtypes[0]);
            let (dtype, bytes) = if same {
                copied_n += k;
                let parts: Vec<(usize, Vec<u8>)> = stored
                    .into_iter()
                    .zip(&mats)
                    .map(|(s, m)| {
                        let b = s.expect("checked").1;
                        (b.len() / m.rows, b)
                    })
                    .collect();
                (dtypes[0].expect("checked"), side_by_side(&parts, hidden))
            } else {
                // Encode each layer's matrix in `enc` and place them side by side.
                let mut parts = Vec::new();
                let mut dtype = enc.dtype();
                for (&l, m) in ls.iter().zip(&mats) {
                    let (d, b, values) = encoded(&m.values(), enc, &format!("layer {l} {name}"))?;
                    encoded_n += 1;
                    dtype = d;
                    let target = pick_mut(&mut written.layers[l], name);
                    target.weight = Matrix::new(m.rows, m.cols, values.expect("encoded"));
                    parts.push((b.len() / m.rows, b));
                }
                (dtype, side_by_side(&parts, hidden))
            };
            t.push((
                leak_suffix(name, "weight"),
                vec![cols, hidden],
                dtype,
                bytes,
            ));
            let biases: Vec<&Vec<f32>> = ls
                .iter()
                .filter_map(|&l| pick(&model.layers[l]).bias.as_ref())
                .collect();
            if !biases.is_empty() {
                // Side by side inputs sum the outputs: the biases add up.
                let mut sum = vec![0f32; hidden];
                for b in biases {
                    sum.iter_mut().zip(b).for_each(|(s, x)| *s += x);
                }
                t.push((
                    leak_suffix(name, "bias"),
                    vec![hidden],
                    DType::F32,
                    f32_bytes(&sum),
                ));
            }
        }
        t.push((
            "attn_norm.weight",
            vec![hidden],
            DType::F32,
            f32_bytes(&norm(ls[0], true)),
        ));
        t.push((
            "ffn_norm.weight",
            vec![hidden],
            DType::F32,
            f32_bytes(&norm(ls[0], false)),
        ));
        if fused {
            for &l in ls {
                written.layers[l].input_layernorm = vec![1.0; hidden];
                written.layers[l].post_attention_layernorm = vec![1.0; hidden];
            }
        }
        layers.push(LayerOut {
            tensors: t,
            heads: h * k,
            kv_heads: kv * k,
            ffn: ff * k,
        });
    }
    Ok(Assembled {
        layers,
        written,
        encoded: encoded_n,
        copied: copied_n,
    })
}

/// `blk.N.{name}.{kind}` without the `blk.N.` part, as a static string.
fn leak_suffix(name: &'static str, kind: &'static str) -> &'static str {
    match (name, kind) {
        ("attn_q", "weight") => "attn_q.weight",
        ("attn_k", "weight") => "attn_k.weight",
        ("attn_v", "weight") => "attn_v.weight",
        ("attn_q", "bias") => "attn_q.bias",
        ("attn_k", "bias") => "attn_k.bias",
        ("attn_v", "bias") => "attn_v.bias",
        ("ffn_gate", "weight") => "ffn_gate.weight",
        ("ffn_up", "weight") => "ffn_up.weight",
        ("ffn_gate", "bias") => "ffn_gate.bias",
        ("ffn_up", "bias") => "ffn_up.bias",
        ("attn_output", "weight") => "attn_output.weight",
        ("attn_output", "bias") => "attn_output.bias",
        ("ffn_down", "weight") => "ffn_down.weight",
        ("ffn_down", "bias") => "ffn_down.bias",
        _ => unreachable!("no tensor {name}.{kind}"),
    }
}

fn pick_mut<'a>(l: &'a mut crate::model::DecoderLayer, name: &str) -> &'a mut crate::model::Linear {
    match name {
        "attn_q" => &mut l.self_attn.q_proj,
        "attn_k" => &mut l.self_attn.k_proj,
        "attn_v" => &mut l.self_attn.v_proj,
        "attn_output" => &mut l.self_attn.o_proj,
        "ffn_gate" => &mut l.mlp.gate_proj,
        "ffn_up" => &mut l.mlp.up_proj,
        "ffn_down" => &mut l.mlp.down_proj,
        _ => unreachable!("no projection {name}"),
    }
}

/// `model` with the values a `deci` GGUF of `plan` in `enc` holds: each
/// group's layers with norm weights of ones and the folded, encoded
/// projections; every matrix the file does not copy as stored, encoded.
pub fn weights_as_written(model: &Model, plan: &Plan, enc: Encoding) -> Result<Model> {
    Ok(assemble(model, plan, enc)?.written)
}

/// What [`write`] wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Written {
    pub bytes: u64,
    pub tensors: usize,
    /// Layers of the file (the plan's depth), and per layer its attention
    /// heads, KV heads and FFN width.
    pub layers: usize,
    pub heads: Vec<usize>,
    pub kv_heads: Vec<usize>,
    pub ffn: Vec<usize>,
    /// Matrices encoded again (`encoding`), and copied as stored.
    pub encoding: &'static str,
    pub encoded: usize,
    pub copied: usize,
}

/// Every `tokenizer.*` and `general.*` key of `file` as stored (not its
/// architecture, alignment or file type).
fn copy_gguf_keys(w: &mut GgufWriter, file: &GgufFile) -> Result<()> {
    for key in file.metadata.keys() {
        let keep = (key.starts_with("general.")
            && ![
                "general.architecture",
                "general.alignment",
                "general.file_type",
            ]
            .contains(&key.as_str()))
            || key.starts_with("tokenizer.");
        if let (true, Some((ty, bytes))) = (keep, file.raw_value(key)) {
            w.meta(
                key,
                Meta::Raw {
                    ty,
                    bytes: bytes.to_vec(),
                },
            );
        }
    }
    // A byte-level BPE vocabulary that needs no merges may have no merges
    // key; llama.cpp refuses a BPE vocabulary without one: an empty list.
    let model = file
        .metadata
        .get("tokenizer.ggml.model")
        .and_then(|v| v.as_str());
    if model == Some("gpt2") && file.raw_value("tokenizer.ggml.merges").is_none() {
        w.meta("tokenizer.ggml.merges", Meta::Strs(Vec::new()));
    }
    if model.is_none() {
        return Err(Error::Input(format!(
            "--format gguf: {} has no tokenizer (`tokenizer.ggml.*`) to copy, and llama.cpp \
             needs one",
            file.path.display()
        )));
    }
    Ok(())
}

/// Where the model was read from: its tokenizer (and `general.*` keys) go
/// into the GGUF.
pub enum Origin {
    /// A GGUF file: every `tokenizer.*` and `general.*` key copied as stored.
    Gguf(GgufFile),
    /// A Hugging Face directory: the byte-level BPE of its `tokenizer.json`
    /// written as llama.cpp's keys ([`Tokenizer::gguf_bpe`]).
    HuggingFace {
        dir: std::path::PathBuf,
        tokenizer: Box<Tokenizer>,
    },
}

impl Origin {
    /// `source` opened for its metadata; refuses a tokenizer the writer
    /// cannot write.
    pub fn open(source: &Path) -> Result<Origin> {
        if source.is_file() {
            return Ok(Origin::Gguf(GgufFile::open(source)?));
        }
        let tokenizer = Tokenizer::from_hf_dir(source)?.ok_or_else(|| {
            Error::Input(format!(
                "--format gguf: {} has no tokenizer.json, and llama.cpp needs the tokenizer",
                source.display()
            ))
        })?;
        tokenizer.gguf_bpe(&source.join("tokenizer.json"))?;
        Ok(Origin::HuggingFace {
            dir: source.to_path_buf(),
            tokenizer: Box::new(tokenizer),
        })
    }
}

/// Write `model` under `plan` to `path` as a `deci` GGUF; `source` is what
/// the model was read from ([`Origin`]), `extra` more metadata (depthc's
/// plan and version).
pub fn write(
    model: &Model,
    plan: &Plan,
    source: &Origin,
    enc: Encoding,
    extra: &[(&str, Meta)],
    path: &Path,
) -> Result<Written> {
    let a = assemble(model, plan, enc)?;
    let cfg = &model.config;
    let mut w = GgufWriter::new();
    w.meta("general.architecture", Meta::Str("deci".into()));
    let u32_of = |v: usize| Meta::U32(v as u32);
    let ctx = match source {
        Origin::Gguf(file) => {
            copy_gguf_keys(&mut w, file)?;
            let arch = file.architecture()?;
            file.metadata
                .get(&format!("{arch}.context_length"))
                .and_then(|v| v.as_u64())
                .map_or(cfg.max_position_embeddings, |v| v as usize)
        }
        Origin::HuggingFace { dir, tokenizer } => {
            let name = dir.file_name().map(|n| n.to_string_lossy().into_owned());
            w.meta("general.name", Meta::Str(name.unwrap_or_default()));
            let bpe = tokenizer.gguf_bpe(&dir.join("tokenizer.json"))?;
            w.meta("tokenizer.ggml.model", Meta::Str("gpt2".into()));
            w.meta("tokenizer.ggml.pre", Meta::Str(bpe.pre.into()));
            w.meta("tokenizer.ggml.tokens", Meta::Strs(bpe.tokens));
            w.meta("tokenizer.ggml.token_type", Meta::I32s(bpe.token_types));
            w.meta("tokenizer.ggml.merges", Meta::Strs(bpe.merges));
            if let Some(id) = cfg.bos_token_id {
                w.meta("tokenizer.ggml.bos_token_id", Meta::U32(id));
            }
            if let Some(id) = cfg.eos_token_id {
                w.meta("tokenizer.ggml.eos_token_id", Meta::U32(id));
            }
            w.meta("tokenizer.ggml.add_bos_token", Meta::Bool(cfg.add_bos));
            let tc = std::fs::read_to_string(dir.join("tokenizer_config.json")).ok();
            let template = tc
                .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
                .and_then(|v| v["chat_template"].as_str().map(String::from));
            if let Some(t) = template {
                w.meta("tokenizer.chat_template", Meta::Str(t));
            }
            cfg.max_position_embeddings
        }
    };
    w.meta("deci.context_length", u32_of(ctx));
    w.meta("deci.embedding_length", u32_of(cfg.hidden_size));
    w.meta("deci.block_count", u32_of(a.layers.len()));
    let arr =
        |f: fn(&LayerOut) -> usize| Meta::I32s(a.layers.iter().map(|l| f(l) as i32).collect());
    w.meta("deci.feed_forward_length", arr(|l| l.ffn));
    w.meta("deci.attention.head_count", arr(|l| l.heads));
    w.meta("deci.attention.head_count_kv", arr(|l| l.kv_heads));
    w.meta("deci.attention.key_length", u32_of(cfg.head_dim));
    w.meta("deci.attention.value_length", u32_of(cfg.head_dim));
    w.meta("deci.rope.dimension_count", u32_of(cfg.head_dim));
    w.meta("deci.rope.freq_base", Meta::F32(cfg.rope_theta as f32));
    w.meta(
        "deci.attention.layer_norm_rms_epsilon",
        Meta::F32(cfg.rms_norm_eps as f32),
    );
    w.meta("deci.vocab_size", u32_of(cfg.vocab_size));
    for (k, v) in extra {
        w.meta(k, v.clone());
    }
    // Embedding, final norm and (untied) LM head as stored.
    let top = |m: &Matrix| matrix_bytes(m, enc, "the embedding / LM head");
    let (dt, b, _) = top(&model.embed_tokens)?;
    w.tensor(TensorData {
        name: "token_embd.weight".into(),
        dims: vec![cfg.hidden_size, model.embed_tokens.rows],
        dtype: dt,
        bytes: b,
    })?;
    w.tensor(TensorData {
        name: "output_norm.weight".into(),
        dims: vec![cfg.hidden_size],
        dtype: DType::F32,
        bytes: f32_bytes(&model.norm),
    })?;
    if let Some(head) = &model.lm_head {
        let (dt, b, _) = top(head)?;
        w.tensor(TensorData {
            name: "output.weight".into(),
            dims: vec![cfg.hidden_size, head.rows],
            dtype: dt,
            bytes: b,
        })?;
    }
    let written = Written {
        bytes: 0,
        tensors: 0,
        layers: a.layers.len(),
        heads: a.layers.iter().map(|l| l.heads).collect(),
        kv_heads: a.layers.iter().map(|l| l.kv_heads).collect(),
        ffn: a.layers.iter().map(|l| l.ffn).collect(),
        encoding: enc.name(),
        encoded: a.encoded,
        copied: a.copied,
    };
    for (i, layer) in a.layers.into_iter().enumerate() {
        for (suffix, dims, dtype, bytes) in layer.tensors {
            w.tensor(TensorData {
                name: format!("blk.{i}.{suffix}"),
                dims,
                dtype,
                bytes,
            })?;
        }
    }
    let file = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
    let mut out = std::io::BufWriter::new(file);
    let bytes = w.write(&mut out).map_err(|e| Error::io(path, e))?;
    use std::io::Write;
    out.flush().map_err(|e| Error::io(path, e))?;
    Ok(Written {
        bytes,
        tensors: w.tensors().len(),
        ..written
    })
}

/// The file name of the GGUF in an output directory.
pub const FILE: &str = "model.gguf";

/// Whether the writer takes a model of `cfg`'s family at all, before any
/// long work.
pub fn check_source(cfg: &crate::checkpoint::ModelConfig) -> Result<()> {
    check_config(cfg)
}

/// Write `model` under `plan` as `dir/model.gguf`; `source` is the
/// checkpoint the model was read from; `healed` is recorded.
pub fn write_into(
    model: &Model,
    plan: &Plan,
    source: &Origin,
    enc: Encoding,
    healed: bool,
    dir: &Path,
) -> Result<Written> {
    check(model, plan)?;
    let extra = [
        ("depthc.plan", Meta::Str(plan.to_string())),
        (
            "depthc.version",
            Meta::Str(env!("CARGO_PKG_VERSION").into()),
        ),
        ("depthc.encoding", Meta::Str(enc.name().into())),
        ("depthc.healed", Meta::Bool(healed)),
    ];
    write(model, plan, source, enc, &extra, &dir.join(FILE))
}

/// [`write_into`] a new directory `out` (which must not exist; written
/// under a temporary name and renamed when complete).
pub fn emit(
    model: &Model,
    plan: &Plan,
    source: &Path,
    enc: Encoding,
    healed: bool,
    out: &Path,
) -> Result<Written> {
    check(model, plan)?;
    let origin = Origin::open(source)?;
    crate::output::new_directory(out, |dir| {
        write_into(model, plan, &origin, enc, healed, dir)
    })
}

#[cfg(test)]
mod tests {
    use super::permute_rows;

    #[test]
    fn rows_move_as_llama_cpp_permutes_them() {
        // 2 heads of 4 rows, one byte per row: HF rows [h0: 0 1 2 3, h1: 4 5 6 7]
        // become, within each head, (0 2 1 3): pairs (i, i + d/2) interleaved.
        let hf: Vec<u8> = (0..8).collect();
        assert_eq!(permute_rows(&hf, 2, 8, 1), [0, 2, 1, 3, 4, 6, 5, 7]);
        // Whole rows of several bytes move together.
        let hf: Vec<u8> = (0..16).collect();
        assert_eq!(
            permute_rows(&hf, 1, 4, 4),
            [0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15]
        );
    }
}
