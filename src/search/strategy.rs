//! Search strategies over LP plans, scored against the original model on the
//! calibration windows from the [`ActivationCache`]:
//!
//! - `contiguous`: every even-length range `[s, e)` split into adjacent pairs
//!   (the paper's family; also the landscape of the heatmap);
//! - `greedy`: disjoint adjacent pairs anywhere, adding the pair that costs
//!   least each round, re-scored end to end;
//! - `beam`: the same with the `B` best plans kept each round.
//!
//! Every plan a strategy considers is first screened ([`Screened`]: a
//! contiguous range by how far its changed span moves the residual stream, a
//! greedy or beam extension by the loss its pairs predict); only the closest
//! are scored end to end ([`Stages`]), on at least [`COMMIT_TOKENS`]. Metrics per scored candidate
//! (means over the positions scored): cosine of final hidden states (after
//! the final norm), KL(original || candidate) of next-token distributions,
//! top-1 agreement.

use indicatif::ProgressBar;
use rayon::prelude::*;
use serde::Serialize;

use super::cache::ActivationCache;
use super::metrics::{Reference, Similarity};
use crate::forward::ops::{matmul_t, rms_norm};
use crate::forward::{Forward, Logits, Options};
use crate::plan::{ParallelGroup, Plan, Step};
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

    /// How far `v` is from the original's own value (KL: `v`; cosine and
    /// top-1: `1 - v`): what the pairs of a plan add up to, nearly.
    pub fn loss(self, v: f64) -> f64 {
        match self {
            Metric::Kl => v,
            _ => 1.0 - v,
        }
    }

    /// The value at `loss` ([`Metric::loss`] inverted).
    pub fn at_loss(self, loss: f64) -> f64 {
        self.loss(loss)
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

impl Budget {
    /// In words, for messages: `6 pairs`, `depth 24 at most`.
    pub fn describe(&self, metric: Metric, unit: Unit) -> String {
        match *self {
            Budget::Pairs(k) => unit.count(k),
            Budget::MinSimilarity(x) => format!(
                "the most {} keeping {} {} {x}",
                unit.plural(),
                metric.name(),
                if metric == Metric::Kl { "<=" } else { ">=" }
            ),
            Budget::MaxDepth(d) => format!("depth {d} at most"),
        }
    }
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
    /// Calibration windows this candidate was scored on end to end: the
    /// scoring stage's ([`Stages`]), or all of them for the plan the budget
    /// chooses.
    pub windows: usize,
    #[serde(flatten)]
    pub scores: Scores,
    #[serde(skip)]
    pub groups: Vec<(usize, usize)>,
    /// The windows scored at every position and the sums there, which
    /// [`Scorer::finish`] adds to.
    #[serde(skip)]
    pub scored: Option<(Vec<usize>, Similarity)>,
}

/// What a search adds to a plan, one at a time: a pair of adjacent layers
/// run in parallel (Layer Parallelism), or, as the baseline it is measured
/// against, a layer dropped (depth pruning). Either takes one step of depth
/// away; the budget's "pairs" count these.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Unit {
    #[default]
    Pair,
    Drop,
}

impl Unit {
    pub fn name(self) -> &'static str {
        match self {
            Unit::Pair => "pair",
            Unit::Drop => "drop",
        }
    }

    /// Layers one unit spans.
    pub fn span(self) -> usize {
        match self {
            Unit::Pair => 2,
            Unit::Drop => 1,
        }
    }

    /// Several, in words: `pairs`, `layers dropped`.
    pub fn plural(self) -> &'static str {
        match self {
            Unit::Pair => "pairs",
            Unit::Drop => "layers dropped",
        }
    }

    /// `k` of them, in words: `6 pairs`, `1 layer dropped`.
    pub fn count(self, k: usize) -> String {
        match (self, k) {
            (Unit::Pair, 1) => "1 pair".to_string(),
            (Unit::Drop, 1) => "1 layer dropped".to_string(),
            (u, k) => format!("{k} {}", u.plural()),
        }
    }

    /// The step of one unit starting at layer `a`.
    fn step(self, a: usize) -> Step {
        match self {
            Unit::Pair => Step::Parallel(ParallelGroup {
                layers: vec![a, a + 1],
            }),
            Unit::Drop => Step::Dropped(a),
        }
    }
}

pub struct SearchSpace {
    pub num_layers: usize,
    pub protect_first: usize,
    pub protect_last: usize,
    pub unit: Unit,
}

