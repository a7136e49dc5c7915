//! `depthc search`: the report folder (schema-valid JSON, markdown, SVGs),
//! determinism, agreement with `depthc eval`, calibration inputs, bad input.

mod common;

use std::path::{Path, PathBuf};

use common::{fixture, text_path};
use serde_json::Value;

fn depthc(args: &[&str]) -> (i32, String, String) {
    common::run_depthc(args)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn read_json(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn tiny() -> PathBuf {
    fixture("tiny_llama/tiny.q8_0.gguf")
}

/// Search the tiny model on a text file with every strategy.
fn tiny_search(out: &Path, calib: &Path, extra: &[&str]) -> Value {
    tiny_search_on(out, calib, 1024, extra)
}

/// [`tiny_search`] on `tokens` calibration tokens (above 1,024 the scoring
/// stage reads part of them, and the front is finished on the rest).
fn tiny_search_on(out: &Path, calib: &Path, tokens: usize, extra: &[&str]) -> Value {
    let model = tiny();
    let tokens = tokens.to_string();
    let mut args = vec![
        "search",
        s(&model),
        "-o",
        s(out),
        "--calib",
        s(calib),
        "--seq-len",
        "16",
        "--max-tokens",
        &tokens,
        "--protect-first",
        "0",
        "--protect-last",
        "0",
        "--strategy",
        "contiguous,greedy,beam",
    ];
    args.extend_from_slice(extra);
    let (code, stdout, stderr) = depthc(&args);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("chosen plan"), "{stdout}");
    read_json(&out.join("search-report.json"))
}

#[test]
fn report_validates_against_its_schema_and_svgs_are_well_formed() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("report");
    let (hamlet, sonnets) = (text_path("hamlet_gut.txt"), text_path("sonnets_gut.txt"));
    let report = tiny_search(
        &out,
        &text_path("macbeth_gut.txt"),
        &["--pairs", "2", "--eval", s(&hamlet), "--eval", s(&sonnets)],
    );
    // Per --eval text, the chosen plan's greedy generation on 8 held-out
    // prompts, 32 tokens each.
    let eval = report["eval"].as_array().unwrap();
    assert_eq!(eval.len(), 2);
    for e in eval {
        let g = &e["generation"];
        assert_eq!(
            (g["prompts"].as_u64(), g["tokens"].as_u64()),
            (Some(8), Some(32))
        );
    }
    // And of the best plan of every pair count (the depth/quality front) on
    // both texts' prompts; the chosen plan is one of them, its agreement the
    // mean of the two texts'.
    let front = report["best_by_pairs"].as_array().unwrap();
    assert!(front.iter().all(|b| b["generation"]["prompts"] == 16));
    let chosen = &front
        .iter()
        .find(|b| b["plan"] == report["chosen_plan"])
        .unwrap()["generation"];
    let mean = |k: &str| {
        (eval[0]["generation"][k].as_f64().unwrap() + eval[1]["generation"][k].as_f64().unwrap())
            / 2.0
    };
    for k in ["equal_fraction", "mean_first_difference"] {
        assert!((chosen[k].as_f64().unwrap() - mean(k)).abs() < 1e-12, "{k}");
    }
    for f in [
        "search-report.json",
        "search-report.md",
        "heatmap.svg",
        "pairs.svg",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let schema =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("schemas/search-report.schema.json");
    let svg = common::run_python("check_report.py", &[s(&out), s(&schema)]);
    // Every contiguous range is screened; one rectangle per range in the
    // heatmap, beside the background.
    let contiguous = |section: &str| {
        report[section]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["strategy"] == "contiguous")
            .count()
    };
    let ranges = contiguous("screened");
    assert_eq!(ranges, 4); // [0,2) [1,3) [2,4) [0,4)
    assert!(svg["svg"]["heatmap.svg"]["rect"].as_u64().unwrap() >= ranges as u64);
    // Scored end to end: the closest two single pairs and the one 2-pair range.
    assert_eq!(contiguous("candidates"), 3);
    assert!(svg["svg"]["pairs.svg"]["circle"].as_u64().unwrap() > 0);
    // The best plan of every pair count is measured on every window.
    let all = report["calibration"]["windows"].as_u64().unwrap();
    for pairs in 1..=2 {
        let best = front
            .iter()
            .filter(|b| b["pairs"] == pairs)
            .min_by(|a, b| {
                a["value"]
                    .as_f64()
                    .unwrap()
                    .total_cmp(&b["value"].as_f64().unwrap())
            })
            .unwrap();
        assert_eq!(best["windows"], all, "{pairs} pairs: {best}");
    }
    assert_eq!(report["depth_before"], 4);
    assert_eq!(report["depth_after"], 2);
    assert_eq!(report["chosen_plan"], "0-1,2-3");
    let md = std::fs::read_to_string(out.join("search-report.md")).unwrap();
    assert!(
        md.contains("Greedy against the best contiguous range"),
        "{md}"
    );
    assert!(md.contains("`0-1,2-3`"));
    assert!(
        md.contains("Greedy generation on 8 held-out prompts"),
        "{md}"
    );
    assert!(
        md.contains("greedy tokens equal | first difference"),
        "{md}"
    );
}

