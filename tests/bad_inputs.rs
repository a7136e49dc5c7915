//! The bad-input corpus (tests/bad_inputs/, made by make_bad_inputs.py): every
//! case runs its command and must end in exit 1 with one line `error: ...`
//! mentioning everything its manifest entry expects (what, where, and the fix
//! when there is one), no panic, and nothing written: the output path does not
//! exist afterwards and the case folder and the temporary folder hold exactly
//! what they held before. The two control cases (the valid bases) must succeed.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

fn corpus() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/bad_inputs")
}

/// Every file and folder under `dir` with its size (folders: 0).
fn listing(dir: &Path) -> BTreeMap<PathBuf, u64> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let meta = e.metadata().unwrap();
            if meta.is_dir() {
                stack.push(e.path());
                out.insert(e.path(), 0);
            } else {
                out.insert(e.path(), meta.len());
            }
        }
    }
    out
}

/// Runs one case; returns what is wrong with its outcome, if anything.
fn check(case: &Value, cases: &Path) -> Option<String> {
    let name = case["name"].as_str().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let args: Vec<String> = case["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            a.as_str()
                .unwrap()
                .replace("{cases}", cases.to_str().unwrap())
                .replace("{out}", out.to_str().unwrap())
        })
        .collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let before = listing(cases);
    let (code, _stdout, stderr) = common::run_depthc(&args);
    let cmd = format!("{name}: depthc {}", args.join(" "));

    if case["ok"].as_bool().unwrap() {
        if code != 0 {
            return Some(format!(
                "{cmd}\n  control case failed (exit {code}):\n{stderr}"
            ));
        }
        return None;
    }
    let mut wrong = Vec::new();
    if code != 1 {
        wrong.push(format!("exit {code}, want 1"));
    }
    if stderr.contains("panicked") {
        wrong.push("panicked".to_string());
    }
    let lines: Vec<&str> = stderr.lines().collect();
    if lines.len() != 1 || !lines[0].starts_with("error: ") {
        wrong.push(format!(
            "want one line `error: ...`, got {} lines",
            lines.len()
        ));
    }
    for needle in case["expect"].as_array().unwrap() {
        let needle = needle.as_str().unwrap();
        if !stderr.contains(needle) {
            wrong.push(format!("message lacks `{needle}`"));
        }
    }
    if out.exists() {
        wrong.push(format!("{} was left behind", out.display()));
    }
    let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
    if !left.is_empty() {
        wrong.push(format!(
            "{} entries left in the temporary folder",
            left.len()
        ));
    }
    if listing(cases) != before {
        wrong.push("the case folder changed".to_string());
    }
    (!wrong.is_empty()).then(|| format!("{cmd}\n  {}\n  stderr: {stderr}", wrong.join("; ")))
}

#[test]
fn every_bad_input_fails_clearly_and_leaves_nothing() {
    let manifest: Vec<Value> = serde_json::from_str(
        &std::fs::read_to_string(corpus().join("cases.json")).expect("cases.json"),
    )
    .unwrap();
    assert!(manifest.len() >= 25, "the corpus lost cases");
    assert_eq!(
        manifest.iter().filter(|c| c["ok"] == true).count(),
        2,
        "two control cases"
    );
    let cases = corpus().join("cases");
    let failures: Vec<String> = manifest
        .iter()
        .filter_map(|case| check(case, &cases))
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        manifest.len(),
        failures.join("\n")
    );
}
