//! The `depthc` command line: `inspect` and `eval` outputs, and bad input.
//! Every bad input must end in one line on stderr naming what and where,
//! exit code 1, no panic, and no output left behind.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{fixture, load, real_model_path, text_path};
use depthc::checkpoint::safetensors::{self, StoreType};
use serde_json::Value;

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn depthc(args: &[&str]) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_depthc"))
        .args(args)
        .output()
        .expect("run depthc");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Bad input: exit 1, exactly one line `error: ...` containing every `needle`.
fn fails_with(args: &[&str], needles: &[&str]) {
    let r = depthc(args);
    assert_eq!(r.code, 1, "depthc {args:?}: exit {}\n{}", r.code, r.stderr);
    assert!(!r.stderr.contains("panicked"), "panic: {}", r.stderr);
    let lines: Vec<&str> = r.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "want one line, got:\n{}", r.stderr);
    assert!(lines[0].starts_with("error: "), "{}", lines[0]);
    for n in needles {
        assert!(
            lines[0].contains(n),
            "`{}` does not mention `{n}`",
            lines[0]
        );
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

fn truncate(path: &Path, keep: usize) {
    let bytes = std::fs::read(path).unwrap();
    std::fs::write(path, &bytes[..keep]).unwrap();
}

fn text() -> PathBuf {
    text_path("hamlet_gut.txt")
}

#[test]
fn inspect_json_describes_the_model() {
    let r = depthc(&[
        "inspect",
        s(&fixture("tiny_llama/tiny.q8_0.gguf")),
        "--json",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let v: Value = serde_json::from_str(&r.stdout).expect("one JSON object");
    assert_eq!(v["family"], "llama");
    assert_eq!(v["format"], "gguf");
    assert_eq!(v["layers"], 4);
    assert_eq!(v["hidden_size"], 64);
    assert_eq!(v["attention_heads"], 4);
    assert_eq!(v["kv_heads"], 2);
    assert_eq!(v["head_dim"], 16);
    assert_eq!(v["intermediate_size"], 96);
    assert_eq!(v["vocab_size"], 64);
    assert_eq!(v["dtypes"]["Q8_0"], 30);

    let r = depthc(&["inspect", s(&real_model_path()), "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    // SmolLM2-135M as docs/DESIGN.md section 3 describes it.
    assert_eq!(v["layers"], 30);
    assert_eq!(v["hidden_size"], 576);
    assert_eq!(
        (v["attention_heads"].clone(), v["kv_heads"].clone()),
        (9.into(), 3.into())
    );
    assert_eq!(v["rope_theta"], 100000.0);
    assert_eq!(v["tie_word_embeddings"], true);
    assert_eq!(v["vocab_size"], 49152);
    assert!(v["tokenizer"].as_str().unwrap().contains("smollm"));
}

#[test]
fn eval_json_with_a_plan_compares_against_the_original() {
    let (model, text) = (real_model_path(), text());
    let base = ["eval", s(&model), "--text", s(&text), "--seq-len", "64"];
    let original = depthc(&[&base[..], &["--max-windows", "2", "--json"]].concat());
    assert_eq!(original.code, 0, "{}", original.stderr);
    let o: Value = serde_json::from_str(&original.stdout).unwrap();
    assert_eq!(o["windows"], 2);
    assert_eq!(o["seq_len"], 64);
    assert!(o.get("plan").is_none());

    let r = depthc(
        &[
            &base[..],
            &["--max-windows", "2", "--plan", "20..24", "--json"],
        ]
        .concat(),
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["plan"], "20-21,22-23");
    assert_eq!(v["perplexity_original"], o["perplexity"]);
    let ppl = v["perplexity"].as_f64().unwrap();
    let cosine = v["cosine"].as_f64().unwrap();
    let kl = v["kl"].as_f64().unwrap();
    let top1 = v["top1_agreement"].as_f64().unwrap();
    // The forward is deterministic up to float rounding (AVX-512 or not), so
    // these are the measured values (perplexity 29.57 -> 40.00, cosine
    // 0.96621, KL 0.28664, top-1 0.734375) with room for rounding only.
    assert!(
        ppl > o["perplexity"].as_f64().unwrap(),
        "a plan costs perplexity: {ppl}"
    );
    assert!((ppl - 40.0).abs() < 0.2, "perplexity {ppl}");
    assert!((cosine - 0.9662).abs() < 2e-3, "cosine {cosine}");
    assert!((kl - 0.2866).abs() < 3e-3, "kl {kl}");
    assert!((top1 - 0.734375).abs() <= 0.016, "top1 {top1}");

    // The empty plan is the original model: identical to no plan at all.
    let e = depthc(&[&base[..], &["--max-windows", "2", "--plan", "", "--json"]].concat());
    let e: Value = serde_json::from_str(&e.stdout).unwrap();
    assert_eq!(e["perplexity"], o["perplexity"]);
}

#[test]
fn bad_plans_are_refused() {
    let model = real_model_path();
    let m = s(&model);
    let t = text();
    let t = s(&t);
    for (plan, needle) in [
        ("20-21,21-22", "layer 21 is in two groups"),
        ("20..23", "even length"),
        ("28-30", "out of range"),
        ("20-22x", "plan `20-22x`"),
        ("5-3", "plan `5-3`"),
    ] {
        fails_with(&["eval", m, "--text", t, "--plan", plan], &[needle]);
    }
}

#[test]
fn truncated_and_corrupt_gguf() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("cut.gguf");
    std::fs::copy(fixture("tiny_llama/tiny.q8_0.gguf"), &gguf).unwrap();
    let len = std::fs::metadata(&gguf).unwrap().len() as usize;
    truncate(&gguf, len - 1000);
    fails_with(&["inspect", s(&gguf)], &["cut.gguf", "truncated"]);
    truncate(&gguf, 200);
    fails_with(&["inspect", s(&gguf)], &["cut.gguf", "truncated"]);
    std::fs::write(&gguf, b"GGUF\x03\x00\x00\x00garbage").unwrap();
    fails_with(&["inspect", s(&gguf)], &["cut.gguf"]);
    std::fs::write(&gguf, b"not a model at all").unwrap();
    fails_with(&["inspect", s(&gguf)], &["cut.gguf", "not a GGUF"]);
}

/// Rewrite the type of `tensor` in a GGUF's tensor table (name, n_dims u32,
/// dims u64 each, type u32).
fn patch_gguf_type(path: &Path, tensor: &str, ggml_type: u32) {
    let mut bytes = std::fs::read(path).unwrap();
    let name = tensor.as_bytes();
    // The name is preceded by its u64 length; n_dims follows it.
    let mut at = bytes
        .windows(name.len() + 8)
        .position(|w| &w[8..] == name && w[..8] == (name.len() as u64).to_le_bytes()[..])
        .expect("tensor in the table")
        + 8
        + name.len();
    let n_dims = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
    at += 4 + 8 * n_dims;
    bytes[at..at + 4].copy_from_slice(&ggml_type.to_le_bytes());
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn unsupported_quant_type_names_the_tensor_and_type() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("q2k.gguf");
    std::fs::copy(fixture("tiny_llama/tiny.q8_0.gguf"), &gguf).unwrap();
    patch_gguf_type(&gguf, "blk.1.ffn_up.weight", 10); // Q2_K
                                                       // `inspect` names it up front, before anything loads it.
    let r = depthc(&["inspect", s(&gguf), "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(
        v["unsupported"][0]["tensor"],
        "model.layers.1.mlp.up_proj.weight"
    );
    assert!(v["unsupported"][0]["why"]
        .as_str()
        .unwrap()
        .contains("Q2_K"));
    let r = depthc(&["inspect", s(&gguf)]);
    assert!(
        r.stdout
            .contains("unsupported    model.layers.1.mlp.up_proj.weight"),
        "{}",
        r.stdout
    );
    let out = dir.path().join("out");
    fails_with(
        &["convert", s(&gguf), "-o", s(&out)],
        &["q2k.gguf", "blk.1.ffn_up.weight", "Q2_K"],
    );
    assert!(!out.exists(), "no partial output");
    fails_with(
        &["eval", s(&gguf), "--text", s(&text()), "--seq-len", "8"],
        &["blk.1.ffn_up.weight"],
    );
}

#[test]
fn truncated_and_corrupt_safetensors() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m");
    copy_dir(&fixture("tiny_llama/hf_f32"), &model);
    let st = model.join("model.safetensors");
    let len = std::fs::metadata(&st).unwrap().len() as usize;
    truncate(&st, len - 100);
    fails_with(&["inspect", s(&model)], &["model.safetensors", "truncated"]);
    // A header length pointing past the end of the file.
    std::fs::write(&st, 1_000_000u64.to_le_bytes()).unwrap();
    fails_with(&["inspect", s(&model)], &["model.safetensors"]);
    // A header that is not JSON.
    let mut bad = 16u64.to_le_bytes().to_vec();
    bad.extend_from_slice(b"{\"a\": garbage!!}");
    std::fs::write(&st, bad).unwrap();
    fails_with(&["inspect", s(&model)], &["model.safetensors", "header"]);
    std::fs::remove_file(&st).unwrap();
    fails_with(&["inspect", s(&model)], &["model.safetensors"]);
}

#[test]
fn unknown_architecture_and_bad_config() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m");
    copy_dir(&fixture("tiny_llama/hf_f32"), &model);
    let config = model.join("config.json");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replace("LlamaForCausalLM", "GPTNeoXForCausalLM"),
    )
    .unwrap();
    fails_with(
        &["inspect", s(&model)],
        &["config.json", "GPTNeoXForCausalLM"],
    );
    std::fs::write(&config, "{ not json").unwrap();
    fails_with(&["inspect", s(&model)], &["config.json"]);
    fails_with(&["inspect", "/no/such/model"], &["/no/such/model"]);
}

/// Write the tiny model's tensors back with one change, beside its config.
fn rewritten_tiny(dir: &Path, edit: impl Fn(&mut Vec<(String, Vec<usize>, &[f32])>)) -> PathBuf {
    let (_, model) = load(&fixture("tiny_llama/hf_f32"));
    let named = model.named_tensors();
    let values: Vec<_> = named.iter().map(|(_, _, t)| t.values()).collect();
    let mut tensors: Vec<(String, Vec<usize>, &[f32])> = named
        .iter()
        .zip(&values)
        .map(|((n, shape, _), v)| (n.clone(), shape.clone(), v.as_ref()))
        .collect();
    edit(&mut tensors);
    let out = dir.join("m");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::copy(
        fixture("tiny_llama/hf_f32/config.json"),
        out.join("config.json"),
    )
    .unwrap();
    safetensors::write(&out.join("model.safetensors"), &tensors, StoreType::F32).unwrap();
    out
}

#[test]
fn missing_tensor_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let name = "model.layers.2.mlp.down_proj.weight";
    let model = rewritten_tiny(dir.path(), |t| t.retain(|(n, _, _)| n != name));
    let out = dir.path().join("out");
    fails_with(
        &["convert", s(&model), "-o", s(&out)],
        &["model.safetensors", name, "missing"],
    );
    assert!(!out.exists(), "no partial output");
}

#[test]
fn mis_shaped_tensor_is_named_with_both_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let name = "model.layers.1.self_attn.k_proj.weight";
    let model = rewritten_tiny(dir.path(), |t| {
        let entry = t.iter_mut().find(|(n, _, _)| n == name).unwrap();
        // Same element count, transposed shape.
        entry.1 = vec![entry.1[1], entry.1[0]];
    });
    fails_with(
        &["convert", s(&model), "-o", s(&dir.path().join("out"))],
        &["model.safetensors", name, "[64, 32]", "[32, 64]"],
    );
}

