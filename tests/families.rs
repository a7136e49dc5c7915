//! Families beyond Llama on small random checkpoints made by transformers'
//! own classes (fixtures/families/make_families.py): Qwen2 (q/k/v biases),
//! Qwen3 (per-head q/k norms) and Mistral (sliding window 5 over 14 tokens).
//! The reference forward against transformers' logits; ONNX Runtime against
//! the reference for plans in both forms; the search through `depthc compile`.

mod common;

use common::{
    fast_compile_args, fixture, load, logits, max_abs_diff, run_depthc, run_python,
    validate_emitted,
};
use depthc::graph::{ElemType, Form};
use depthc::onnx::package::{emit, EmitOptions, Source, MODEL_FILE};
use depthc::plan::Plan;
use indicatif::ProgressBar;
use serde_json::Value;

const FAMILIES: [&str; 3] = ["qwen2", "qwen3", "mistral"];

fn reference() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("families/reference.json")).unwrap())
        .unwrap()
}

#[test]
fn reference_forward_matches_transformers() {
    let r = reference();
    let ids: Vec<u32> = r["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    for name in FAMILIES {
        let (ckpt, model) = load(&fixture(&format!("families/{name}")));
        assert_eq!(ckpt.config.family.name(), name);
        let want: Vec<f32> = r["families"][name]["logits"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|row| row.as_array().unwrap().iter())
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        let got = logits(&model, &Plan::sequential(4), &ids);
        let d = max_abs_diff(&got, &want);
        eprintln!("{name}: max abs diff vs transformers {d:e}");
        assert!(d <= 1e-4, "{name}: logits differ from transformers by {d}");
    }
}

/// The same checkpoints as GGUF `qwen2` / `qwen3` files (written by
/// fixtures/families/make_family_ggufs.py from the safetensors): the reader maps
/// the biases and head norms, keeps q/k rows as they are, and gives the same
/// logits bit for bit; the tokenizer uses the `qwen2` pre-tokenizer.
#[test]
fn qwen_gguf_files_give_the_safetensors_logits() {
    let r = reference();
    let ids: Vec<u32> = r["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    for name in ["qwen2", "qwen3"] {
        let (_, hf) = load(&fixture(&format!("families/{name}")));
        let (ckpt, gguf) = load(&fixture(&format!("families/{name}.gguf")));
        assert_eq!(ckpt.config.family.name(), name);
        assert_eq!(ckpt.config.qkv_bias, name == "qwen2");
        assert_eq!(ckpt.config.qk_norm, name == "qwen3");
        let plan = Plan::sequential(4);
        let (a, b) = (logits(&hf, &plan, &ids), logits(&gguf, &plan, &ids));
        assert!(
            a == b,
            "{name}: GGUF logits differ from safetensors by {}",
            max_abs_diff(&a, &b)
        );
        let tok = ckpt.tokenizer.as_ref().expect("GGUF tokenizer");
        assert!(tok.description.contains("`qwen2`"), "{}", tok.description);
        assert_eq!(tok.encode("ABC").unwrap(), [0, 1, 2]);
    }
}

/// Both forms, in plain operators and in ONNX Runtime's (`--ops ort`: Qwen2's
/// biases on the packed QKV, Qwen3's head norms between the QKV MatMul and
/// GroupQueryAttention, Mistral's window as its `local_window_size`).
#[test]
fn onnx_runtime_matches_the_reference_in_both_forms() {
    use depthc::graph::Ops;
    let dir = tempfile::tempdir().unwrap();
    let prompt: Vec<u32> = (0..10).map(|i| (i * 7 + 3) % 64).collect();
    for (name, ops) in FAMILIES
        .iter()
        .flat_map(|n| [(*n, Ops::Portable), (*n, Ops::Ort)])
    {
        let (ckpt, model) = load(&fixture(&format!("families/{name}")));
        for spec in ["", "1-2", "0-1,2-3", "0-2"] {
            let plan = Plan::parse(spec, 4).unwrap();
            for form in [Form::Fused, Form::Branches] {
                let out = dir.path().join(
                    format!("{name}-{}-{}-{spec}", ops.name(), form.name()).replace(',', "_"),
                );
                emit(
                    &model,
                    &plan,
                    &Source {
                        path: &ckpt.path,
                        tokenizer: None,
                    },
                    &EmitOptions {
                        form,
                        float: ElemType::F32,
                        ops,
                        int4: None,
                        healed: false,
                    },
                    &out,
                    &ProgressBar::hidden(),
                )
                .unwrap();
                let v = validate_emitted(&out, &model, &plan, &prompt, 6);
                let worst = v.outputs.iter().map(|o| o.max_abs).fold(0f32, f32::max);
                eprintln!(
                    "{name} {} `{spec}` {}: max abs {worst:e}",
                    ops.name(),
                    form.name()
                );
                assert!(worst <= 1e-4, "{name} `{spec}` {}: {worst}", form.name());
                assert!(v.tokens_agree, "{name} `{spec}` {}", form.name());
            }
        }
        if name == "qwen3" {
            let out = dir.path().join("qwen3-portable-fused-0-1_2-3");
            let v = run_python("check_onnx.py", &[out.join(MODEL_FILE).to_str().unwrap()]);
            assert_eq!(v["ir_version"], 10);
        }
    }
}

#[test]
fn compile_searches_and_validates_every_family() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/bad_inputs/cases/tokens.npy");
    for name in FAMILIES {
        let out = dir.path().join(name);
        let model = fixture(&format!("families/{name}"));
        let mut args = fast_compile_args(model.to_str().unwrap(), out.to_str().unwrap());
        args.extend(["--calib", tokens.to_str().unwrap()]);
        let (code, _, stderr) = run_depthc(&args);
        assert_eq!(code, 0, "{name}: {stderr}");
        let report: Value = serde_json::from_str(
            &std::fs::read_to_string(out.join("report/search-report.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(report["model"]["family"], name, "{name}");
        assert!(out.join("compiled/model.onnx").exists());
    }
}

#[test]
fn inspect_says_which_forms_are_exact() {
    for name in FAMILIES {
        let model = fixture(&format!("families/{name}"));
        let (code, stdout, stderr) = run_depthc(&["inspect", model.to_str().unwrap(), "--json"]);
        assert_eq!(code, 0, "{stderr}");
        let v: Value = serde_json::from_str(&stdout).unwrap();
        assert_eq!(v["family"], name);
        let forms = v["lp_forms"].as_array().unwrap();
        let names: Vec<&str> = forms.iter().map(|f| f["form"].as_str().unwrap()).collect();
        assert_eq!(names, ["fused", "branches"]);
        // Both are exact for these families: the ONNX test above holds them to 1e-4.
        assert!(
            forms.iter().all(|f| f["exact"] == true),
            "{name}: {forms:?}"
        );
        let fused = forms[0]["why"].as_str().unwrap();
        match name {
            "qwen2" => assert!(fused.contains("q/k/v biases"), "{fused}"),
            "qwen3" => assert!(fused.contains("head norms"), "{fused}"),
            _ => assert!(!fused.contains("bias") && !fused.contains("head norms")),
        }
    }
}
