//! Tokenizers: a Hugging Face `tokenizer.json` through the `tokenizers` crate,
//! or the byte-level BPE stored in GGUF metadata (`tokenizer.ggml.*`), turned
//! into the same crate's `tokenizer.json` form so that both paths tokenize with
//! one implementation and the GGUF one can be written beside an emitted model.

use std::path::Path;

use serde_json::{json, Value};

use crate::{Error, Result};

/// `n` token ids spread deterministically over a vocabulary of `vocab_size`:
/// the input of a timing or a check that needs tokens and has no tokenizer
/// or no text (the values do not matter, only that they are valid ids).
pub fn stand_in_ids(n: usize, vocab_size: usize) -> Vec<u32> {
    (0..n)
        .map(|i| ((i * 7919 + 13) % vocab_size) as u32)
        .collect()
}

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

/// Qwen2's split regex (tokenizer.ggml.pre `qwen2`, `deepseek-r1-qwen`): Llama 3's
/// with every digit on its own, as Qwen2's own tokenizer.json splits.
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

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
            "qwen2" | "deepseek-r1-qwen" => json!({
                "type": "Sequence",
                "pretokenizers": [
                    {"type": "Split", "pattern": {"Regex": QWEN2_SPLIT}, "behavior": "Isolated", "invert": false},
                    byte_level(false)
                ]
            }),
            other => {
                return Err(Error::Tokenizer {
                    path: path.to_path_buf(),
                    msg: format!("pre-tokenizer `{other}` (tokenizer.ggml.pre) is not supported (smollm, gpt2, llama-bpe, qwen2, deepseek-r1-qwen)"),
                })
            }
        };
        // Qwen2's own tokenizer.json normalises to NFC before splitting.
        let normalizer = match pre {
            "qwen2" | "deepseek-r1-qwen" => json!({"type": "NFC"}),
            _ => Value::Null,
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
            "normalizer": normalizer,
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

    /// SentencePiece BPE from a GGUF vocabulary (`tokenizer.ggml.model` `llama`,
    /// Gemma's files: no merges stored). Built as transformers builds it from
    /// the same file, so that both tokenize alike: a token of two or more
    /// spaces is respelled with `▁`, merges are recovered from the vocabulary
    /// (every split of a token into two tokens) and ranked by the token's
    /// position in the file, text spaces become `▁`, unknown bytes fall back
    /// to `<0xXX>` tokens.
    pub fn from_gguf_spm(
        path: &Path,
        tokens: Vec<String>,
        token_types: &[u64],
    ) -> Result<Tokenizer> {
        let spelled: Vec<String> = tokens
            .iter()
            .map(|t| {
                if t.contains(' ') && t.trim().is_empty() {
                    "\u{2581}".repeat(t.chars().count())
                } else {
                    t.clone()
                }
            })
            .collect();
        // Later duplicates win the id, as in a Python dict; order is first sight.
        let mut id_of = std::collections::HashMap::with_capacity(spelled.len());
        let mut order: Vec<&str> = Vec::with_capacity(spelled.len());
        for (id, t) in spelled.iter().enumerate() {
            if id_of.insert(t.as_str(), id).is_none() {
                order.push(t);
            }
        }
        // (left, right, rank of the merged token: its last position).
        let mut merges: Vec<(&str, &str, usize)> = Vec::new();
        for &merged in &order {
            let start = merges.len();
            for (at, _) in merged.char_indices().skip(1) {
                let (l, r) = merged.split_at(at);
                if id_of.contains_key(l) && id_of.contains_key(r) {
                    merges.push((l, r, id_of[merged]));
                }
            }
            merges[start..].sort_by_key(|&(l, r, _)| (id_of[l], id_of[r]));
        }
        // Best first: earlier tokens, then longer left and right pieces.
        merges.sort_by(|a, b| {
            (
                a.2,
                std::cmp::Reverse(a.0.chars().count()),
                std::cmp::Reverse(a.1.chars().count()),
            )
                .cmp(&(
                    b.2,
                    std::cmp::Reverse(b.0.chars().count()),
                    std::cmp::Reverse(b.1.chars().count()),
                ))
        });
        let mut vocab = serde_json::Map::new();
        for (t, &id) in &id_of {
            vocab.insert(t.to_string(), json!(id));
        }
        let mut added = Vec::new();
        for (id, (tok, ty)) in tokens.iter().zip(token_types).enumerate() {
            let is_control = *ty == TOKEN_TYPE_CONTROL;
            if is_control || (*ty == TOKEN_TYPE_USER_DEFINED && id_of.contains_key(tok.as_str())) {
                added.push(json!({
                    "id": id, "content": tok, "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": false, "special": is_control
                }));
            }
        }
        let merges: Vec<Value> = merges.iter().map(|(l, r, _)| json!([l, r])).collect();
        let bos = tokens.iter().position(|t| t == "<bos>");
        let post_processor = match bos {
            Some(id) => json!({
                "type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": "<bos>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": "<bos>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": "<bos>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {"<bos>": {"id": "<bos>", "ids": [id], "tokens": ["<bos>"]}}
            }),
            None => Value::Null,
        };
        let tokenizer_json = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"},
            "pre_tokenizer": {"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious", "invert": false},
            "post_processor": post_processor,
            "decoder": {"type": "Sequence", "decoders": [
                {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
                {"type": "ByteFallback"}, {"type": "Fuse"}
            ]},
            "model": {
                "type": "BPE", "dropout": null, "unk_token": "<unk>", "continuing_subword_prefix": null,
                "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true,
                "ignore_merges": false, "vocab": Value::Object(vocab), "merges": merges
            }
        });
        Self::from_json(
            path,
            tokenizer_json.to_string(),
            format!("GGUF SentencePiece BPE, {} tokens", tokens.len()),
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

    /// The byte-level BPE as llama.cpp's `tokenizer.ggml.*` keys hold it
    /// (the inverse of [`Tokenizer::from_gguf_bpe`]): every token by id, its
    /// type (1 normal, 3 control for a special added token, 4 user-defined
    /// for another added token), the merges as `"a b"`, and the
    /// pre-tokenizer's llama.cpp name, recognised from the splits this file
    /// makes (`smollm`, `gpt2`, `llama-bpe`, `qwen2`).
    pub fn gguf_bpe(&self, path: &Path) -> Result<GgufBpe> {
        let bad = |msg: String| Error::Tokenizer {
            path: path.to_path_buf(),
            msg,
        };
        let v: Value = serde_json::from_str(&self.json).map_err(|e| bad(format!("{e}")))?;
        let model = &v["model"];
        if model["type"] != "BPE" {
            return Err(bad(format!(
                "a `{}` model: llama.cpp's GGUF is written for byte-level BPE only",
                model["type"].as_str().unwrap_or("?")
            )));
        }
        let mut tokens: Vec<Option<String>> = Vec::new();
        let mut types: Vec<i32> = Vec::new();
        let mut put = |id: usize, tok: &str, ty: i32| {
            if tokens.len() <= id {
                tokens.resize(id + 1, None);
                types.resize(id + 1, 1);
            }
            tokens[id] = Some(tok.to_string());
            types[id] = ty;
        };
        for (tok, id) in model["vocab"]
            .as_object()
            .ok_or_else(|| bad("no vocab".into()))?
        {
            put(
                id.as_u64()
                    .ok_or_else(|| bad(format!("token `{tok}` has no id")))?
                    as usize,
                tok,
                1,
            );
        }
        for t in v["added_tokens"].as_array().into_iter().flatten() {
            let (Some(id), Some(tok)) = (t["id"].as_u64(), t["content"].as_str()) else {
                return Err(bad("an added token without id or content".into()));
            };
            let ty = if t["special"] == true {
                TOKEN_TYPE_CONTROL
            } else {
                TOKEN_TYPE_USER_DEFINED
            };
            put(id as usize, tok, ty as i32);
        }
        let tokens = tokens
            .into_iter()
            .enumerate()
            .map(|(id, t)| t.ok_or_else(|| bad(format!("no token has id {id}"))))
            .collect::<Result<Vec<_>>>()?;
        let merges = model["merges"]
            .as_array()
            .ok_or_else(|| bad("no merges".into()))?
            .iter()
            .map(|m| match m {
                Value::String(s) => Ok(s.clone()),
                Value::Array(p) if p.len() == 2 => Ok(format!(
                    "{} {}",
                    p[0].as_str().unwrap_or_default(),
                    p[1].as_str().unwrap_or_default()
                )),
                _ => Err(bad(format!("merge {m} is neither \"a b\" nor [a, b]"))),
            })
            .collect::<Result<Vec<_>>>()?;
        let pre = &v["pre_tokenizer"];
        let parts: Vec<&Value> = match pre["type"].as_str() {
            Some("Sequence") => pre["pretokenizers"]
                .as_array()
                .map(|a| a.iter().collect())
                .unwrap_or_default(),
            _ => vec![pre],
        };
        let split = |regex: &str| {
            parts.len() == 2
                && parts[0]["type"] == "Split"
                && parts[0]["pattern"]["Regex"] == regex
                && parts[1]["type"] == "ByteLevel"
        };
        let pre = if parts.len() == 2
            && parts[0]["type"] == "Digits"
            && parts[0]["individual_digits"] == true
            && parts[1]["type"] == "ByteLevel"
        {
            "smollm"
        } else if parts.len() == 1 && parts[0]["type"] == "ByteLevel" {
            "gpt2"
        } else if split(LLAMA3_SPLIT) {
            "llama-bpe"
        } else if split(QWEN2_SPLIT) {
            "qwen2"
        } else {
            return Err(bad(
                "its pre-tokenizer is none llama.cpp's GGUF names for depthc (smollm, gpt2, \
                 llama-bpe, qwen2): convert the model to GGUF with llama.cpp first"
                    .into(),
            ));
        };
        Ok(GgufBpe {
            tokens,
            token_types: types,
            merges,
            pre,
        })
    }
}

/// A byte-level BPE vocabulary in llama.cpp's GGUF terms ([`Tokenizer::gguf_bpe`]).
pub struct GgufBpe {
    pub tokens: Vec<String>,
    pub token_types: Vec<i32>,
    pub merges: Vec<String>,
    pub pre: &'static str,
}