#[test]
fn convert_refuses_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    fails_with(
        &[
            "convert",
            s(&fixture("tiny_llama/tiny.q8_0.gguf")),
            "-o",
            s(dir.path()),
        ],
        &["already exists"],
    );
}

#[test]
fn emit_refuses_bad_plans_and_unwritable_outputs_leaving_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixture("tiny_llama/tiny.q8_0.gguf");
    let out = dir.path().join("out");
    fails_with(
        &["emit", s(&model), "--plan", "3-4", "-o", s(&out)],
        &["plan `3-4`", "out of range"],
    );
    assert!(!out.exists());
    let file = dir.path().join("a-file");
    std::fs::write(&file, "x").unwrap();
    let inside = file.join("out");
    fails_with(
        &["emit", s(&model), "-o", s(&inside)],
        &["a-file", "not a directory"],
    );
    std::fs::create_dir(&out).unwrap();
    fails_with(&["emit", s(&model), "-o", s(&out)], &["already exists"]);
    // Nothing but what the test made: no temporary directory left behind.
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left.len(), 2, "{left:?}");
}

#[test]
fn validate_names_a_missing_runtime_library_and_how_to_get_it() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixture("tiny_llama/tiny.q8_0.gguf");
    let out = dir.path().join("out");
    let r = depthc(&["emit", s(&model), "--plan", "1-2", "-o", s(&out)]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    fails_with(
        &[
            "validate",
            s(&out),
            "--model",
            s(&model),
            "--ort-lib",
            "/no/such/libonnxruntime.so",
        ],
        &[
            "/no/such/libonnxruntime.so",
            "not found",
            &format!("onnxruntime=={}", *depthc::runtime::PINNED_VERSION),
        ],
    );
    // A file that is not a shared library.
    let r = Command::new(env!("CARGO_BIN_EXE_depthc"))
        .args(["validate", s(&out), "--model", s(&model)])
        .env("ORT_DYLIB_PATH", s(&model))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.starts_with("error: ONNX Runtime: cannot load"),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    // Not an emitted directory.
    fails_with(
        &["validate", s(dir.path()), "--model", s(&model)],
        &["no model.onnx"],
    );
}

