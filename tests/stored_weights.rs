//! Weights kept as stored (docs/DESIGN.md section 9): the forward with no
//! widened weight kept (every product widening its weight's stored blocks a
//! panel at a time, on the thread that uses the panel) against the forward
//! with every matrix widened once and kept (what loading the model as f32
//! gives), bit for bit, on GGUF and safetensors checkpoints of every stored
//! type the fixtures have; and a single product from blocks of every stored
//! type against the same product from the widened rows and from kept panels.
//! Each model is a test of its own: the budget is a value each load is given.

mod common;

use std::path::Path;

use common::{cache_dir, fixture, load_with_cache, logits, real_model_path};
use std::sync::Arc;

use depthc::checkpoint::{dequant, DType, Pages, TensorInfo, TensorSource};
use depthc::forward::ops::matmul_t;
use depthc::model::{Matrix, WeightCache};
use depthc::plan::Plan;

fn stored_weights_give_the_logits_of_widened_ones(path: &Path) {
    let ids: Vec<u32> = (0..24).map(|i| (i * 37 + 5) % 61).collect();
    let everything = WeightCache::new(usize::MAX);
    let (_, model) = load_with_cache(path, &everything);
    let n = model.config.num_hidden_layers;
    let plan = Plan::parse(&format!("{}-{}", n / 2 - 1, n / 2), n).unwrap();
    let kept = logits(&model, &plan, &ids);
    assert!(
        everything.kept_bytes() > 0,
        "{}: nothing was kept",
        path.display()
    );
    drop(model);
    assert_eq!(
        everything.kept_bytes(),
        0,
        "a dropped model gives its budget back"
    );

    let nothing = WeightCache::new(0);
    let (_, model) = load_with_cache(path, &nothing);
    let streamed = logits(&model, &plan, &ids);
    assert_eq!(nothing.kept_bytes(), 0, "budget 0 keeps nothing");
    assert_eq!(
        kept,
        streamed,
        "{}: products from stored blocks differ from widened ones",
        path.display()
    );
}

#[test]
fn gguf_q4_0() {
    stored_weights_give_the_logits_of_widened_ones(&fixture("tiny_llama/tiny.q4_0.gguf"));
}

#[test]
fn gguf_q4_1() {
    stored_weights_give_the_logits_of_widened_ones(&fixture("tiny_llama/tiny.q4_1.gguf"));
}

#[test]
fn gguf_q8_0() {
    stored_weights_give_the_logits_of_widened_ones(&fixture("tiny_llama/tiny.q8_0.gguf"));
}

#[test]
fn gguf_bf16() {
    stored_weights_give_the_logits_of_widened_ones(&fixture("tiny_llama/tiny.bf16.gguf"));
}

#[test]
fn gguf_f16() {
    stored_weights_give_the_logits_of_widened_ones(&fixture("tiny_llama/tiny.f16.gguf"));
}

#[test]
fn safetensors_f16() {
    stored_weights_give_the_logits_of_widened_ones(&fixture("tiny_llama/hf_f16"));
}

#[test]
fn safetensors_f32() {
    stored_weights_give_the_logits_of_widened_ones(&fixture("tiny_llama/hf_f32"));
}

#[test]
fn safetensors_bf16() {
    stored_weights_give_the_logits_of_widened_ones(&fixture("tiny_llama/hf_bf16"));
}

#[test]
fn gguf_qwen2() {
    stored_weights_give_the_logits_of_widened_ones(&fixture("families/qwen2.gguf"));
}

#[test]
fn gguf_qwen3() {
    stored_weights_give_the_logits_of_widened_ones(&fixture("families/qwen3.gguf"));
}

#[test]
fn smollm2_q4_1() {
    stored_weights_give_the_logits_of_widened_ones(&real_model_path());
}

#[test]
fn gemma3_q4_k_m() {
    let gemma = cache_dir().join("gemma3/gemma-3-270m-q4_k_m.gguf");
    if gemma.exists() {
        stored_weights_give_the_logits_of_widened_ones(&gemma);
    } else {
        eprintln!("{} missing: skipped", gemma.display());
    }
}

/// One weight `[n, k]` of made-up blocks of one stored type.
struct Blocks {
    info: TensorInfo,
    bytes: Vec<u8>,
}

