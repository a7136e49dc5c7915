//! Emitted ONNX models: decoded by an independent schema (`onnx-protobuf`),
//! checked by ONNX's own checker, run through ONNX Runtime against the
//! reference forward of the same plan (prefill + greedy decode steps), and
//! loaded by onnxruntime-genai.

mod common;

use std::path::{Path, PathBuf};

use common::{fixture, load, real_model_path, reference_greedy, text_path};
use depthc::checkpoint::Checkpoint;
use depthc::forward::Forward;
use depthc::graph::{ElemType, Form};
use depthc::model::Model;
use depthc::onnx::package::{emit, EmitOptions, Source, MODEL_FILE};
use depthc::plan::Plan;
use depthc::runtime::validate::{validate, Tolerance, Validation};
use depthc::runtime::{DecoderSession, RuntimeOptions};
use indicatif::ProgressBar;
use protobuf::Message;

/// Validation records the differences; the tests assert their own bounds.
const LOOSE: Tolerance = Tolerance {
    abs: None,
    rel: None,
};

fn emit_to(
    dir: &Path,
    ckpt: &Checkpoint,
    model: &Model,
    plan: &Plan,
    form: Form,
    float: ElemType,
) -> PathBuf {
    let out = dir.join(format!("{}-{}", form.name(), plan).replace(',', "_"));
    emit(
        model,
        plan,
        &Source {
            path: &ckpt.path,
            tokenizer: ckpt.tokenizer.as_ref(),
        },
        &EmitOptions {
            form,
            float,
            ops: depthc::graph::Ops::Portable,
            int4: None,
            healed: false,
        },
        &out,
        &ProgressBar::hidden(),
    )
    .unwrap_or_else(|e| panic!("emit `{plan}` {}: {e}", form.name()));
    out
}

fn run_validation(
    out: &Path,
    model: &Model,
    plan: &Plan,
    prompt: &[u32],
    steps: usize,
) -> Validation {
    common::validate_emitted(out, model, plan, prompt, steps)
}

fn report(v: &Validation, what: &str) -> (f32, f32) {
    let logits = v.outputs[0].max_abs;
    let present = v.outputs[1..]
        .iter()
        .map(|o| o.max_abs)
        .fold(0f32, f32::max);
    eprintln!(
        "{what}: logits max abs {logits:e}, present max abs {present:e}, tokens agree {}",
        v.tokens_agree
    );
    (logits, present)
}

/// Decode with the `onnx-protobuf` crate (rust-protobuf, the full ONNX schema)
/// and check the I/O contract and the external data layout.
fn check_with_independent_decoder(out: &Path, layers: usize, float_bytes: i64) {
    let bytes = std::fs::read(out.join(MODEL_FILE)).unwrap();
    let m = onnx_protobuf::ModelProto::parse_from_bytes(&bytes).expect("onnx-protobuf decodes");
    assert_eq!(m.ir_version, 10);
    assert_eq!(m.opset_import.len(), 1);
    assert_eq!(m.opset_import[0].domain, "");
    assert_eq!(m.opset_import[0].version, 21);
    let g = m.graph.as_ref().expect("graph");
    let inputs: Vec<&str> = g.input.iter().map(|v| v.name.as_str()).collect();
    let outputs: Vec<&str> = g.output.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(inputs[..3], ["input_ids", "attention_mask", "position_ids"]);
    assert_eq!(inputs.len(), 3 + 2 * layers);
    assert_eq!(outputs[0], "logits");
    assert_eq!(outputs.len(), 1 + 2 * layers);
    for l in 0..layers {
        assert!(inputs.contains(&format!("past_key_values.{l}.key").as_str()));
        assert!(outputs.contains(&format!("present.{l}.value").as_str()));
    }
    let data_len = std::fs::metadata(out.join("model.onnx_data"))
        .unwrap()
        .len();
    let mut external = 0;
    for t in &g.initializer {
        if t.external_data.is_empty() {
            assert!(!t.raw_data.is_empty(), "{} has no data", t.name);
            continue;
        }
        external += 1;
        let get = |k: &str| {
            t.external_data
                .iter()
                .find(|e| e.key == k)
                .map(|e| e.value.clone())
                .unwrap_or_else(|| panic!("{} lacks `{k}`", t.name))
        };
        assert_eq!(get("location"), "model.onnx_data");
        let offset: u64 = get("offset").parse().unwrap();
        let length: u64 = get("length").parse().unwrap();
        assert_eq!(offset % 4096, 0, "{} is not 4096-aligned", t.name);
        assert!(
            offset + length <= data_len,
            "{} lies past the data file",
            t.name
        );
        let numel: i64 = t.dims.iter().product();
        assert_eq!(length as i64, numel * float_bytes, "{} length", t.name);
    }
    assert!(external > 0);
    // Node names live in the /model namespace and are unique.
    let mut names: Vec<&str> = g.node.iter().map(|n| n.name.as_str()).collect();
    assert!(names
        .iter()
        .all(|n| n.starts_with("/model/") || n.starts_with("/lm_head/")));
    names.sort();
    names.dedup();
    assert_eq!(names.len(), g.node.len());
}