impl SearchSpace {
    /// Layers that may be paired (or dropped): `[protect_first, L - protect_last)`.
    pub fn range(&self) -> (usize, usize) {
        (
            self.protect_first,
            self.num_layers.saturating_sub(self.protect_last),
        )
    }
    /// The most units the range holds (one layer is always kept).
    pub fn max_pairs(&self) -> usize {
        let (lo, hi) = self.range();
        let most = hi.saturating_sub(lo) / self.unit.span();
        match self.unit {
            Unit::Pair => most,
            Unit::Drop => most.min(self.num_layers.saturating_sub(1)),
        }
    }
}

/// A plan a strategy considered, screened before any end-to-end scoring:
/// a contiguous range by the local measure (how far its changed span moves
/// the residual stream at the span's end, before the rest of the network), a
/// greedy or beam extension by the metric its pairs predict. Only the
/// closest go on to be scored end to end ([`Candidate`]).
#[derive(Debug, Clone, Serialize)]
pub struct Screened {
    pub plan: Plan,
    pub strategy: Strategy,
    pub pairs: usize,
    pub first_changed_layer: usize,
    /// The layer boundary the deviation is measured at: the end of the
    /// changed span (of the pair added, in a greedy or beam round).
    pub span_end: usize,
    /// Contiguous ranges: mean over positions of `|r - r0|^2 / |r0|^2`, `r`
    /// the plan's residual stream at `span_end` and `r0` the original's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deviation: Option<f64>,
    /// Greedy and beam rounds: the metric predicted from the kept plan's
    /// loss plus the pair added's alone ([`Metric::loss`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub predicted: Option<f64>,
    /// Calibration windows it was measured on.
    pub windows: usize,
}

/// How much of the calibration each stage of the search reads.
///
/// 1. screening: the local measure ([`Screened`]) on `1/8` of the windows,
///    spread evenly over them (every free pair alone, for greedy and beam:
///    on `1/16`, 4 windows of 16,384 tokens misjudged a pair by half and the
///    choice came out 14% worse in KL than the exhaustive search's);
/// 2. scoring: the closest few per pair count (contiguous) or per round
///    (greedy, beam) end to end on `1/8` of the windows, spread, but never
///    fewer than [`COMMIT_TOKENS`] tokens (all of them when there are fewer),
///    at every position (`score_stride` 1: every 4th chose worse plans); a
///    greedy or beam round commits to its best here;
/// 3. the best plan of every pair count, the one the budget chooses among
///    them: every window, every position ([`Scorer::finish`]).
///
/// [`Stages::exhaustive`] scores every plan a strategy considers on every
/// window and position: the reference the staged search is measured against.
#[derive(Debug, Clone, Copy)]
pub struct Stages {
    pub screen_windows: usize,
    pub score_windows: usize,
    pub score_stride: usize,
    /// Contiguous ranges scored end to end per pair count, after screening.
    pub contiguous_scored: usize,
    /// Extensions scored end to end per greedy round (beam: the width plus
    /// this less one), after screening.
    pub round_scored: usize,
}

/// Calibration tokens a plan is committed on at least: one window of 256
/// tokens is too few to tell plans a few percent apart.
pub const COMMIT_TOKENS: usize = 1024;

impl Stages {
    /// The staged search on `windows` windows of `seq_len` tokens.
    pub fn of(windows: usize, seq_len: usize) -> Stages {
        let commit = COMMIT_TOKENS.div_ceil(seq_len.max(1));
        Stages {
            screen_windows: (windows / 8).max(1),
            score_windows: (windows / 8).max(commit).min(windows).max(1),
            score_stride: 1,
            contiguous_scored: 2,
            round_scored: 3,
        }
    }

    /// Every plan scored on every window and position.
    pub fn exhaustive(windows: usize) -> Stages {
        Stages {
            screen_windows: 1,
            score_windows: windows.max(1),
            score_stride: 1,
            contiguous_scored: usize::MAX,
            round_scored: usize::MAX,
        }
    }
}

/// `count` of the `n` windows, spread evenly over them (all of them when
/// `count >= n`): a sample of the whole calibration text, not its start.
pub fn spread(count: usize, n: usize) -> Vec<usize> {
    let count = count.min(n);
    (0..count).map(|i| i * n / count).collect()
}

/// Sums of one candidate's metrics over positions.
#[derive(Debug, Clone, Copy, Default)]
struct Sums {
    similarity: Similarity,
    /// Where the NaN/Inf watch stopped this candidate: (layer, sublayer).
    non_finite: Option<NonFinite>,
}

