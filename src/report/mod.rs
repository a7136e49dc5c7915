//! Search-report artifacts: `search-report.json` (schema:
//! `schemas/search-report.schema.json`), `search-report.md`, and two plots
//! drawn with `plotters`: `heatmap.svg` (contiguous ranges, start x end,
//! coloured by the deviation of the residual stream at their end, the
//! landscape of the paper's figure) and `pairs.svg` (the deviation after each
//! single pair along depth; the best metric against the number of pairs for
//! each strategy).

use std::fmt::Write as _;
use std::path::Path;

use plotters::prelude::*;
use serde::Serialize;

use crate::plan::Plan;
use crate::search::calib::Calibration;
use crate::search::strategy::{Budget, Candidate, Metric, Screened, Strategy, Unit};
use crate::search::{BestAtPairs, SearchOutcome};
use crate::{Error, Result};

const GIB: f64 = (1u64 << 30) as f64;

pub const SCHEMA_ID: &str = "https://depthc.dev/schemas/search-report.schema.json";

#[derive(Debug, Clone, Serialize)]
pub struct ModelIdentity {
    pub path: String,
    pub format: String,
    pub family: String,
    pub layers: usize,
    pub hidden_size: usize,
    pub content_hash: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct EvalSection {
    pub text: String,
    pub windows: usize,
    pub seq_len: usize,
    pub perplexity_before: f64,
    pub perplexity_after: f64,
    /// The chosen plan's greedy generation against the original's on
    /// held-out prompts of the text.
    pub generation: crate::search::Agreement,
}

/// Accuracy on one `--task`: the original's and the chosen plan's.
#[derive(Debug, Clone, Serialize)]
pub struct TaskSection {
    pub name: String,
    pub path: String,
    pub primary_metric: crate::search::tasks::PrimaryMetric,
    /// Docs scored (the first `--task-limit` of the file).
    pub docs: usize,
    pub original: crate::search::tasks::Accuracy,
    pub chosen: crate::search::tasks::Accuracy,
    /// The chosen plan's primary metric over the original's.
    pub retained: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Timings {
    pub load_s: f64,
    pub one_forward_s: f64,
    /// The strategies, and the chosen plan on every window.
    pub search_s: f64,
    pub search_forward_multiple: f64,
    /// The best plan of every other pair count on every window.
    pub front_s: f64,
    pub front_forward_multiple: f64,
    pub strategy_forward_multiples: Vec<(Strategy, f64)>,
    pub eval_s: f64,
    /// Task accuracy of the original, the chosen plan and the front.
    pub tasks_s: f64,
    /// `search --heal`: healing every plan of the front and measuring it.
    pub heal_s: f64,
    pub total_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct MetricDefinitions {
    pub cosine: &'static str,
    pub kl: &'static str,
    pub top1: &'static str,
}

const DEFINITIONS: MetricDefinitions = MetricDefinitions {
    cosine: "mean over calibration positions of the cosine similarity of the final hidden \
             states (after the final norm), candidate vs original",
    kl: "mean over calibration positions of KL(original || candidate) of the next-token \
         distributions, in nats",
    top1: "fraction of calibration positions whose most likely next token is the same",
};

#[derive(Debug, Clone, Serialize)]
pub struct SearchReport {
    #[serde(rename = "$schema")]
    pub schema: &'static str,
    pub depthc_version: &'static str,
    /// The search is deterministic; recorded for reproducibility.
    pub seed: u64,
    pub model: ModelIdentity,
    pub calibration: CalibrationSection,
    pub metric: Metric,
    pub metric_definitions: MetricDefinitions,
    pub strategies: Vec<Strategy>,
    pub beam_width: usize,
    pub budget: Budget,
    /// What the budget counts: pairs run in parallel, or layers dropped.
    pub unit: Unit,
    pub protect_first: usize,
    pub protect_last: usize,
    pub candidates: Vec<Candidate>,
    pub screened: Vec<Screened>,
    pub best_by_pairs: Vec<BestAtPairs>,
    pub chosen_plan: Plan,
    pub chosen: Candidate,
    pub reason: String,
    pub depth_before: usize,
    pub depth_after: usize,
    /// One section per `--eval` text.
    pub eval: Vec<EvalSection>,
    /// One section per `--task`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tasks: Vec<TaskSection>,
    /// The chosen plan's accuracy retained, averaged over the tasks.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accuracy_retained: Option<f64>,
    /// `compile --heal`: what healing did to each group of the chosen plan.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub healing: Option<crate::heal::HealReport>,
    pub activation_cache: CacheSection,
    pub timings: Timings,
    /// `depthc compile`: ONNX Runtime against the reference, per emitted model.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub validation:
        Option<std::collections::BTreeMap<String, crate::runtime::validate::Validation>>,
    /// `depthc compile`: baseline (A) against compiled (B) in ONNX Runtime.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub benchmark: Option<crate::runtime::bench::BenchResult>,
    /// `compile`: every candidate form and op set, and which was kept.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub speed: Option<crate::runtime::bench::SpeedChoice>,
    /// `compile`: wall time and peak resident memory of each stage, in order.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stages: Option<Vec<crate::measure::StageCost>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CalibrationSection {
    #[serde(flatten)]
    pub calibration: Calibration,
    pub windows: usize,
    pub tokens: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct CacheSection {
    pub memory_bytes: u64,
    pub disk_bytes: u64,
}

#[allow(clippy::too_many_arguments)]
impl SearchReport {
    pub fn new(
        model: ModelIdentity,
        calibration: &Calibration,
        outcome: &SearchOutcome,
        metric: Metric,
        strategies: &[Strategy],
        beam_width: usize,
        budget: Budget,
        protect: (usize, usize),
        eval: Vec<EvalSection>,
        timings: Timings,
    ) -> Self {
        let layers = model.layers;
        SearchReport {
            schema: SCHEMA_ID,
            depthc_version: env!("CARGO_PKG_VERSION"),
            seed: 0,
            model,
            calibration: CalibrationSection {
                calibration: calibration.clone(),
                windows: calibration.windows.len(),
                tokens: calibration.tokens(),
            },
            metric,
            metric_definitions: DEFINITIONS,
            strategies: strategies.to_vec(),
            beam_width,
            budget,
            unit: Unit::Pair,
            protect_first: protect.0,
            protect_last: protect.1,
            candidates: outcome.candidates.clone(),
            screened: outcome.screened.clone(),
            best_by_pairs: outcome.best_by_pairs.clone(),
            chosen_plan: outcome.chosen.plan.clone(),
            chosen: outcome.chosen.clone(),
            reason: outcome.reason.clone(),
            depth_before: layers,
            depth_after: outcome.chosen.depth,
            eval,
            tasks: Vec::new(),
            accuracy_retained: None,
            healing: None,
            activation_cache: CacheSection {
                memory_bytes: outcome.cache_memory_bytes,
                disk_bytes: outcome.cache_disk_bytes,
            },
            timings,
            validation: None,
            benchmark: None,
            speed: None,
            stages: None,
        }
    }

    /// Write the four artifacts into `dir` (which must exist).
    pub fn write(&self, dir: &Path) -> Result<()> {
        let json = serde_json::to_string_pretty(self).expect("report serialises");
        let path = dir.join("search-report.json");
        std::fs::write(&path, json + "\n").map_err(|e| Error::io(&path, e))?;
        let path = dir.join("search-report.md");
        std::fs::write(&path, self.markdown()).map_err(|e| Error::io(&path, e))?;
        self.heatmap(&dir.join("heatmap.svg"))?;
        self.pairs_plot(&dir.join("pairs.svg"))?;
        if self.accuracy_retained.is_some() {
            self.front_plot(&dir.join("accuracy.svg"))?;
        }
        Ok(())
    }

    /// `search-report.md`: each section in turn.
    fn markdown(&self) -> String {
        let mut s = String::new();
        self.md_header(&mut s);
        self.md_chosen(&mut s);
        self.md_tasks(&mut s);
        self.md_healing(&mut s);
        self.md_best_by_pairs(&mut s);
        self.md_greedy_against_contiguous(&mut s);
        self.md_cost(&mut s);
        self.md_validation(&mut s);
        self.md_benchmark(&mut s);
        self.md_candidates(&mut s);
        self.md_stages(&mut s);
        s
    }

    /// The model and the calibration text.
    fn md_header(&self, s: &mut String) {
        let _ = writeln!(s, "# depthc search report\n");
        let _ = writeln!(
            s,
            "Model `{}` ({}, {} layers, {}).\n",
            self.model.path, self.model.family, self.model.layers, self.model.content_hash
        );
        let _ = writeln!(
            s,
            "Calibration: {} windows of {} tokens ({} tokens) from {}.\n",
            self.calibration.windows,
            self.calibration.calibration.seq_len,
            self.calibration.tokens,
            self.calibration
                .calibration
                .sources
                .iter()
                .map(|c| format!("`{}`", c.path))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }

    /// The chosen plan, why, and what it costs on each held-out text.
    fn md_chosen(&self, s: &mut String) {
        let _ = writeln!(s, "## Chosen plan\n");
        let c = &self.chosen;
        let _ = writeln!(
            s,
            "`{}` ({} strategy): depth {} -> {}, cosine {:.6}, KL {:.6}, top-1 {:.4}.\n",
            self.chosen_plan,
            c.strategy.name(),
            self.depth_before,
            self.depth_after,
            c.scores.cosine,
            c.scores.kl,
            c.scores.top1_agreement
        );
        let _ = writeln!(s, "Why: {}.\n", self.reason);
        for e in &self.eval {
            let _ = writeln!(
                s,
                "Perplexity on `{}` ({} windows of {}): {:.4} before, {:.4} after (x{:.4}).\n",
                e.text,
                e.windows,
                e.seq_len,
                e.perplexity_before,
                e.perplexity_after,
                e.perplexity_after / e.perplexity_before
            );
            let g = &e.generation;
            let _ = writeln!(
                s,
                "Greedy generation on {} held-out prompts of that text: {:.1}% of {} tokens equal \
                 to the original's, first difference at token {:.1} on average.\n",
                g.prompts,
                100.0 * g.equal_fraction,
                g.tokens,
                g.mean_first_difference
            );
        }
    }

    /// Task accuracy of the chosen plan against the original's.
    fn md_tasks(&self, s: &mut String) {
        if self.tasks.is_empty() {
            return;
        }
        let _ = writeln!(
            s,
            "## Task accuracy\n\n| task | docs | metric | original | chosen plan | retained |\n|---|---|---|---|---|---|"
        );
        for t in &self.tasks {
            let m = t.primary_metric;
            let _ = writeln!(
                s,
                "| {} | {} | {} | {:.4} +- {:.4} | {:.4} +- {:.4} | {:.1}% |",
                t.name,
                t.docs,
                m.name(),
                t.original.primary(m),
                t.original.stderr(m),
                t.chosen.primary(m),
                t.chosen.stderr(m),
                100.0 * t.retained
            );
        }
        if let Some(r) = self.accuracy_retained {
            let _ = writeln!(
                s,
                "\nAccuracy retained, averaged over the tasks: {:.1}%.\n",
                100.0 * r
            );
        }
    }

    /// `compile --heal`: each group's held-out deviation before and after.
    fn md_healing(&self, s: &mut String) {
        let Some(h) = &self.healing else {
            return;
        };
        let _ = writeln!(
            s,
            "## Healing\n\nEach group's summed MLP output corrected towards its layers run in turn \
             (least squares on {} calibration windows, {} held out), folded into its down_proj \
             weights.\n\n| group | kind | ridge | held-out deviation before | after | applied |\n|---|---|---|---|---|---|",
            h.fit_windows, h.held_out_windows
        );
        for g in &h.groups {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {:.4} | {:.4} | {} |",
                g.name(),
                g.kind,
                g.ridge,
                g.deviation_before,
                g.deviation_after,
                if g.applied { "yes" } else { "no" }
            );
        }
        let _ = writeln!(s);
    }

    /// The best plan of each pair count, with its generation agreement when measured.
    fn md_best_by_pairs(&self, s: &mut String) {
        let m = self.metric;
        let _ = writeln!(s, "## Best plan for each pair count ({})\n", m.name());
        if self.unit == Unit::Drop {
            let _ = writeln!(
                s,
                "Layers dropped (`--drop-layers`), not paired: each \"pairs\" count below is \
                 the number of layers dropped.\n"
            );
        }
        let front = self
            .best_by_pairs
            .iter()
            .any(|b| b.quality.generation.is_some());
        let (head, rule) = if front {
            (" greedy tokens equal | first difference |", "---|---|")
        } else {
            ("", "")
        };
        let tasks = self
            .best_by_pairs
            .iter()
            .any(|b| b.quality.accuracy_retained.is_some());
        let (task_head, task_rule) = if tasks {
            (" accuracy retained |", "---|")
        } else {
            ("", "")
        };
        let with_perplexity = self
            .best_by_pairs
            .iter()
            .any(|b| !b.quality.perplexity.is_empty());
        let healed_front = self.best_by_pairs.iter().any(|b| b.healed.is_some());
        let (p_head, p_rule) = if with_perplexity {
            (" perplexity |", "---|")
        } else {
            ("", "")
        };
        let (h_head, h_rule) = if healed_front {
            (
                " healed: perplexity | healed: greedy tokens equal | healed: accuracy retained |",
                "---|---|---|",
            )
        } else {
            ("", "")
        };
        let _ = writeln!(
            s,
            "| pairs | depth | strategy | plan | {} | windows |{p_head}{head}{task_head}{h_head}",
            m.name()
        );
        let _ = writeln!(
            s,
            "|---|---|---|---|---|---|{p_rule}{rule}{task_rule}{h_rule}"
        );
        for b in &self.best_by_pairs {
            let generation = b.quality.generation.as_ref().map_or(String::new(), |g| {
                format!(
                    " {:.1}% | {:.1} |",
                    100.0 * g.equal_fraction,
                    g.mean_first_difference
                )
            });
            let retained = match (tasks, b.quality.accuracy_retained) {
                (true, Some(r)) => format!(" {:.1}% |", 100.0 * r),
                (true, None) => " |".to_string(),
                _ => String::new(),
            };
            let healed = match (healed_front, &b.healed) {
                (true, Some(h)) => format!(
                    " {} | {} | {} |",
                    h.quality
                        .perplexity
                        .first()
                        .map_or("-".into(), |p| format!("{p:.3}")),
                    h.quality
                        .generation
                        .as_ref()
                        .map_or("-".into(), |g| format!("{:.1}%", 100.0 * g.equal_fraction)),
                    h.quality
                        .accuracy_retained
                        .map_or("-".into(), |r| format!("{:.1}%", 100.0 * r))
                ),
                (true, None) => " | | |".to_string(),
                _ => String::new(),
            };
            let perplexity = if with_perplexity {
                format!(
                    " {} |",
                    b.quality
                        .perplexity
                        .first()
                        .map_or("-".into(), |p| format!("{p:.3}"))
                )
            } else {
                String::new()
            };
            let _ = writeln!(
                s,
                "| {} | {} | {} | `{}` | {:.6} | {} |{perplexity}{generation}{retained}{healed}",
                b.pairs,
                self.depth_before - b.pairs,
                b.strategy.name(),
                b.plan,
                b.value,
                b.windows
            );
        }
        let _ = writeln!(
            s,
            "\n`windows`: the calibration windows the value is measured on (the scoring \
             stage's eighth; every window for the pair count the budget chose)."
        );
        if front {
            let _ =
                writeln!(
                s,
                "\nGreedy generation of each plan on the held-out prompts of every `--eval` text \
                 together ({} prompts).",
                self.eval.iter().map(|e| e.generation.prompts).sum::<usize>()
            );
        }
    }

    /// Greedy against the best contiguous range, per pair count.
    fn md_greedy_against_contiguous(&self, s: &mut String) {
        let m = self.metric;
        let mut lines = Vec::new();
        let max_pairs = self
            .best_by_pairs
            .iter()
            .map(|b| b.pairs)
            .max()
            .unwrap_or(0);
        for k in 1..=max_pairs {
            let of = |st: Strategy| {
                self.best_by_pairs
                    .iter()
                    .find(|b| b.pairs == k && b.strategy == st)
            };
            if let (Some(c), Some(g)) = (of(Strategy::Contiguous), of(Strategy::Greedy)) {
                let winner = if m.better(g.value, c.value) {
                    "greedy"
                } else if m.better(c.value, g.value) {
                    "contiguous"
                } else {
                    "tie"
                };
                lines.push(format!(
                    "| {k} | `{}` {:.6} | `{}` {:.6} | {winner} by {:.6} |",
                    c.plan,
                    c.value,
                    g.plan,
                    g.value,
                    (g.value - c.value).abs()
                ));
            }
        }
        if !lines.is_empty() {
            let _ = writeln!(
                s,
                "\n## Greedy against the best contiguous range\n\n| pairs | contiguous | greedy | winner |\n|---|---|---|---|"
            );
            for l in lines {
                let _ = writeln!(s, "{l}");
            }
        }
    }

    /// What the search cost, and the plots.
    fn md_cost(&self, s: &mut String) {
        let _ = writeln!(
            s,
            "\n## Cost\n\n{} plans screened, {} scored end to end, in {:.1} s = {:.2}x one \
             forward pass over the calibration tokens ({:.2} s); the best plan of every other \
             pair count measured on every window in {:.1} s = {:.2}x more.\n",
            self.screened.len(),
            self.candidates.len(),
            self.timings.search_s,
            self.timings.search_forward_multiple,
            self.timings.one_forward_s,
            self.timings.front_s,
            self.timings.front_forward_multiple
        );
        let _ = writeln!(
            s,
            "Plots: `heatmap.svg` (contiguous ranges: deviation at their end), `pairs.svg` (single pairs along depth: deviation after them; best metric against pairs)."
        );
    }

    /// `compile`: each model against the reference forward.
    fn md_validation(&self, s: &mut String) {
        if let Some(v) = &self.validation {
            let _ = writeln!(
                s,
                "\n## Validation in ONNX Runtime\n\n| model | plan | logits max abs | worst present max abs | greedy tokens |\n|---|---|---|---|---|"
            );
            for (name, v) in v {
                let present = v.outputs[1..]
                    .iter()
                    .map(|o| o.max_abs)
                    .fold(0f32, f32::max);
                let _ = writeln!(
                    s,
                    "| {name} | `{}` | {:.3e} | {:.3e} | {} |",
                    v.plan,
                    v.outputs[0].max_abs,
                    present,
                    v.tokens_word()
                );
            }
        }
    }

    /// `compile`: the kept candidate against the unmodified model.
    fn md_benchmark(&self, s: &mut String) {
        if let Some(b) = &self.benchmark {
            let o = &b.options;
            let _ = writeln!(
                s,
                "\n## Benchmark in ONNX Runtime\n\nBatch {}, prefill {} tokens, decode {} tokens after a {}-token prompt, median of {} runs, baseline and compiled alternating.\n\n| model | prefill ms | decode tokens/s |\n|---|---|---|\n| baseline | {:.2} | {:.1} |\n| compiled | {:.2} | {:.1} |\n\nSpeed-up: prefill x{:.3} (rounds x{:.3}..x{:.3}: {}), decode x{:.3} (rounds x{:.3}..x{:.3}: {}).",
                o.batch,
                o.prefill_tokens,
                o.decode_tokens,
                o.prompt_tokens,
                o.runs,
                b.a.prefill_ms,
                b.a.decode_tokens_per_s,
                b.b.prefill_ms,
                b.b.decode_tokens_per_s,
                b.prefill_speedup,
                b.prefill.min,
                b.prefill.max,
                b.prefill.verdict.name(),
                b.decode_speedup,
                b.decode.min,
                b.decode.max,
                b.decode.verdict.name()
            );
        }
    }

    /// `compile`: every candidate form and op set, and which was kept.
    fn md_candidates(&self, s: &mut String) {
        if let Some(sp) = &self.speed {
            let _ = writeln!(
                s,
                "\n## Candidates ({} workload)\n\nEach against the unmodified model of its op set, per-round ratios (> 1: faster).\n\n| form | ops | prefill | decode | {} |\n|---|---|---|---|---|",
                sp.workload.name(),
                sp.workload.name()
            );
            for (k, c) in sp.candidates.iter().enumerate() {
                let b = &c.benchmark;
                let _ = writeln!(
                    s,
                    "| {}{} | {} | x{:.3} ({}) | x{:.3} ({}) | x{:.3}..x{:.3} ({}) |",
                    c.form,
                    if k == sp.chosen { " (kept)" } else { "" },
                    c.ops,
                    b.prefill_speedup,
                    b.prefill.verdict.name(),
                    b.decode_speedup,
                    b.decode.verdict.name(),
                    c.workload.min,
                    c.workload.max,
                    c.workload.verdict.name()
                );
            }
            let _ = writeln!(s, "\n{}", sp.why);
        }
    }

    /// `compile`: wall time and peak memory of each stage.
    fn md_stages(&self, s: &mut String) {
        if let Some(stages) = &self.stages {
            let _ = writeln!(
                s,
                "\n## Stages\n\n| stage | wall s | peak RSS GiB |\n|---|---|---|"
            );
            for st in stages {
                let rss = st
                    .peak_rss_bytes
                    .map_or("-".to_string(), |b| format!("{:.2}", b as f64 / GIB));
                let _ = writeln!(s, "| {} | {:.1} | {rss} |", st.stage, st.seconds);
            }
        }
    }

    fn heatmap(&self, path: &Path) -> Result<()> {
        let cells: Vec<(usize, usize, f64)> = self
            .screened
            .iter()
            .filter_map(|c| Some((c.first_changed_layer, c.span_end, c.deviation?)))
            .collect();
        let l = self.model.layers;
        let (lo, hi) = cells
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), c| {
                (a.min(c.2), b.max(c.2))
            });
        let draw = || -> std::result::Result<(), Box<dyn std::error::Error>> {
            let root = SVGBackend::new(path, (720, 640)).into_drawing_area();
            root.fill(&WHITE)?;
            let title = if cells.is_empty() {
                "contiguous ranges: none screened (strategy contiguous not run)".to_string()
            } else {
                format!(
                    "contiguous ranges [start, end): deviation at the end ({:.4} .. {:.4})",
                    lo, hi
                )
            };
            let mut chart = ChartBuilder::on(&root)
                .caption(title, ("sans-serif", 18))
                .margin(12)
                .x_label_area_size(40)
                .y_label_area_size(50)
                .build_cartesian_2d(0..l, 0..l + 1)?;
            chart
                .configure_mesh()
                .x_desc("start layer")
                .y_desc("end layer (exclusive)")
                .disable_mesh()
                .draw()?;
            chart.draw_series(cells.iter().map(|&(s, e, v)| {
                // Low deviation (close to the original) bright.
                let t = if hi > lo {
                    1.0 - (v - lo) / (hi - lo)
                } else {
                    1.0
                };
                Rectangle::new([(s, e), (s + 1, e - 1)], colour(t).filled())
            }))?;
            root.present()?;
            Ok(())
        };
        draw().map_err(|e| Error::output(path, format!("cannot draw: {e}")))
    }

    fn pairs_plot(&self, path: &Path) -> Result<()> {
        let m = self.metric;
        // Every single pair's deviation from the original at its end.
        let singles: Vec<(usize, f64)> = {
            let mut v: Vec<(usize, f64)> = self
                .screened
                .iter()
                .filter(|c| c.pairs == 1)
                .filter_map(|c| Some((c.first_changed_layer, c.deviation?)))
                .collect();
            v.sort_by_key(|x| x.0);
            v.dedup_by_key(|x| x.0);
            v
        };
        let l = self.model.layers;
        let range = |values: &mut dyn Iterator<Item = f64>| {
            let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
                (a.min(v), b.max(v))
            });
            let (lo, hi) = if hi > lo {
                (lo, hi)
            } else if lo.is_finite() {
                (lo - 0.5, hi + 0.5)
            } else {
                (0.0, 1.0)
            };
            let pad = (hi - lo) * 0.05;
            (lo - pad)..(hi + pad)
        };
        let single_range = range(&mut singles.iter().map(|x| x.1));
        let best_range = range(&mut self.best_by_pairs.iter().map(|b| b.value));
        let max_pairs = self
            .best_by_pairs
            .iter()
            .map(|b| b.pairs)
            .max()
            .unwrap_or(1);
        let draw = || -> std::result::Result<(), Box<dyn std::error::Error>> {
            let root = SVGBackend::new(path, (760, 720)).into_drawing_area();
            root.fill(&WHITE)?;
            let (top, bottom) = root.split_vertically(360);
            let mut a = ChartBuilder::on(&top)
                .caption(
                    "each single pair (i, i+1): deviation of the stream after it",
                    ("sans-serif", 18),
                )
                .margin(12)
                .x_label_area_size(36)
                .y_label_area_size(60)
                .build_cartesian_2d(0..l, single_range.clone())?;
            a.configure_mesh()
                .x_desc("first layer of the pair")
                .y_desc("deviation")
                .draw()?;
            a.draw_series(LineSeries::new(singles.iter().cloned(), &BLUE))?;
            a.draw_series(
                singles
                    .iter()
                    .map(|&(x, y)| Circle::new((x, y), 3, BLUE.filled())),
            )?;
            let mut b = ChartBuilder::on(&bottom)
                .caption(
                    format!("best {} against the number of pairs", m.name()),
                    ("sans-serif", 18),
                )
                .margin(12)
                .x_label_area_size(36)
                .y_label_area_size(60)
                .build_cartesian_2d(0..max_pairs + 1, best_range.clone())?;
            b.configure_mesh().x_desc("pairs").y_desc(m.name()).draw()?;
            for (k, s) in self.strategies.iter().enumerate() {
                let colour = [&RED, &BLUE, &GREEN][k % 3];
                let pts: Vec<(usize, f64)> = self
                    .best_by_pairs
                    .iter()
                    .filter(|x| x.strategy == *s)
                    .map(|x| (x.pairs, x.value))
                    .collect();
                b.draw_series(LineSeries::new(pts.clone(), colour))?
                    .label(s.name())
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], colour));
                b.draw_series(pts.iter().map(|&p| Circle::new(p, 3, colour.filled())))?;
            }
            b.configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()?;
            root.present()?;
            Ok(())
        };
        draw().map_err(|e| Error::output(path, format!("cannot draw: {e}")))
    }
}