use common::run_python;

#[test]
fn tiny_model_every_plan_and_form_matches_the_reference() {
    let path = fixture("tiny_llama/tiny.q8_0.gguf");
    let (ckpt, model) = load(&path);
    let dir = tempfile::tempdir().unwrap();
    let prompt: Vec<u32> = (0..12).map(|i| (i * 7 + 3) % 64).collect();
    for spec in ["", "1-2", "0-1,2-3", "0-2"] {
        let plan = Plan::parse(spec, 4).unwrap();
        for form in [Form::Fused, Form::Branches] {
            let out = emit_to(dir.path(), &ckpt, &model, &plan, form, ElemType::F32);
            check_with_independent_decoder(&out, 4, 4);
            let v = run_validation(&out, &model, &plan, &prompt, 6);
            let (logits, present) = report(&v, &format!("tiny `{spec}` {}", form.name()));
            assert!(
                logits <= 1e-4 && present <= 1e-4,
                "`{spec}` {}",
                form.name()
            );
            assert!(v.tokens_agree);
        }
    }
}

#[test]
fn sliding_window_mask_matches_the_reference() {
    let (ckpt, mut model) = load(&fixture("tiny_llama/hf_f32"));
    model.config.family = depthc::checkpoint::Family::Mistral;
    model.config.sliding_window = Some(5);
    let dir = tempfile::tempdir().unwrap();
    let plan = Plan::parse("1-2", 4).unwrap();
    let out = emit_to(dir.path(), &ckpt, &model, &plan, Form::Fused, ElemType::F32);
    let prompt: Vec<u32> = (0..9).map(|i| (i * 5 + 1) % 64).collect();
    let v = run_validation(&out, &model, &plan, &prompt, 8);
    let (logits, present) = report(&v, "sliding window 5");
    assert!(logits <= 1e-4 && present <= 1e-4);
}

#[test]
fn onnx_checker_accepts_emitted_models() {
    let (ckpt, model) = load(&fixture("tiny_llama/tiny.q8_0.gguf"));
    let dir = tempfile::tempdir().unwrap();
    for form in [Form::Fused, Form::Branches] {
        let plan = Plan::parse("0-1,2-3", 4).unwrap();
        let out = emit_to(dir.path(), &ckpt, &model, &plan, form, ElemType::F32);
        let v = run_python("check_onnx.py", &[out.join(MODEL_FILE).to_str().unwrap()]);
        assert_eq!(v["ir_version"], 10);
        assert_eq!(v["opset"][""], 21);
    }
}

