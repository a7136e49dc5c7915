//! Calibration windows and the similarity metrics that compare a plan's
//! outputs with the original model's (perplexity, cosine of final hidden
//! states, KL(original || plan) of next-token distributions, top-1 agreement).

pub mod metrics;

use indicatif::ProgressBar;
use serde::Serialize;

use crate::forward::{Forward, KvCache, Logits, Options};
use crate::plan::Plan;
use crate::{Error, Result};
use metrics::{cosine, log_softmax, PlanComparison};

/// The first `max_windows` non-overlapping windows of `seq_len` tokens, from
/// the start of `ids` (a trailing partial window is dropped).
pub fn windows(ids: &[u32], seq_len: usize, max_windows: Option<usize>) -> Result<Vec<&[u32]>> {
    if seq_len < 2 {
        return Err(Error::Input(format!(
            "--seq-len {seq_len} is too short: at least 2 tokens are needed"
        )));
    }
    let all: Vec<&[u32]> = ids
        .chunks_exact(seq_len)
        .take(max_windows.unwrap_or(usize::MAX))
        .collect();
    if all.is_empty() {
        return Err(Error::Input(format!(
            "the text has {} tokens, fewer than one window of {seq_len}",
            ids.len()
        )));
    }
    Ok(all)
}

/// Result of `depthc eval`.
#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    /// Perplexity of the plan (of the original model when no plan is given).
    pub perplexity: f64,
    pub windows: usize,
    pub seq_len: usize,
    /// Next-token predictions scored: `windows * (seq_len - 1)`.
    pub predictions: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plan: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub depth: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub perplexity_original: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cosine: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kl: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top1_agreement: Option<f64>,
}

/// Perplexity over `windows`; with a non-sequential `plan`, also the plan's
/// similarity to the original on the same windows.
pub fn evaluate(
    forward: &Forward,
    plan: Option<&Plan>,
    windows: &[&[u32]],
    progress: &ProgressBar,
) -> Result<EvalReport> {
    let cfg = &forward.model.config;
    let original = Plan::sequential(cfg.num_hidden_layers);
    let (vocab, hidden) = (cfg.vocab_size, cfg.hidden_size);
    let opts = Options {
        logits: Logits::All,
        capture_residuals: false,
    };
    let mut nll_original = 0f64;
    let mut nll_plan = 0f64;
    let mut comparison = PlanComparison::default();
    let mut predictions = 0usize;
    for window in windows {
        let reference = forward.run(
            &original,
            window,
            &mut KvCache::new(cfg.num_hidden_layers),
            opts,
        )?;
        let rewritten = match plan {
            Some(p) => {
                Some(forward.run(p, window, &mut KvCache::new(cfg.num_hidden_layers), opts)?)
            }
            None => None,
        };
        for pos in 0..window.len() {
            let lp_o = log_softmax(&reference.logits[pos * vocab..(pos + 1) * vocab]);
            let next = window.get(pos + 1).map(|&id| id as usize);
            if let Some(target) = next {
                nll_original -= lp_o[target];
                predictions += 1;
            }
            if let Some(r) = &rewritten {
                let lp_p = log_softmax(&r.logits[pos * vocab..(pos + 1) * vocab]);
                if let Some(target) = next {
                    nll_plan -= lp_p[target];
                }
                let span = pos * hidden..(pos + 1) * hidden;
                comparison.add(
                    &lp_o,
                    &lp_p,
                    cosine(&reference.final_hidden[span.clone()], &r.final_hidden[span]),
                );
            }
        }
        progress.inc(1);
    }
    let ppl = |nll: f64| (nll / predictions as f64).exp();
    let seq_len = windows[0].len();
    Ok(match plan {
        None => EvalReport {
            perplexity: ppl(nll_original),
            windows: windows.len(),
            seq_len,
            predictions,
            plan: None,
            depth: None,
            perplexity_original: None,
            cosine: None,
            kl: None,
            top1_agreement: None,
        },
        Some(p) => EvalReport {
            perplexity: ppl(nll_plan),
            windows: windows.len(),
            seq_len,
            predictions,
            plan: Some(p.to_string()),
            depth: Some(p.depth()),
            perplexity_original: Some(ppl(nll_original)),
            cosine: Some(comparison.mean_cosine()),
            kl: Some(comparison.mean_kl()),
            top1_agreement: Some(comparison.top1_agreement()),
        },
    })
}
