//! Conversion of stored element types to f32: IEEE f16, bfloat16 and the ggml
//! block quantisations Q8_0, Q4_0 and Q4_1 (ggml-common.h block layouts).
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

fn f16_at(bytes: &[u8], at: usize) -> f32 {
    half::f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

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
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
