//! llama.cpp runs depthc's GGUF output (`--format gguf`, architecture
//! `deci`): node-llama-cpp 3.22.1's prebuilt CPU binary (`tests/llama/`,
//! pinned by its package-lock.json; `scripts/setup.sh` installs it, nothing
//! is compiled) generates the greedy tokens of depthc's reference forward of
//! the same plan with the weights as written
//! ([`depthc::llamacpp::weights_as_written`]), and its next-token logits
//! after the prompt are compared with the reference's (KL, max difference).
//! The unmodified SmolLM2 GGUF in llama.cpp against depthc's reader is the
//! independent check of the reader.

mod common;

use std::path::{Path, PathBuf};

use common::{fixture, load, real_model_path, text_path};
use depthc::forward::{Forward, KvCache, Logits, Options};
use depthc::llamacpp::{weights_as_written, Encoding};
use depthc::model::Model;
use depthc::plan::Plan;
use serde_json::Value;

const PROMPT: &str = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind";

/// `node tests/llama/generate.mjs GGUF N IDS LOGITS`: greedy tokens and the
/// logits after the prompt.
fn llama_cpp(gguf: &Path, n: usize, prompt: &[u32]) -> (Vec<u32>, Vec<f32>) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/llama");
    assert!(
        dir.join("node_modules/node-llama-cpp").is_dir(),
        "node-llama-cpp missing: run scripts/setup.sh"
    );
    let tmp = tempfile::tempdir().unwrap();
    let logits_path = tmp.path().join("logits.f32");
    let ids: Vec<String> = prompt.iter().map(|t| t.to_string()).collect();
    let out = std::process::Command::new("node")
        .arg("generate.mjs")
        .arg(gguf)
        .arg(n.to_string())
        .arg(ids.join(","))
        .arg(&logits_path)
        .current_dir(&dir)
        .output()
        .expect("run node");
    assert!(
        out.status.success(),
        "llama.cpp failed on {}:\n{}",
        gguf.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    let tokens = v["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap() as u32)
        .collect();
    let bytes = std::fs::read(&logits_path).unwrap();
    let logits = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    (tokens, logits)
}

/// The reference's logits after `ids` (the last position).
fn last_logits(model: &Model, plan: &Plan, ids: &[u32]) -> Vec<f32> {
    let mut cache = KvCache::new(model.config.num_hidden_layers);
    Forward::new(model)
        .run(
            plan,
            ids,
            &mut cache,
            Options {
                logits: Logits::Last,
                capture_residuals: false,
            },
        )
        .expect("forward")
        .logits
}

/// KL(p || q) of two logit rows, in nats.
fn kl(p: &[f32], q: &[f32]) -> f64 {
    let lse = |x: &[f32]| {
        let m = x.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
        m + x.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln()
    };
    let (lp, lq) = (lse(p), lse(q));
    p.iter()
        .zip(q)
        .map(|(&a, &b)| {
            let la = a as f64 - lp;
            la.exp() * (la - (b as f64 - lq))
        })
        .sum()
}

/// llama.cpp's greedy tokens equal the reference's, and its logits after
/// the prompt are within `max_kl` of the reference's. Where llama.cpp's
/// choice differs at some step, the flip must be a near-tie: on the
/// reference's own prefix (evaluated in one batch, which llama.cpp computes
/// a little differently from token by token), llama.cpp's logits are again
/// within `max_kl`, and the reference prefers its token to llama.cpp's by at
/// most [`TIE`]; the flip and both margins are shown and the comparison
/// stops there.
fn check(gguf: &Path, model: &Model, plan: &Plan, prompt: &[u32], n: usize, max_kl: f64) {
    let f = Forward::new(model);
    let want = f.greedy(plan, prompt, n).unwrap();
    let (got, logits) = llama_cpp(gguf, n, prompt);
    let reference = last_logits(model, plan, prompt);
    assert_eq!(logits.len(), reference.len(), "vocabulary");
    let d = kl(&reference, &logits);
    let max_diff = common::max_abs_diff(&reference, &logits);
    eprintln!(
        "{}: KL(reference || llama.cpp) {d:.2e}, max |logit difference| {max_diff:.4}\n  \
         llama.cpp {got:?}\n  reference {want:?}",
        gguf.display()
    );
    assert!(d <= max_kl, "KL {d} > {max_kl}");
    for (i, (&a, &b)) in got.iter().zip(&want).enumerate() {
        if a == b {
            continue;
        }
        let mut ids = prompt.to_vec();
        ids.extend(&want[..i]);
        let r = last_logits(model, plan, &ids);
        let (_, l) = llama_cpp(gguf, 1, &ids);
        let (mr, ml) = (r[b as usize] - r[a as usize], l[a as usize] - l[b as usize]);
        let d = kl(&r, &l);
        eprintln!(
            "  step {i}: llama.cpp {a}, reference {b}; on the reference's prefix: KL {d:.2e}, \
             margins: the reference's {mr:.4}, llama.cpp's {ml:.4}"
        );
        assert!(d <= max_kl, "step {i}: KL {d} > {max_kl}");
        assert!(
            mr <= TIE,
            "step {i}: not a near-tie: the reference's margin {mr} > {TIE}"
        );
        return;
    }
    assert_eq!(got.len(), want.len(), "tokens generated");
}

/// The largest disagreement accepted as a near-tie (logits): llama.cpp's
/// quantised products (activations rounded to 8 bits) move the top logits of
/// the unmodified SmolLM2 by up to about 1 against depthc's float32 forward.
const TIE: f32 = 1.0;

fn emit(source: &Path, plan: &str, out: &Path) {
    emit_with(source, plan, out, &[]);
}

fn emit_with(source: &Path, plan: &str, out: &Path, extra: &[&str]) {
    let args = [
        "emit",
        source.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--format",
        "gguf",
        "--plan",
        plan,
    ];
    let (code, stdout, stderr) = common::run_depthc(&[&args[..], extra].concat());
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("llama.cpp `deci`"), "{stdout}");
}