impl SearchReport {
    /// The depth/quality front with `--task`: per strategy, the accuracy its
    /// best plan of each depth retains (and, with `--eval`, the greedy tokens
    /// equal to the original's), in percent against depth, the original's
    /// depth at 100%.
    fn front_plot(&self, path: &Path) -> Result<()> {
        let l = self.depth_before;
        let min_depth = self
            .best_by_pairs
            .iter()
            .map(|b| l - b.pairs)
            .min()
            .unwrap_or(l)
            .saturating_sub(1);
        let lowest = self
            .best_by_pairs
            .iter()
            .flat_map(|b| {
                [
                    b.quality.accuracy_retained,
                    b.quality.generation.as_ref().map(|g| g.equal_fraction),
                ]
            })
            .flatten()
            .fold(1.0f64, f64::min);
        let draw = || -> std::result::Result<(), Box<dyn std::error::Error>> {
            let root = SVGBackend::new(path, (760, 420)).into_drawing_area();
            root.fill(&WHITE)?;
            let mut c = ChartBuilder::on(&root)
                .caption(
                    "best plan of each depth: accuracy retained (dots; healed: crosses), greedy tokens equal (dashed)",
                    ("sans-serif", 16),
                )
                .margin(12)
                .x_label_area_size(36)
                .y_label_area_size(60)
                .build_cartesian_2d(min_depth..l + 1, (100.0 * lowest - 5.0).max(0.0)..105.0)?;
            c.configure_mesh()
                .x_desc("depth (steps)")
                .y_desc("% of the original")
                .draw()?;
            for (k, st) in self.strategies.iter().enumerate() {
                let colour = [&RED, &BLUE, &GREEN][k % 3];
                let of = |f: &dyn Fn(&BestAtPairs) -> Option<f64>| -> Vec<(usize, f64)> {
                    std::iter::once((l, 100.0))
                        .chain(
                            self.best_by_pairs
                                .iter()
                                .filter(|b| b.strategy == *st)
                                .filter_map(|b| f(b).map(|v| (l - b.pairs, 100.0 * v))),
                        )
                        .collect()
                };
                let acc = of(&|b| b.quality.accuracy_retained);
                c.draw_series(LineSeries::new(acc.clone(), colour))?
                    .label(st.name())
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], colour));
                c.draw_series(acc.iter().map(|&p| Circle::new(p, 3, colour.filled())))?;
                let generation = of(&|b| b.quality.generation.as_ref().map(|g| g.equal_fraction));
                if generation.len() > 1 {
                    c.draw_series(DashedLineSeries::new(generation, 4, 4, colour.into()))?;
                }
                // search --heal: the same plans healed, crosses.
                let healed = of(&|b| b.healed.as_ref().and_then(|h| h.quality.accuracy_retained));
                if healed.len() > 1 {
                    c.draw_series(LineSeries::new(healed.clone(), colour.mix(0.5)))?;
                    c.draw_series(healed.iter().map(|&p| Cross::new(p, 4, colour)))?;
                }
            }
            c.configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()?;
            root.present()?;
            Ok(())
        };
        draw().map_err(|e| Error::output(path, format!("cannot draw: {e}")))
    }
}

/// A dark-blue (0) to yellow (1) scale, roughly viridis.
fn colour(t: f64) -> RGBColor {
    let stops = [
        (68.0, 1.0, 84.0),
        (59.0, 82.0, 139.0),
        (33.0, 145.0, 140.0),
        (94.0, 201.0, 98.0),
        (253.0, 231.0, 37.0),
    ];
    let t = t.clamp(0.0, 1.0) * (stops.len() - 1) as f64;
    let i = (t.floor() as usize).min(stops.len() - 2);
    let f = t - i as f64;
    let (a, b) = (stops[i], stops[i + 1]);
    let mix = |x: f64, y: f64| (x + (y - x) * f).round() as u8;
    RGBColor(mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2))
}