#[test]
fn emit_then_validate_succeeds_on_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixture("tiny_llama/tiny.q8_0.gguf");
    let out = dir.path().join("out");
    let r = depthc(&[
        "emit",
        s(&model),
        "--plan",
        "0..4",
        "--form",
        "branches",
        "-o",
        s(&out),
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("branches form"), "{}", r.stdout);
    for f in [
        "model.onnx",
        "model.onnx_data",
        "genai_config.json",
        "config.json",
        "tokenizer.json",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let genai: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("genai_config.json")).unwrap())
            .unwrap();
    assert_eq!(genai["search"]["past_present_share_buffer"], false);
    assert_eq!(genai["model"]["decoder"]["num_hidden_layers"], 4);
    let r = depthc(&[
        "validate",
        s(&out),
        "--model",
        s(&model),
        "--steps",
        "4",
        "--json",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["plan"], "0-1,2-3");
    assert_eq!(v["tokens_agree"], true);
    assert_eq!(v["outputs"].as_array().unwrap().len(), 9);
}

#[test]
fn cuda_registration_error_is_reported_verbatim() {
    // The library scripts/setup.sh installs is ONNX Runtime's CPU build.
    let dir = tempfile::tempdir().unwrap();
    let model = fixture("tiny_llama/tiny.q8_0.gguf");
    let out = dir.path().join("out");
    let r = depthc(&["emit", s(&model), "-o", s(&out)]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    fails_with(
        &[
            "validate",
            s(&out),
            "--model",
            s(&model),
            "--device",
            "cuda",
        ],
        &["CUDA execution provider", "not enabled in this build"],
    );
}
