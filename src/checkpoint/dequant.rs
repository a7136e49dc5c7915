//! Conversion of stored element types to f32: IEEE f16, bfloat16 and the ggml
//! block quantisations Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and the k-quants Q4_K,
//! Q5_K, Q6_K (block layouts of ggml-common.h; super-blocks of 256 elements).
//! Bytes are read unaligned, little-endian; nothing is cast in place.

use super::DType;

/// Elements per block and bytes per block of each type.
pub fn block_layout(dtype: DType) -> (usize, usize) {
    match dtype {
        DType::F32 => (1, 4),
        DType::F16 | DType::BF16 => (1, 2),
        // f16 scale + 32 x i8
        DType::Q8_0 => (32, 34),
        // f16 scale + 16 bytes of nibbles
        DType::Q4_0 => (32, 18),
        // f16 scale + f16 min + 16 bytes of nibbles
        DType::Q4_1 => (32, 20),
        // f16 scale + 4 bytes of fifth bits + 16 bytes of nibbles
        DType::Q5_0 => (32, 22),
        // f16 scale + f16 min + fifth bits + nibbles
        DType::Q5_1 => (32, 24),
        // f16 d + f16 dmin + 12 bytes of 6-bit scales/mins + 128 bytes of nibbles
        DType::Q4_K => (QK_K, 144),
        // as Q4_K + 32 bytes of fifth bits
        DType::Q5_K => (QK_K, 176),
        // 128 bytes low nibbles + 64 bytes high 2-bit pairs + 16 i8 scales + f16 d
        DType::Q6_K => (QK_K, 210),
    }
}

/// Size in bytes of `numel` elements, or `None` when `numel` is not a whole
/// number of blocks.
pub fn byte_size(dtype: DType, numel: usize) -> Option<usize> {
    let (block, bytes) = block_layout(dtype);
    if !numel.is_multiple_of(block) {
        return None;
    }
    (numel / block).checked_mul(bytes)
}

/// Elements per k-quant super-block.
const QK_K: usize = 256;

/// Scale and min of sub-block `j` (0..8) from the 12 packed bytes of Q4_K/Q5_K
/// (6 bits each: the low 6 bits of bytes 0..8 for j < 4, otherwise a nibble of
/// bytes 8..12 and the top 2 bits of bytes 0..8).
fn scale_min_k4(j: usize, q: &[u8]) -> (f32, f32) {
    let (sc, m) = if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    };
    (sc as f32, m as f32)
}

/// Q4_K and Q5_K: eight sub-blocks of 32, value `d * sc * q - dmin * m`; the
/// 4 low bits of sub-blocks 2i and 2i+1 share 32 bytes (low, high nibble), the
/// fifth bit (Q5_K) is bit 2i / 2i+1 of `qh[l]`.
fn k4_or_k5(out: &mut [f32], b: &[u8], fifth: bool) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let scales = &b[4..16];
    let (qh, qs) = if fifth {
        (&b[16..48], &b[48..176])
    } else {
        (&b[0..0], &b[16..144])
    };
    for (i, o) in out.chunks_exact_mut(64).enumerate() {
        let (sc1, m1) = scale_min_k4(2 * i, scales);
        let (sc2, m2) = scale_min_k4(2 * i + 1, scales);
        let q = &qs[32 * i..32 * i + 32];
        for l in 0..32 {
            let (mut lo, mut hi) = ((q[l] & 0x0f) as f32, (q[l] >> 4) as f32);
            if fifth {
                lo += f32::from((qh[l] >> (2 * i)) & 1) * 16.0;
                hi += f32::from((qh[l] >> (2 * i + 1)) & 1) * 16.0;
            }
            o[l] = d * sc1 * lo - dmin * m1;
            o[l + 32] = d * sc2 * hi - dmin * m2;
        }
    }
}

