//! Search strategies over LP plans, scored against the original model on the
//! calibration windows from the [`ActivationCache`]:
//!
//! - `contiguous`: every even-length range `[s, e)` split into adjacent pairs
//!   (the paper's family; also the landscape of the heatmap);
//! - `greedy`: disjoint adjacent pairs anywhere, adding the pair that costs
//!   least each round, re-scored end to end;
//! - `beam`: the same with the `B` best plans kept each round.
//!
//! Metrics per candidate (means over all calibration positions): cosine of
//! final hidden states (after the final norm), KL(original || candidate) of
//! next-token distributions, top-1 agreement.

use indicatif::ProgressBar;
use rayon::prelude::*;
use serde::Serialize;

use super::cache::ActivationCache;
use super::metrics::{Reference, Similarity};
use crate::forward::ops::{matmul_t, rms_norm};
use crate::forward::{Forward, Logits, Options};
use crate::plan::Plan;
use crate::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Metric {
    Cosine,
    Kl,
    Top1,
}

impl Metric {
    pub fn name(self) -> &'static str {
        match self {
            Metric::Cosine => "cosine",
            Metric::Kl => "kl",
            Metric::Top1 => "top1",
        }
    }
    pub fn of(self, s: &Scores) -> f64 {
        match self {
            Metric::Cosine => s.cosine,
            Metric::Kl => s.kl,
            Metric::Top1 => s.top1_agreement,
        }
    }
    /// Is `a` better than `b`? (KL: lower is better.)
    pub fn better(self, a: f64, b: f64) -> bool {
        match self {
            Metric::Kl => a < b,
            _ => a > b,
        }
    }
    /// Total order, best first (NaN last).
    pub fn order(self, a: f64, b: f64) -> std::cmp::Ordering {
        let key = |v: f64| {
            if v.is_nan() {
                f64::INFINITY
            } else if self == Metric::Kl {
                v
            } else {
                -v
            }
        };
        key(a).total_cmp(&key(b))
    }

    /// Does `v` meet a `--min-similarity` threshold?
    pub fn meets(self, v: f64, threshold: f64) -> bool {
        match self {
            Metric::Kl => v <= threshold,
            _ => v >= threshold,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    Contiguous,
    Greedy,
    Beam,
}

impl Strategy {
    pub fn name(self) -> &'static str {
        match self {
            Strategy::Contiguous => "contiguous",
            Strategy::Greedy => "greedy",
            Strategy::Beam => "beam",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Budget {
    /// Exactly this many pairs.
    Pairs(usize),
    /// The most pairs whose metric still meets this.
    MinSimilarity(f64),
    /// At most this depth (number of steps).
    MaxDepth(usize),
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Scores {
    pub cosine: f64,
    pub kl: f64,
    pub top1_agreement: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Candidate {
    pub plan: Plan,
    pub strategy: Strategy,
    pub pairs: usize,
    pub depth: usize,
    pub first_changed_layer: usize,
    /// Calibration windows this candidate was scored on (racing drops the
    /// clearly worse candidates of a round early).
    pub windows: usize,
    #[serde(flatten)]
    pub scores: Scores,
    #[serde(skip)]
    pub groups: Vec<(usize, usize)>,
}

pub struct SearchSpace {
    pub num_layers: usize,
    pub protect_first: usize,
    pub protect_last: usize,
}

impl SearchSpace {
    /// Layers that may be paired: `[protect_first, L - protect_last)`.
    pub fn range(&self) -> (usize, usize) {
        (
            self.protect_first,
            self.num_layers.saturating_sub(self.protect_last),
        )
    }
    pub fn max_pairs(&self) -> usize {
        let (lo, hi) = self.range();
        hi.saturating_sub(lo) / 2
    }
}

/// Sums of one candidate's metrics over positions.
#[derive(Debug, Clone, Copy, Default)]
struct Sums {
    similarity: Similarity,
    /// Where the NaN/Inf watch stopped this candidate: (layer, sublayer).
    non_finite: Option<(usize, &'static str)>,
}

/// The original on window `w` of the cache, from its last residual.
fn reference(forward: &Forward, last_residual: &[f32]) -> Reference {
    let cfg = &forward.model.config;
    let final_hidden = rms_norm(last_residual, &forward.model.norm, cfg.rms_norm_eps);
    let t = final_hidden.len() / cfg.hidden_size;
    let logits = matmul_t(&final_hidden, t, forward.model.lm_head());
    Reference::new(&logits, final_hidden, cfg.vocab_size)
}

/// One set's racing result.
struct Scored {
    scores: Scores,
    /// Windows it was scored on.
    windows: usize,
    non_finite: Option<(usize, &'static str)>,
}

/// Scores `groups_list` (each a set of pairs) on every cached window, in
/// parallel over candidates.
pub struct Scorer<'a> {
    pub forward: &'a Forward<'a>,
    pub cache: &'a ActivationCache,
    pub progress: &'a ProgressBar,
}

impl Scorer<'_> {
    /// Add the metrics of `plans[i]` for `i` in `alive` over windows `range`.
    fn accumulate(
        &self,
        plans: &[(Plan, usize)],
        alive: &[usize],
        range: std::ops::Range<usize>,
        sums: &mut [Sums],
    ) -> Result<()> {
        let cfg = &self.forward.model.config;
        let layers = cfg.num_hidden_layers;
        for w in range {
            let original = reference(self.forward, &self.cache.residual(w, layers)?);
            let per: Vec<Sums> = alive
                .par_iter()
                .map(|&i| -> Result<Sums> {
                    let (plan, first) = &plans[i];
                    let x = self.cache.residual(w, *first)?;
                    let out = self.forward.run_from(
                        plan,
                        *first,
                        x,
                        Options {
                            logits: Logits::All,
                            capture_residuals: false,
                        },
                    );
                    self.progress.inc(1);
                    match out {
                        Ok(out) => Ok(Sums {
                            similarity: original.compare(&out.final_hidden, &out.logits),
                            non_finite: None,
                        }),
                        Err(Error::NonFinite { layer, sublayer }) => Ok(Sums {
                            non_finite: Some((layer, sublayer)),
                            ..Sums::default()
                        }),
                        Err(e) => Err(e),
                    }
                })
                .collect::<Result<_>>()?;
            for (&i, s) in alive.iter().zip(per) {
                let acc = &mut sums[i];
                acc.non_finite = acc.non_finite.or(s.non_finite);
                acc.similarity.add(&s.similarity);
            }
        }
        Ok(())
    }

    /// Score every set by racing: all on the first W/16 windows, then within
    /// each group (same pair count) the best quarter on W/4, and the best
    /// quarter of those on all W windows. Returns scores and windows used.
    fn score(&self, sets: &[Vec<(usize, usize)>], metric: Metric) -> Result<Vec<Scored>> {
        let layers = self.forward.model.config.num_hidden_layers;
        let plans: Vec<(Plan, usize)> = sets
            .iter()
            .map(|g| {
                let first = g.iter().map(|p| p.0).min().unwrap_or(layers);
                Plan::from_pairs(layers, g).map(|p| (p, first))
            })
            .collect::<Result<_>>()?;
        let total = self.cache.len();
        let mut schedule = vec![(total / 16).max(1), (total / 4).max(1), total];
        schedule.dedup();
        let mut sums = vec![Sums::default(); plans.len()];
        let mut used = vec![0usize; plans.len()];
        let mut alive: Vec<usize> = (0..plans.len()).collect();
        let mut done = 0;
        let mean = |s: &Sums| Scores {
            cosine: s.similarity.mean_cosine(),
            kl: s.similarity.mean_kl(),
            top1_agreement: s.similarity.top1_agreement(),
        };
        for (stage, &upto) in schedule.iter().enumerate() {
            if stage > 0 {
                // Keep the best quarter (at least one) of each pair count.
                let mut keep = Vec::new();
                let mut by_pairs: std::collections::BTreeMap<usize, Vec<usize>> =
                    Default::default();
                for &i in &alive {
                    by_pairs.entry(sets[i].len()).or_default().push(i);
                }
                for (_, mut group) in by_pairs {
                    group.sort_by(|&a, &b| {
                        let (x, y) = (metric.of(&mean(&sums[a])), metric.of(&mean(&sums[b])));
                        metric.order(x, y).then(a.cmp(&b))
                    });
                    group.truncate(group.len().div_ceil(4));
                    keep.extend(group);
                }
                keep.sort();
                alive = keep;
            }
            self.progress
                .inc_length((alive.len() * (upto - done)) as u64);
            self.accumulate(&plans, &alive, done..upto, &mut sums)?;
            alive.retain(|&i| sums[i].non_finite.is_none());
            for &i in &alive {
                used[i] = upto;
            }
            done = upto;
        }
        Ok(sums
            .iter()
            .zip(used)
            .map(|(s, u)| Scored {
                scores: mean(s),
                windows: u,
                non_finite: s.non_finite,
            })
            .collect())
    }

    fn candidates(
        &self,
        sets: Vec<Vec<(usize, usize)>>,
        strategy: Strategy,
        metric: Metric,
    ) -> Result<Vec<Candidate>> {
        let layers = self.forward.model.config.num_hidden_layers;
        let scores = self.score(&sets, metric)?;
        let mut out = Vec::new();
        for (mut groups, scored) in sets.into_iter().zip(scores) {
            groups.sort();
            let plan = Plan::from_pairs(layers, &groups)?;
            if let Some((layer, sublayer)) = scored.non_finite {
                // Reported, never chosen.
                self.progress.suspend(|| {
                    eprintln!(
                        "warning: plan `{plan}` dropped: {}",
                        Error::NonFinite { layer, sublayer }
                    )
                });
                continue;
            }
            let Scored {
                scores, windows, ..
            } = scored;
            out.push(Candidate {
                depth: plan.depth(),
                plan,
                strategy,
                pairs: groups.len(),
                first_changed_layer: groups.first().map_or(layers, |g| g.0),
                windows,
                scores,
                groups,
            });
        }
        Ok(out)
    }

    /// Every even-length range `[s, e)` inside the search space.
    pub fn contiguous(&self, space: &SearchSpace, metric: Metric) -> Result<Vec<Candidate>> {
        let (lo, hi) = space.range();
        let mut sets = Vec::new();
        for s in lo..hi {
            let mut e = s + 2;
            while e <= hi {
                sets.push((s..e).step_by(2).map(|a| (a, a + 1)).collect());
                e += 2;
            }
        }
        self.candidates(sets, Strategy::Contiguous, metric)
    }

    /// Greedy (`width == 1`) or beam search over disjoint adjacent pairs, up
    /// to `max_pairs`; `stop` ends early once a round's best fails it.
    pub fn beam(
        &self,
        space: &SearchSpace,
        width: usize,
        max_pairs: usize,
        metric: Metric,
        stop: Option<f64>,
    ) -> Result<Vec<Candidate>> {
        let strategy = if width <= 1 {
            Strategy::Greedy
        } else {
            Strategy::Beam
        };
        let (lo, hi) = space.range();
        let mut beam: Vec<Vec<(usize, usize)>> = vec![Vec::new()];
        let mut all = Vec::new();
        for _ in 0..max_pairs {
            let mut sets: Vec<Vec<(usize, usize)>> = Vec::new();
            for base in &beam {
                for a in lo..hi.saturating_sub(1) {
                    let free = base.iter().all(|&(x, y)| a > y || a + 1 < x);
                    if !free {
                        continue;
                    }
                    let mut s = base.clone();
                    s.push((a, a + 1));
                    s.sort();
                    if !sets.contains(&s) {
                        sets.push(s);
                    }
                }
            }
            if sets.is_empty() {
                break;
            }
            let mut round = self.candidates(sets, strategy, metric)?;
            if round.is_empty() {
                break;
            }
            // Rank only fully scored candidates.
            let full = self.cache.len();
            round.sort_by(|a, b| {
                let (x, y) = (metric.of(&a.scores), metric.of(&b.scores));
                (b.windows == full)
                    .cmp(&(a.windows == full))
                    .then(metric.order(x, y))
                    .then_with(|| a.plan.to_string().cmp(&b.plan.to_string()))
            });
            let best = metric.of(&round[0].scores);
            beam = round
                .iter()
                .take(width.max(1))
                .map(|c| c.groups.clone())
                .collect();
            all.extend(round);
            if stop.is_some_and(|t| !metric.meets(best, t)) {
                break;
            }
        }
        Ok(all)
    }
}

/// The best candidate with exactly `pairs` pairs.
pub fn best_with(
    candidates: &[Candidate],
    pairs: usize,
    metric: Metric,
    strategy: Option<Strategy>,
) -> Option<&Candidate> {
    let eligible = || {
        candidates
            .iter()
            .filter(move |c| c.pairs == pairs && strategy.is_none_or(|s| c.strategy == s))
    };
    // Only candidates that survived racing to the most windows compete.
    let most = eligible().map(|c| c.windows).max()?;
    eligible()
        .filter(|c| c.windows == most)
        .fold(None, |best: Option<&Candidate>, c| match best {
            Some(b) if !metric.better(metric.of(&c.scores), metric.of(&b.scores)) => Some(b),
            _ => Some(c),
        })
}

/// How many pairs a budget asks for (the upper bound for `MinSimilarity`).
pub fn pairs_for(budget: Budget, space: &SearchSpace) -> Result<usize> {
    let max = space.max_pairs();
    let want = match budget {
        Budget::Pairs(k) => k,
        Budget::MaxDepth(d) => space.num_layers.saturating_sub(d),
        Budget::MinSimilarity(_) => max,
    };
    let (lo, hi) = space.range();
    if want == 0 {
        return Err(Error::Input(format!(
            "the budget asks for no pairs (depth {} already meets it)",
            space.num_layers
        )));
    }
    if want > max {
        return Err(Error::Input(format!(
            "the budget needs {want} pairs but layers {lo}..{hi} (after --protect-first {} and \
             --protect-last {}) hold at most {max}: ask for fewer pairs or protect fewer layers",
            space.protect_first, space.protect_last
        )));
    }
    Ok(want)
}