/// Rows `stride - 1, 2 stride - 1, ...` of `x [T, width]` (all rows for 1).
fn every(x: &[f32], width: usize, stride: usize) -> Vec<f32> {
    if stride <= 1 {
        return x.to_vec();
    }
    x.chunks_exact(width)
        .skip(stride - 1)
        .step_by(stride)
        .flatten()
        .copied()
        .collect()
}

/// The original on one window from its last residual, at every `stride`-th
/// position.
fn reference(forward: &Forward, last_residual: &[f32], stride: usize) -> Reference {
    let cfg = &forward.model.config;
    let rows = every(last_residual, cfg.hidden_size, stride);
    let final_hidden = rms_norm(&rows, &forward.model.norm, cfg.rms_norm_eps);
    let t = final_hidden.len() / cfg.hidden_size;
    let logits = matmul_t(&final_hidden, t, forward.model.lm_head());
    Reference::new(&logits, final_hidden, cfg.vocab_size)
}

/// Mean over rows of `|r - r0|^2 / |r0|^2`, summed (and the row count).
fn deviation(r: &[f32], r0: &[f32], width: usize) -> (f64, usize) {
    let mut sum = 0f64;
    let mut rows = 0;
    for (a, b) in r.chunks_exact(width).zip(r0.chunks_exact(width)) {
        let (mut d, mut n) = (0f64, 0f64);
        for (&x, &y) in a.iter().zip(b) {
            let (x, y) = (x as f64, y as f64);
            d += (x - y) * (x - y);
            n += y * y;
        }
        sum += if n > 0.0 { d / n } else { d };
        rows += 1;
    }
    (sum, rows)
}

/// One set's end-to-end result.
#[derive(Debug, Clone, Copy)]
struct Scored {
    scores: Scores,
    similarity: Similarity,
    non_finite: Option<NonFinite>,
}

/// Scores plans against the original on the cached calibration windows.
pub struct Scorer<'a> {
    forward: &'a Forward<'a>,
    cache: &'a ActivationCache,
    progress: &'a ProgressBar,
    stages: Stages,
    unit: Unit,
    /// The original on the scoring stage's windows and positions, made once.
    references: std::sync::OnceLock<Vec<Reference>>,
    /// Plans already scored on the scoring stage's windows and positions, by
    /// their units: a plan two strategies reach (a single pair is a
    /// contiguous range and a greedy round's extension, and is screened on
    /// the scoring windows when the two samples are the same) runs once.
    scored: std::sync::Mutex<std::collections::HashMap<Vec<(usize, usize)>, Scored>>,
}

/// One plan to score: its units (first and last layer of each) and its plan.
struct Planned {
    groups: Vec<(usize, usize)>,
    plan: Plan,
    first: usize,
    /// In a greedy or beam round: the kept plan it extends (its index) and
    /// the first layer of the pair added. The two plans agree before that
    /// layer, so the extension runs from there on the kept plan's stream.
    extends: Option<(usize, usize)>,
}

