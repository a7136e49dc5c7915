//! The emitted directory, laid out so that every serving client loads it with
//! no option:
//!
//! ```text
//! model.onnx, model.onnx_data    ONNX Runtime, Optimum, onnxruntime-genai
//! onnx/model.onnx, onnx/model.onnx_data
//!                                transformers.js (relative symbolic links to the two
//!                                above: the weights are stored once)
//! genai_config.json              onnxruntime-genai (`past_present_share_buffer` false for
//!                                the portable graph's KV cache by Concat, true for
//!                                GroupQueryAttention's)
//! config.json                    the Hugging Face config, with `transformers.js_config`
//! generation_config.json, tokenizer.json, tokenizer_config.json
//! ```
//!
//! `model.onnx_data` is the name Optimum and transformers.js fetch the
//! external weights under from a model hub.
//!
//! The directory is written under a temporary name beside its destination and
//! renamed when complete: an error never leaves a half-written directory.

use std::path::Path;

use indicatif::ProgressBar;
use serde_json::{json, Value};

use super::{write, Written};
use crate::checkpoint::tokenizer::Tokenizer;
use crate::checkpoint::ModelConfig;
use crate::graph::{self, contract, ElemType, Form, Ops};
use crate::model::{Int4, Model};
use crate::plan::Plan;
use crate::{Error, Result};

pub const MODEL_FILE: &str = "model.onnx";
/// Where transformers.js looks for the model (`onnx/model.onnx`).
pub const TRANSFORMERS_JS_DIR: &str = "onnx";

/// Tokenizer files of a Hugging Face checkpoint copied as they are.
const HF_TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
];

pub struct EmitOptions {
    pub form: Form,
    pub float: ElemType,
    /// Plain ONNX operators or ONNX Runtime's fused ones (`--ops`).
    pub ops: Ops,
    /// 4-bit linear weights (`MatMulNBits`), or the float type's.
    pub int4: Option<Int4>,
    /// The model's groups were healed (recorded in the metadata).
    pub healed: bool,
}

/// Where the model came from: its tokenizer files are copied or built.
pub struct Source<'a> {
    pub path: &'a Path,
    pub tokenizer: Option<&'a Tokenizer>,
}

/// Write the emitted directory `out` (which must not exist).
pub fn emit(
    model: &Model,
    plan: &Plan,
    source: &Source,
    opts: &EmitOptions,
    out: &Path,
    progress: &ProgressBar,
) -> Result<Written> {
    crate::output::new_directory(out, |dir| fill(model, plan, source, opts, dir, progress))
}

fn fill(
    model: &Model,
    plan: &Plan,
    source: &Source,
    opts: &EmitOptions,
    dir: &Path,
    progress: &ProgressBar,
) -> Result<Written> {
    let (model, kept_plan) = graph::lp::without_dropped(model, plan);
    let cfg = &model.config;
    let model = &*graph::lp::weights_as_emitted(&model, &kept_plan, opts.form, opts.int4)?;
    let graph = graph::build(
        model,
        plan,
        opts.form,
        opts.ops,
        opts.float,
        opts.int4,
        opts.healed,
    );
    let written = write(&graph, &dir.join(MODEL_FILE), progress)?;
    drop(graph);
    link_for_transformers_js(dir)?;

    let mut config = cfg.to_hf_json();
    config["torch_dtype"] = json!(if opts.float == ElemType::F16 {
        "float16"
    } else {
        "float32"
    });
    // transformers.js fetches `onnx/model.onnx_data` beside the graph from a
    // hub only when told to; a local path finds it through ONNX Runtime.
    config["transformers.js_config"] = json!({ "use_external_data_format": true });
    write_json(&dir.join("config.json"), &config)?;
    write_json(&dir.join("genai_config.json"), &genai_config(cfg, opts.ops))?;

    let mut copied = Vec::new();
    if source.path.is_dir() {
        for f in HF_TOKENIZER_FILES {
            let from = source.path.join(f);
            if from.is_file() {
                std::fs::copy(&from, dir.join(f)).map_err(|e| Error::io(&from, e))?;
                copied.push(*f);
            }
        }
    }
    if let Some(tok) = source.tokenizer {
        if !copied.contains(&"tokenizer.json") {
            let path = dir.join("tokenizer.json");
            std::fs::write(&path, tok.to_json()).map_err(|e| Error::io(&path, e))?;
        }
        if !copied.contains(&"tokenizer_config.json") {
            write_json(
                &dir.join("tokenizer_config.json"),
                &tokenizer_config(cfg, tok),
            )?;
        }
    }
    if !copied.contains(&"generation_config.json") {
        write_json(
            &dir.join("generation_config.json"),
            &json!({
                "bos_token_id": cfg.bos_token_id,
                "eos_token_id": cfg.eos_token_id,
                "pad_token_id": cfg.eos_token_id,
                "do_sample": false,
            }),
        )?;
    }
    Ok(written)
}

