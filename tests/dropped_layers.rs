//! Dropping whole layers, the depth-pruning baseline (`d12` in a plan,
//! `search --drop-layers`): the reference forward skips a dropped layer
//! exactly as a model without it runs; emitted, the model has fewer layers
//! (config, KV cache inputs) and validates in ONNX Runtime against the
//! reference; Gemma 3 keeps each kept layer's own attention kind; healing
//! stands the layer before a dropped one in for it; the search chooses
//! layers to drop with the same strategies and budget.

mod common;

use std::path::{Path, PathBuf};

use common::{fixture, gemma_path, load, logits, real_model_path, text_path};
use depthc::plan::Plan;
use serde_json::Value;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn depthc(args: &[&str]) -> (i32, String, String) {
    common::run_depthc(args)
}

#[test]
fn a_dropped_layer_runs_as_the_model_without_it() {
    let (_, model) = load(&real_model_path());
    let plan = Plan::parse("d3,12-13,d20-21", model.config.num_hidden_layers).unwrap();
    let (kept, renumbered) = plan.without_dropped();
    let pruned = model.keep_layers(&kept);
    assert_eq!(pruned.config.num_hidden_layers, 27);
    assert_eq!(renumbered.to_string(), "11-12");
    let ids: Vec<u32> = (1..40).map(|i| (i * 37) % 4000).collect();
    // The same layers on the same stream: the same bits.
    assert_eq!(
        logits(&model, &plan, &ids),
        logits(&pruned, &renumbered, &ids)
    );
    // And not the original's.
    let original = Plan::sequential(model.config.num_hidden_layers);
    assert_ne!(logits(&model, &plan, &ids), logits(&model, &original, &ids));
}

/// `emit MODEL --plan PLAN -o OUT` then `validate OUT --model MODEL --json`.
fn emit_and_validate(model: &Path, plan: &str, extra: &[&str], out: &Path) -> Value {
    let (code, stdout, stderr) =
        depthc(&[&["emit", s(model), "--plan", plan, "-o", s(out)][..], extra].concat());
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains(&format!("plan `{plan}`")), "{stdout}");
    if !extra.contains(&"ort") {
        // The ONNX checker knows the standard operators only.
        common::run_python("check_onnx.py", &[s(&out.join("model.onnx"))]);
    }
    let (code, stdout, stderr) = depthc(&["validate", s(out), "--model", s(model), "--json"]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    serde_json::from_str(&stdout).unwrap()
}

fn config(out: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap()
}

#[test]
fn a_plan_that_drops_layers_emits_a_shallower_model_that_validates() {
    let dir = tempfile::tempdir().unwrap();
    let model = real_model_path();
    for (i, (plan, extra)) in [
        ("d12,14-15,d20-21", &[][..]),
        (
            "d12,14-15,d20-21",
            &["--form", "branches", "--ops", "ort"][..],
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let out = dir.path().join(format!("out{i}"));
        let v = emit_and_validate(&model, plan, extra, &out);
        assert_eq!(v["tokens_agree"], true, "{v}");
        assert_eq!(v["plan"], plan);
        assert!(v["outputs"][0]["max_abs"].as_f64().unwrap() <= 1e-3, "{v}");
        // 30 layers, 3 dropped: 27 in the config, 27 caches, in
        // onnxruntime-genai's config too.
        assert_eq!(config(&out)["num_hidden_layers"], 27);
        let genai: Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("genai_config.json")).unwrap())
                .unwrap();
        assert_eq!(genai["model"]["decoder"]["num_hidden_layers"], 27);
        assert_eq!(v["outputs"].as_array().unwrap().len(), 1 + 2 * 27, "{v}");
    }
}

#[test]
fn gemma_keeps_each_kept_layers_attention_kind() {
    // Gemma 3 270M: 18 layers, every sixth global (5, 11, 17), the rest
    // sliding-window. Dropping 3 and 4 moves global layer 5 to index 3.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let v = emit_and_validate(&gemma_path(), "d3-4", &[], &out);
    assert_eq!(v["tokens_agree"], true, "{v}");
    let c = config(&out);
    assert_eq!(c["num_hidden_layers"], 16);
    let kinds: Vec<&str> = c["layer_types"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap())
        .collect();
    assert_eq!(kinds.len(), 16);
    let global: Vec<usize> = (0..16).filter(|&i| kinds[i] == "full_attention").collect();
    assert_eq!(global, [3, 9, 15], "{kinds:?}");
}

#[test]
fn healing_stands_in_for_dropped_layers() {
    let (model, hamlet, macbeth) = (
        real_model_path(),
        text_path("hamlet_gut.txt"),
        text_path("macbeth_gut.txt"),
    );
    let eval = |heal: bool| -> (Value, String) {
        let mut args = vec![
            "eval",
            s(&model),
            "--text",
            s(&hamlet),
            "--max-windows",
            "4",
            "--prompts",
            "0",
            "--plan",
            "d12,d20",
            "--json",
        ];
        if heal {
            args.extend(["--heal", "--calib", s(&macbeth), "--max-tokens", "4096"]);
        }
        let (code, stdout, stderr) = depthc(&args);
        assert_eq!(code, 0, "{stderr}");
        (serde_json::from_str(&stdout).unwrap(), stderr)
    };
    let ((plain, _), (healed, stderr)) = (eval(false), eval(true));
    // One correction per dropped layer, in the layer before it.
    assert!(stderr.contains("group 11 for d12"), "{stderr}");
    assert!(stderr.contains("group 19 for d20"), "{stderr}");
    let f = |v: &Value, k: &str| v[k].as_f64().unwrap();
    eprintln!(
        "d12,d20: perplexity {:.3} original, {:.3} dropped, {:.3} healed",
        f(&plain, "perplexity_original"),
        f(&plain, "perplexity"),
        f(&healed, "perplexity")
    );
    assert!(f(&healed, "perplexity") < f(&plain, "perplexity"));
}

#[test]
fn search_drop_layers_chooses_layers_to_drop() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("report");
    let model = fixture("tiny_llama/tiny.q8_0.gguf");
    let mut args = common::fast_search_args("search", s(&model), s(&out));
    args.extend(["--drop-layers", "--pairs", "2", "--heal"]);
    let (code, stdout, stderr) = depthc(&args);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("budget 2 layers dropped"), "{stdout}");
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("search-report.json")).unwrap())
            .unwrap();
    assert_eq!(report["unit"], "drop");
    let (ckpt, _) = load(&model);
    let layers = ckpt.config.num_hidden_layers;
    let chosen = Plan::parse(report["chosen_plan"].as_str().unwrap(), layers).unwrap();
    assert_eq!(chosen.dropped().len(), 2, "{chosen}");
    assert_eq!(chosen.groups().count(), 0, "{chosen}");
    assert_eq!(report["depth_after"], layers - 2);
    // Every front plan drops layers only, one more per count.
    for b in report["best_by_pairs"].as_array().unwrap() {
        let p = Plan::parse(b["plan"].as_str().unwrap(), layers).unwrap();
        assert_eq!(
            p.dropped().len() as u64,
            b["pairs"].as_u64().unwrap(),
            "{b}"
        );
        assert!(b["healed"].is_object(), "{b}");
    }
    let schema =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("schemas/search-report.schema.json");
    common::run_python("check_report.py", &[s(&out), s(&schema)]);
    let md = std::fs::read_to_string(out.join("search-report.md")).unwrap();
    assert!(md.contains("Layers dropped (`--drop-layers`)"), "{md}");
}
