//! `--dtype int4` on SmolLM2-135M: the 4-bit codes against ONNX Runtime's own
//! quantiser, every form and op set against the reference forward (as
//! written at accuracy level 4, and the same graph at level 0), the ONNX
//! checker, onnxruntime-genai's greedy tokens, and `eval --dtype int4`.

mod common;

use common::*;
use depthc::graph::{ElemType, Form, Ops};
use depthc::model::Int4;
use depthc::onnx::package::{self, EmitOptions, Source, MODEL_FILE};
use depthc::plan::Plan;
use indicatif::ProgressBar;

const PLAN: &str = "12-13,14-15,17-18,21-22,24-25,26-27";

#[test]
fn codes_and_scales_equal_onnx_runtimes_quantizer() {
    let model = real_model_path();
    let model = model.to_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (hf, onnx) = (dir.path().join("hf"), dir.path().join("int4"));
    let (hf, onnx) = (hf.to_str().unwrap(), onnx.to_str().unwrap());
    let (code, _, err) = run_depthc(&["convert", model, "-o", hf, "--dtype", "f32"]);
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = run_depthc(&["emit", model, "-o", onnx, "--dtype", "int4"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("int4 weights (block 32, accuracy level 4)"),
        "{out}"
    );
    let r = run_python("int4_quantizer.py", &[onnx, hf]);
    // 30 layers x (qkv, o, gate|up, down) + lm_head.
    assert_eq!(r["checked"], 121);
    assert_eq!(r["mismatch"], serde_json::Value::Null, "{r}");
    // SmolLM2's embedding is tied: it gathers the LM head's 4-bit rows.
    assert_eq!(r["embedding"][0], "GatherBlockQuantized", "{r}");
    assert_eq!(r["embedding"][1][2], "lm_head.weight_scales", "{r}");
    let c = run_python("check_onnx.py", &[&format!("{onnx}/{MODEL_FILE}")]);
    assert_eq!(c["opset"]["com.microsoft"], 1);
}

#[test]
fn both_forms_and_op_sets_validate_and_generate_in_int4() {
    let path = real_model_path();
    let (ckpt, model) = load(&path);
    let layers = model.config.num_hidden_layers;
    let plan = Plan::parse(PLAN, layers).unwrap();
    let tok = ckpt.tokenizer.as_ref().unwrap();
    let prompt = tok
        .encode("To be, or not to be, that is the question:\nWhether 'tis nobler in the mind")
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    for ops in [Ops::Portable, Ops::Ort] {
        for form in [Form::Fused, Form::Branches] {
            let name = format!("{}-{}", ops.name(), form.name());
            let out = dir.path().join(&name);
            let int4 = Int4::default();
            package::emit(
                &model,
                &plan,
                &Source {
                    path: &ckpt.path,
                    tokenizer: ckpt.tokenizer.as_ref(),
                },
                &EmitOptions {
                    form,
                    float: ElemType::F32,
                    ops,
                    int4: Some(int4),
                    healed: false,
                },
                &out,
                &ProgressBar::hidden(),
            )
            .unwrap_or_else(|e| panic!("{name}: {e}"));
            // As written (accuracy level 4), and at level 0 within 1e-3.
            let (code, stdout, err) = run_depthc(&[
                "validate",
                out.to_str().unwrap(),
                "--model",
                path.to_str().unwrap(),
                "--json",
            ]);
            assert_eq!(code, 0, "{name}: {stdout}{err}");
            let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
            let exact = &v["at_accuracy_level_0"];
            let logits = exact["outputs"][0]["max_abs"].as_f64().unwrap();
            eprintln!(
                "{name}: level 4 logits rel {:.3}, level 0 logits abs {logits:.2e}",
                v["outputs"][0]["max_rel"]
            );
            assert!(logits < 1e-3, "{name}: {logits}");
            assert_eq!(exact["tokens_reference"], exact["tokens_onnx"], "{name}");

            // onnxruntime-genai's greedy tokens: the graph at accuracy level
            // 0 generates exactly the reference forward's.
            let reference = depthc::graph::lp::weights_as_emitted(
                &model,
                &plan,
                form,
                Some(Int4 {
                    accuracy_level: 0,
                    ..int4
                }),
            )
            .unwrap();
            let expected = reference_greedy(&reference, &plan, &prompt, 16);
            let exact_dir = dir.path().join(format!("{name}-level0"));
            std::fs::create_dir(&exact_dir).unwrap();
            let graph = depthc::onnx::at_accuracy_level_zero(&out.join(MODEL_FILE)).unwrap();
            std::fs::rename(&graph, exact_dir.join(MODEL_FILE)).unwrap();
            for f in std::fs::read_dir(&out).unwrap() {
                let f = f.unwrap().path();
                if f.is_file() && !f.ends_with(MODEL_FILE) {
                    std::fs::hard_link(&f, exact_dir.join(f.file_name().unwrap())).unwrap();
                }
            }
            for (d, exact) in [(&exact_dir, true), (&out, false)] {
                let got = ids_of(&common::genai_generate(d, 16, &prompt)["tokens"]);
                if exact {
                    assert_eq!(got, expected, "{name}: onnxruntime-genai at level 0");
                } else {
                    // As written (int8 activations) it generates too, up to
                    // 16 tokens or its end-of-text token.
                    eprintln!("{name}: genai as written {got:?}");
                    assert!(!got.is_empty(), "{name}");
                }
            }
            std::fs::remove_dir_all(&exact_dir).unwrap();
            std::fs::remove_dir_all(&out).unwrap();
        }
    }
}

#[test]
fn eval_reports_what_int4_costs_alone_and_with_a_plan() {
    let model = real_model_path();
    let model = model.to_str().unwrap();
    let text = text_path("hamlet_gut.txt");
    let text = text.to_str().unwrap();
    let eval = |extra: &[&str]| -> serde_json::Value {
        let mut args = vec![
            "eval",
            model,
            "--text",
            text,
            "--max-windows",
            "2",
            "--json",
        ];
        args.extend(extra);
        let (code, out, err) = run_depthc(&args);
        assert_eq!(code, 0, "{err}");
        serde_json::from_str(&out).unwrap()
    };
    let float = eval(&[]);
    let alone = eval(&["--dtype", "int4"]);
    let both = eval(&["--dtype", "int4", "--plan", PLAN]);
    let ppl = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap();
    // The reference is the float model in both.
    assert_eq!(
        ppl(&alone, "perplexity_original"),
        ppl(&float, "perplexity")
    );
    assert_eq!(ppl(&both, "perplexity_original"), ppl(&float, "perplexity"));
    assert_eq!(alone["depth"], 30);
    assert_eq!(both["depth"], 24);
    // Rounding weights to 4 bits moves the model; the plan moves it further.
    assert!(ppl(&alone, "kl") > 0.0);
    assert!(ppl(&both, "kl") > ppl(&alone, "kl"), "{alone} {both}");
    assert_ne!(ppl(&alone, "perplexity"), ppl(&float, "perplexity"));
    // Greedy generation on the two windows' first 32 tokens, 32 tokens each.
    for v in [&alone, &both] {
        let g = &v["generation"];
        assert_eq!(
            (g["prompts"].as_u64(), g["tokens"].as_u64()),
            (Some(2), Some(32))
        );
        // Every token before a prompt's first difference is equal, so the
        // mean first difference is at most the equal tokens per prompt.
        let first = g["mean_first_difference"].as_f64().unwrap();
        let equal = g["equal_fraction"].as_f64().unwrap();
        assert!(
            (0.0..=32.0).contains(&first) && first <= equal * 32.0 + 1e-9,
            "{g}"
        );
    }
    assert!(
        float.get("generation").is_none(),
        "no candidate, no generation"
    );
}

#[test]
fn gguf_source_keeps_the_checkpoints_blocks() {
    let model = real_model_path();
    let model = model.to_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("gguf");
    let out = out.to_str().unwrap();
    let (code, _, err) = run_depthc(&[
        "emit",
        model,
        "-o",
        out,
        "--dtype",
        "int4",
        "--int4-source",
        "gguf",
    ]);
    assert_eq!(code, 0, "{err}");
    // Every Q4_1 row of the GGUF, as the gguf package dequantises it.
    let r = run_python("int4_gguf_blocks.py", &[out, model]);
    eprintln!("{r}");
    assert_eq!(r["rows"], 30 * (576 + 192 + 192 + 576 + 1536 + 1536 + 576));
    assert!(r["max_rel"].as_f64().unwrap() < 1e-6, "{r}");
    // All but the LM head (the Q8_0 embedding, rounded to nearest).
    assert_eq!(r["nodes_with_zero_points"], 120);
    // The reference runs the same blocks: float32 close at level 0.
    let (code, stdout, err) = run_depthc(&["validate", out, "--model", model, "--json"]);
    assert_eq!(code, 0, "{stdout}{err}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let exact = &v["at_accuracy_level_0"]["outputs"][0]["max_abs"];
    assert!(exact.as_f64().unwrap() < 1e-3, "{v}");
    // A block size other than the GGUF's 32 is refused.
    let (code, _, err) = run_depthc(&[
        "emit",
        model,
        "-o",
        &format!("{out}-64"),
        "--dtype",
        "int4",
        "--int4-source",
        "gguf",
        "--block-size",
        "64",
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("blocks of 32"), "{err}");
    assert!(!std::path::Path::new(&format!("{out}-64")).exists());
}