#[test]
fn exhaustive_greedy_scores_every_extension_on_every_window() {
    let dir = tempfile::tempdir().unwrap();
    let calib = text_path("tempest_gut.txt");
    let run = |name: &str, extra: &[&str]| {
        let out = dir.path().join(name);
        let model = tiny();
        let mut args = vec![
            "search",
            s(&model),
            "-o",
            s(&out),
            "--calib",
            s(&calib),
            "--seq-len",
            "16",
            "--max-tokens",
            "1024",
            "--protect-first",
            "0",
            "--protect-last",
            "0",
            "--strategy",
            "greedy",
            "--pairs",
            "2",
        ];
        args.extend_from_slice(extra);
        let (code, _, stderr) = depthc(&args);
        assert_eq!(code, 0, "{stderr}");
        read_json(&out.join("search-report.json"))
    };
    let exhaustive = run("exhaustive", &["--exhaustive"]);
    let staged = run("staged", &[]);
    let all = exhaustive["calibration"]["windows"].clone();
    let candidates = exhaustive["candidates"].as_array().unwrap();
    // 4 layers: round 1 adds 0-1, 1-2 or 2-3; round 2 the one pair left
    // free beside the kept plan (0-1 or 2-3), or none.
    let round1 = candidates.iter().filter(|c| c["pairs"] == 1).count();
    assert_eq!(round1, 3, "{candidates:?}");
    assert!(candidates.iter().all(|c| c["windows"] == all));
    // Both measure the chosen plan on every window; the staged search, on
    // this model, finds the same plan.
    assert_eq!(staged["chosen"]["windows"], all);
    assert_eq!(staged["chosen_plan"], exhaustive["chosen_plan"]);
    let (a, b) = (
        staged["chosen"]["kl"].as_f64().unwrap(),
        exhaustive["chosen"]["kl"].as_f64().unwrap(),
    );
    assert!((a - b).abs() <= 1e-9 * b.max(1.0), "{a} vs {b}");
}

#[test]
fn two_runs_give_identical_reports_except_timings() {
    let dir = tempfile::tempdir().unwrap();
    let calib = text_path("tempest_gut.txt");
    let mut runs = Vec::new();
    for k in 0..2 {
        let mut r = tiny_search(&dir.path().join(format!("r{k}")), &calib, &["--pairs", "1"]);
        r.as_object_mut().unwrap().remove("timings");
        runs.push(r);
    }
    assert_eq!(runs[0], runs[1]);
}

#[test]
fn search_scores_equal_eval_for_the_same_plan() {
    let dir = tempfile::tempdir().unwrap();
    let calib = text_path("sonnets_gut.txt");
    let report = tiny_search_on(
        &dir.path().join("r"),
        &calib,
        4096,
        &["--pairs", "2", "--metric", "cosine"],
    );
    let all = report["calibration"]["windows"].as_u64().unwrap();
    assert_eq!(report["chosen"]["windows"].as_u64().unwrap(), all);
    let scored = report["candidates"].as_array().unwrap();
    assert!(
        scored.iter().any(|c| c["windows"].as_u64() < Some(all)),
        "nothing left to finish"
    );
    // The chosen plan, and the best plan of every pair count finished on
    // every window with it (the front, scored together).
    let mut plans = vec![(
        report["chosen_plan"].as_str().unwrap().to_string(),
        report["chosen"]["cosine"].as_f64().unwrap(),
        Some(report["chosen"].clone()),
    )];
    for b in report["best_by_pairs"].as_array().unwrap() {
        if b["windows"].as_u64() == Some(all) {
            let plan = b["plan"].as_str().unwrap().to_string();
            plans.push((plan, b["value"].as_f64().unwrap(), None));
        }
    }
    let counts: std::collections::BTreeSet<usize> =
        plans.iter().map(|p| p.0.split(',').count()).collect();
    assert_eq!(counts.len(), 2, "the front of 1 and 2 pairs: {plans:?}");
    for (plan, cosine, full) in plans {
        let (code, stdout, stderr) = depthc(&[
            "eval",
            s(&tiny()),
            "--text",
            s(&calib),
            "--seq-len",
            "16",
            "--max-windows",
            &all.to_string(),
            "--plan",
            &plan,
            "--json",
        ]);
        assert_eq!(code, 0, "{stderr}");
        let eval: Value = serde_json::from_str(&stdout).unwrap();
        let y = eval["cosine"].as_f64().unwrap();
        assert!(
            (cosine - y).abs() <= 1e-6,
            "{plan}: search {cosine} vs eval {y}"
        );
        if let Some(chosen) = full {
            for a in ["kl", "top1_agreement"] {
                let (x, y) = (chosen[a].as_f64().unwrap(), eval[a].as_f64().unwrap());
                assert!((x - y).abs() <= 1e-6, "{a}: search {x} vs eval {y}");
            }
        }
    }
}