impl<'a> Scorer<'a> {
    pub fn new(
        forward: &'a Forward<'a>,
        cache: &'a ActivationCache,
        stages: Stages,
        unit: Unit,
        progress: &'a ProgressBar,
    ) -> Scorer<'a> {
        Scorer {
            forward,
            cache,
            progress,
            stages,
            unit,
            references: std::sync::OnceLock::new(),
            scored: Default::default(),
        }
    }

    fn layers(&self) -> usize {
        self.forward.model.config.num_hidden_layers
    }

    /// The screening stage's windows.
    fn screen_sample(&self) -> Vec<usize> {
        spread(self.stages.screen_windows, self.cache.len())
    }

    /// The scoring stage's windows.
    fn score_sample(&self) -> Vec<usize> {
        spread(self.stages.score_windows, self.cache.len())
    }

    fn planned(&self, mut groups: Vec<(usize, usize)>) -> Result<Planned> {
        groups.sort();
        let layers = self.layers();
        let plan = match self.unit {
            Unit::Pair => Plan::from_pairs(layers, &groups)?,
            Unit::Drop => {
                let dropped: Vec<usize> = groups.iter().map(|g| g.0).collect();
                Plan::from_dropped(layers, &dropped)?
            }
        };
        let first = groups.first().map_or(layers, |g| g.0);
        Ok(Planned {
            groups,
            plan,
            first,
            extends: None,
        })
    }

    fn warn_dropped(&self, plan: &Plan, (layer, sublayer): NonFinite) {
        self.progress.suspend(|| {
            eprintln!(
                "warning: plan `{plan}` dropped: {}",
                Error::NonFinite { layer, sublayer }
            )
        });
    }

    /// End-to-end scores of `plans` (extensions of `bases`, or starting from
    /// the cache) on the windows `sample`, KL and top-1 at every `stride`-th
    /// position, in parallel over plans.
    fn score(
        &self,
        plans: &[&Planned],
        bases: &[Planned],
        sample: &[usize],
        stride: usize,
    ) -> Result<Vec<Scored>> {
        if plans.is_empty() {
            return Ok(Vec::new());
        }
        let cfg = &self.forward.model.config;
        let layers = cfg.num_hidden_layers;
        let mut sums = vec![Sums::default(); plans.len()];
        self.progress
            .inc_length((plans.len() * sample.len()) as u64);
        let st = self.stages;
        let kept = (sample == self.score_sample() && stride == st.score_stride && stride > 1)
            .then(|| -> Result<&Vec<Reference>> {
                if let Some(r) = self.references.get() {
                    return Ok(r);
                }
                let made = sample
                    .iter()
                    .map(|&w| {
                        Ok(reference(
                            self.forward,
                            &self.cache.residual(w, layers)?,
                            stride,
                        ))
                    })
                    .collect::<Result<Vec<_>>>()?;
                Ok(self.references.get_or_init(|| made))
            })
            .transpose()?;
        for (i, &w) in sample.iter().enumerate() {
            let made;
            let original = match kept {
                Some(r) => &r[i],
                None => {
                    made = reference(self.forward, &self.cache.residual(w, layers)?, stride);
                    &made
                }
            };
            // The kept plans' streams on this window, where an extension
            // starts from one.
            let streams: Vec<Option<BaseStream>> = bases
                .iter()
                .enumerate()
                .map(|(b, base)| {
                    plans
                        .iter()
                        .filter_map(|p| p.extends.filter(|e| e.0 == b).map(|e| e.1))
                        .max()
                        .map(|until| BaseStream::of(self, base, w, until))
                        .transpose()
                })
                .collect::<Result<_>>()?;
            let per: Vec<Sums> = plans
                .par_iter()
                .zip(&sums)
                .map(|(p, so_far)| -> Result<Sums> {
                    if so_far.non_finite.is_some() {
                        self.progress.inc(1);
                        return Ok(Sums::default());
                    }
                    let opts = Options {
                        logits: Logits::None,
                        capture_residuals: false,
                    };
                    let out = match p.extends {
                        Some((b, a)) => {
                            let stream = streams[b].as_ref().expect("made above");
                            let at = p.plan.steps.iter().position(|s| s.layers()[0] == a);
                            let at = at.expect("the pair added starts a step");
                            let x = stream.entering(a).to_vec();
                            self.forward.run_steps_from(&p.plan.steps[at..], x, opts)
                        }
                        None => {
                            let x = self.cache.residual(w, p.first)?;
                            self.forward.run_from(&p.plan, p.first, x, opts)
                        }
                    };
                    let result = match out {
                        Ok(out) => {
                            let hidden = every(&out.final_hidden, cfg.hidden_size, stride);
                            let t = hidden.len() / cfg.hidden_size;
                            let logits = matmul_t(&hidden, t, self.forward.model.lm_head());
                            Ok(Sums {
                                similarity: original.compare(&hidden, &logits),
                                non_finite: None,
                            })
                        }
                        Err(Error::NonFinite { layer, sublayer }) => Ok(Sums {
                            non_finite: Some((layer, sublayer)),
                            ..Sums::default()
                        }),
                        Err(e) => Err(e),
                    };
                    self.progress.inc(1);
                    result
                })
                .collect::<Result<_>>()?;
            for (acc, s) in sums.iter_mut().zip(per) {
                acc.non_finite = acc.non_finite.or(s.non_finite);
                acc.similarity.add(&s.similarity);
            }
        }
        Ok(sums
            .iter()
            .map(|s| Scored {
                similarity: s.similarity,
                scores: Scores {
                    cosine: s.similarity.mean_cosine(),
                    kl: s.similarity.mean_kl(),
                    top1_agreement: s.similarity.top1_agreement(),
                },
                non_finite: s.non_finite,
            })
            .collect())
    }

    /// Score `plans` at the scoring stage; plans that go non-finite are
    /// reported and dropped.
    fn candidates(
        &self,
        plans: Vec<Planned>,
        bases: &[Planned],
        strategy: Strategy,
    ) -> Result<Vec<Candidate>> {
        let st = self.stages;
        let sample = self.score_sample();
        let known: Vec<Option<Scored>> = {
            let memo = self.scored.lock().expect("not poisoned");
            plans.iter().map(|p| memo.get(&p.groups).copied()).collect()
        };
        let refs: Vec<&Planned> = plans
            .iter()
            .zip(&known)
            .filter(|(_, k)| k.is_none())
            .map(|(p, _)| p)
            .collect();
        let mut fresh = self
            .score(&refs, bases, &sample, st.score_stride)?
            .into_iter();
        let scored: Vec<Scored> = {
            let mut memo = self.scored.lock().expect("not poisoned");
            plans
                .iter()
                .zip(known)
                .map(|(p, k)| {
                    k.unwrap_or_else(|| {
                        let s = fresh.next().expect("one score per plan not yet scored");
                        memo.insert(p.groups.clone(), s);
                        s
                    })
                })
                .collect()
        };
        let mut out = Vec::new();
        for (p, s) in plans.into_iter().zip(scored) {
            if let Some(nf) = s.non_finite {
                self.warn_dropped(&p.plan, nf);
                continue;
            }
            out.push(Candidate {
                depth: p.plan.depth(),
                plan: p.plan,
                strategy,
                pairs: p.groups.len(),
                first_changed_layer: p.first,
                windows: sample.len(),
                scores: s.scores,
                groups: p.groups,
                scored: (st.score_stride == 1).then(|| (sample.clone(), s.similarity)),
            });
        }
        Ok(out)
    }

    /// Score `c` again on every window at every position: the best plan of a
    /// pair count, so that its scores are those `depthc eval` gives.
    pub fn finish(&self, c: &mut Candidate) -> Result<()> {
        self.finish_all(std::slice::from_mut(c))
    }

    /// [`Scorer::finish`] for several plans, those scored on the same windows
    /// together (the original's logits on each window made once for them).
    pub fn finish_all(&self, cs: &mut [Candidate]) -> Result<()> {
        let all = self.cache.len();
        // The windows each was scored on at every position already count.
        let done: Vec<(Vec<usize>, Similarity)> = cs
            .iter_mut()
            .map(|c| c.scored.take().unwrap_or_default())
            .collect();
        let mut by_done: std::collections::BTreeMap<&[usize], Vec<usize>> = Default::default();
        for (i, (windows, _)) in done.iter().enumerate() {
            by_done.entry(windows.as_slice()).or_default().push(i);
        }
        for (windows, members) in by_done {
            let rest: Vec<usize> = (0..all).filter(|w| !windows.contains(w)).collect();
            let planned: Vec<Planned> = members
                .iter()
                .map(|&i| self.planned(cs[i].groups.clone()))
                .collect::<Result<_>>()?;
            let refs: Vec<&Planned> = planned.iter().collect();
            let scored = self.score(&refs, &[], &rest, 1)?;
            for (&i, s) in members.iter().zip(scored) {
                if let Some(nf) = s.non_finite {
                    return Err(Error::NonFinite {
                        layer: nf.0,
                        sublayer: nf.1,
                    });
                }
                let mut similarity = done[i].1;
                similarity.add(&s.similarity);
                let c = &mut cs[i];
                c.scores = Scores {
                    cosine: similarity.mean_cosine(),
                    kl: similarity.mean_kl(),
                    top1_agreement: similarity.top1_agreement(),
                };
                c.windows = all;
                c.scored = Some(((0..all).collect(), similarity));
            }
        }
        Ok(())
    }

    /// Every even-length range `[s, e)` inside the search space, screened;
    /// the closest `contiguous_scored` ([`Stages`]) of each pair count up to
    /// `max_scored` scored end to end.
    pub fn contiguous(
        &self,
        space: &SearchSpace,
        max_scored: usize,
    ) -> Result<(Vec<Candidate>, Vec<Screened>)> {
        let (lo, hi) = space.range();
        let span = self.unit.span();
        let h = self.forward.model.config.hidden_size;
        let sample = self.screen_sample();
        let windows = sample.len();
        let starts: Vec<usize> = (lo..(hi + 1).saturating_sub(span)).collect();
        self.progress.inc_length((starts.len() * windows) as u64);
        // Per start s: the ranges [s, e) for e = s + 2, s + 4, ... (pairs; a
        // layer at a time when dropping), each unit run on the stream the
        // shorter range left (the ranges from one start share their prefix). Deviation sums and rows per range, and the
        // first range to go non-finite (it and every longer one are dropped).
        type Runs = (Vec<usize>, Vec<(f64, usize)>, Option<(usize, NonFinite)>);
        let per_start: Vec<Runs> = starts
            .par_iter()
            .map(|&s| -> Result<Runs> {
                let ends: Vec<usize> = (s + span..=hi).step_by(span).collect();
                let mut sums = vec![(0.0, 0); ends.len()];
                let mut dropped: Option<(usize, NonFinite)> = None;
                for &w in &sample {
                    let mut x = self.cache.residual(w, s)?;
                    let live = dropped.map_or(ends.len(), |d| d.0);
                    for (j, &e) in ends[..live].iter().enumerate() {
                        let step = self.unit.step(e - span);
                        match self.forward.advance(std::slice::from_ref(&step), x) {
                            Ok(y) => {
                                let (d, n) = deviation(&y, &self.cache.residual(w, e)?, h);
                                sums[j].0 += d;
                                sums[j].1 += n;
                                x = y;
                            }
                            Err(Error::NonFinite { layer, sublayer }) => {
                                dropped = Some((j, (layer, sublayer)));
                                break;
                            }
                            Err(err) => return Err(err),
                        }
                    }
                    self.progress.inc(1);
                }
                Ok((ends, sums, dropped))
            })
            .collect::<Result<_>>()?;
        let mut screened = Vec::new();
        let mut planned = Vec::new();
        for (&s, (ends, sums, dropped)) in starts.iter().zip(per_start) {
            for (j, (e, (d, n))) in ends.into_iter().zip(sums).enumerate() {
                if (e - s) / span > space.max_pairs() {
                    continue;
                }
                let groups: Vec<(usize, usize)> =
                    (s..e).step_by(span).map(|a| (a, a + span - 1)).collect();
                let p = self.planned(groups)?;
                if let Some((_, nf)) = dropped.filter(|d| j >= d.0) {
                    self.warn_dropped(&p.plan, nf);
                    continue;
                }
                screened.push(Screened {
                    plan: p.plan.clone(),
                    strategy: Strategy::Contiguous,
                    pairs: (e - s) / span,
                    first_changed_layer: s,
                    span_end: e,
                    deviation: Some(d / n.max(1) as f64),
                    predicted: None,
                    windows,
                });
                planned.push(p);
            }
        }
        // The closest ranges of each pair count go on to be scored.
        let mut by_pairs: std::collections::BTreeMap<usize, Vec<usize>> = Default::default();
        for (i, sc) in screened.iter().enumerate() {
            by_pairs.entry(sc.pairs).or_default().push(i);
        }
        let mut chosen = Vec::new();
        for (pairs, mut group) in by_pairs {
            if pairs > max_scored {
                continue;
            }
            group.sort_by(|&a, &b| {
                let d = |i: usize| screened[i].deviation.unwrap_or(f64::INFINITY);
                d(a).total_cmp(&d(b)).then(a.cmp(&b))
            });
            chosen.extend(group.into_iter().take(self.stages.contiguous_scored));
        }
        chosen.sort();
        let to_score: Vec<Planned> = planned
            .into_iter()
            .enumerate()
            .filter(|(i, _)| chosen.binary_search(i).is_ok())
            .map(|(_, p)| p)
            .collect();
        let scored = self.candidates(to_score, &[], Strategy::Contiguous)?;
        Ok((scored, screened))
    }

    /// Greedy (`width == 1`) or beam search over disjoint adjacent pairs, up
    /// to `max_pairs`. Every free pair is first scored alone, end to end on
    /// the screening windows. Each round predicts every kept plan with one
    /// more free pair as the kept plan's loss plus the pair's alone (the
    /// pairs' losses nearly add up), scores the closest end to end on the
    /// scoring windows, from the pair added on the kept plan's stream, and
    /// keeps the `width` best; `stop` ends early once a round's best fails it.
    pub fn beam(
        &self,
        space: &SearchSpace,
        width: usize,
        max_pairs: usize,
        metric: Metric,
        stop: Option<f64>,
    ) -> Result<(Vec<Candidate>, Vec<Screened>)> {
        let strategy = if width <= 1 {
            Strategy::Greedy
        } else {
            Strategy::Beam
        };
        let (lo, hi) = space.range();
        let span = self.unit.span();
        let st = self.stages;
        // Every free pair (or layer) alone (none when every plan is scored
        // anyway).
        let firsts: Vec<usize> = (lo..(hi + 1).saturating_sub(span)).collect();
        let alone: Vec<Option<f64>> = if st.round_scored == usize::MAX {
            vec![Some(0.0); firsts.len()]
        } else {
            let singles: Vec<Planned> = firsts
                .iter()
                .map(|&a| self.planned(vec![(a, a + span - 1)]))
                .collect::<Result<_>>()?;
            let refs: Vec<&Planned> = singles.iter().collect();
            let sample = self.screen_sample();
            let scored = self.score(&refs, &[], &sample, st.score_stride)?;
            if sample == self.score_sample() {
                let mut memo = self.scored.lock().expect("not poisoned");
                for (p, s) in singles.iter().zip(&scored) {
                    memo.insert(p.groups.clone(), *s);
                }
            }
            singles
                .iter()
                .zip(scored)
                .map(|(p, s)| match s.non_finite {
                    Some(nf) => {
                        self.warn_dropped(&p.plan, nf);
                        None
                    }
                    None => Some(metric.loss(metric.of(&s.scores))),
                })
                .collect()
        };
        let screened_on = self.screen_sample().len();
        let mut beam: Vec<(Vec<(usize, usize)>, f64)> = vec![(Vec::new(), 0.0)];
        let mut all = Vec::new();
        let mut all_screened = Vec::new();
        for _ in 0..max_pairs {
            let kept: Vec<Vec<(usize, usize)>> = beam.iter().map(|b| b.0.clone()).collect();
            let ext = Extension::all(&kept, lo, hi, span);
            let mut ranked: Vec<(f64, Planned)> = Vec::new();
            for e in ext {
                let a = e.first;
                let Some(pair) = alone[a - lo] else { continue };
                let predicted = beam[e.base].1 + pair;
                let mut p = self.planned(e.groups)?;
                p.extends = Some((e.base, a));
                all_screened.push(Screened {
                    plan: p.plan.clone(),
                    strategy,
                    pairs: p.groups.len(),
                    first_changed_layer: p.first,
                    span_end: a + span,
                    deviation: None,
                    predicted: Some(metric.at_loss(predicted)),
                    windows: screened_on,
                });
                ranked.push((predicted, p));
            }
            if ranked.is_empty() {
                break;
            }
            ranked.sort_by(|x, y| {
                x.0.total_cmp(&y.0)
                    .then_with(|| x.1.groups.cmp(&y.1.groups))
            });
            let keep = if width <= 1 {
                st.round_scored
            } else {
                st.round_scored.saturating_add(width - 1)
            };
            let to_score: Vec<Planned> = ranked.into_iter().take(keep).map(|r| r.1).collect();
            let bases: Vec<Planned> = kept
                .iter()
                .map(|b| self.planned(b.clone()))
                .collect::<Result<_>>()?;
            let mut round = self.candidates(to_score, &bases, strategy)?;
            if round.is_empty() {
                break;
            }
            round.sort_by(|a, b| {
                metric
                    .order(metric.of(&a.scores), metric.of(&b.scores))
                    .then_with(|| a.plan.to_string().cmp(&b.plan.to_string()))
            });
            let best = metric.of(&round[0].scores);
            beam = round
                .iter()
                .take(width.max(1))
                .map(|c| (c.groups.clone(), metric.loss(metric.of(&c.scores))))
                .collect();
            all.extend(round);
            if stop.is_some_and(|t| !metric.meets(best, t)) {
                break;
            }
        }
        Ok((all, all_screened))
    }
}

