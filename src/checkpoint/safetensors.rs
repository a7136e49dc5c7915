//! safetensors reader (memory-mapped): `model.safetensors`, or shards listed
//! in `model.safetensors.index.json` (`weight_map`). Format: u64 LE header
//! length, a JSON header `{name: {dtype, shape, data_offsets}}`, then data.
//! Also a small writer, used to export checkpoints and build test fixtures.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use serde::Deserialize;

use super::{dequant, DType, Pages, TensorInfo, TensorSource};
use crate::{Error, Result};

struct Shard {
    path: PathBuf,
    mmap: Mmap,
}

struct Entry {
    info: TensorInfo,
    shard: usize,
    begin: usize,
    end: usize,
}

/// All tensors of a Hugging Face safetensors checkpoint.
pub struct SafetensorsSource {
    shards: Vec<Shard>,
    entries: BTreeMap<String, Entry>,
}

#[derive(Deserialize)]
struct HeaderEntry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: [usize; 2],
}

#[derive(Deserialize)]
struct ShardIndex {
    weight_map: HashMap<String, String>,
}

fn parse_dtype(s: &str) -> Option<DType> {
    match s {
        "F32" => Some(DType::F32),
        "F16" => Some(DType::F16),
        "BF16" => Some(DType::BF16),
        _ => None,
    }
}

impl SafetensorsSource {
    /// Open `dir/model.safetensors` or the shards named by
    /// `dir/model.safetensors.index.json`.
    pub fn open_dir(dir: &Path) -> Result<SafetensorsSource> {
        let index_path = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let files: Vec<PathBuf> = if index_path.exists() {
            let text =
                std::fs::read_to_string(&index_path).map_err(|e| Error::io(&index_path, e))?;
            let index: ShardIndex = serde_json::from_str(&text)
                .map_err(|e| Error::format(&index_path, format!("invalid index: {e}")))?;
            let mut names: Vec<String> = index.weight_map.values().cloned().collect();
            names.sort();
            names.dedup();
            names.into_iter().map(|n| dir.join(n)).collect()
        } else if single.exists() {
            vec![single]
        } else {
            return Err(Error::format(
                dir,
                "no model.safetensors or model.safetensors.index.json in this directory",
            ));
        };
        Self::open_files(&files)
    }

    pub fn open_files(files: &[PathBuf]) -> Result<SafetensorsSource> {
        let mut shards = Vec::new();
        let mut entries = BTreeMap::new();
        for path in files {
            let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
            // SAFETY: the file is opened read-only; a concurrent writer would be
            // a user error, as for every mmap-based checkpoint reader.
            let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
            let (header, data_start) = parse_header(path, &mmap)?;
            let shard = shards.len();
            let data_len = mmap.len() - data_start;
            for (name, h) in header {
                let dtype = parse_dtype(&h.dtype).ok_or_else(|| {
                    Error::tensor(
                        path,
                        &name,
                        format!("unsupported dtype {} (F32, F16, BF16)", h.dtype),
                    )
                })?;
                let numel = h
                    .shape
                    .iter()
                    .try_fold(1usize, |n, &d| n.checked_mul(d))
                    .ok_or_else(|| {
                        Error::tensor(path, &name, format!("shape {:?} overflows", h.shape))
                    })?;
                let [begin, end] = h.data_offsets;
                let want = dequant::byte_size(dtype, numel).unwrap_or(usize::MAX);
                if begin > end || end > data_len {
                    return Err(Error::tensor(
                        path,
                        &name,
                        format!("data_offsets [{begin}, {end}) exceed the {data_len} data bytes (truncated file?)"),
                    ));
                }
                if end - begin != want {
                    return Err(Error::tensor(
                        path,
                        &name,
                        format!(
                            "{} bytes stored for shape {:?} {}, expected {want}",
                            end - begin,
                            h.shape,
                            h.dtype
                        ),
                    ));
                }
                if entries.contains_key(&name) {
                    return Err(Error::tensor(path, &name, "stored in more than one shard"));
                }
                entries.insert(
                    name.clone(),
                    Entry {
                        info: TensorInfo {
                            name,
                            dtype,
                            shape: h.shape,
                        },
                        shard,
                        begin: data_start + begin,
                        end: data_start + end,
                    },
                );
            }
            check_disjoint(path, shard, &entries)?;
            shards.push(Shard {
                path: path.clone(),
                mmap,
            });
        }
        Ok(SafetensorsSource { shards, entries })
    }

    /// Raw bytes of one tensor.
    pub fn bytes(&self, name: &str) -> Option<&[u8]> {
        let e = self.entries.get(name)?;
        Some(&self.shards[e.shard].mmap[e.begin..e.end])
    }
}

/// No two tensors of one shard may share bytes (a corrupt or hand-edited header).
fn check_disjoint(path: &Path, shard: usize, entries: &BTreeMap<String, Entry>) -> Result<()> {
    let mut spans: Vec<(usize, usize, &str)> = entries
        .values()
        .filter(|e| e.shard == shard && e.end > e.begin)
        .map(|e| (e.begin, e.end, e.info.name.as_str()))
        .collect();
    spans.sort();
    for w in spans.windows(2) {
        let ((_, end, a), (begin, _, b)) = (w[0], w[1]);
        if begin < end {
            return Err(Error::tensor(
                path,
                b,
                format!("its data_offsets overlap those of `{a}` (corrupt header)"),
            ));
        }
    }
    Ok(())
}