impl Blocks {
    /// `n` rows of `k` values in blocks of `dtype`: bytes from a fixed
    /// sequence, with every f16 scale (and min) of magnitude in
    /// [2^-10, 2^-9), and float values' exponents in -8..8, so that every
    /// value is finite.
    fn new(dtype: DType, n: usize, k: usize) -> Blocks {
        let size = dequant::byte_size(dtype, n * k).expect("rows of whole blocks");
        let mut state = 0x9e37_79b9_7f4a_7c15u64 ^ size as u64;
        let mut bytes: Vec<u8> = (0..size)
            .map(|_| {
                state = state
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1);
                (state >> 33) as u8
            })
            .collect();
        // A finite f16 from two random bytes: sign kept, exponent set.
        let scale = |b: &mut [u8]| b[1] = (b[1] & 0x83) | 0x14;
        // (block bytes, offsets of its f16 fields)
        let (block, halves): (usize, &[usize]) = match dtype {
            DType::F32 => (4, &[]),
            DType::F16 => (2, &[0]),
            DType::BF16 => (2, &[]),
            DType::Q8_0 => (34, &[0]),
            DType::Q4_0 => (18, &[0]),
            DType::Q4_1 => (20, &[0, 2]),
            DType::Q5_0 => (22, &[0]),
            DType::Q5_1 => (24, &[0, 2]),
            DType::Q4_K => (144, &[0, 2]),
            DType::Q5_K => (176, &[0, 2]),
            DType::Q6_K => (210, &[208]),
        };
        for b in bytes.chunks_exact_mut(block) {
            match dtype {
                // Sign, an exponent of -8..8, any mantissa.
                DType::F32 => b[3] = (b[3] & 0x80) | 0x3c | (b[3] & 0x01),
                DType::BF16 => b[1] = (b[1] & 0x80) | 0x3c | (b[1] & 0x01),
                _ => {}
            }
            for &at in halves {
                scale(&mut b[at..at + 2]);
            }
        }
        Blocks {
            info: TensorInfo {
                name: "w".into(),
                dtype,
                shape: vec![n, k],
            },
            bytes,
        }
    }
}

impl TensorSource for Blocks {
    fn tensors(&self) -> Vec<&TensorInfo> {
        vec![&self.info]
    }
    fn info(&self, name: &str) -> Option<&TensorInfo> {
        (name == "w").then_some(&self.info)
    }
    fn read_rows_with(
        &self,
        _name: &str,
        rows: std::ops::Range<usize>,
        out: &mut [f32],
        _pages: Pages,
    ) -> depthc::Result<()> {
        let k = self.info.shape[1];
        let row_bytes = dequant::byte_size(self.info.dtype, k).unwrap();
        let bytes = &self.bytes[rows.start * row_bytes..rows.end * row_bytes];
        dequant::rows_to_f32(self.info.dtype, bytes, k, out);
        Ok(())
    }
    fn file_of(&self, _name: &str) -> std::path::PathBuf {
        "blocks".into()
    }
}

/// A product from stored blocks (no budget: each panel widened by the
/// thread that uses it) equals, bit for bit, the product from the widened
/// rows in memory and from the kept packed panels, for every stored type,
/// one row of `x` (a decode step) and several (prefill), across panels.
#[test]
fn products_from_blocks_equal_widened_ones_for_every_stored_type() {
    let (n, k) = (101, 512);
    for dtype in [
        DType::F32,
        DType::F16,
        DType::BF16,
        DType::Q8_0,
        DType::Q4_0,
        DType::Q4_1,
        DType::Q5_0,
        DType::Q5_1,
        DType::Q4_K,
        DType::Q5_K,
        DType::Q6_K,
    ] {
        let source: Arc<dyn TensorSource> = Arc::new(Blocks::new(dtype, n, k));
        let stored =
            |budget| Matrix::stored(n, k, source.clone(), "w".into(), &WeightCache::new(budget));
        let from_blocks = stored(0);
        let widened = Matrix::new(n, k, from_blocks.values().into_owned());
        assert!(
            widened.row_values().unwrap().iter().all(|v| v.is_finite()),
            "{dtype:?}: values not finite"
        );
        let kept = stored(usize::MAX);
        for m in [1, 9, 40] {
            let x: Vec<f32> = (0..m * k)
                .map(|i| ((i * 7919) % 1013) as f32 / 1013.0 - 0.5)
                .collect();
            let want = matmul_t(&x, m, &widened);
            assert_eq!(
                matmul_t(&x, m, &from_blocks),
                want,
                "{dtype:?}, {m} rows: from blocks"
            );
            assert_eq!(matmul_t(&x, m, &kept), want, "{dtype:?}, {m} rows: kept");
            assert!(kept.kept_panels().is_some() && from_blocks.kept_panels().is_none());
        }
    }
}