/// `onnx/model.onnx` and `onnx/model.onnx_data` as relative symbolic links
/// to the files above them: a pair, so that ONNX Runtime finds the data next
/// to the graph it opens. Not hard links: the ONNX checker refuses external
/// data with several hard links, and the files at the top must pass it.
fn link_for_transformers_js(dir: &Path) -> Result<()> {
    let sub = dir.join(TRANSFORMERS_JS_DIR);
    std::fs::create_dir(&sub).map_err(|e| Error::io(&sub, e))?;
    let data = super::external_data_name(MODEL_FILE);
    for name in [MODEL_FILE, data.as_str()] {
        let link = sub.join(name);
        #[cfg(unix)]
        std::os::unix::fs::symlink(Path::new("..").join(name), &link)
            .map_err(|e| Error::io(&link, e))?;
        #[cfg(not(unix))]
        std::fs::copy(dir.join(name), &link).map_err(|e| Error::io(&link, e))?;
    }
    Ok(())
}

fn write_json(path: &Path, v: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v).expect("JSON values serialise");
    std::fs::write(path, text + "\n").map_err(|e| Error::io(path, e))
}

/// onnxruntime-genai's configuration of a decoder-only model. The portable
/// graph grows its cache by `Concat` (`past_present_share_buffer: false`);
/// GroupQueryAttention (`--ops ort`) also writes into a cache preallocated to
/// the maximum length, which spares genai a copy of every cache each step.
fn genai_config(cfg: &ModelConfig, ops: Ops) -> Value {
    let eos = cfg.eos_token_id.unwrap_or(0);
    json!({
        "model": {
            "bos_token_id": cfg.bos_token_id.unwrap_or(eos),
            "context_length": cfg.max_position_embeddings,
            "decoder": {
                "session_options": {
                    "log_id": "onnxruntime-genai",
                    "provider_options": []
                },
                "filename": MODEL_FILE,
                "head_size": cfg.head_dim,
                "hidden_size": cfg.hidden_size,
                "inputs": {
                    "input_ids": contract::INPUT_IDS,
                    "attention_mask": contract::ATTENTION_MASK,
                    "position_ids": contract::POSITION_IDS,
                    "past_key_names": contract::PAST_KEY,
                    "past_value_names": contract::PAST_VALUE
                },
                "outputs": {
                    "logits": contract::LOGITS,
                    "present_key_names": contract::PRESENT_KEY,
                    "present_value_names": contract::PRESENT_VALUE
                },
                "num_attention_heads": cfg.num_attention_heads,
                "num_hidden_layers": cfg.num_hidden_layers,
                "num_key_value_heads": cfg.num_key_value_heads
            },
            "eos_token_id": eos,
            "pad_token_id": eos,
            // onnxruntime-genai's model types carry the family names (its
            // `gemma3` is the multimodal pipeline).
            "type": match cfg.family {
                crate::checkpoint::Family::Gemma3 => "gemma3_text",
                f => f.name(),
            },
            "vocab_size": cfg.vocab_size
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": false,
            "early_stopping": true,
            "length_penalty": 1.0,
            "max_length": cfg.max_position_embeddings,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": ops == Ops::Ort,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0
        }
    })
}

/// A `tokenizer_config.json` for a tokenizer built from GGUF metadata.
fn tokenizer_config(cfg: &ModelConfig, tok: &Tokenizer) -> Value {
    let token = |id: Option<u32>| id.and_then(|i| tok.id_to_token(i));
    json!({
        "tokenizer_class": "GPT2Tokenizer",
        "bos_token": token(cfg.bos_token_id),
        "eos_token": token(cfg.eos_token_id),
        "unk_token": token(cfg.eos_token_id),
        "pad_token": token(cfg.eos_token_id),
        "add_bos_token": false,
        "add_prefix_space": false,
        "clean_up_tokenization_spaces": false,
        "model_max_length": cfg.max_position_embeddings,
    })
}
