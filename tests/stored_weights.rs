//! Weights kept as stored (docs/DESIGN.md section 9): the forward with no
//! widened weight kept (every matrix read from the file on each use, a large
//! one in tiles of rows) against the forward with every matrix widened once
//! and kept (what loading the model as f32 gives), on GGUF and safetensors
//! checkpoints of every stored type the fixtures have. One test: the widening
//! budget is process-wide.

mod common;

use common::{cache_dir, fixture, load, logits, real_model_path};
use depthc::model::matrix::{set_widen_budget, widened_bytes, TILE_VALUES};
use depthc::plan::Plan;

#[test]
fn stored_weights_give_the_logits_of_widened_ones() {
    let mut models = vec![
        fixture("tiny_llama/tiny.q4_0.gguf"),
        fixture("tiny_llama/tiny.q4_1.gguf"),
        fixture("tiny_llama/tiny.q8_0.gguf"),
        fixture("tiny_llama/tiny.bf16.gguf"),
        fixture("tiny_llama/hf_bf16"),
        fixture("families/qwen2.gguf"),
        fixture("families/qwen3.gguf"),
        real_model_path(),
    ];
    let gemma = cache_dir().join("gemma3/gemma-3-270m-q4_k_m.gguf");
    if gemma.exists() {
        models.push(gemma);
    }
    let ids: Vec<u32> = (0..24).map(|i| (i * 37 + 5) % 61).collect();
    for path in &models {
        set_widen_budget(usize::MAX);
        let (_, model) = load(path);
        let n = model.config.num_hidden_layers;
        let plan = Plan::parse(&format!("{}-{}", n / 2 - 1, n / 2), n).unwrap();
        let kept = logits(&model, &plan, &ids);
        assert!(widened_bytes() > 0, "{}: nothing was kept", path.display());
        let tiled = model.lm_head().rows * model.lm_head().cols > TILE_VALUES;
        drop(model);
        assert_eq!(widened_bytes(), 0, "a dropped model gives its budget back");

        set_widen_budget(0);
        let (_, model) = load(path);
        let streamed = logits(&model, &plan, &ids);
        assert_eq!(widened_bytes(), 0, "budget 0 keeps nothing");
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
}
