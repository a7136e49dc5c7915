//! Task accuracy (`depthc eval --task`): every choice's log-likelihood
//! against transformers' (fixtures/tasks/make_goldens.py), the same picks,
//! a request file by path, and bad request files refused with their line.

mod common;

use std::path::Path;
use std::process::Command;

use common::{fixture, load_with_cache, real_model_path};
use depthc::checkpoint::setup_caches;
use depthc::forward::Forward;
use depthc::model::WeightCache;
use depthc::plan::Plan;
use depthc::search::tasks::{encode, log_likelihoods, Accuracy, Task};
use indicatif::ProgressBar;
use serde_json::Value;

/// Every choice of the golden's docs within 1e-3 of transformers' (f32,
/// natural log, summed over the continuation), the same continuation
/// tokens, and the same accuracy both ways.
fn matches_golden(model_path: &Path, golden: &Path) {
    let golden: Value = serde_json::from_str(&std::fs::read_to_string(golden).unwrap()).unwrap();
    // Every weight kept widened where the machine has room (a 1.5B model's
    // 7 GB): each doc is several forwards.
    let cache = WeightCache::new(WeightCache::budget_for_this_machine());
    let (ckpt, model) = load_with_cache(model_path, &cache);
    let tokenizer = ckpt.tokenizer.as_ref().unwrap();
    let forward = Forward::new(&model);
    let plan = Plan::sequential(model.config.num_hidden_layers);
    for (name, want) in golden["tasks"].as_object().unwrap() {
        let want_docs = want["docs"].as_array().unwrap();
        let task = Task::open(name, &setup_caches()).unwrap();
        let docs = encode(
            &task,
            tokenizer,
            model.config.window_bos(),
            Some(want_docs.len()),
        )
        .unwrap();
        assert_eq!(docs.len(), want_docs.len(), "{name}");
        let lls = log_likelihoods(&forward, &plan, &docs, &ProgressBar::hidden()).unwrap();
        // Docs run in batches: a doc scored alone gets the same bits.
        for (i, batched) in lls.iter().enumerate().take(5) {
            let alone =
                log_likelihoods(&forward, &plan, &docs[i..i + 1], &ProgressBar::hidden()).unwrap();
            assert_eq!(alone[0], *batched, "{name} doc {i} alone");
        }
        let mut worst = 0f64;
        for ((doc, got), w) in docs.iter().zip(&lls).zip(want_docs) {
            assert_eq!(doc.label as u64, w["label"].as_u64().unwrap(), "{name}");
            let tokens: Vec<Vec<u32>> =
                serde_json::from_value(w["continuation_tokens"].clone()).unwrap();
            assert_eq!(doc.continuations, tokens, "{name} doc {}", w["doc_id"]);
            let theirs: Vec<f64> = serde_json::from_value(w["logliks"].clone()).unwrap();
            for (g, t) in got.iter().zip(&theirs) {
                worst = worst.max((g - t).abs());
            }
            // The same pick on every doc, both ways.
            let chars = |v: &[f64]| -> Vec<f64> {
                v.iter()
                    .zip(&doc.chars)
                    .map(|(l, &c)| l / c as f64)
                    .collect()
            };
            assert_eq!(pick(got), pick(&theirs), "{name} doc {}", w["doc_id"]);
            assert_eq!(
                pick(&chars(got)),
                pick(&chars(&theirs)),
                "{name} doc {}",
                w["doc_id"]
            );
        }
        let acc = Accuracy::of(&docs, &lls);
        eprintln!(
            "{name}: {} docs, max |log-likelihood - transformers'| {worst:.2e}, acc_raw {} acc_per_char {}",
            docs.len(),
            acc.acc_raw,
            acc.acc_per_char
        );
        assert!(worst <= 1e-3, "{name}: {worst}");
        assert_eq!(acc.acc_raw, want["acc_raw"].as_f64().unwrap(), "{name}");
        assert_eq!(
            acc.acc_per_char,
            want["acc_per_char"].as_f64().unwrap(),
            "{name}"
        );
    }
}

/// The first of the largest.
fn pick(v: &[f64]) -> usize {
    (0..v.len()).fold(0, |best, i| if v[i] > v[best] { i } else { best })
}

#[test]
fn smollm2_matches_transformers_on_arc_easy_and_hellaswag() {
    matches_golden(&real_model_path(), &fixture("tasks/golden_smollm2.json"));
}

/// About 10 minutes on 2 cores (200 docs of a 1.5B model): a slower check,
/// `cargo test --release --test tasks -- --ignored` (docs/TESTING.md).
#[test]
#[ignore]
fn qwen2_5_matches_transformers_on_arc_easy_and_hellaswag() {
    matches_golden(
        &common::qwen2_5_path(),
        &fixture("tasks/golden_qwen2.5.json"),
    );
}