/// Where the NaN/Inf watch stopped a plan: (layer, sublayer).
type NonFinite = (usize, &'static str);

/// A kept plan with one more pair, in a greedy or beam round.
struct Extension {
    /// Index of the kept plan.
    base: usize,
    /// First layer of the pair added.
    first: usize,
    /// Pairs of the extended plan.
    groups: Vec<(usize, usize)>,
}

impl Extension {
    /// Every kept plan of `beam` with one more free unit of `span` layers in
    /// `lo..hi`, each set of units once.
    fn all(beam: &[Vec<(usize, usize)>], lo: usize, hi: usize, span: usize) -> Vec<Extension> {
        let mut ext: Vec<Extension> = Vec::new();
        for (b, base) in beam.iter().enumerate() {
            for a in lo..(hi + 1).saturating_sub(span) {
                let free = base.iter().all(|&(x, y)| a > y || a + span - 1 < x);
                if !free {
                    continue;
                }
                let mut s = base.clone();
                s.push((a, a + span - 1));
                s.sort();
                if !ext.iter().any(|e| e.groups == s) {
                    ext.push(Extension {
                        base: b,
                        first: a,
                        groups: s,
                    });
                }
            }
        }
        ext
    }
}

/// A kept plan's residual stream on one window, at every step boundary from
/// its first changed layer (before it: the original's, from the cache).
struct BaseStream {
    /// Layer entering each boundary, and the stream there.
    at: Vec<(usize, Vec<f32>)>,
}

impl BaseStream {
    /// Up to the boundary `until`.
    fn of(scorer: &Scorer, p: &Planned, w: usize, until: usize) -> Result<BaseStream> {
        let layers = scorer.layers();
        let mut at: Vec<(usize, Vec<f32>)> = (0..=p.first.min(until).min(layers))
            .map(|b| scorer.cache.residual(w, b).map(|r| (b, r)))
            .collect::<Result<_>>()?;
        if p.first < until.min(layers) {
            let from = p
                .plan
                .steps
                .iter()
                .position(|s| s.layers()[0] >= p.first)
                .unwrap_or(p.plan.steps.len());
            let to = p
                .plan
                .steps
                .iter()
                .position(|s| s.layers()[0] >= until)
                .unwrap_or(p.plan.steps.len());
            let steps = &p.plan.steps[from..to];
            let x = at
                .pop()
                .expect("the stream entering the first changed layer")
                .1;
            let stream = scorer.forward.advance_capturing(steps, x)?;
            let mut starts: Vec<usize> = steps.iter().map(|s| s.layers()[0]).collect();
            starts.push(p.plan.steps.get(to).map_or(layers, |s| s.layers()[0]));
            at.extend(starts.into_iter().zip(stream));
        }
        Ok(BaseStream { at })
    }

    /// The stream entering layer `l` (a step boundary of the plan).
    fn entering(&self, l: usize) -> &[f32] {
        &self
            .at
            .iter()
            .find(|(b, _)| *b == l)
            .expect("a free pair's layers are step boundaries")
            .1
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
    // Only the candidates scored on the most windows compete (the plan the
    // budget chose, once finished, against the rest).
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
    let unit = space.unit;
    if want == 0 {
        return Err(Error::Input(format!(
            "the budget asks for no {} (depth {} already meets it)",
            unit.plural(),
            space.num_layers
        )));
    }
    if want > max {
        return Err(Error::Input(format!(
            "the budget needs {} but layers {lo}..{hi} (after --protect-first {} and \
             --protect-last {}) hold at most {max}: ask for fewer {} or protect fewer layers",
            unit.count(want),
            space.protect_first,
            space.protect_last,
            unit.plural()
        )));
    }
    Ok(want)
}

#[cfg(test)]
mod tests {
    use super::{spread, Stages, COMMIT_TOKENS};

    #[test]
    fn samples_spread_over_the_windows() {
        assert_eq!(spread(4, 8), [0, 2, 4, 6]);
        assert_eq!(spread(3, 10), [0, 3, 6]);
        assert_eq!(spread(5, 3), [0, 1, 2]);
        assert!(spread(0, 3).is_empty());
    }

    #[test]
    fn plans_are_committed_on_at_least_the_commit_tokens() {
        for (windows, seq_len) in [(8, 256), (16, 256), (64, 256), (200, 64), (3, 256), (1, 16)] {
            let st = Stages::of(windows, seq_len);
            let tokens = st.score_windows * seq_len;
            assert!(
                tokens >= COMMIT_TOKENS.min(windows * seq_len),
                "{windows} x {seq_len}: {st:?}"
            );
            assert!(st.score_windows <= windows && st.score_windows >= windows / 8);
            assert!(
                st.screen_windows >= (windows / 8).max(1) && st.screen_windows <= st.score_windows
            );
            assert_eq!(st.score_stride, 1);
        }
        assert_eq!(Stages::of(8, 256).score_windows, 4);
        assert_eq!(Stages::of(64, 256).score_windows, 8);
        let ex = Stages::exhaustive(8);
        assert_eq!((ex.score_windows, ex.round_scored), (8, usize::MAX));
    }
}