fn prompt_of(path: &Path) -> Vec<u32> {
    let (ckpt, _) = load(path);
    let tok = ckpt.tokenizer.expect("a tokenizer");
    let mut ids = tok.encode(PROMPT).unwrap();
    if ckpt.config.add_bos {
        ids.insert(0, ckpt.config.bos_token_id.expect("a BOS id"));
    }
    ids
}

#[test]
fn llama_cpp_runs_smollm2_as_depthc_reads_it() {
    let path = real_model_path();
    let (_, model) = load(&path);
    let plan = Plan::sequential(model.config.num_hidden_layers);
    check(&path, &model, &plan, &prompt_of(&path), 16, 0.05);
}

/// `spec` on SmolLM2, emitted as a GGUF with `--gguf-encoding enc`: llama.cpp
/// generates the reference forward's tokens of the weights as written.
fn smollm2_plan_in_llama_cpp(spec: &str, enc: Encoding) {
    let path = real_model_path();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let name = enc.name().to_lowercase();
    emit_with(&path, spec, &out, &["--gguf-encoding", &name]);
    let (_, model) = load(&path);
    let plan = Plan::parse(spec, model.config.num_hidden_layers).unwrap();
    let written = weights_as_written(&model, &plan, enc).unwrap();
    check(
        &out.join(depthc::llamacpp::FILE),
        &written,
        &plan,
        &prompt_of(&path),
        16,
        0.05,
    );
}

#[test]
fn a_smollm2_plan_in_llama_cpp_generates_the_reference_tokens() {
    smollm2_plan_in_llama_cpp("12-13,14-15,17-18,21-22,24-25,26-27", Encoding::Q8_0);
}

#[test]
fn a_plan_that_drops_layers_in_llama_cpp_generates_the_reference_tokens() {
    // The file holds the 26 layers left (the pair as one): llama.cpp runs
    // the model without the dropped ones.
    smollm2_plan_in_llama_cpp("d12,14-15,d20-21", Encoding::F32);
}

/// A healed plan (`--heal`: corrected down_proj weights, written in the
/// encoding asked for) in llama.cpp: the tokens of the reference forward
/// with the healed weights as written.
#[test]
fn a_healed_plan_in_llama_cpp_generates_the_reference_tokens() {
    let path = real_model_path();
    let spec = "12-13,14-15,17-18,21-22,24-25,26-27";
    let macbeth = text_path("macbeth_gut.txt");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    emit_with(
        &path,
        spec,
        &out,
        &[
            "--gguf-encoding",
            "q8_0",
            "--heal",
            "--calib",
            macbeth.to_str().unwrap(),
            "--max-tokens",
            "2048",
        ],
    );
    let (ckpt, model) = load(&path);
    let plan = Plan::parse(spec, model.config.num_hidden_layers).unwrap();
    let healed = common::healed(&path, &ckpt, &model, &plan, &macbeth, 2048);
    let written = weights_as_written(&healed, &plan, Encoding::Q8_0).unwrap();
    check(
        &out.join(depthc::llamacpp::FILE),
        &written,
        &plan,
        &prompt_of(&path),
        16,
        0.05,
    );
}