fn depthc(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_depthc"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_request_file_by_path_with_a_plan() {
    // sciq is used by no other test: the file as setup.sh installed it.
    let caches = setup_caches();
    let file = caches
        .iter()
        .map(|c| c.join("tasks/sciq/requests.jsonl.gz"))
        .find(|p| p.is_file())
        .expect("run scripts/setup.sh");
    let model = real_model_path();
    let (code, stdout, stderr) = depthc(&[
        "eval",
        model.to_str().unwrap(),
        "--task",
        file.to_str().unwrap(),
        "--limit",
        "12",
        "--plan",
        "14-15,17-18",
        "--json",
    ]);
    assert_eq!(code, 0, "{stderr}");
    let v: Value = serde_json::from_str(&stdout).unwrap();
    let t = &v["tasks"][0];
    assert_eq!(t["name"], "sciq");
    assert_eq!(t["docs"], 12);
    assert_eq!(t["primary_metric"], "acc_raw");
    for side in ["original", "candidate"] {
        for k in ["acc_raw", "acc_per_char"] {
            let acc = t[side][k].as_f64().unwrap();
            // 12 docs: a whole number of them right.
            assert!(
                (acc * 12.0 - (acc * 12.0).round()).abs() < 1e-9,
                "{side} {k} {acc}"
            );
            assert!(t[side][format!("{k}_stderr")].as_f64().unwrap() >= 0.0);
        }
    }
    let retained = t["retained"].as_f64().unwrap();
    let want =
        t["candidate"]["acc_raw"].as_f64().unwrap() / t["original"]["acc_raw"].as_f64().unwrap();
    assert!((retained - want).abs() < 1e-12, "{t}");
    assert_eq!(v["accuracy_retained"].as_f64().unwrap(), retained);
    assert_eq!(v["plan"], "14-15,17-18");
}

#[test]
fn bad_request_files_name_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let model = real_model_path();
    let line = |doc: u64, idx: u64, label: u64| {
        serde_json::json!({"doc_id": doc, "idx": idx, "label": label,
            "request": {"context": "Question: 1 + 1?\nAnswer:", "continuation": " 2"}})
        .to_string()
    };
    for (name, text, says) in [
        ("empty.jsonl", String::new(), "empty request file"),
        (
            "labels.jsonl",
            [line(0, 0, 1), line(0, 1, 1), line(1, 0, 0), line(1, 1, 1)].join("\n"),
            "line 4: doc 1: label 1, but line 3 gave it label 0",
        ),
        (
            "broken.jsonl",
            format!("{}\n{{\"doc_id\": 1", line(0, 0, 0)),
            "line 2: not JSON",
        ),
    ] {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        let (code, stdout, stderr) = depthc(&[
            "eval",
            model.to_str().unwrap(),
            "--task",
            path.to_str().unwrap(),
        ]);
        assert_eq!(code, 1, "{name}: {stdout}{stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(
            stderr.contains(path.to_str().unwrap()) && stderr.contains(says),
            "{stderr}"
        );
    }
    let (code, _, stderr) = depthc(&["eval", model.to_str().unwrap(), "--task", "no_such_task"]);
    assert_eq!(code, 1);
    assert!(stderr.contains("arc_easy"), "{stderr}");
}

#[test]
fn search_reports_the_accuracy_each_plan_retains() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("report");
    let model = real_model_path();
    let calib = common::text_path("macbeth_gut.txt");
    let (code, stdout, stderr) = depthc(&[
        "search",
        model.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--calib",
        calib.to_str().unwrap(),
        "--max-tokens",
        "2048",
        "--pairs",
        "2",
        "--task",
        "arc_easy",
        "--task-limit",
        "20",
        "--json",
    ]);
    assert_eq!(code, 0, "{stderr}");
    let summary: Value = serde_json::from_str(&stdout).unwrap();
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("search-report.json")).unwrap())
            .unwrap();
    let t = &report["tasks"][0];
    assert_eq!(
        (t["name"].as_str(), t["docs"].as_u64()),
        (Some("arc_easy"), Some(20))
    );
    let retained =
        t["chosen"]["acc_raw"].as_f64().unwrap() / t["original"]["acc_raw"].as_f64().unwrap();
    assert!(
        (t["retained"].as_f64().unwrap() - retained).abs() < 1e-12,
        "{t}"
    );
    assert_eq!(report["accuracy_retained"], t["retained"]);
    assert_eq!(summary["accuracy_retained"], t["retained"]);
    // Every plan of the front is scored; the chosen plan's entry is the
    // chosen plan's score.
    for b in report["best_by_pairs"].as_array().unwrap() {
        assert!(b["accuracy_retained"].as_f64().is_some(), "{b}");
        if b["plan"] == report["chosen_plan"] {
            assert_eq!(b["accuracy_retained"], report["accuracy_retained"]);
        }
    }
    let md = std::fs::read_to_string(out.join("search-report.md")).unwrap();
    assert!(
        md.contains("## Task accuracy") && md.contains("accuracy retained"),
        "{md}"
    );
    let schema = Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas/search-report.schema.json");
    let checked = common::run_python(
        "check_report.py",
        &[out.to_str().unwrap(), schema.to_str().unwrap()],
    );
    assert!(
        checked["svg"]["accuracy.svg"]["polyline"]
            .as_u64()
            .unwrap_or(0)
            + checked["svg"]["accuracy.svg"]["path"].as_u64().unwrap_or(0)
            > 0,
        "{checked}"
    );
}