/// Greedy tokens of the reference forward: prefill `prompt`, then `n` steps.
#[test]
fn real_model_plans_in_both_forms_match_the_reference() {
    let path = real_model_path();
    let (ckpt, model) = load(&path);
    let tok = ckpt.tokenizer.as_ref().unwrap();
    let text = std::fs::read_to_string(text_path("hamlet_gut.txt")).unwrap();
    let prompt: Vec<u32> = tok.encode(&text[20000..22000]).unwrap()[..64].to_vec();
    let layers = model.config.num_hidden_layers;
    let dir = tempfile::tempdir().unwrap();
    for spec in ["", "20..24", "10-11,20-21"] {
        let plan = Plan::parse(spec, layers).unwrap();
        let mut runs = Vec::new();
        for form in [Form::Fused, Form::Branches] {
            let out = emit_to(dir.path(), &ckpt, &model, &plan, form, ElemType::F32);
            let mut session = DecoderSession::open(
                &out.join(MODEL_FILE),
                &model.config,
                ElemType::F32,
                &RuntimeOptions::default(),
            )
            .unwrap();
            let v = validate(
                &mut session,
                &Forward::new(&model),
                &plan,
                &prompt,
                16,
                LOOSE,
            )
            .unwrap();
            let (logits, present) = report(&v, &format!("SmolLM2 `{spec}` {}", form.name()));
            assert!(logits <= 1e-3, "`{spec}` {}: logits {logits}", form.name());
            assert!(
                present <= 1e-3,
                "`{spec}` {}: present {present}",
                form.name()
            );
            assert!(
                v.tokens_agree,
                "`{spec}` {}: greedy tokens differ",
                form.name()
            );
            // Same inputs again, keeping ONNX Runtime's logits to compare the forms.
            let mut logits_all = Vec::new();
            let mut past = None;
            let mut ids = prompt.clone();
            for &next in &v.tokens_reference {
                let step = session.step(&ids, past.as_ref()).unwrap();
                logits_all.extend_from_slice(&step.logits);
                past = Some(step);
                ids = vec![next];
            }
            runs.push(logits_all);
            drop(session);
            std::fs::remove_dir_all(&out).unwrap();
        }
        let d = common::max_abs_diff(&runs[0], &runs[1]);
        eprintln!("SmolLM2 `{spec}`: fused vs branches logits max abs {d:e}");
        assert!(d <= 1e-4, "`{spec}`: fused and branches differ by {d}");
    }
}

#[test]
fn onnxruntime_genai_generates_the_reference_tokens() {
    let path = real_model_path();
    let (ckpt, model) = load(&path);
    let layers = model.config.num_hidden_layers;
    let plan = Plan::parse("20..24", layers).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = emit_to(dir.path(), &ckpt, &model, &plan, Form::Fused, ElemType::F32);
    let v = run_python("check_onnx.py", &[out.join(MODEL_FILE).to_str().unwrap()]);
    assert_eq!(v["outputs"].as_array().unwrap().len(), 1 + 2 * layers);

    let tok = ckpt.tokenizer.as_ref().unwrap();
    let prompt = tok
        .encode("To be, or not to be, that is the question:\nWhether 'tis nobler in the mind")
        .unwrap();
    let expected = reference_greedy(&model, &plan, &prompt, 16);
    let g = common::genai_generate(&out, 16, &prompt);
    let got: Vec<u32> = g["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect();
    eprintln!("genai: {got:?}\nreference: {expected:?}");
    assert_eq!(got, expected, "onnxruntime-genai greedy tokens");
    assert!(g["decoded_prompt"]
        .as_str()
        .unwrap()
        .starts_with("To be, or not"));
}

#[test]
fn float16_model_matches_within_half_precision() {
    let (ckpt, model) = load(&real_model_path());
    let layers = model.config.num_hidden_layers;
    let plan = Plan::parse("20..24", layers).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = emit_to(dir.path(), &ckpt, &model, &plan, Form::Fused, ElemType::F16);
    check_with_independent_decoder(&out, layers, 2);
    let mut session = DecoderSession::open(
        &out.join(MODEL_FILE),
        &model.config,
        ElemType::F16,
        &RuntimeOptions::default(),
    )
    .unwrap();
    let prompt = ckpt
        .tokenizer
        .as_ref()
        .unwrap()
        .encode("To be, or not to be, that is the question:\nWhether 'tis nobler in the mind")
        .unwrap();
    let tol = Tolerance::default_for(ElemType::F16, None);
    let v = validate(&mut session, &Forward::new(&model), &plan, &prompt, 8, tol).unwrap();
    let worst = v.outputs.iter().map(|o| o.max_rel).fold(0f32, f32::max);
    eprintln!(
        "float16: logits max abs {:e}, worst max rel {worst:e}",
        v.outputs[0].max_abs
    );
    assert!(v.failures.is_empty(), "{:?}", v.failures);
    assert!(v.tokens_agree);
}

/// `--ops ort` on the real model: ONNX Runtime's fused operators (one
/// GroupQueryAttention per original layer, SkipSimplifiedLayerNormalization)
/// match the reference like the portable graph, and onnxruntime-genai
/// generates the reference's greedy tokens from it.
#[test]
fn ort_ops_match_the_reference_and_genai() {
    use depthc::graph::Ops;
    let (ckpt, model) = load(&real_model_path());
    let tok = ckpt.tokenizer.as_ref().unwrap();
    let layers = model.config.num_hidden_layers;
    let text = std::fs::read_to_string(text_path("hamlet_gut.txt")).unwrap();
    let prompt: Vec<u32> = tok.encode(&text[20000..22000]).unwrap()[..64].to_vec();
    let dir = tempfile::tempdir().unwrap();
    for (spec, form) in [
        ("", Form::Fused),
        ("20..24", Form::Fused),
        ("10-11,20-21", Form::Branches),
    ] {
        let plan = Plan::parse(spec, layers).unwrap();
        let out = dir
            .path()
            .join(format!("ort-{}-{spec}", form.name()).replace(',', "_"));
        emit(
            &model,
            &plan,
            &Source {
                path: &ckpt.path,
                tokenizer: ckpt.tokenizer.as_ref(),
            },
            &EmitOptions {
                form,
                float: ElemType::F32,
                ops: Ops::Ort,
                int4: None,
                healed: false,
            },
            &out,
            &ProgressBar::hidden(),
        )
        .unwrap();
        let bytes = std::fs::read(out.join(MODEL_FILE)).unwrap();
        let m = onnx_protobuf::ModelProto::parse_from_bytes(&bytes).unwrap();
        assert!(m.opset_import.iter().any(|o| o.domain == "com.microsoft"));
        let g = m.graph.as_ref().unwrap();
        let gqa = g
            .node
            .iter()
            .filter(|n| n.op_type == "GroupQueryAttention")
            .count();
        assert_eq!(gqa, layers, "one attention op and cache per original layer");
        let v = run_validation(&out, &model, &plan, &prompt, 16);
        let (logits, present) = report(&v, &format!("SmolLM2 ort `{spec}` {}", form.name()));
        assert!(
            logits <= 1e-3 && present <= 1e-3,
            "`{spec}`: {logits} {present}"
        );
        assert!(v.tokens_agree, "`{spec}`: greedy tokens differ");
        let genai: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("genai_config.json")).unwrap())
                .unwrap();
        assert_eq!(genai["search"]["past_present_share_buffer"], true);
        if spec == "20..24" {
            let r = common::genai_generate(&out, 16, &prompt);
            let got: Vec<u32> = r["tokens"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect();
            assert_eq!(got, v.tokens_reference[..16], "onnxruntime-genai");
        }
        std::fs::remove_dir_all(&out).unwrap();
    }
}