#[test]
fn compile_format_gguf_writes_what_llama_cpp_runs() {
    // The whole command: search (short), then model.gguf and the report.
    let path = real_model_path();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let (code, stdout, stderr) = common::run_depthc(&[
        "compile",
        path.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--format",
        "gguf",
        "--pairs",
        "3",
        "--strategy",
        "greedy",
        "--max-tokens",
        "1024",
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("llama.cpp `deci`, 27 layers"), "{stdout}");
    let names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    assert_eq!(names, ["model.gguf", "report"]);
    let report: Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("report/search-report.json")).unwrap(),
    )
    .unwrap();
    let spec = report["chosen_plan"].as_str().unwrap();
    let gguf = out.join(depthc::llamacpp::FILE);
    let meta = common::run_python("check_gguf.py", &[gguf.to_str().unwrap()]);
    assert_eq!(meta["meta"]["depthc.plan"], spec);
    let (_, model) = load(&path);
    let plan = Plan::parse(spec, model.config.num_hidden_layers).unwrap();
    let written = weights_as_written(&model, &plan, Encoding::Q8_0).unwrap();
    // The plan is the search's, the prompt's continuation less certain: the
    // KL bound is that of llama.cpp's own noise at some positions (on the
    // unmodified SmolLM2 from 1.7e-4 to 2.0e-2 over the prompt's last 8).
    check(&gguf, &written, &plan, &prompt_of(&path), 16, 0.1);
}

