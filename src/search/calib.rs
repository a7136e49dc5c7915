//! Calibration input: text files or folders (tokenized by the model's
//! tokenizer, no special tokens), or token ids (`.json` array, `.npy` 1-D or
//! 2-D integer array). Each file is cut into non-overlapping windows of
//! `seq_len` tokens from its start; files are taken in the order given, the
//! files of a folder in name order; at most `max_tokens / seq_len` windows.
//!
//! Without input, the built-in default is 80,000 characters of public-domain
//! Shakespeare (four plays, not Hamlet), made by `assets/calibration/make_default.py`.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::checkpoint::tokenizer::Tokenizer;
use crate::{Error, Result};

/// The built-in calibration text.
pub const DEFAULT_TEXT: &str = include_str!("../../assets/calibration/shakespeare.txt");
pub const DEFAULT_NAME: &str = "built-in: assets/calibration/shakespeare.txt";

/// One calibration source as the report describes it.
#[derive(Debug, Clone, Serialize)]
pub struct CalibSource {
    pub path: String,
    /// `text`, `json-ids` or `npy-ids`.
    pub kind: &'static str,
    pub tokens: usize,
    /// Windows taken from it.
    pub windows: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Calibration {
    pub sources: Vec<CalibSource>,
    pub seq_len: usize,
    pub max_tokens: usize,
    #[serde(skip)]
    pub windows: Vec<Vec<u32>>,
}

impl Calibration {
    pub fn tokens(&self) -> usize {
        self.windows.len() * self.seq_len
    }
}

fn files_of(path: &Path) -> Result<Vec<PathBuf>> {
    if path.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|e| Error::io(path, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.is_file()
                    && !p
                        .file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with('.'))
            })
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(Error::Input(format!(
                "calibration folder {} has no files",
                path.display()
            )));
        }
        Ok(files)
    } else if path.is_file() {
        Ok(vec![path.to_path_buf()])
    } else {
        Err(Error::Input(format!(
            "calibration input {} does not exist",
            path.display()
        )))
    }
}

/// Token ids of a `.json` file: a flat array of integers.
fn json_ids(path: &Path) -> Result<Vec<u32>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::format(path, format!("not JSON: {e}")))?;
    let arr = v
        .as_array()
        .ok_or_else(|| Error::format(path, "expected a JSON array of token ids"))?;
    arr.iter()
        .enumerate()
        .map(|(i, x)| {
            x.as_u64()
                .and_then(|x| u32::try_from(x).ok())
                .ok_or_else(|| Error::format(path, format!("element {i} is not a token id: {x}")))
        })
        .collect()
}

/// Token ids of a `.npy` file: little-endian integer array, C order, 1-D or 2-D
/// (rows are concatenated).
fn npy_ids(path: &Path) -> Result<Vec<u32>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let bad = |msg: &str| Error::format(path, format!("not a supported .npy file: {msg}"));
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(bad("bad magic"));
    }
    let (header_len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        _ => return Err(bad("unknown version")),
    };
    let header = bytes
        .get(start..start + header_len)
        .and_then(|h| std::str::from_utf8(h).ok())
        .ok_or_else(|| bad("truncated header"))?;
    if header.contains("'fortran_order': True") {
        return Err(bad("Fortran order"));
    }
    let width = ["'<i8'", "'<u8'", "'<i4'", "'<u4'", "'<i2'", "'<u2'"]
        .iter()
        .find(|d| header.contains(*d))
        .map(|d| match &d[3..4] {
            "8" => 8,
            "4" => 4,
            _ => 2,
        })
        .ok_or_else(|| bad("dtype must be a little-endian integer (<i8, <i4, <u4, ...)"))?;
    let signed = header.contains("'<i");
    let data = &bytes[start + header_len..];
    if data.len() % width != 0 {
        return Err(bad("data length is not a multiple of the element size"));
    }
    data.chunks_exact(width)
        .enumerate()
        .map(|(i, c)| {
            let v: i128 = match (width, signed) {
                (8, true) => i64::from_le_bytes(c.try_into().expect("8 bytes")) as i128,
                (8, false) => u64::from_le_bytes(c.try_into().expect("8 bytes")) as i128,
                (4, true) => i32::from_le_bytes(c.try_into().expect("4 bytes")) as i128,
                (4, false) => u32::from_le_bytes(c.try_into().expect("4 bytes")) as i128,
                (_, true) => i16::from_le_bytes(c.try_into().expect("2 bytes")) as i128,
                (_, false) => u16::from_le_bytes(c.try_into().expect("2 bytes")) as i128,
            };
            u32::try_from(v).map_err(|_| bad(&format!("element {i} ({v}) is not a token id")))
        })
        .collect()
}

