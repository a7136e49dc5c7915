//! Calibration windows and the similarity metrics that compare a plan's
//! outputs with the original model's (perplexity, cosine of final hidden
//! states, KL(original || plan) of next-token distributions, top-1 agreement).

pub mod cache;
pub mod calib;
pub mod metrics;
pub mod strategy;
pub mod tasks;

use std::time::Instant;

use indicatif::ProgressBar;
use serde::Serialize;

use crate::forward::{Forward, KvCache, Logits, Options};
use crate::plan::Plan;
use crate::{Error, Result};
pub use metrics::Agreement;
use metrics::{log_prob, Reference, Similarity};

/// The first `max_windows` non-overlapping windows of `seq_len` tokens, from
/// the start of `ids` (a trailing partial window is dropped). With `bos`
/// (models that need it, see [`ModelConfig::window_bos`]) each window is
/// `bos` and the next `seq_len - 1` tokens.
///
/// [`ModelConfig::window_bos`]: crate::checkpoint::ModelConfig::window_bos
pub fn windows(
    ids: &[u32],
    seq_len: usize,
    max_windows: Option<usize>,
    bos: Option<u32>,
) -> Result<Vec<Vec<u32>>> {
    if seq_len < 2 {
        return Err(Error::Input(format!(
            "--seq-len {seq_len} is too short: at least 2 tokens are needed"
        )));
    }
    let all: Vec<Vec<u32>> = chunks(ids, seq_len, bos)
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

/// Non-overlapping windows of `seq_len` tokens from the start of `ids`, each
/// starting with `bos` when given (then `seq_len - 1` tokens of `ids` each).
pub(crate) fn chunks(
    ids: &[u32],
    seq_len: usize,
    bos: Option<u32>,
) -> impl Iterator<Item = Vec<u32>> + '_ {
    ids.chunks_exact(seq_len - usize::from(bos.is_some()))
        .map(move |c| bos.into_iter().chain(c.iter().copied()).collect())
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
    pub plan: Option<Plan>,
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
    /// Greedy generation against the original's ([`generation_agreement`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub generation: Option<Agreement>,
}

/// Generation agreement on an evaluation text: held-out prompts (the first
/// tokens of its first windows) and greedy tokens generated after each.
pub const HELD_OUT_PROMPTS: usize = 8;
pub const HELD_OUT_PROMPT_TOKENS: usize = 32;
pub const HELD_OUT_GENERATED_TOKENS: usize = 32;

/// Held-out prompts: the first `prompt_tokens` tokens of each of the first
/// `prompts` windows of an evaluation text.
pub fn prompts_of(windows: &[Vec<u32>], prompts: usize, prompt_tokens: usize) -> Vec<Vec<u32>> {
    windows
        .iter()
        .take(prompts)
        .map(|w| w[..prompt_tokens.min(w.len())].to_vec())
        .collect()
}

/// The original's greedy continuations of held-out prompts, against which
/// candidates' generations are compared.
pub struct HeldOut {
    pub prompts: Vec<Vec<u32>>,
    pub tokens: usize,
    original: Vec<Vec<u32>>,
}

impl HeldOut {
    /// `tokens` greedy tokens of the original (`reference` run sequentially)
    /// after each prompt.
    pub fn new(reference: &Forward, prompts: Vec<Vec<u32>>, tokens: usize) -> Result<HeldOut> {
        let original = Plan::sequential(reference.model.config.num_hidden_layers);
        let original = reference.greedy_many(&original, &prompts, tokens)?;
        Ok(HeldOut {
            prompts,
            tokens,
            original,
        })
    }

    /// The candidate (a model and the plan it runs) generating after the same
    /// prompts, compared position by position with the original.
    pub fn agreement(&self, forward: &Forward, plan: &Plan) -> Result<Agreement> {
        Ok(Agreement::of(&self.continuations(forward, plan)?))
    }

    /// Per prompt, the original's continuation and `plan`'s.
    pub fn continuations(
        &self,
        forward: &Forward,
        plan: &Plan,
    ) -> Result<Vec<(Vec<u32>, Vec<u32>)>> {
        let generated = forward.greedy_many(plan, &self.prompts, self.tokens)?;
        Ok(self.original.iter().cloned().zip(generated).collect())
    }
}

/// Perplexity over `windows`; with a non-sequential `plan`, also the plan's
/// similarity to the original on the same windows.
pub fn evaluate(
    forward: &Forward,
    plan: Option<&Plan>,
    windows: &[Vec<u32>],
    progress: &ProgressBar,
) -> Result<EvalReport> {
    evaluate_against(forward, plan.map(|p| (forward, p)), windows, progress)
}

