//! Readers and forward on the small synthetic Llama of fixtures/tiny_llama
//! (made by make_tiny_llama.py): every variant's logits against transformers'.

mod common;

use common::*;
use depthc::checkpoint::{Checkpoint, Format};
use depthc::plan::Plan;
use serde_json::Value;

fn reference() -> Value {
    let text =
        std::fs::read_to_string(fixture("tiny_llama/reference.json")).expect("reference.json");
    serde_json::from_str(&text).expect("JSON")
}

fn ids(r: &Value) -> Vec<u32> {
    r["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect()
}

fn rows(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .flat_map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
        })
        .collect()
}

fn check_variant(name: &str, tol: f32) {
    let r = reference();
    let (ckpt, model) = load(&fixture(&format!("tiny_llama/{name}")));
    let got = logits(&model, &Plan::sequential(4), &ids(&r));
    let want = rows(&r["variants"][name]);
    let d = max_abs_diff(&got, &want);
    eprintln!("{name}: max abs diff vs transformers {d:e}");
    assert!(
        d <= tol,
        "{name}: logits differ from transformers by {d} > {tol}"
    );
    assert_eq!(ckpt.config.num_hidden_layers, 4);
}

#[test]
fn safetensors_f32() {
    check_variant("hf_f32", 1e-4);
}

#[test]
fn safetensors_f16() {
    check_variant("hf_f16", 1e-4);
}

#[test]
fn safetensors_bf16_sharded() {
    assert!(fixture("tiny_llama/hf_bf16/model.safetensors.index.json").exists());
    check_variant("hf_bf16", 1e-4);
}

#[test]
fn rope_llama3_scaling_from_rope_parameters() {
    let (ckpt, _) = load(&fixture("tiny_llama/hf_llama3"));
    assert!(matches!(
        ckpt.config.rope_scaling,
        depthc::checkpoint::RopeScaling::Llama3 { .. }
    ));
    assert_eq!(
        ckpt.config.rope_theta, 500.0,
        "rope_theta must be read from rope_parameters"
    );
    check_variant("hf_llama3", 1e-4);
}

#[test]
fn gguf_q8_0() {
    check_variant("tiny.q8_0.gguf", 1e-4);
}

#[test]
fn gguf_q4_0() {
    check_variant("tiny.q4_0.gguf", 1e-4);
}

#[test]
fn gguf_q4_1() {
    check_variant("tiny.q4_1.gguf", 1e-4);
}

#[test]
fn gguf_f16() {
    check_variant("tiny.f16.gguf", 1e-4);
}

#[test]
fn gguf_bf16() {
    check_variant("tiny.bf16.gguf", 1e-4);
}

#[test]
fn gguf_metadata_becomes_config() {
    let ckpt = Checkpoint::open(&fixture("tiny_llama/tiny.q8_0.gguf")).unwrap();
    let c = &ckpt.config;
    assert_eq!(ckpt.format, Format::Gguf);
    assert_eq!(
        (
            c.hidden_size,
            c.num_attention_heads,
            c.num_key_value_heads,
            c.head_dim
        ),
        (64, 4, 2, 16)
    );
    assert_eq!(
        (c.intermediate_size, c.vocab_size, c.rope_theta),
        (96, 64, 500.0)
    );
    assert!(!c.tie_word_embeddings);
    assert!(ckpt.tokenizer.is_some());
}

#[test]
fn lp_pairs_equal_the_formula_computed_by_hand() {
    let r = reference();
    let (_, model) = load(&fixture("tiny_llama/hf_f32"));
    for (spec, key) in [("1-2", "plan_1-2"), ("0..4", "plan_0-1,2-3")] {
        let plan = Plan::parse(spec, 4).unwrap();
        let d = max_abs_diff(&logits(&model, &plan, &ids(&r)), &rows(&r[key]));
        eprintln!("plan {spec}: max abs diff vs numpy {d:e}");
        assert!(
            d <= 1e-4,
            "plan {spec}: differs from the hand-computed formula by {d}"
        );
    }
    // A plan must change the output: the test above would be vacuous otherwise.
    let seq = rows(&r["variants"]["hf_f32"]);
    assert!(max_abs_diff(&seq, &rows(&r["plan_1-2"])) > 1e-2);
}

#[test]
fn kv_cache_decode_equals_full_forward() {
    let r = reference();
    let (_, model) = load(&fixture("tiny_llama/hf_f32"));
    let ids = ids(&r);
    for spec in ["", "1-2", "0-3"] {
        decode_matches_full(&model, &Plan::parse(spec, 4).unwrap(), &ids, 4, 1e-5);
    }
}

#[test]
fn residual_capture_has_one_entry_per_step_boundary() {
    let r = reference();
    let (_, model) = load(&fixture("tiny_llama/hf_f32"));
    let f = depthc::forward::Forward::new(&model);
    let plan = Plan::parse("1-2", 4).unwrap();
    let mut cache = depthc::forward::KvCache::new(4);
    let opts = depthc::forward::Options {
        logits: depthc::forward::Logits::None,
        capture_residuals: true,
    };
    let out = f.run(&plan, &ids(&r), &mut cache, opts).unwrap();
    assert_eq!(out.residuals.len(), plan.depth() + 1);
    assert!(out.logits.is_empty());
}

#[test]
fn safetensors_export_round_trips() {
    let (ckpt, model) = load(&fixture("tiny_llama/tiny.q4_1.gguf"));
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("hf");
    model
        .write_hf_dir(
            &out,
            ckpt.tokenizer.as_ref().map(|t| t.to_json()),
            depthc::checkpoint::safetensors::StoreType::F32,
        )
        .unwrap();
    let (_, again) = load(&out);
    let ids = ids(&reference());
    let plan = Plan::sequential(4);
    assert_eq!(logits(&model, &plan, &ids), logits(&again, &plan, &ids));
    assert!(out.join("tokenizer.json").exists());
}

/// Q5_0, Q5_1, Q4_K, Q5_K and Q6_K blocks against the values the `gguf`
/// package dequantises them to (fixtures/kquants/make_kquants.py).
#[test]
fn block_quantisations_match_the_gguf_package() {
    use depthc::checkpoint::{dequant, DType};
    for (name, dtype) in [
        ("q5_0", DType::Q5_0),
        ("q5_1", DType::Q5_1),
        ("q4_k", DType::Q4_K),
        ("q5_k", DType::Q5_K),
        ("q6_k", DType::Q6_K),
    ] {
        let blocks = std::fs::read(fixture(&format!("kquants/{name}.blocks"))).unwrap();
        let want: Vec<f32> = std::fs::read(fixture(&format!("kquants/{name}.f32")))
            .unwrap()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(dequant::byte_size(dtype, want.len()), Some(blocks.len()));
        let mut got = vec![0f32; want.len()];
        dequant::to_f32(dtype, &blocks, &mut got);
        // Both compute in f32 from the same f16 scales: exact up to rounding order.
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                (g - w).abs() <= 1e-6 * w.abs().max(1.0),
                "{name}[{i}]: depthc {g}, gguf {w}"
            );
        }
    }
}