/// Read the calibration windows. `inputs` empty: the built-in text. `model`
/// names the checkpoint in errors.
pub fn load(
    inputs: &[PathBuf],
    model: &Path,
    bos: Option<u32>,
    tokenizer: Option<&Tokenizer>,
    vocab_size: usize,
    seq_len: usize,
    max_tokens: usize,
) -> Result<Calibration> {
    if seq_len < 2 {
        return Err(Error::Input(format!(
            "--seq-len {seq_len} is too short: at least 2 tokens are needed"
        )));
    }
    let max_windows = max_tokens / seq_len;
    if max_windows == 0 {
        return Err(Error::Input(format!(
            "--max-tokens {max_tokens} is less than one window of --seq-len {seq_len}"
        )));
    }
    let tokenize = |text: &str, what: &str| -> Result<Vec<u32>> {
        tokenizer
            .ok_or_else(|| {
                Error::Input(format!(
                    "{what} is text but {} has no tokenizer (no tokenizer.json, no tokenizer.ggml.* \
                     in a GGUF): give token ids with --calib IDS.npy or IDS.json",
                    model.display()
                ))
            })?
            .encode(text)
    };
    let mut documents: Vec<(String, &'static str, Vec<u32>)> = Vec::new();
    if inputs.is_empty() {
        documents.push((
            DEFAULT_NAME.to_string(),
            "text",
            tokenize(DEFAULT_TEXT, "the built-in calibration")?,
        ));
    }
    for input in inputs {
        for file in files_of(input)? {
            let ext = file.extension().and_then(|e| e.to_str()).unwrap_or("");
            let (kind, ids) = match ext {
                "json" => ("json-ids", json_ids(&file)?),
                "npy" => ("npy-ids", npy_ids(&file)?),
                _ => {
                    let text = std::fs::read_to_string(&file).map_err(|e| Error::io(&file, e))?;
                    ("text", tokenize(&text, &file.display().to_string())?)
                }
            };
            if ids.is_empty() {
                return Err(Error::format(
                    &file,
                    format!("the calibration {kind} is empty"),
                ));
            }
            if let Some(&bad) = ids.iter().find(|&&i| i as usize >= vocab_size) {
                return Err(Error::Input(format!(
                    "{}: token id {bad} is outside the model's vocabulary of {vocab_size}",
                    file.display()
                )));
            }
            documents.push((file.display().to_string(), kind, ids));
        }
    }
    let mut windows = Vec::new();
    let mut sources = Vec::new();
    for (path, kind, ids) in documents {
        let take: Vec<Vec<u32>> = super::chunks(&ids, seq_len, bos)
            .take(max_windows - windows.len())
            .collect();
        sources.push(CalibSource {
            path,
            kind,
            tokens: ids.len(),
            windows: take.len(),
        });
        windows.extend(take);
    }
    if windows.is_empty() {
        let total: usize = sources.iter().map(|s| s.tokens).sum();
        let names: Vec<&str> = sources.iter().map(|s| s.path.as_str()).collect();
        return Err(Error::Input(format!(
            "the calibration input ({}) has {total} tokens, fewer than one window of --seq-len \
             {seq_len}: give more text or a smaller --seq-len",
            names.join(", ")
        )));
    }
    Ok(Calibration {
        sources,
        seq_len,
        max_tokens,
        windows,
    })
}

/// `sha256:<hex>` of a checkpoint's content: the GGUF file, or a directory's
/// `config.json` and safetensors files in name order.
pub fn content_hash(path: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let files = if path.is_dir() {
        let mut f: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|e| Error::io(path, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
                name == "config.json" || name.ends_with(".safetensors")
            })
            .collect();
        f.sort();
        f
    } else {
        vec![path.to_path_buf()]
    };
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    for f in files {
        let mut file = std::fs::File::open(&f).map_err(|e| Error::io(&f, e))?;
        loop {
            let n = file.read(&mut buf).map_err(|e| Error::io(&f, e))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
    }
    let digest = hasher.finalize();
    Ok(format!(
        "sha256:{}",
        digest
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    ))
}