#[test]
fn a_plan_two_strategies_reach_has_the_same_scores_in_both() {
    let dir = tempfile::tempdir().unwrap();
    let calib = text_path("sonnets_gut.txt");
    let report = tiny_search_on(&dir.path().join("r"), &calib, 4096, &["--pairs", "2"]);
    let mut seen: std::collections::BTreeMap<String, Vec<(String, Value)>> = Default::default();
    for c in report["candidates"].as_array().unwrap() {
        let key = format!("{} on {}", c["plan"], c["windows"]);
        let scores = serde_json::json!([c["cosine"], c["kl"], c["top1_agreement"]]);
        seen.entry(key)
            .or_default()
            .push((c["strategy"].as_str().unwrap().to_string(), scores));
    }
    // A single pair is a contiguous range and a greedy and beam extension.
    let shared: Vec<_> = seen.values().filter(|v| v.len() > 1).collect();
    assert!(!shared.is_empty(), "{seen:?}");
    for v in shared {
        assert!(v.iter().all(|x| x.1 == v[0].1), "{v:?}");
    }
}

#[test]
fn token_id_files_calibrate_like_the_text_they_came_from() {
    let dir = tempfile::tempdir().unwrap();
    let text = "To be, or not to be, that is the question: ".repeat(40);
    let txt = dir.path().join("c.txt");
    std::fs::write(&txt, &text).unwrap();
    let a = tiny_search(&dir.path().join("a"), &txt, &["--pairs", "1"]);
    // The same ids as .json and as .npy (int64, written by hand: NPY v1 header).
    let (tiny_ckpt, _) = common::load(&tiny());
    let ids = tiny_ckpt.tokenizer.unwrap().encode(&text).unwrap();
    let json = dir.path().join("ids.json");
    std::fs::write(&json, serde_json::to_string(&ids).unwrap()).unwrap();
    let b = tiny_search(&dir.path().join("b"), &json, &["--pairs", "1"]);
    let mut header = format!(
        "{{'descr': '<i8', 'fortran_order': False, 'shape': ({},), }}",
        ids.len()
    );
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut npy = b"\x93NUMPY\x01\x00".to_vec();
    npy.extend_from_slice(&(header.len() as u16).to_le_bytes());
    npy.extend_from_slice(header.as_bytes());
    for &i in &ids {
        npy.extend_from_slice(&(i as i64).to_le_bytes());
    }
    let npy_path = dir.path().join("ids.npy");
    std::fs::write(&npy_path, npy).unwrap();
    let c = tiny_search(&dir.path().join("c"), &npy_path, &["--pairs", "1"]);
    for r in [&b, &c] {
        assert_eq!(r["candidates"], a["candidates"]);
        assert_eq!(r["chosen_plan"], a["chosen_plan"]);
    }
    assert_eq!(b["calibration"]["sources"][0]["kind"], "json-ids");
    assert_eq!(c["calibration"]["sources"][0]["kind"], "npy-ids");
}

#[test]
fn bad_calibration_and_impossible_budgets_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let short = dir.path().join("short.txt");
    std::fs::write(&short, "To be").unwrap();
    let out = dir.path().join("out");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--calib", s(&empty)], "the calibration text is empty"),
        (
            vec!["--calib", s(&short)],
            "give more text or a smaller --seq-len",
        ),
        (vec!["--calib", "/no/such/file"], "does not exist"),
        (
            vec!["--pairs", "9"],
            "ask for fewer pairs or protect fewer layers",
        ),
        (vec!["--max-depth", "4"], "no pairs"),
        (
            vec![
                "--protect-first",
                "2",
                "--protect-last",
                "2",
                "--pairs",
                "1",
            ],
            "protect fewer layers",
        ),
    ];
    let model = tiny();
    for (extra, needle) in cases {
        let mut args = vec!["search", s(&model), "-o", s(&out), "--seq-len", "16"];
        args.extend(extra.iter());
        let (code, _, stderr) = depthc(&args);
        assert_eq!(code, 1, "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(
            stderr.contains(needle),
            "{args:?}: `{stderr}` lacks `{needle}`"
        );
        assert!(!out.exists());
    }
    // A threshold nothing meets.
    let mut args = common::fast_search_args("search", s(&model), s(&out));
    args.extend(["--metric", "cosine", "--min-similarity", "0.99999"]);
    let (code, _, stderr) = depthc(&args);
    assert_eq!(code, 1);
    assert!(stderr.contains("lower --min-similarity"), "{stderr}");
    assert!(!out.exists());
}