#[test]
fn a_hugging_face_source_gets_the_vocabulary_llama_cpp_had() {
    // SmolLM2 converted to a Hugging Face directory (bf16 safetensors and
    // tokenizer.json), then written as a GGUF: its tokenizer keys are written
    // from tokenizer.json and must be the original GGUF's, and llama.cpp must
    // generate the reference tokens of the plan from the directory.
    let gguf_src = real_model_path();
    let dir = tempfile::tempdir().unwrap();
    let hf = dir.path().join("hf");
    let (code, _, stderr) = common::run_depthc(&[
        "convert",
        gguf_src.to_str().unwrap(),
        "-o",
        hf.to_str().unwrap(),
        "--dtype",
        "bf16",
    ]);
    assert_eq!(code, 0, "{stderr}");
    let spec = "14-15,17-18,21-22";
    let out = dir.path().join("out");
    emit(&hf, spec, &out);
    let gguf = out.join(depthc::llamacpp::FILE);
    let (orig, written_file) = (
        depthc::checkpoint::gguf::GgufFile::open(&gguf_src).unwrap(),
        depthc::checkpoint::gguf::GgufFile::open(&gguf).unwrap(),
    );
    for key in [
        "tokenizer.ggml.model",
        "tokenizer.ggml.pre",
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.merges",
        "tokenizer.ggml.token_type",
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
    ] {
        assert_eq!(
            written_file.raw_value(key),
            orig.raw_value(key),
            "{key}: written from tokenizer.json, against the original GGUF's"
        );
    }
    // Every matrix outside the groups is the directory's bf16, as stored.
    let v = common::run_python("check_gguf.py", &[gguf.to_str().unwrap()]);
    let types: Vec<&str> = v["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["name"] == "blk.0.ffn_down.weight" || t["name"] == "blk.14.attn_q.weight")
        .map(|t| t["type"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["BF16", "Q8_0"]);
    let (_, model) = load(&hf);
    let plan = Plan::parse(spec, model.config.num_hidden_layers).unwrap();
    let written = weights_as_written(&model, &plan, Encoding::Q8_0).unwrap();
    check(&gguf, &written, &plan, &prompt_of(&hf), 16, 0.05);
}

#[test]
fn a_qwen2_plan_in_llama_cpp_generates_the_reference_tokens() {
    // Qwen2 GGUFs keep Q/K rows in Hugging Face order (their rotation is not
    // interleaved): the writer permutes them, biases too, for `deci`.
    let path = fixture("families/qwen2.gguf");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    emit(&path, "0-1,2-3", &out);
    let (_, model) = load(&path);
    let plan = Plan::parse("0-1,2-3", 4).unwrap();
    let written = weights_as_written(&model, &plan, Encoding::Q8_0).unwrap();
    check(
        &out.join(depthc::llamacpp::FILE),
        &written,
        &plan,
        &[1, 5, 9, 13, 20, 31],
        8,
        1e-3,
    );
}

#[test]
fn gguf_py_reads_the_per_layer_counts_and_every_tensor() {
    let path = fixture("families/qwen2.gguf");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    emit(&path, "1-2", &out);
    let gguf = out.join(depthc::llamacpp::FILE);
    let v = common::run_python("check_gguf.py", &[gguf.to_str().unwrap()]);
    let m = &v["meta"];
    assert_eq!(m["general.architecture"], "deci");
    assert_eq!(m["depthc.plan"], "1-2");
    // Layers 0, [1 2], 3: the group has twice the heads, KV heads and FFN.
    assert_eq!(m["deci.block_count"], 3);
    assert_eq!(m["deci.attention.head_count"], serde_json::json!([4, 8, 4]));
    assert_eq!(
        m["deci.attention.head_count_kv"],
        serde_json::json!([2, 4, 2])
    );
    assert_eq!(
        m["deci.feed_forward_length"],
        serde_json::json!([96, 192, 96])
    );
    assert_eq!(m["deci.rope.dimension_count"], 16);
    assert_eq!(v["tokens"], 64);
    assert_eq!(v["aligned"], true);
    let tensors = v["tensors"].as_array().unwrap();
    let of = |name: &str| {
        tensors
            .iter()
            .find(|t| t["name"] == name)
            .unwrap_or_else(|| panic!("{name}"))
    };
    // The group's input projections are encoded again (norms folded in),
    // its output projections are the layers' float32 side by side; the
    // other layers' tensors are as stored (float32 here).
    assert_eq!(of("blk.1.attn_q.weight")["type"], "Q8_0");
    assert_eq!(
        of("blk.1.attn_q.weight")["shape"],
        serde_json::json!([64, 128])
    );
    assert_eq!(of("blk.1.attn_q.bias")["shape"], serde_json::json!([128]));
    assert_eq!(of("blk.1.ffn_down.weight")["type"], "F32");
    assert_eq!(
        of("blk.1.ffn_down.weight")["shape"],
        serde_json::json!([192, 64])
    );
    assert_eq!(of("blk.0.attn_q.weight")["type"], "F32");
    assert_eq!(
        of("blk.2.attn_k.weight")["shape"],
        serde_json::json!([64, 32])
    );
    // 2 + 3 layers x 12 tensors (q/k/v biases included) + the untied head.
    assert_eq!(tensors.len(), 3 + 3 * 12);
}

#[test]
fn what_llama_cpp_cannot_hold_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let gemma = common::gemma_path();
    let cases: Vec<(PathBuf, Vec<&str>, &str)> = vec![
        (
            fixture("families/qwen3.gguf"),
            vec!["--plan", "1-2"],
            "Qwen3 normalises each query and key head",
        ),
        (
            gemma,
            vec!["--plan", "6-7"],
            "Gemma 3 normalises each sublayer's output",
        ),
        (
            fixture("families/qwen2.gguf"),
            vec!["--plan", "1-2", "--form", "branches"],
            "--form branches",
        ),
        (
            fixture("families/qwen2"),
            vec!["--plan", "1-2"],
            "has no tokenizer.json",
        ),
    ];
    for (i, (model, extra, needle)) in cases.into_iter().enumerate() {
        let out = dir.path().join(format!("out{i}"));
        let mut args = vec![
            "emit",
            model.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--format",
            "gguf",
        ];
        args.extend(extra);
        let (code, _, stderr) = common::run_depthc(&args);
        assert_ne!(code, 0, "{args:?}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
        assert!(!out.exists(), "nothing written for {args:?}");
    }
}

/// Qwen2.5-Coder-1.5B (Q4_K_M) with 4 pairs: about 2 minutes on 2 cores, so
/// off the default run: `cargo test --release --test llamacpp -- --ignored`.
#[test]
#[ignore]
fn a_qwen2_5_plan_in_llama_cpp_generates_the_reference_tokens() {
    let path = common::qwen2_5_path();
    let dir = tempfile::tempdir().unwrap();
    let spec = "9-10,14-15,17-18,19-20";
    let out = dir.path().join("out");
    emit(&path, spec, &out);
    let (_, model) = load(&path);
    let plan = Plan::parse(spec, model.config.num_hidden_layers).unwrap();
    let written = weights_as_written(&model, &plan, Encoding::Q8_0).unwrap();
    check(
        &out.join(depthc::llamacpp::FILE),
        &written,
        &plan,
        &prompt_of(&path),
        16,
        0.05,
    );
}