/// Add to `nll` the negative log-likelihood of each next token of `window`
/// under `logits [window, vocab]`, position by position (the last position
/// predicts nothing).
fn add_next_token_nll(nll: &mut f64, logits: &[f32], window: &[u32], vocab: usize) {
    for (pos, &target) in window.iter().skip(1).enumerate() {
        *nll -= log_prob(&logits[pos * vocab..(pos + 1) * vocab], target as usize);
    }
}

/// The perplexity of `plan` alone over `windows` (no reference run).
pub fn perplexity(forward: &Forward, plan: &Plan, windows: &[Vec<u32>]) -> Result<f64> {
    let cfg = &forward.model.config;
    let opts = Options {
        logits: Logits::All,
        capture_residuals: false,
    };
    let (mut nll, mut predictions) = (0f64, 0usize);
    for window in windows {
        let out = forward.run(plan, window, &mut KvCache::new(cfg.num_hidden_layers), opts)?;
        add_next_token_nll(&mut nll, &out.logits, window, cfg.vocab_size);
        predictions += window.len().saturating_sub(1);
    }
    Ok((nll / predictions as f64).exp())
}

/// Perplexity of `reference` (the original model, run sequentially) over
/// `windows`; with a `candidate` (a model and the plan it runs: the same
/// model with an LP plan, or its int4 weights with or without one), also
/// the candidate's perplexity and its similarity to the reference.
pub fn evaluate_against(
    reference: &Forward,
    candidate: Option<(&Forward, &Plan)>,
    windows: &[Vec<u32>],
    progress: &ProgressBar,
) -> Result<EvalReport> {
    let forward = reference;
    let plan = candidate.map(|(_, p)| p);
    let cfg = &forward.model.config;
    let original = Plan::sequential(cfg.num_hidden_layers);
    let vocab = cfg.vocab_size;
    let opts = Options {
        logits: Logits::All,
        capture_residuals: false,
    };
    let mut nll_original = 0f64;
    let mut nll_plan = 0f64;
    let mut comparison = Similarity::default();
    let mut predictions = 0usize;
    for window in windows {
        let reference = forward.run(
            &original,
            window,
            &mut KvCache::new(cfg.num_hidden_layers),
            opts,
        )?;
        let rewritten = match candidate {
            Some((f, p)) => {
                Some(f.run(p, window, &mut KvCache::new(cfg.num_hidden_layers), opts)?)
            }
            None => None,
        };
        add_next_token_nll(&mut nll_original, &reference.logits, window, vocab);
        if let Some(r) = &rewritten {
            add_next_token_nll(&mut nll_plan, &r.logits, window, vocab);
        }
        predictions += window.len().saturating_sub(1);
        if let Some(r) = &rewritten {
            let original = Reference::new(&reference.logits, reference.final_hidden, vocab);
            comparison.add(&original.compare(&r.final_hidden, &r.logits));
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
            generation: None,
        },
        Some(p) => EvalReport {
            perplexity: ppl(nll_plan),
            windows: windows.len(),
            seq_len,
            predictions,
            plan: Some(p.clone()),
            depth: Some(p.depth()),
            perplexity_original: Some(ppl(nll_original)),
            cosine: Some(comparison.mean_cosine()),
            kl: Some(comparison.mean_kl()),
            top1_agreement: Some(comparison.top1_agreement()),
            generation: None,
        },
    })
}

/// What `depthc search` looks for and within which limits.
pub struct SearchOptions {
    pub strategies: Vec<strategy::Strategy>,
    pub beam_width: usize,
    pub budget: strategy::Budget,
    pub space: strategy::SearchSpace,
    pub metric: strategy::Metric,
    /// Residuals kept in memory before spilling to disk.
    pub memory_budget_bytes: u64,
    /// Score every plan a strategy considers on every window and position
    /// ([`strategy::Stages::exhaustive`]): slow, the reference the staged
    /// search is measured against.
    pub exhaustive: bool,
}

/// The best plan found by one strategy for one pair count.
#[derive(Debug, Clone, Serialize)]
pub struct BestAtPairs {
    pub pairs: usize,
    pub strategy: strategy::Strategy,
    pub plan: Plan,
    pub value: f64,
    /// Calibration windows `value` is measured on.
    pub windows: usize,
    /// Generation agreement, perplexity and task accuracy retained: the
    /// depth/quality front, where measured.
    #[serde(flatten)]
    pub quality: Quality,
    /// `search --heal`: the same measures of the plan healed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub healed: Option<HealedScores>,
}

