//! Real serving clients load what depthc writes, with no option and no file
//! change, and generate the reference forward's greedy tokens:
//! transformers.js 4.3.2 in Node (`tests/node/`, pinned by its
//! package-lock.json; `scripts/setup.sh` installs it) and onnxruntime-genai,
//! on a `depthc compile` folder of the tiny fixture and on SmolLM2 with a plan,
//! unhealed and healed.
//! Optimum's `ORTModelForCausalLM` needs torch; `scripts/optimum_check.sh`
//! runs the same check with it, off the CI path.

mod common;

use std::path::{Path, PathBuf};

use common::{fixture, load, real_model_path, reference_greedy, text_path};
use depthc::model::Model;
use depthc::plan::Plan;
use serde_json::Value;

const PROMPT: &str = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind";

/// `node tests/node/generate.mjs DIR N TEXT`.
fn transformers_js(dir: &Path, n: usize, text: &str) -> Value {
    let node_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/node");
    assert!(
        node_dir
            .join("node_modules/@huggingface/transformers")
            .is_dir(),
        "transformers.js missing: run scripts/setup.sh"
    );
    let out = std::process::Command::new("node")
        .arg("generate.mjs")
        .arg(dir)
        .arg(n.to_string())
        .arg(text)
        .current_dir(&node_dir)
        .output()
        .expect("run node");
    assert!(
        out.status.success(),
        "transformers.js failed on {}:\n{}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON object")
}

fn genai(dir: &Path, n: usize, prompt: &[u32]) -> Vec<u32> {
    ids(&common::genai_generate(dir, n, prompt)["tokens"])
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("an array of ids")
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// The reference's greedy tokens up to and including the first
/// end-of-sequence token, where every client stops.
fn expected(model: &Model, plan: &Plan, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut want = reference_greedy(model, plan, prompt, n);
    if let Some(eos) = model.config.eos_token_id {
        if let Some(at) = want.iter().position(|&t| t == eos) {
            want.truncate(at + 1);
        }
    }
    want
}

/// Both clients on one emitted folder: the prompt as the folder's tokenizer
/// encodes it, and `n` greedy tokens equal to the reference's.
fn check_clients(dir: &Path, model: &Model, plan: &Plan, prompt: &[u32], n: usize) {
    let want = expected(model, plan, prompt, n);
    let js = transformers_js(dir, n, PROMPT);
    assert_eq!(ids(&js["prompt_ids"]), prompt, "transformers.js tokenizer");
    let got = ids(&js["tokens"]);
    eprintln!("transformers.js: {got:?}\nreference:       {want:?}");
    assert_eq!(
        got,
        want,
        "transformers.js greedy tokens ({})",
        dir.display()
    );
    assert_eq!(
        genai(dir, n, prompt),
        want,
        "onnxruntime-genai greedy tokens ({})",
        dir.display()
    );
}

#[test]
fn compile_output_loads_in_transformers_js_and_genai() {
    let dir = tempfile::tempdir().unwrap();
    let model_path = fixture("tiny_llama/tiny.q8_0.gguf");
    let out = dir.path().join("out");
    let (code, _, stderr) = common::run_depthc(&common::fast_compile_args(
        model_path.to_str().unwrap(),
        out.to_str().unwrap(),
    ));
    assert_eq!(code, 0, "{stderr}");
    let (ckpt, model) = load(&model_path);
    let prompt = ckpt.tokenizer.as_ref().unwrap().encode(PROMPT).unwrap();
    let report: Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("report/search-report.json")).unwrap(),
    )
    .unwrap();
    let chosen = report["chosen_plan"].as_str().unwrap();
    for (part, plan) in [
        ("baseline", Plan::sequential(model.config.num_hidden_layers)),
        (
            "compiled",
            Plan::parse(chosen, model.config.num_hidden_layers).unwrap(),
        ),
    ] {
        let folder = out.join(part);
        // transformers.js's place for the graph holds the same files, stored
        // once (links to the top), and the top ones pass the ONNX checker.
        for f in ["model.onnx", "model.onnx_data"] {
            let (a, b) = (folder.join(f), folder.join("onnx").join(f));
            assert!(std::fs::symlink_metadata(&a).unwrap().is_file(), "{f}");
            assert_eq!(
                std::fs::canonicalize(&b).unwrap(),
                std::fs::canonicalize(&a).unwrap(),
                "onnx/{f} is not the file at the top"
            );
        }
        common::run_python(
            "check_onnx.py",
            &[folder.join("model.onnx").to_str().unwrap()],
        );
        let config: Value =
            serde_json::from_str(&std::fs::read_to_string(folder.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(
            config["transformers.js_config"]["use_external_data_format"],
            true
        );
        check_clients(&folder, &model, &plan, &prompt, 16);
    }
}

/// SmolLM2 with a plan, in float32 and float16 (whose greedy tokens on this
/// prompt are the float32 reference's).
#[test]
fn smollm2_plan_loads_in_transformers_js_and_genai() {
    let path = real_model_path();
    let (ckpt, model) = load(&path);
    let plan = Plan::parse("20..24", model.config.num_hidden_layers).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let prompt = ckpt.tokenizer.as_ref().unwrap().encode(PROMPT).unwrap();
    for dtype in ["f32", "f16"] {
        let out = dir.path().join(format!("smollm2-lp-{dtype}"));
        let (code, _, stderr) = common::run_depthc(&[
            "emit",
            path.to_str().unwrap(),
            "--plan",
            &plan.to_string(),
            "--dtype",
            dtype,
            "-o",
            out.to_str().unwrap(),
        ]);
        assert_eq!(code, 0, "{stderr}");
        check_clients(&out, &model, &plan, &prompt, 16);
    }
}

/// A healed plan (its groups' down_proj weights corrected, `--heal`) loads
/// as the unhealed one does, and both clients generate the tokens of the
/// reference forward with the healed weights, which are not the unhealed
/// plan's.
#[test]
fn a_healed_smollm2_plan_loads_in_transformers_js_and_genai() {
    let path = real_model_path();
    let (ckpt, model) = load(&path);
    let spec = "12-13,14-15,17-18,21-22,24-25,26-27";
    let plan = Plan::parse(spec, model.config.num_hidden_layers).unwrap();
    let macbeth = text_path("macbeth_gut.txt");
    let healed = common::healed(&path, &ckpt, &model, &plan, &macbeth, 2048);
    let prompt = ckpt.tokenizer.as_ref().unwrap().encode(PROMPT).unwrap();
    assert_ne!(
        expected(&healed, &plan, &prompt, 16),
        expected(&model, &plan, &prompt, 16),
        "healing should change this plan's greedy tokens"
    );
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("healed");
    let (code, _, stderr) = common::run_depthc(&[
        "emit",
        path.to_str().unwrap(),
        "--plan",
        spec,
        "--heal",
        "--calib",
        macbeth.to_str().unwrap(),
        "--max-tokens",
        "2048",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stderr}");
    check_clients(&out, &healed, &plan, &prompt, 16);
}
