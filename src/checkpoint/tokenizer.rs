//! Tokenizers: a Hugging Face `tokenizer.json` through the `tokenizers` crate,
//! or the byte-level BPE stored in GGUF metadata (`tokenizer.ggml.*`), turned
//! into the same crate's `tokenizer.json` form so that both paths tokenize with
//! one implementation and the GGUF one can be written beside an emitted model.

use std::path::Path;

use serde_json::{json, Value};

use crate::{Error, Result};

/// A loaded tokenizer and the `tokenizer.json` text it was built from.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    json: String,
    /// Where it came from, for `inspect`.
    pub description: String,
}

/// GGUF token type of control tokens (llama.cpp `LLAMA_TOKEN_TYPE_CONTROL`).
const TOKEN_TYPE_CONTROL: u64 = 3;
const TOKEN_TYPE_USER_DEFINED: u64 = 4;

/// Llama 3's split regex (tokenizer.ggml.pre `llama-bpe`).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

impl Tokenizer {
    /// `dir/tokenizer.json`, or `None` when the directory has none.
    pub fn from_hf_dir(dir: &Path) -> Result<Option<Tokenizer>> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Ok(None);
        }
        let json = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        Self::from_json(&path, json, "tokenizer.json".to_string()).map(Some)
    }

    fn from_json(path: &Path, json: String, description: String) -> Result<Tokenizer> {
        let inner: tokenizers::Tokenizer = json.parse().map_err(|e| Error::Tokenizer {
            path: path.to_path_buf(),
            msg: format!("cannot load: {e}"),
        })?;
        Ok(Tokenizer {
            inner,
            json,
            description,
        })
    }

    /// Byte-level BPE from GGUF vocab and merges; `pre` is `tokenizer.ggml.pre`.
    pub fn from_gguf_bpe(
        path: &Path,
        tokens: Vec<String>,
        merges: Vec<String>,
        token_types: &[u64],
        pre: &str,
    ) -> Result<Tokenizer> {
        let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
        let pre_tokenizer = match pre {
            // llama.cpp splits every digit on its own before the GPT-2 regex.
            "smollm" | "starcoder" | "refact" | "codeshell" => json!({
                "type": "Sequence",
                "pretokenizers": [{"type": "Digits", "individual_digits": true}, byte_level(true)]
            }),
            "default" | "gpt2" | "gpt-2" => byte_level(true),
            "llama-bpe" | "llama3" => json!({
                "type": "Sequence",
                "pretokenizers": [
                    {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}, "behavior": "Isolated", "invert": false},
                    byte_level(false)
                ]
            }),
            other => {
                return Err(Error::Tokenizer {
                    path: path.to_path_buf(),
                    msg: format!("pre-tokenizer `{other}` (tokenizer.ggml.pre) is not supported (smollm, gpt2, llama-bpe)"),
                })
            }
        };
        let mut vocab = serde_json::Map::new();
        let mut added = Vec::new();
        for (id, tok) in tokens.iter().enumerate() {
            vocab.insert(tok.clone(), json!(id));
            let ty = token_types.get(id).copied().unwrap_or(1);
            if ty == TOKEN_TYPE_CONTROL || ty == TOKEN_TYPE_USER_DEFINED {
                added.push(json!({
                    "id": id, "content": tok, "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": false, "special": ty == TOKEN_TYPE_CONTROL
                }));
            }
        }
        let tokenizer_json = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {
                "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                "ignore_merges": false, "vocab": Value::Object(vocab), "merges": merges
            }
        });
        Self::from_json(
            path,
            tokenizer_json.to_string(),
            format!(
                "GGUF byte-level BPE, {} tokens, pre-tokenizer `{pre}`",
                tokens.len()
            ),
        )
    }

    /// Token ids of `text`, no special tokens added (no BOS).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::Tokenizer {
                path: Default::default(),
                msg: format!("encoding failed: {e}"),
            })?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, false).map_err(|e| Error::Tokenizer {
            path: Default::default(),
            msg: format!("decoding failed: {e}"),
        })
    }

    /// The token string of `id` (with special tokens).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The `tokenizer.json` text, to write beside an exported model.
    pub fn to_json(&self) -> &str {
        &self.json
    }
}
