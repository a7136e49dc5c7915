//! Weights kept as stored (docs/DESIGN.md section 9): the forward with no
//! widened weight kept (every matrix read from the file on each use, a large
//! one in tiles of rows) against the forward with every matrix widened once
//! and kept (what loading the model as f32 gives), on GGUF and safetensors
//! checkpoints of every stored type the fixtures have. Each model is a test
//! of its own: the budget is a value each load is given.

mod common;

use std::path::Path;

use common::{cache_dir, fixture, load_with_cache, logits, real_model_path};
use depthc::model::matrix::TILE_VALUES;
use depthc::model::WeightCache;
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
    let tiled = model.lm_head().rows * model.lm_head().cols > TILE_VALUES;
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
    let scale = kept.iter().fold(0f32, |a, v| a.max(v.abs()));
    let diff = common::max_abs_diff(&kept, &streamed);
    eprintln!(
        "{}: max abs diff {diff:e} of {scale} (LM head in tiles: {tiled})",
        path.display()
    );
    if tiled {
        // A tile is a column block of the same product (float rounding of
        // the GEMM's blocking only; see forward::ops' tile test).
        assert!(
            diff <= 1e-6 * scale,
            "{}: {diff} of {scale}",
            path.display()
        );
    } else {
        assert_eq!(kept, streamed, "{}", path.display());
    }
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
