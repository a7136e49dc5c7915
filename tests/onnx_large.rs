//! A model whose external data passes 2 GiB: written by `depthc emit`, loaded
//! by ONNX Runtime through `depthc validate` (offsets beyond 2^31 in the data
//! file, the protobuf itself far below its 2 GiB limit).
//!
//! The checkpoint is synthetic: 2 Llama layers with a 270,000-token untied
//! vocabulary (embedding and lm_head of 1.1 GB each in f32).

mod common;

use std::process::Command;

use common::{fixture, load};
use depthc::checkpoint::safetensors::{self, StoreType};
use serde_json::{json, Value};

const VOCAB: usize = 270_000;
const HIDDEN: usize = 1024;
const HEADS: usize = 8;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = 128;
const FFN: usize = 2048;
const LAYERS: usize = 2;

/// Deterministic values in [-scale, scale) (a 64-bit LCG per tensor).
fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

#[test]
fn external_data_beyond_2_gib_is_written_and_loads() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("synthetic");
    std::fs::create_dir(&ckpt).unwrap();
    let config = json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "num_hidden_layers": LAYERS, "hidden_size": HIDDEN, "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM, "intermediate_size": FFN,
        "vocab_size": VOCAB, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
        "max_position_embeddings": 256, "tie_word_embeddings": false,
    });
    std::fs::write(ckpt.join("config.json"), config.to_string()).unwrap();
    // Any tokenizer whose ids are in range; the tiny fixture's will do.
    let (tiny, _) = load(&fixture("tiny_llama/tiny.q8_0.gguf"));
    std::fs::write(
        ckpt.join("tokenizer.json"),
        tiny.tokenizer.unwrap().to_json(),
    )
    .unwrap();

    let mut shapes: Vec<(String, Vec<usize>, f32)> = vec![
        ("model.embed_tokens.weight".into(), vec![VOCAB, HIDDEN], 0.5),
        ("lm_head.weight".into(), vec![VOCAB, HIDDEN], 0.05),
        ("model.norm.weight".into(), vec![HIDDEN], 1.0),
    ];
    for l in 0..LAYERS {
        let p = format!("model.layers.{l}");
        for (name, shape) in [
            ("input_layernorm", vec![HIDDEN]),
            ("post_attention_layernorm", vec![HIDDEN]),
            ("self_attn.q_proj", vec![HEADS * HEAD_DIM, HIDDEN]),
            ("self_attn.k_proj", vec![KV_HEADS * HEAD_DIM, HIDDEN]),
            ("self_attn.v_proj", vec![KV_HEADS * HEAD_DIM, HIDDEN]),
            ("self_attn.o_proj", vec![HIDDEN, HEADS * HEAD_DIM]),
            ("mlp.gate_proj", vec![FFN, HIDDEN]),
            ("mlp.up_proj", vec![FFN, HIDDEN]),
            ("mlp.down_proj", vec![HIDDEN, FFN]),
        ] {
            let scale = if shape.len() == 1 { 1.0 } else { 0.03 };
            shapes.push((format!("{p}.{name}.weight"), shape, scale));
        }
    }
    let data: Vec<Vec<f32>> = shapes
        .iter()
        .enumerate()
        .map(|(i, (_, shape, scale))| {
            let v = values(shape.iter().product(), i as u64 + 1, *scale);
            // Norm weights around 1.
            if shape.len() == 1 {
                v.iter().map(|x| 1.0 + 0.1 * x).collect()
            } else {
                v
            }
        })
        .collect();
    let tensors: Vec<(String, Vec<usize>, &[f32])> = shapes
        .iter()
        .zip(&data)
        .map(|((n, s, _), d)| (n.clone(), s.clone(), d.as_slice()))
        .collect();
    safetensors::write(&ckpt.join("model.safetensors"), &tensors, StoreType::F32).unwrap();
    drop(tensors);
    drop(data);

    let out = dir.path().join("emitted");
    let bin = env!("CARGO_BIN_EXE_depthc");
    let emit = Command::new(bin)
        .args(["emit", ckpt.to_str().unwrap(), "--plan", "0-1", "-o"])
        .arg(&out)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&emit.stdout);
    assert!(
        emit.status.success(),
        "{}",
        String::from_utf8_lossy(&emit.stderr)
    );
    eprintln!("{stdout}");
    let data_len = std::fs::metadata(out.join("model.onnx_data"))
        .unwrap()
        .len();
    assert!(data_len > 1 << 31, "external data is only {data_len} bytes");

    let validate = Command::new(bin)
        .args([
            "validate",
            out.to_str().unwrap(),
            "--model",
            ckpt.to_str().unwrap(),
        ])
        .args(["--steps", "2", "--json"])
        .output()
        .unwrap();
    assert!(
        validate.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&validate.stdout),
        String::from_utf8_lossy(&validate.stderr)
    );
    let v: Value = serde_json::from_slice(&validate.stdout).unwrap();
    eprintln!(
        "data {:.2} GiB; logits max abs {}",
        data_len as f64 / (1u64 << 30) as f64,
        v["outputs"][0]["max_abs"]
    );
    assert_eq!(v["plan"], "0-1");
    assert_eq!(v["tokens_agree"], true);
}
