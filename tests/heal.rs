//! Healing (`--heal`): on SmolLM2 a healed plan is closer to the original on
//! held-out text than the plan unhealed; emitted healed, it validates in ONNX
//! Runtime against the reference healed the same way (and refuses a
//! reference that is not); `compile --heal` reports each group.

mod common;

use std::path::{Path, PathBuf};

use common::{fixture, real_model_path, text_path};
use serde_json::Value;

fn depthc(args: &[&str]) -> (i32, String, String) {
    common::run_depthc(args)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

const PLAN: &str = "12-13,17-18,21-22";

#[test]
fn healing_brings_a_plan_closer_to_the_original_on_held_out_text() {
    let (model, hamlet, macbeth) = (
        real_model_path(),
        text_path("hamlet_gut.txt"),
        text_path("macbeth_gut.txt"),
    );
    let eval = |heal: bool, attention: bool| -> Value {
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
            PLAN,
            "--json",
        ];
        if heal {
            args.extend(["--heal", "--calib", s(&macbeth), "--max-tokens", "4096"]);
        }
        if attention {
            args.push("--heal-attention");
        }
        let (code, stdout, stderr) = depthc(&args);
        assert_eq!(code, 0, "{stderr}");
        if heal {
            // One line per group on stderr (and one per attention half),
            // each lowering its held-out deviation.
            let lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with("heal ")).collect();
            assert_eq!(lines.len(), if attention { 6 } else { 3 }, "{stderr}");
            for l in lines {
                assert!(l.contains("(applied,"), "{l}");
            }
        }
        serde_json::from_str(&stdout).unwrap()
    };
    let (plain, healed, both) = (eval(false, false), eval(true, false), eval(true, true));
    let f = |v: &Value, k: &str| v[k].as_f64().unwrap();
    assert_eq!(
        f(&plain, "perplexity_original"),
        f(&healed, "perplexity_original")
    );
    eprintln!(
        "perplexity {:.3} original, {:.3} unhealed, {:.3} healed; kl {:.4} -> {:.4}",
        f(&plain, "perplexity_original"),
        f(&plain, "perplexity"),
        f(&healed, "perplexity"),
        f(&plain, "kl"),
        f(&healed, "kl")
    );
    assert!(f(&healed, "perplexity") < f(&plain, "perplexity"));
    assert!(f(&healed, "kl") < f(&plain, "kl"));
    // The attention half corrected too (--heal-attention): every half
    // applied (above), and still closer than unhealed. Against the MLP half
    // alone it measured better on one plan and worse on this one
    // (docs/RESULTS.md, "The attention half too"): not asserted.
    eprintln!(
        "with the attention half: perplexity {:.3}, kl {:.4}",
        f(&both, "perplexity"),
        f(&both, "kl")
    );
    assert!(f(&both, "perplexity") < f(&plain, "perplexity"));
    assert!(f(&both, "kl") < f(&plain, "kl"));
}

#[test]
fn a_healed_model_validates_against_the_reference_healed_the_same_way() {
    let dir = tempfile::tempdir().unwrap();
    let (model, macbeth) = (real_model_path(), text_path("macbeth_gut.txt"));
    let out = dir.path().join("healed");
    let heal = ["--heal", "--calib", s(&macbeth), "--max-tokens", "2048"];
    let (code, _, stderr) = depthc(
        &[
            &["emit", s(&model), "--plan", PLAN, "-o", s(&out)][..],
            &heal[..],
        ]
        .concat(),
    );
    assert_eq!(code, 0, "{stderr}");
    common::run_python("check_onnx.py", &[s(&out.join("model.onnx"))]);
    let (code, stdout, stderr) = depthc(
        &[
            &["validate", s(&out), "--model", s(&model), "--json"][..],
            &heal[..],
        ]
        .concat(),
    );
    assert_eq!(code, 0, "{stdout}{stderr}");
    let v: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["tokens_agree"], true);
    assert!(v["outputs"][0]["max_abs"].as_f64().unwrap() <= 1e-3, "{v}");
    // The reference unhealed is refused, with what to pass.
    let (code, _, stderr) = depthc(&["validate", s(&out), "--model", s(&model)]);
    assert_eq!(code, 1);
    assert!(stderr.contains("was emitted with --heal"), "{stderr}");
}

