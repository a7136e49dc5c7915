//! GGUF v3 writer, the inverse of the reader ([`super::gguf`]): header,
//! typed metadata, tensor table (dims fastest-varying first), and the data
//! section, each tensor padded to [`ALIGNMENT`] bytes with offsets back to
//! back (llama.cpp refuses any other offset). Values for the encodings a
//! writer may need to produce ([`encode`]): F32, F16, BF16, Q8_0, Q4_0 and Q4_1
//! (llama.cpp's reference rounding of each).

use std::collections::BTreeSet;
use std::io::Write;

use super::{dequant, DType};
use crate::{Error, Result};

/// `general.alignment` of every file written (GGUF's default, not written).
pub const ALIGNMENT: usize = 32;

/// GGUF metadata value types.
const TY_U32: u32 = 4;
const TY_I32: u32 = 5;
const TY_F32: u32 = 6;
const TY_BOOL: u32 = 7;
const TY_STRING: u32 = 8;
const TY_ARRAY: u32 = 9;

/// A metadata value with its GGUF type (llama.cpp reads scalars with exact
/// types: counts UINT32, floats FLOAT32).
#[derive(Debug, Clone, PartialEq)]
pub enum Meta {
    U32(u32),
    F32(f32),
    Bool(bool),
    Str(String),
    /// An INT32 array (how gguf-py writes lists of integers).
    I32s(Vec<i32>),
    /// An array of strings.
    Strs(Vec<String>),
    /// A value copied as another file stores it: its type and bytes.
    Raw {
        ty: u32,
        bytes: Vec<u8>,
    },
}

/// The ggml type code of a stored element type.
pub fn ggml_type(dtype: DType) -> u32 {
    match dtype {
        DType::F32 => 0,
        DType::F16 => 1,
        DType::Q4_0 => 2,
        DType::Q4_1 => 3,
        DType::Q5_0 => 6,
        DType::Q5_1 => 7,
        DType::Q8_0 => 8,
        DType::Q4_K => 12,
        DType::Q5_K => 13,
        DType::Q6_K => 14,
        DType::BF16 => 30,
    }
}

/// `values` in `dtype`, rounded as llama.cpp's reference quantisers round
/// (per block of 32: Q8_0 `d = max|x| / 127`, `q = round(x / d)`; Q4_0 `d` =
/// the largest-magnitude value over -8, `q = x / d + 8`; Q4_1 `d = (max -
/// min) / 15`, `q = (x - min) / d`; the 4-bit codes truncated after adding
/// one half, at most 15), or `None` for a type this writer does not produce
/// or a length not of whole blocks.
pub fn encode(dtype: DType, values: &[f32]) -> Option<Vec<u8>> {
    let size = dequant::byte_size(dtype, values.len())?;
    let mut out = Vec::with_capacity(size);
    match dtype {
        DType::F32 => values.iter().for_each(|v| out.extend(v.to_le_bytes())),
        DType::F16 => values
            .iter()
            .for_each(|&v| out.extend(half::f16::from_f32(v).to_le_bytes())),
        DType::BF16 => values
            .iter()
            .for_each(|&v| out.extend(half::bf16::from_f32(v).to_le_bytes())),
        DType::Q8_0 => {
            for block in values.chunks_exact(32) {
                let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
                let d = amax / 127.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend(half::f16::from_f32(d).to_le_bytes());
                out.extend(block.iter().map(|&v| (v * id).round() as i8 as u8));
            }
        }
        DType::Q4_0 => {
            for block in values.chunks_exact(32) {
                // The value of largest magnitude, with its sign, is -8 codes.
                let max = block
                    .iter()
                    .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
                let d = max / -8.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend(half::f16::from_f32(d).to_le_bytes());
                let q = |v: f32| ((v * id + 8.5) as i8).min(15) as u8;
                out.extend((0..16).map(|j| q(block[j]) | (q(block[j + 16]) << 4)));
            }
        }
        DType::Q4_1 => {
            for block in values.chunks_exact(32) {
                let min = block.iter().fold(f32::MAX, |m, &v| m.min(v));
                let max = block.iter().fold(f32::MIN, |m, &v| m.max(v));
                let d = (max - min) / 15.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend(half::f16::from_f32(d).to_le_bytes());
                out.extend(half::f16::from_f32(min).to_le_bytes());
                let q = |v: f32| (((v - min) * id + 0.5) as i8).min(15) as u8;
                out.extend((0..16).map(|j| q(block[j]) | (q(block[j + 16]) << 4)));
            }
        }
        _ => return None,
    }
    debug_assert_eq!(out.len(), size);
    Some(out)
}