/// The benchmark's decode loop (`DecoderSession::greedy_bound`: KV cache kept
/// where the execution provider wrote it, bound as the next step's past)
/// generates the reference's greedy tokens in every row, in both op modes.
#[test]
fn bound_decode_generates_the_reference_tokens() {
    use depthc::graph::Ops;
    let path = real_model_path();
    let (ckpt, model) = load(&path);
    let layers = model.config.num_hidden_layers;
    let plan = Plan::parse("12-13,14-15,17-18,21-22,24-25,26-27", layers).unwrap();
    let prompt = ckpt
        .tokenizer
        .as_ref()
        .unwrap()
        .encode("To be, or not to be, that is the question:\nWhether 'tis nobler in the mind")
        .unwrap();
    let want = reference_greedy(&model, &plan, &prompt, 9);
    let dir = tempfile::tempdir().unwrap();
    for ops in [Ops::Portable, Ops::Ort] {
        let out = dir.path().join(ops.name());
        let opts = EmitOptions {
            form: Form::Fused,
            float: ElemType::F32,
            ops,
            int4: None,
            healed: false,
        };
        let source = Source {
            path: &ckpt.path,
            tokenizer: ckpt.tokenizer.as_ref(),
        };
        emit(&model, &plan, &source, &opts, &out, &ProgressBar::hidden()).unwrap();
        let mut session = DecoderSession::open(
            &out.join(MODEL_FILE),
            &model.config,
            ElemType::F32,
            &RuntimeOptions::default(),
        )
        .unwrap();
        let rows: Vec<u32> = [prompt.clone(), prompt.clone()].concat();
        let r = session.greedy_bound(&rows, 2, 8).unwrap();
        for (k, got) in r.tokens.iter().enumerate() {
            assert_eq!(got, &want, "{} row {k}", ops.name());
        }
        assert!(r.prefill_s > 0.0 && r.decode_s > 0.0);
        let prefill_only = session.greedy_bound(&prompt, 1, 0).unwrap();
        assert!(prefill_only.tokens[0].is_empty() && prefill_only.prefill_s > 0.0);
        // No step, no decode time: the clock runs only around the steps.
        assert_eq!(prefill_only.decode_s, 0.0);
    }
}