#[test]
fn compile_heal_reports_each_group() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixture("tiny_llama/tiny.q8_0.gguf");
    let out = dir.path().join("out");
    let mut args = common::fast_compile_args(s(&model), s(&out));
    args.push("--heal");
    let (code, stdout, stderr) = depthc(&args);
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("heal           group"), "{stdout}{stderr}");
    let report: Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("report/search-report.json")).unwrap(),
    )
    .unwrap();
    let groups = report["healing"]["groups"].as_array().unwrap();
    assert_eq!(groups.len(), 1, "{report}");
    let g = &groups[0];
    let (before, after) = (
        g["deviation_before"].as_f64().unwrap(),
        g["deviation_after"].as_f64().unwrap(),
    );
    assert_eq!(g["applied"].as_bool().unwrap(), after < before, "{g}");
    assert_eq!(report["validation"]["compiled"]["tokens_agree"], true);
    let schema =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("schemas/search-report.schema.json");
    common::run_python("check_report.py", &[s(&out.join("report")), s(&schema)]);
    let md = std::fs::read_to_string(out.join("report/search-report.md")).unwrap();
    assert!(md.contains("## Healing"), "{md}");
}

#[test]
fn search_heal_measures_every_front_plan_healed() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("report");
    let (model, hamlet, macbeth) = (
        real_model_path(),
        text_path("hamlet_gut.txt"),
        text_path("macbeth_gut.txt"),
    );
    let (code, _, stderr) = depthc(&[
        "search",
        s(&model),
        "-o",
        s(&out),
        "--calib",
        s(&macbeth),
        "--max-tokens",
        "2048",
        "--pairs",
        "2",
        "--strategy",
        "greedy",
        "--eval",
        s(&hamlet),
        "--eval-windows",
        "2",
        "--task",
        "arc_easy",
        "--task-limit",
        "10",
        "--heal",
    ]);
    assert_eq!(code, 0, "{stderr}");
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("search-report.json")).unwrap())
            .unwrap();
    for b in report["best_by_pairs"].as_array().unwrap() {
        let h = &b["healed"];
        assert_eq!(h["perplexity"].as_array().unwrap().len(), 1, "{b}");
        assert_eq!(b["perplexity"].as_array().unwrap().len(), 1, "{b}");
        assert!(h["generation"]["equal_fraction"].as_f64().is_some(), "{b}");
        assert!(h["accuracy_retained"].as_f64().is_some(), "{b}");
        // Healing changes the plan only where a group improved.
        if h["groups_applied"] == 0 {
            assert_eq!(h["perplexity"], b["perplexity"], "{b}");
        }
    }
    let schema =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("schemas/search-report.schema.json");
    common::run_python("check_report.py", &[s(&out), s(&schema)]);
    let md = std::fs::read_to_string(out.join("search-report.md")).unwrap();
    assert!(md.contains("healed: perplexity"), "{md}");
}

#[test]
fn heal_without_a_plan_is_refused() {
    let model = common::real_model_path();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    for args in [
        vec![
            "eval",
            s(&model),
            "--text",
            s(&common::text_path("hamlet_gut.txt")),
            "--heal",
        ],
        vec!["emit", s(&model), "-o", s(&out), "--heal"],
    ] {
        let (code, _, stderr) = depthc(&args);
        assert_eq!(code, 1, "{args:?}");
        assert!(stderr.contains("give --plan"), "{args:?}: {stderr}");
        assert!(!out.exists());
    }
}