fn f16_at(bytes: &[u8], at: usize) -> f32 {
    half::f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

/// [`to_f32`] of whole rows of `cols` elements, rows in parallel (each
/// value converted as [`to_f32`] converts it). A few rows (up to
/// [`SERIAL_ROWS`]: a panel of the forward's products, widened by the
/// thread that uses it) are converted on the calling thread.
pub fn rows_to_f32(dtype: DType, bytes: &[u8], cols: usize, out: &mut [f32]) {
    use rayon::prelude::*;
    const ROWS_PER_TASK: usize = 16;
    if out.is_empty() {
        return;
    }
    let row_bytes = byte_size(dtype, cols).expect("rows of whole blocks");
    out.par_chunks_mut(cols * ROWS_PER_TASK)
        .zip(bytes.par_chunks(row_bytes * ROWS_PER_TASK))
        .with_min_len(SERIAL_ROWS / ROWS_PER_TASK)
        .for_each(|(o, b)| to_f32(dtype, b, o));
}

/// Rows that [`rows_to_f32`] converts on the calling thread rather than
/// sharing them out over the thread pool.
pub const SERIAL_ROWS: usize = 64;

/// Convert `bytes` (exactly `byte_size(dtype, out.len())` long) into `out`.
pub fn to_f32(dtype: DType, bytes: &[u8], out: &mut [f32]) {
    match dtype {
        DType::F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        DType::F16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = half::f16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        DType::BF16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = half::bf16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        DType::Q8_0 => {
            for (o, b) in out.chunks_exact_mut(32).zip(bytes.chunks_exact(34)) {
                let d = f16_at(b, 0);
                for (j, v) in o.iter_mut().enumerate() {
                    *v = (b[2 + j] as i8) as f32 * d;
                }
            }
        }
        DType::Q4_0 => {
            for (o, b) in out.chunks_exact_mut(32).zip(bytes.chunks_exact(18)) {
                let d = f16_at(b, 0);
                let qs = &b[2..18];
                for j in 0..16 {
                    o[j] = ((qs[j] & 0x0f) as i32 - 8) as f32 * d;
                    o[j + 16] = ((qs[j] >> 4) as i32 - 8) as f32 * d;
                }
            }
        }
        DType::Q4_1 => {
            for (o, b) in out.chunks_exact_mut(32).zip(bytes.chunks_exact(20)) {
                let d = f16_at(b, 0);
                let m = f16_at(b, 2);
                let qs = &b[4..20];
                for j in 0..16 {
                    o[j] = (qs[j] & 0x0f) as f32 * d + m;
                    o[j + 16] = (qs[j] >> 4) as f32 * d + m;
                }
            }
        }
        DType::Q5_0 | DType::Q5_1 => {
            let (size, start) = if dtype == DType::Q5_0 {
                (22, 2)
            } else {
                (24, 4)
            };
            for (o, b) in out.chunks_exact_mut(32).zip(bytes.chunks_exact(size)) {
                let d = f16_at(b, 0);
                let qh = u32::from_le_bytes(b[start..start + 4].try_into().expect("4 bytes"));
                let qs = &b[start + 4..start + 20];
                // Element j's fifth bit is bit j of qh (j < 32).
                let q = |j: usize| {
                    let nibble = if j < 16 {
                        qs[j] & 0x0f
                    } else {
                        qs[j - 16] >> 4
                    };
                    (nibble as u32 | (((qh >> j) & 1) << 4)) as f32
                };
                if dtype == DType::Q5_0 {
                    for (j, v) in o.iter_mut().enumerate() {
                        *v = (q(j) - 16.0) * d;
                    }
                } else {
                    let m = f16_at(b, 2);
                    for (j, v) in o.iter_mut().enumerate() {
                        *v = q(j) * d + m;
                    }
                }
            }
        }
        DType::Q4_K | DType::Q5_K => {
            let (size, fifth) = if dtype == DType::Q4_K {
                (144, false)
            } else {
                (176, true)
            };
            for (o, b) in out.chunks_exact_mut(QK_K).zip(bytes.chunks_exact(size)) {
                k4_or_k5(o, b, fifth);
            }
        }
        DType::Q6_K => {
            for (o, b) in out.chunks_exact_mut(QK_K).zip(bytes.chunks_exact(210)) {
                let (ql, qh, sc) = (&b[..128], &b[128..192], &b[192..208]);
                let d = f16_at(b, 208);
                // Two halves of 128: each takes 64 bytes of ql, 32 of qh, 8 scales.
                for h in 0..2 {
                    let (ql, qh, sc) = (&ql[64 * h..], &qh[32 * h..], &sc[8 * h..]);
                    let o = &mut o[128 * h..128 * h + 128];
                    for l in 0..32 {
                        let is = l / 16;
                        let q = [
                            (ql[l] & 0x0f) | ((qh[l] & 3) << 4),
                            (ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4),
                            (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4),
                            (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4),
                        ];
                        for (k, &qk) in q.iter().enumerate() {
                            let scale = sc[is + 2 * k] as i8 as f32;
                            o[l + 32 * k] = d * scale * (qk as i32 - 32) as f32;
                        }
                    }
                }
            }
        }
    }
}

/// A tensor's 4-bit blocks of 32 as they are stored: each element's code
/// `0..=15` (row-major, element order), and per block a scale and an offset,
/// the value being `scale * code + offset`. `None` for types that are not
/// 4-bit blocks of 32 (Q4_0, Q4_1, and Q4_K's sub-blocks).
pub struct FourBitBlocks {
    pub codes: Vec<u8>,
    pub scales: Vec<f32>,
    pub offsets: Vec<f32>,
}

pub fn four_bit_blocks(dtype: DType, bytes: &[u8]) -> Option<FourBitBlocks> {
    let mut codes = Vec::new();
    let (mut scales, mut offsets) = (Vec::new(), Vec::new());
    match dtype {
        DType::Q4_0 | DType::Q4_1 => {
            let (size, start) = if dtype == DType::Q4_0 {
                (18, 2)
            } else {
                (20, 4)
            };
            for b in bytes.chunks_exact(size) {
                let d = f16_at(b, 0);
                let qs = &b[start..start + 16];
                codes.extend(qs.iter().map(|q| q & 0x0f));
                codes.extend(qs.iter().map(|q| q >> 4));
                scales.push(d);
                // Q4_0: d * (q - 8); Q4_1: d * q + m.
                offsets.push(if dtype == DType::Q4_0 {
                    -8.0 * d
                } else {
                    f16_at(b, 2)
                });
            }
        }
        DType::Q4_K => {
            for b in bytes.chunks_exact(144) {
                let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
                let (sc, qs) = (&b[4..16], &b[16..144]);
                for i in 0..4 {
                    let q = &qs[32 * i..32 * i + 32];
                    for (j, high) in [(2 * i, false), (2 * i + 1, true)] {
                        let (s, m) = scale_min_k4(j, sc);
                        codes.extend(q.iter().map(|&v| if high { v >> 4 } else { v & 0x0f }));
                        scales.push(d * s);
                        offsets.push(-(dmin * m));
                    }
                }
            }
        }
        _ => return None,
    }
    Some(FourBitBlocks {
        codes,
        scales,
        offsets,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn four_bit_blocks_give_the_dequantised_values() {
        let mut bytes = Vec::new();
        for k in 0..144 {
            bytes.push((k * 37 % 251) as u8);
        }
        // Keep d and dmin finite and modest.
        bytes[..4].copy_from_slice(&[0x00, 0x2c, 0x00, 0x28]);
        for dtype in [DType::Q4_0, DType::Q4_1, DType::Q4_K] {
            let (block, size) = block_layout(dtype);
            let n = 144 / size * block;
            let bytes = &bytes[..n / block * size];
            let mut want = vec![0f32; n];
            to_f32(dtype, bytes, &mut want);
            let b = four_bit_blocks(dtype, bytes).unwrap();
            for (i, w) in want.iter().enumerate() {
                let got = b.scales[i / 32] * b.codes[i] as f32 + b.offsets[i / 32];
                assert!((got - w).abs() <= 1e-6 * w.abs().max(1.0), "{dtype:?} {i}");
            }
        }
        assert!(four_bit_blocks(DType::Q8_0, &[0; 34]).is_none());
    }

    #[test]
    fn q4_1_block_by_hand() {
        // d = 0.5, m = -1.0; nibbles: low j, high 15 - j.
        let mut b = Vec::new();
        b.extend_from_slice(&half::f16::from_f32(0.5).to_le_bytes());
        b.extend_from_slice(&half::f16::from_f32(-1.0).to_le_bytes());
        for j in 0..16u8 {
            b.push(j | ((15 - j) << 4));
        }
        let mut out = [0f32; 32];
        to_f32(DType::Q4_1, &b, &mut out);
        for j in 0..16 {
            assert_eq!(out[j], j as f32 * 0.5 - 1.0);
            assert_eq!(out[j + 16], (15 - j) as f32 * 0.5 - 1.0);
        }
    }

    #[test]
    fn q8_0_block_by_hand() {
        let mut b = Vec::new();
        b.extend_from_slice(&half::f16::from_f32(0.25).to_le_bytes());
        for j in 0..32i32 {
            b.push((j - 16) as i8 as u8);
        }
        let mut out = [0f32; 32];
        to_f32(DType::Q8_0, &b, &mut out);
        for (j, v) in out.iter().enumerate() {
            assert_eq!(*v, (j as f32 - 16.0) * 0.25);
        }
    }

    #[test]
    fn partial_blocks_have_no_size() {
        assert_eq!(byte_size(DType::Q4_0, 33), None);
        assert_eq!(byte_size(DType::Q4_0, 64), Some(36));
        assert_eq!(byte_size(DType::BF16, 3), Some(6));
    }
}