/// One tensor to write: GGUF name, dims fastest-varying first (a linear
/// weight `[out, in]` is `[in, out]`), type and bytes.
pub struct TensorData {
    pub name: String,
    pub dims: Vec<usize>,
    pub dtype: DType,
    pub bytes: Vec<u8>,
}

/// A GGUF file being assembled in memory.
#[derive(Default)]
pub struct GgufWriter {
    meta: Vec<(String, Meta)>,
    tensors: Vec<TensorData>,
    names: BTreeSet<String>,
}

fn pad(n: usize) -> usize {
    n.div_ceil(ALIGNMENT) * ALIGNMENT
}

impl GgufWriter {
    pub fn new() -> GgufWriter {
        GgufWriter::default()
    }

    /// Set `key` (replacing an earlier value).
    pub fn meta(&mut self, key: &str, value: Meta) {
        match self.meta.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = value,
            None => self.meta.push((key.to_string(), value)),
        }
    }

    /// Add a tensor; its bytes must be whole blocks of `dtype` covering `dims`.
    pub fn tensor(&mut self, t: TensorData) -> Result<()> {
        let numel: usize = t.dims.iter().product();
        let bad = |why: String| Err(Error::Input(format!("GGUF tensor `{}`: {why}", t.name)));
        if t.name.len() >= 64 {
            return bad("names are at most 63 bytes".into());
        }
        if t.dims.is_empty() || t.dims.len() > 4 {
            return bad(format!("{} dims (1 to 4 allowed)", t.dims.len()));
        }
        match dequant::byte_size(t.dtype, numel) {
            Some(n) if n == t.bytes.len() => {}
            Some(n) => {
                return bad(format!(
                    "{} bytes where {:?} {} takes {n}",
                    t.bytes.len(),
                    t.dims,
                    t.dtype.name()
                ))
            }
            None => {
                return bad(format!(
                    "dims {:?} are not whole {} blocks",
                    t.dims,
                    t.dtype.name()
                ))
            }
        }
        if !self.names.insert(t.name.clone()) {
            return bad("written twice".into());
        }
        self.tensors.push(t);
        Ok(())
    }

    pub fn tensors(&self) -> &[TensorData] {
        &self.tensors
    }

    /// The whole file into `w`; returns the bytes written.
    pub fn write(&self, w: &mut impl Write) -> std::io::Result<u64> {
        let mut head = Vec::new();
        head.extend(b"GGUF");
        head.extend(3u32.to_le_bytes());
        head.extend((self.tensors.len() as u64).to_le_bytes());
        head.extend((self.meta.len() as u64).to_le_bytes());
        for (key, value) in &self.meta {
            put_string(&mut head, key);
            put_meta(&mut head, value);
        }
        let mut offset = 0usize;
        for t in &self.tensors {
            put_string(&mut head, &t.name);
            head.extend((t.dims.len() as u32).to_le_bytes());
            for &d in &t.dims {
                head.extend((d as u64).to_le_bytes());
            }
            head.extend(ggml_type(t.dtype).to_le_bytes());
            head.extend((offset as u64).to_le_bytes());
            offset += pad(t.bytes.len());
        }
        head.resize(pad(head.len()), 0);
        w.write_all(&head)?;
        let zeros = [0u8; ALIGNMENT];
        for t in &self.tensors {
            w.write_all(&t.bytes)?;
            w.write_all(&zeros[..pad(t.bytes.len()) - t.bytes.len()])?;
        }
        Ok((head.len() + offset) as u64)
    }
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