/// A checkpoint whose original forward is finite but whose pair 1-2 overflows:
/// layer 1's MLP turns the residual from `e` (all ones) towards `d` (+-1);
/// layer 2's MLP opens its gate for inputs along `e` (and then multiplies by
/// 3e38) and shuts it along `d`. In sequence layer 2 reads `d`: finite; in
/// parallel it reads `e`: infinite. The search must report the plan with the
/// layer where it went non-finite, drop it, and choose another.
#[test]
fn a_candidate_that_goes_non_finite_is_reported_and_dropped() {
    use depthc::checkpoint::safetensors::{self, StoreType};
    let dir = tempfile::tempdir().unwrap();
    let model_dir = dir.path().join("m");
    std::fs::create_dir(&model_dir).unwrap();
    let config = fixture("tiny_llama/hf_f32/config.json");
    std::fs::copy(&config, model_dir.join("config.json")).unwrap();
    let (h, ffn, vocab, q, kv) = (64usize, 96usize, 64usize, 64usize, 32usize);
    let e = vec![1f32; h];
    let d: Vec<f32> = (0..h)
        .map(|i| if i % 2 == 0 { 1.0 } else { -1.0 })
        .collect();
    let zeros = |n: usize| vec![0f32; n];
    let mut t: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    t.push((
        "model.embed_tokens.weight".into(),
        vec![vocab, h],
        e.repeat(vocab),
    ));
    t.push(("model.norm.weight".into(), vec![h], e.clone()));
    t.push((
        "lm_head.weight".into(),
        vec![vocab, h],
        (0..vocab * h)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 1e-3)
            .collect(),
    ));
    for l in 0..4 {
        let p = format!("model.layers.{l}");
        for (name, shape) in [
            ("self_attn.q_proj", [q, h]),
            ("self_attn.k_proj", [kv, h]),
            ("self_attn.v_proj", [kv, h]),
            ("self_attn.o_proj", [h, q]),
        ] {
            t.push((
                format!("{p}.{name}.weight"),
                shape.to_vec(),
                zeros(shape[0] * shape[1]),
            ));
        }
        for norm in ["input_layernorm", "post_attention_layernorm"] {
            t.push((format!("{p}.{norm}.weight"), vec![h], e.clone()));
        }
        let (mut gate, mut up, mut down) = (zeros(ffn * h), zeros(ffn * h), zeros(h * ffn));
        match l {
            // gate 10, up 1 on input e; down writes 1e3 * d: the MLP adds 1e4 * d.
            1 => {
                gate[..h].iter_mut().for_each(|g| *g = 10.0 / h as f32);
                up[..h].iter_mut().for_each(|u| *u = 1.0 / h as f32);
                (0..h).for_each(|r| down[r * ffn] = 1e3 * d[r]);
            }
            // gate +100 along e, -100 along d; up 1 on both; down 3e38 into channel 0.
            2 => {
                (0..h).for_each(|i| gate[i] = 100.0 * (e[i] - d[i]) / h as f32);
                (0..h).for_each(|i| up[i] = (e[i] + d[i]) / h as f32);
                down[0] = 3e38;
            }
            _ => {}
        }
        t.push((format!("{p}.mlp.gate_proj.weight"), vec![ffn, h], gate));
        t.push((format!("{p}.mlp.up_proj.weight"), vec![ffn, h], up));
        t.push((format!("{p}.mlp.down_proj.weight"), vec![h, ffn], down));
    }
    let refs: Vec<(String, Vec<usize>, &[f32])> = t
        .iter()
        .map(|(n, s, v)| (n.clone(), s.clone(), v.as_slice()))
        .collect();
    safetensors::write(&model_dir.join("model.safetensors"), &refs, StoreType::F32).unwrap();
    let tokens =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/bad_inputs/cases/tokens.npy");
    let out = dir.path().join("out");
    let mut args = common::fast_search_args("search", s(&model_dir), s(&out));
    args.extend([
        "--calib",
        s(&tokens),
        "--pairs",
        "1",
        "--strategy",
        "contiguous",
    ]);
    let (code, _, stderr) = depthc(&args);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains(
            "warning: plan `1-2` dropped: non-finite activations (NaN or Inf) first appear in \
             layer 2 (mlp)"
        ),
        "{stderr}"
    );
    let report = read_json(&out.join("search-report.json"));
    let plans: Vec<&str> = report["candidates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["plan"].as_str().unwrap())
        .collect();
    assert!(
        plans.contains(&"2-3") && !plans.contains(&"1-2"),
        "{plans:?}"
    );
    assert_ne!(report["chosen_plan"], "1-2");
}
