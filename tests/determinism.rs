//! Determinism: the same command gives byte-identical models whatever the
//! thread count (the reference forward's rayon pool, hence the search, and
//! the emission). Only wall-clock timings may differ between runs.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::{fast_compile_args, fixture, real_model_path, run_depthc_with};
use serde_json::Value;

/// Every file under `dir`, by relative path.
fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(dir).unwrap().to_string_lossy().into_owned();
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

/// A search report without what measures time (and memory).
fn untimed(report: &[u8]) -> Value {
    let mut v: Value = serde_json::from_slice(report).unwrap();
    let o = v.as_object_mut().unwrap();
    o.remove("timings");
    o.remove("stages");
    o.remove("benchmark");
    o.remove("speed");
    v
}

fn run_with_threads(args: &[&str], threads: &str) {
    let (code, _, stderr) = run_depthc_with(args, &[("RAYON_NUM_THREADS", threads)]);
    assert_eq!(
        code, 0,
        "RAYON_NUM_THREADS={threads} depthc {args:?}: {stderr}"
    );
}

#[test]
fn compile_is_byte_identical_across_thread_counts() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixture("tiny_llama/tiny.q8_0.gguf");
    let mut outputs = Vec::new();
    for threads in ["1", "2", "3"] {
        let out = dir.path().join(format!("out{threads}"));
        let out_str = out.to_str().unwrap();
        let mut args = fast_compile_args(model.to_str().unwrap(), out_str);
        // More windows than the fast flags give: several per thread.
        let at = args.iter().position(|&a| a == "--max-tokens").unwrap();
        args[at + 1] = "512";
        run_with_threads(&args, threads);
        outputs.push(files(&out));
    }
    let first = &outputs[0];
    assert!(first.contains_key("compiled/model.onnx_data"));
    for other in &outputs[1..] {
        assert_eq!(
            first.keys().collect::<Vec<_>>(),
            other.keys().collect::<Vec<_>>()
        );
        for (name, bytes) in first {
            if name.starts_with("report/search-report.") {
                continue;
            }
            assert!(
                other[name] == *bytes,
                "{name} differs between thread counts"
            );
        }
        assert_eq!(
            untimed(&first["report/search-report.json"]),
            untimed(&other["report/search-report.json"]),
            "search results differ between thread counts"
        );
    }
}

/// On the real model, where the matmuls are large enough to be split over
/// threads: the search's scores and the emitted bytes do not depend on them.
#[test]
fn real_model_search_and_emit_are_identical_across_thread_counts() {
    let dir = tempfile::tempdir().unwrap();
    let model = real_model_path();
    let m = model.to_str().unwrap();
    let mut reports = Vec::new();
    let mut emitted = Vec::new();
    for threads in ["1", "2"] {
        let report = dir.path().join(format!("search{threads}"));
        run_with_threads(
            &[
                "search",
                m,
                "-o",
                report.to_str().unwrap(),
                "--seq-len",
                "64",
                "--max-tokens",
                "256",
                "--pairs",
                "2",
                "--strategy",
                "greedy",
            ],
            threads,
        );
        reports.push(untimed(
            &std::fs::read(report.join("search-report.json")).unwrap(),
        ));
        let out = dir.path().join(format!("emit{threads}"));
        run_with_threads(
            &[
                "emit",
                m,
                "--plan",
                "14-15,20-21",
                "-o",
                out.to_str().unwrap(),
            ],
            threads,
        );
        emitted.push(files(&out));
    }
    assert_eq!(reports[0], reports[1], "search results differ");
    assert_eq!(emitted[0].len(), emitted[1].len());
    for (name, bytes) in &emitted[0] {
        assert!(emitted[1][name] == *bytes, "{name} differs");
    }
}