fn put_meta(out: &mut Vec<u8>, value: &Meta) {
    match value {
        Meta::U32(v) => {
            out.extend(TY_U32.to_le_bytes());
            out.extend(v.to_le_bytes());
        }
        Meta::F32(v) => {
            out.extend(TY_F32.to_le_bytes());
            out.extend(v.to_le_bytes());
        }
        Meta::Bool(v) => {
            out.extend(TY_BOOL.to_le_bytes());
            out.push(*v as u8);
        }
        Meta::Str(s) => {
            out.extend(TY_STRING.to_le_bytes());
            put_string(out, s);
        }
        Meta::I32s(v) => {
            out.extend(TY_ARRAY.to_le_bytes());
            out.extend(TY_I32.to_le_bytes());
            out.extend((v.len() as u64).to_le_bytes());
            v.iter().for_each(|x| out.extend(x.to_le_bytes()));
        }
        Meta::Strs(v) => {
            out.extend(TY_ARRAY.to_le_bytes());
            out.extend(TY_STRING.to_le_bytes());
            out.extend((v.len() as u64).to_le_bytes());
            v.iter().for_each(|x| put_string(out, x));
        }
        Meta::Raw { ty, bytes } => {
            out.extend(ty.to_le_bytes());
            out.extend(bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::gguf::{GgufFile, Value};

    #[test]
    fn q8_0_encodes_as_llama_cpp_rounds() {
        let x: Vec<f32> = (0..64).map(|i| ((i as f32) - 20.5) * 0.37).collect();
        let bytes = encode(DType::Q8_0, &x).unwrap();
        assert_eq!(bytes.len(), 68);
        let mut back = vec![0f32; 64];
        dequant::to_f32(DType::Q8_0, &bytes, &mut back);
        for (blk, (a, b)) in x.chunks(32).zip(back.chunks(32)).enumerate() {
            let amax = a.iter().fold(0f32, |m, v| m.max(v.abs()));
            // Half a step of the f16 scale, and the scale's own f16 rounding.
            let tol = amax / 127.0 * 0.5 + amax * 1e-3;
            for (u, v) in a.iter().zip(b) {
                assert!((u - v).abs() <= tol, "block {blk}: {u} vs {v}");
            }
            // The largest magnitude is exactly +-127 codes.
            let codes = &bytes[blk * 34 + 2..blk * 34 + 34];
            assert!(codes.iter().any(|&c| (c as i8).unsigned_abs() == 127));
        }
        assert!(encode(DType::Q8_0, &x[..31]).is_none());
        assert!(encode(DType::Q4_K, &x).is_none());
        // 4-bit: within half a step of each block's scale (and its f16 rounding).
        for dtype in [DType::Q4_0, DType::Q4_1] {
            let bytes = encode(dtype, &x).unwrap();
            dequant::to_f32(dtype, &bytes, &mut back);
            for (a, b) in x.chunks(32).zip(back.chunks(32)) {
                let (lo, hi) = a
                    .iter()
                    .fold((f32::MAX, f32::MIN), |(l, h), &v| (l.min(v), h.max(v)));
                let step = if dtype == DType::Q4_1 {
                    (hi - lo) / 15.0
                } else {
                    hi.abs().max(lo.abs()) / 8.0
                };
                for (u, v) in a.iter().zip(b) {
                    assert!(
                        (u - v).abs() <= step * 0.5 + step * 0.01 + 1e-6,
                        "{dtype:?}: {u} vs {v}"
                    );
                }
            }
        }
        // All zeros: scale 0, codes 0.
        assert!(encode(DType::Q8_0, &[0.0; 32])
            .unwrap()
            .iter()
            .all(|&b| b == 0));
    }

    #[test]
    fn what_is_written_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.gguf");
        let mut w = GgufWriter::new();
        w.meta("general.architecture", Meta::Str("deci".into()));
        w.meta("deci.block_count", Meta::U32(3));
        w.meta("deci.rope.freq_base", Meta::F32(10000.0));
        w.meta("deci.attention.head_count", Meta::I32s(vec![2, 4, 2]));
        w.meta("tokenizer.ggml.add_bos_token", Meta::Bool(true));
        // An array of strings as another file stores it.
        let mut raw = Vec::new();
        raw.extend(TY_STRING.to_le_bytes());
        raw.extend(2u64.to_le_bytes());
        put_string(&mut raw, "a");
        put_string(&mut raw, "bc");
        w.meta(
            "tokenizer.ggml.tokens",
            Meta::Raw {
                ty: TY_ARRAY,
                bytes: raw,
            },
        );
        let values: Vec<f32> = (0..64 * 3).map(|i| (i as f32 * 0.1).sin()).collect();
        for (name, dtype) in [
            ("f32", DType::F32),
            ("f16", DType::F16),
            ("bf16", DType::BF16),
            ("q8", DType::Q8_0),
        ] {
            w.tensor(TensorData {
                name: format!("{name}.weight"),
                dims: vec![64, 3],
                dtype,
                bytes: encode(dtype, &values).unwrap(),
            })
            .unwrap();
        }
        // Stored blocks copied as they are (any type), 5 bytes: padded.
        w.tensor(TensorData {
            name: "q41.weight".into(),
            dims: vec![32],
            dtype: DType::Q4_1,
            bytes: (0..20).collect(),
        })
        .unwrap();
        assert!(w
            .tensor(TensorData {
                name: "f32.weight".into(),
                dims: vec![1],
                dtype: DType::F32,
                bytes: vec![0; 4]
            })
            .is_err());
        assert!(w
            .tensor(TensorData {
                name: "short".into(),
                dims: vec![64],
                dtype: DType::F32,
                bytes: vec![0; 4]
            })
            .is_err());
        let mut f = std::fs::File::create(&path).unwrap();
        let n = w.write(&mut f).unwrap();
        drop(f);
        assert_eq!(n, std::fs::metadata(&path).unwrap().len());

        let r = GgufFile::open(&path).unwrap();
        assert_eq!(r.version, 3);
        assert_eq!(r.metadata["general.architecture"].as_str(), Some("deci"));
        assert_eq!(r.metadata["deci.block_count"].as_u64(), Some(3));
        assert_eq!(r.metadata["deci.rope.freq_base"].as_f64(), Some(10000.0));
        let heads: Vec<u64> = r.metadata["deci.attention.head_count"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        assert_eq!(heads, [2, 4, 2]);
        assert!(matches!(
            r.metadata["tokenizer.ggml.add_bos_token"],
            Value::Bool(true)
        ));
        let tokens: Vec<&str> = r.metadata["tokenizer.ggml.tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(tokens, ["a", "bc"]);
        // Raw values come back as the bytes they were.
        let (ty, bytes) = r.raw_value("deci.attention.head_count").unwrap();
        assert_eq!(ty, TY_ARRAY);
        let mut again = Vec::new();
        put_meta(&mut again, &Meta::I32s(vec![2, 4, 2]));
        assert_eq!(bytes, &again[4..]);
        // Every tensor's bytes exactly, at an aligned offset.
        for t in w.tensors() {
            let got = r.tensors.iter().find(|g| g.name == t.name).unwrap();
            assert_eq!(got.dims, t.dims);
            assert_eq!(got.ggml_type, ggml_type(t.dtype));
            assert_eq!(got.offset % ALIGNMENT, 0);
            assert_eq!(r.stored_bytes(got).unwrap(), &t.bytes[..], "{}", t.name);
        }
    }
}