/// What a plan keeps of the original on held-out text and tasks.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Quality {
    /// Greedy generation against the original's on the `--eval` texts'
    /// held-out prompts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub generation: Option<Agreement>,
    /// Perplexity on each `--eval` text, in their order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub perplexity: Vec<f64>,
    /// Accuracy retained on each `--task` (the plan's primary metric over
    /// the original's).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tasks: Vec<tasks::Retained>,
    /// Their mean.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accuracy_retained: Option<f64>,
}

/// A front plan healed on the calibration windows, measured again.
#[derive(Debug, Clone, Serialize)]
pub struct HealedScores {
    /// Groups whose correction was folded in (the others did not improve
    /// on held-out calibration windows).
    pub groups_applied: usize,
    #[serde(flatten)]
    pub quality: Quality,
}

#[derive(Debug, Clone, Serialize)]
pub struct SearchTimings {
    /// Building the activation cache: one full forward of the original
    /// over the calibration tokens (with residual capture and logits).
    pub one_forward_s: f64,
    /// Scoring every candidate of every strategy, and the chosen plan on
    /// every window.
    pub search_s: f64,
    /// Measuring the best plan of every other pair count on every window.
    pub front_s: f64,
    /// Per strategy, its scoring time as a multiple of `one_forward_s`.
    pub strategy_forward_multiples: Vec<(strategy::Strategy, f64)>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SearchOutcome {
    /// Plans scored end to end.
    pub candidates: Vec<strategy::Candidate>,
    /// Every plan the strategies considered, with its local measure.
    pub screened: Vec<strategy::Screened>,
    pub chosen: strategy::Candidate,
    pub reason: String,
    pub best_by_pairs: Vec<BestAtPairs>,
    pub timings: SearchTimings,
    pub cache_memory_bytes: u64,
    pub cache_disk_bytes: u64,
}

/// Build the activation cache, run every strategy, choose a plan for the budget.
pub fn search(
    forward: &Forward,
    windows: &[Vec<u32>],
    opts: &SearchOptions,
    progress: &ProgressBar,
) -> Result<SearchOutcome> {
    use strategy::{best_with, pairs_for, Budget, Scorer, Strategy};
    let want = pairs_for(opts.budget, &opts.space)?;
    let t0 = Instant::now();
    progress.set_length(windows.len() as u64);
    progress.set_message("original forward");
    let cache = cache::ActivationCache::build(forward, windows, opts.memory_budget_bytes, progress)
        .map_err(|e| match e {
            Error::NonFinite { .. } => Error::Input(format!(
                "the original model on the calibration windows: {e}; the checkpoint's \
                     weights there are corrupt or overflow float32"
            )),
            e => e,
        })?;
    let one_forward_s = t0.elapsed().as_secs_f64();
    let stages = if opts.exhaustive {
        strategy::Stages::exhaustive(windows.len())
    } else {
        strategy::Stages::of(windows.len(), windows.first().map_or(1, Vec::len))
    };
    let scorer = Scorer::new(forward, &cache, stages, opts.space.unit, progress);
    let stop = match opts.budget {
        Budget::MinSimilarity(x) => Some(x),
        _ => None,
    };
    let mut candidates = Vec::new();
    let mut screened = Vec::new();
    let mut multiples = Vec::new();
    let t1 = Instant::now();
    for &s in &opts.strategies {
        progress.set_message(s.name());
        let ts = Instant::now();
        let (found, seen) = match s {
            Strategy::Contiguous => scorer.contiguous(&opts.space, want)?,
            Strategy::Greedy => scorer.beam(&opts.space, 1, want, opts.metric, stop)?,
            Strategy::Beam => {
                scorer.beam(&opts.space, opts.beam_width.max(2), want, opts.metric, stop)?
            }
        };
        multiples.push((s, ts.elapsed().as_secs_f64() / one_forward_s));
        candidates.extend(found);
        screened.extend(seen);
    }
    let metric = opts.metric;
    // The best plan of every pair count is scored again on every window and
    // position, so that the budget chooses among, and the front shows, what
    // `depthc eval` gives (for a similarity floor: from the most pairs down,
    // until one still meets it there, and then the rest of the front).
    progress.set_message("finish");
    let unfinished = |c: &strategy::Candidate| c.windows < windows.len() || stages.score_stride > 1;
    // A finished plan replaces its entry among the candidates.
    fn put_back(candidates: &mut [strategy::Candidate], c: strategy::Candidate) {
        if let Some(slot) = candidates
            .iter_mut()
            .find(|x| x.plan == c.plan && x.strategy == c.strategy)
        {
            *slot = c;
        }
    }
    let mut finish = |pairs: usize| -> Result<Option<strategy::Candidate>> {
        let Some(c) = best_with(&candidates, pairs, metric, None) else {
            return Ok(None);
        };
        let mut c = c.clone();
        if unfinished(&c) {
            scorer.finish(&mut c)?;
        }
        put_back(&mut candidates, c.clone());
        Ok(Some(c))
    };
    let mut finished = want + 1;
    if let Budget::MinSimilarity(x) = opts.budget {
        for k in (1..=want).rev() {
            finished = k;
            if finish(k)?.is_some_and(|c| metric.meets(metric.of(&c.scores), x)) {
                break;
            }
        }
    }
    let search_s = t1.elapsed().as_secs_f64();
    let t2 = Instant::now();
    // The rest of the front, scored together.
    let mut rest: Vec<strategy::Candidate> = (1..finished.min(want + 1))
        .filter_map(|k| best_with(&candidates, k, metric, None).cloned())
        .filter(unfinished)
        .collect();
    scorer.finish_all(&mut rest)?;
    for c in rest {
        put_back(&mut candidates, c);
    }
    let front_s = t2.elapsed().as_secs_f64();
    let best_by_pairs = best_by_pairs(&candidates, opts);
    let (chosen, reason) = choose(&candidates, opts, want)?;
    Ok(SearchOutcome {
        candidates,
        screened,
        chosen,
        reason,
        best_by_pairs,
        timings: SearchTimings {
            one_forward_s,
            search_s,
            front_s,
            strategy_forward_multiples: multiples,
        },
        cache_memory_bytes: cache.memory_bytes,
        cache_disk_bytes: cache.disk_bytes,
    })
}

/// The best plan of each pair count from each strategy.
fn best_by_pairs(candidates: &[strategy::Candidate], opts: &SearchOptions) -> Vec<BestAtPairs> {
    let metric = opts.metric;
    let mut best_by_pairs = Vec::new();
    for pairs in 1..=opts.space.max_pairs() {
        for &s in &opts.strategies {
            if let Some(c) = strategy::best_with(candidates, pairs, metric, Some(s)) {
                best_by_pairs.push(BestAtPairs {
                    pairs,
                    strategy: s,
                    plan: c.plan.clone(),
                    value: metric.of(&c.scores),
                    windows: c.windows,
                    quality: Quality::default(),
                    healed: None,
                });
            }
        }
    }
    best_by_pairs
}

/// The plan the budget chooses among `candidates` (`want` pairs at most),
/// and why.
fn choose(
    candidates: &[strategy::Candidate],
    opts: &SearchOptions,
    want: usize,
) -> Result<(strategy::Candidate, String)> {
    use strategy::{best_with, Budget};
    let metric = opts.metric;
    let unit = opts.space.unit;
    Ok(match opts.budget {
        Budget::MinSimilarity(x) => {
            let k = (1..=want)
                .rev()
                .find(|&k| {
                    best_with(candidates, k, metric, None)
                        .is_some_and(|c| metric.meets(metric.of(&c.scores), x))
                })
                .ok_or_else(|| {
                    Error::Input(format!(
                        "no plan keeps {} {} {x}, not even with {}: lower --min-similarity",
                        metric.name(),
                        if metric == strategy::Metric::Kl {
                            "<="
                        } else {
                            ">="
                        },
                        unit.count(1)
                    ))
                })?;
            let c = best_with(candidates, k, metric, None).expect("found above");
            let reason = format!(
                "{}, the most whose best plan keeps {} {} {x} ({:.6})",
                unit.count(k),
                metric.name(),
                if metric == strategy::Metric::Kl {
                    "<="
                } else {
                    ">="
                },
                metric.of(&c.scores)
            );
            (c.clone(), reason)
        }
        _ => {
            let c = best_with(candidates, want, metric, None).ok_or_else(|| {
                Error::Input(format!(
                    "no strategy produced a plan with {}",
                    unit.count(want)
                ))
            })?;
            let n = opts.strategies.len();
            let reason = format!(
                "the best {} of every plan with {} scored ({n} {}: {})",
                metric.name(),
                unit.count(want),
                if n == 1 { "strategy" } else { "strategies" },
                opts.strategies
                    .iter()
                    .map(|s| s.name())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            (c.clone(), reason)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::windows;

    #[test]
    fn windows_start_with_bos_when_the_model_needs_it() {
        let ids: Vec<u32> = (10..20).collect();
        assert_eq!(
            windows(&ids, 4, None, None).unwrap(),
            [vec![10, 11, 12, 13], vec![14, 15, 16, 17]]
        );
        assert_eq!(
            windows(&ids, 4, Some(2), Some(2)).unwrap(),
            [vec![2, 10, 11, 12], vec![2, 13, 14, 15]]
        );
        assert!(windows(&ids[..2], 4, None, Some(2)).is_err());
    }
}