fn parse_header(path: &Path, bytes: &[u8]) -> Result<(BTreeMap<String, HeaderEntry>, usize)> {
    if bytes.len() < 8 {
        return Err(Error::format(
            path,
            "file shorter than the 8-byte header length",
        ));
    }
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    if n > bytes.len() - 8 {
        return Err(Error::format(
            path,
            format!(
                "header length {n} exceeds the file size {} (truncated or not safetensors)",
                bytes.len()
            ),
        ));
    }
    let text = std::str::from_utf8(&bytes[8..8 + n])
        .map_err(|_| Error::format(path, "header is not UTF-8 (not a safetensors file?)"))?;
    let value: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| Error::format(path, format!("invalid header JSON: {e}")))?;
    let serde_json::Value::Object(map) = value else {
        return Err(Error::format(path, "header is not a JSON object"));
    };
    let mut out = BTreeMap::new();
    for (name, v) in map {
        if name == "__metadata__" {
            continue;
        }
        let entry: HeaderEntry = serde_json::from_value(v)
            .map_err(|e| Error::tensor(path, &name, format!("invalid header entry: {e}")))?;
        out.insert(name, entry);
    }
    Ok((out, 8 + n))
}

impl TensorSource for SafetensorsSource {
    fn tensors(&self) -> Vec<&TensorInfo> {
        self.entries.values().map(|e| &e.info).collect()
    }
    fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.entries.get(name).map(|e| &e.info)
    }
    fn stored(&self, name: &str) -> Option<Result<(DType, Vec<u8>)>> {
        let e = self.entries.get(name)?;
        Some(Ok((e.info.dtype, self.bytes(name)?.to_vec())))
    }
    fn read_rows_with(
        &self,
        name: &str,
        rows: Range<usize>,
        out: &mut [f32],
        pages: Pages,
    ) -> Result<()> {
        let e = self
            .entries
            .get(name)
            .ok_or_else(|| Error::tensor(self.file_of(name), name, "not found"))?;
        let shape = super::rows_cols(&e.info.shape);
        super::check_rows(&self.file_of(name), name, shape, &rows, out)?;
        let row_bytes = dequant::byte_size(e.info.dtype, shape.1).expect("float types");
        let (begin, end) = (
            e.begin + rows.start * row_bytes,
            e.begin + rows.end * row_bytes,
        );
        let mmap = &self.shards[e.shard].mmap;
        dequant::rows_to_f32(e.info.dtype, &mmap[begin..end], shape.1, out);
        super::release_pages(mmap, begin, end, pages);
        Ok(())
    }
    fn file_of(&self, name: &str) -> PathBuf {
        match self.entries.get(name) {
            Some(e) => self.shards[e.shard].path.clone(),
            None => self
                .shards
                .first()
                .map(|s| s.path.clone())
                .unwrap_or_default(),
        }
    }
}

/// Element type for [`write`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreType {
    F32,
    F16,
    BF16,
}

/// Write f32 tensors as one safetensors file, converting to `store`. The file
/// is written under a temporary name and renamed, so it is never half-written.
pub fn write(
    path: &Path,
    tensors: &[(String, Vec<usize>, &[f32])],
    store: StoreType,
) -> Result<()> {
    let specs: Vec<(String, Vec<usize>)> = tensors
        .iter()
        .map(|(n, shape, data)| {
            assert_eq!(data.len(), shape.iter().product::<usize>(), "{n}: shape");
            (n.clone(), shape.clone())
        })
        .collect();
    write_with(path, &specs, |i| Cow::Borrowed(tensors[i].2), store)
}

/// [`write`] with each tensor's values made when written (`values(i)` for
/// the `i`th of `specs`), so that only one is in memory at a time.
pub fn write_with<'a>(
    path: &Path,
    specs: &[(String, Vec<usize>)],
    values: impl Fn(usize) -> Cow<'a, [f32]>,
    store: StoreType,
) -> Result<()> {
    let (dtype, width) = match store {
        StoreType::F32 => ("F32", 4),
        StoreType::F16 => ("F16", 2),
        StoreType::BF16 => ("BF16", 2),
    };
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, shape) in specs {
        let len = shape.iter().product::<usize>() * width;
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len]}),
        );
        offset += len;
    }
    let mut text = serde_json::Value::Object(header).to_string();
    while !(text.len() + 8).is_multiple_of(8) {
        text.push(' ');
    }
    let tmp = path.with_extension("safetensors.partial");
    let io = |e| Error::io(path, e);
    {
        let file = std::fs::File::create(&tmp).map_err(io)?;
        let mut w = std::io::BufWriter::new(file);
        w.write_all(&(text.len() as u64).to_le_bytes())
            .map_err(io)?;
        w.write_all(text.as_bytes()).map_err(io)?;
        for (i, (name, shape)) in specs.iter().enumerate() {
            let data = values(i);
            assert_eq!(
                data.len(),
                shape.iter().product::<usize>(),
                "{name}: values do not match the shape"
            );
            for &x in data.iter() {
                match store {
                    StoreType::F32 => w.write_all(&x.to_le_bytes()),
                    StoreType::F16 => w.write_all(&half::f16::from_f32(x).to_le_bytes()),
                    StoreType::BF16 => w.write_all(&half::bf16::from_f32(x).to_le_bytes()),
                }
                .map_err(io)?;
            }
        }
        w.flush().map_err(io)?;
    }
    std::fs::rename(&tmp, path).map_err(io)
}
