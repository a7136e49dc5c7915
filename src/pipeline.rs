//! The whole pipeline as a library call, what `depthc search` and
//! `depthc compile` do: load a checkpoint, search the plan on calibration
//! text ([`search`]), then emit the original and the chosen plan as ONNX,
//! validate both in ONNX Runtime against the reference forward, benchmark
//! the compiled model against the original, and write the report
//! ([`compile`]). The binary parses arguments, calls these and prints.
//!
//! Progress is reported through [`Progress`], so that a terminal shows bars
//! and a library caller or a test shows nothing ([`Silent`]).

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::time::Instant;

use indicatif::ProgressBar;

use crate::checkpoint::tokenizer::Tokenizer;
use crate::checkpoint::Checkpoint;
use crate::forward::Forward;
use crate::graph::{ElemType, Form, Ops};
use crate::measure::timed;
use crate::model::{Int4, Model, WeightCache};
use crate::onnx::package::{self, EmitOptions, Source};
use crate::plan::Plan;
use crate::report::{EvalSection, ModelIdentity, SearchReport, TaskSection, Timings};
use crate::runtime::bench::{
    bench, BenchOptions, BenchResult, CandidateSpeed, SpeedChoice, Workload,
};
use crate::runtime::validate::{validate_emitted, Validation};
use crate::runtime::{validate, Emitted, RuntimeOptions};
use crate::search::strategy::{Budget, Metric, SearchSpace, Strategy, Unit};
use crate::search::tasks::{Retained, Task, TaskRun};
use crate::search::{self, calib, SearchOptions};
use crate::{Error, Result};

/// Where long stages report their progress.
pub trait Progress {
    /// A bar in indicatif's template syntax; its length is set by the stage.
    fn bar(&self, template: &str) -> ProgressBar;
    /// A spinner with a message, for stages of unknown length.
    fn spinner(&self, msg: &str) -> ProgressBar;
    /// One line saying what a stage chose for the user (a default, a size).
    fn note(&self, _line: &str) {}
}

/// No progress output.
pub struct Silent;

impl Progress for Silent {
    fn bar(&self, _template: &str) -> ProgressBar {
        ProgressBar::hidden()
    }
    fn spinner(&self, _msg: &str) -> ProgressBar {
        ProgressBar::hidden()
    }
}

/// What the search reads and looks for (`depthc search`'s flags).
#[derive(Debug, Clone)]
pub struct SearchConfig {
    /// Calibration files or folders (text, `.json` or `.npy` token ids);
    /// empty: the built-in calibration text.
    pub calib: Vec<PathBuf>,
    /// Window length in tokens.
    pub seq_len: usize,
    /// Calibration tokens at most; `None`: as [`Sizing`] says for the model.
    pub max_tokens: Option<usize>,
    /// `None`: one pair per 8 layers.
    pub budget: Option<Budget>,
    /// Pairs run in parallel, or layers dropped (the depth-pruning baseline).
    pub unit: Unit,
    pub protect_first: usize,
    pub protect_last: usize,
    pub metric: Metric,
    /// In the order they run; duplicates are ignored.
    pub strategies: Vec<Strategy>,
    pub beam_width: usize,
    /// Residuals kept in memory before spilling to disk.
    pub memory_budget_mib: u64,
    /// Score every plan on every window ([`SearchOptions::exhaustive`]).
    pub exhaustive: bool,
    /// Held-out texts for perplexity before and after and generation
    /// agreement, and windows of each at most.
    pub eval: Vec<PathBuf>,
    pub eval_windows: usize,
    /// Bytes of widened weights kept between uses ([`WeightCache`]).
    pub weight_cache: usize,
    /// Tasks (names or request files) the original, the chosen plan and
    /// every pair count's best plan are scored on, and docs of each at most.
    pub tasks: Vec<String>,
    pub task_limit: Option<usize>,
    /// Heal every plan of the front on the calibration windows and measure
    /// it again (`search --heal`).
    pub heal: Option<crate::heal::HealOptions>,
}

impl Default for SearchConfig {
    fn default() -> Self {
        SearchConfig {
            calib: Vec::new(),
            seq_len: 256,
            max_tokens: None,
            budget: None,
            unit: Unit::Pair,
            protect_first: 2,
            protect_last: 2,
            metric: Metric::Kl,
            strategies: vec![Strategy::Contiguous, Strategy::Greedy],
            beam_width: 4,
            memory_budget_mib: 2048,
            exhaustive: false,
            eval: Vec::new(),
            eval_windows: 16,
            weight_cache: crate::model::DEFAULT_WIDEN_BUDGET,
            tasks: Vec::new(),
            task_limit: None,
            heal: None,
        }
    }
}

/// The defaults that scale with the model, so that `search` and `compile`
/// finish on a 2-core machine in minutes: a forward pass costs about one
/// multiply-add per parameter and token, and a float32 decode step reads
/// every weight. Up to [`Sizing::LARGE_PARAMETERS`] the full defaults;
/// above, fewer calibration tokens (never fewer than the 1,024 the search
/// commits on), the fused form only (on a CPU the two forms measure within
/// each other's noise, docs/RESULTS.md) and a shorter benchmark decode.
#[derive(Debug, Clone, PartialEq)]
pub struct Sizing {
    pub parameters: usize,
    pub max_tokens: usize,
    pub forms: Vec<Form>,
    /// Tokens each benchmark run decodes.
    pub decode_tokens: usize,
}

impl Sizing {
    /// Models above this many parameters get the smaller defaults.
    pub const LARGE_PARAMETERS: usize = 500_000_000;

    pub fn of(config: &crate::checkpoint::ModelConfig) -> Sizing {
        let parameters = config.parameter_count();
        let large = parameters > Sizing::LARGE_PARAMETERS;
        Sizing {
            parameters,
            max_tokens: if large { 2048 } else { 16384 },
            forms: if large {
                vec![Form::Fused]
            } else {
                vec![Form::Fused, Form::Branches]
            },
            decode_tokens: if large {
                32
            } else {
                crate::runtime::bench::BenchOptions::default().decode_tokens
            },
        }
    }

    /// Whether these are the smaller defaults.
    pub fn is_large(&self) -> bool {
        self.parameters > Sizing::LARGE_PARAMETERS
    }

    /// What the calibration line says when the model's size chose its length.
    pub fn calibration_note(&self) -> String {
        format!(
            "at most {} for a model of {:.2}B parameters; --max-tokens to change",
            self.max_tokens,
            self.parameters as f64 / 1e9
        )
    }
}

impl SearchConfig {
    /// Calibration tokens at most for the model `config` describes.
    pub fn max_tokens_for(&self, config: &crate::checkpoint::ModelConfig) -> usize {
        self.max_tokens
            .unwrap_or_else(|| Sizing::of(config).max_tokens)
    }
}

/// The model, its tokenizer and its search report (not yet written).
pub struct Searched {
    pub model: Model,
    pub tokenizer: Option<Tokenizer>,
    pub report: SearchReport,
    /// The defaults the model's size gives.
    pub sizing: Sizing,
}

/// Load the checkpoint at `model_path` and search its plan.
pub fn search(
    model_path: &Path,
    config: &SearchConfig,
    progress: &dyn Progress,
) -> Result<Searched> {
    let f = config;
    let t0 = Instant::now();
    let ckpt = Checkpoint::open(model_path)?;
    let cfg = ckpt.config.clone();
    let layers = cfg.num_hidden_layers;
    let calibration = calib::load(
        &f.calib,
        model_path,
        cfg.window_bos(),
        ckpt.tokenizer.as_ref(),
        cfg.vocab_size,
        f.seq_len,
        f.max_tokens_for(&cfg),
    )?;
    let eval_texts = eval_windows(&ckpt, f)?;
    let tasks = f
        .tasks
        .iter()
        .map(|t| Task::open(t, &crate::checkpoint::setup_caches()))
        .collect::<Result<Vec<_>>>()?;
    if !tasks.is_empty() {
        ckpt.require_tokenizer()?;
    }
    let budget = f.budget.unwrap_or(Budget::Pairs((layers / 8).max(1)));
    let space = SearchSpace {
        num_layers: layers,
        protect_first: f.protect_first,
        protect_last: f.protect_last,
        unit: f.unit,
    };
    search::strategy::pairs_for(budget, &space)?;
    progress.note(&calibration_note(f, &cfg, &calibration, budget));
    let mut strategies: Vec<Strategy> = Vec::new();
    for &s in &f.strategies {
        if !strategies.contains(&s) {
            strategies.push(s);
        }
    }
    let content_hash = calib::content_hash(model_path)?;
    let pb = progress.spinner(&format!("loading {}", model_path.display()));
    let model = Model::load(
        &ckpt.source,
        &ckpt.config,
        &WeightCache::new(f.weight_cache),
    )?;
    let identity = ModelIdentity {
        path: model_path.display().to_string(),
        format: format!("{:?}", ckpt.format).to_lowercase(),
        family: cfg.family.name().to_string(),
        layers,
        hidden_size: cfg.hidden_size,
        content_hash,
    };
    let tokenizer = ckpt.tokenizer;
    drop(ckpt.source);
    pb.finish_and_clear();
    let load_s = t0.elapsed().as_secs_f64();
    let forward = Forward::new(&model);
    let bar = progress.bar("search {msg:>12} {bar:30} {pos}/{len} window runs, {eta} left");
    let opts = SearchOptions {
        strategies: strategies.clone(),
        beam_width: f.beam_width,
        budget,
        space,
        metric: f.metric,
        memory_budget_bytes: f.memory_budget_mib * 1024 * 1024,
        exhaustive: f.exhaustive,
    };
    let mut outcome = search::search(&forward, &calibration.windows, &opts, &bar)
        .map_err(|e| Error::Input(format!("{}: {e}", model_path.display())))?;
    bar.finish_and_clear();
    let t_eval = Instant::now();
    let (eval, held_out) = held_out_eval(&forward, &mut outcome, &eval_texts, progress)?;
    let eval_s = t_eval.elapsed().as_secs_f64();
    let t_tasks = Instant::now();
    let (task_sections, task_runs) = task_eval(
        &forward,
        &mut outcome,
        &tasks,
        tokenizer.as_ref(),
        f.task_limit,
        progress,
    )?;
    let tasks_s = t_tasks.elapsed().as_secs_f64();
    let t_heal = Instant::now();
    if let Some(h) = f.heal {
        healed_front(
            &model,
            &mut outcome,
            &calibration.windows,
            &eval_texts,
            held_out.as_ref(),
            &task_runs,
            h,
            progress,
        )?;
    }
    let heal_s = t_heal.elapsed().as_secs_f64();
    let timings = Timings {
        load_s,
        one_forward_s: outcome.timings.one_forward_s,
        search_s: outcome.timings.search_s,
        search_forward_multiple: outcome.timings.search_s / outcome.timings.one_forward_s,
        front_s: outcome.timings.front_s,
        front_forward_multiple: outcome.timings.front_s / outcome.timings.one_forward_s,
        strategy_forward_multiples: outcome.timings.strategy_forward_multiples.clone(),
        eval_s,
        tasks_s,
        heal_s,
        total_s: t0.elapsed().as_secs_f64(),
    };
    let mut report = SearchReport::new(
        identity,
        &calibration,
        &outcome,
        f.metric,
        &strategies,
        f.beam_width,
        budget,
        (f.protect_first, f.protect_last),
        eval,
        timings,
    );
    report.unit = f.unit;
    report.accuracy_retained =
        search::tasks::mean_retained(task_sections.iter().map(|t| t.retained));
    report.tasks = task_sections;
    drop(forward);
    Ok(Searched {
        sizing: Sizing::of(&model.config),
        model,
        tokenizer,
        report,
    })
}

/// The windows of each `--eval` text, by name.
fn eval_windows(ckpt: &Checkpoint, f: &SearchConfig) -> Result<Vec<(String, Vec<Vec<u32>>)>> {
    f.eval
        .iter()
        .map(|p| {
            let text = std::fs::read_to_string(p).map_err(|e| {
                Error::Input(format!("{}: cannot read --eval text: {e}", p.display()))
            })?;
            let ids = ckpt.require_tokenizer()?.encode(&text)?;
            let bos = ckpt.config.window_bos();
            let w = search::windows(&ids, f.seq_len, Some(f.eval_windows), bos)
                .map_err(|e| Error::Input(format!("{}: {e}", p.display())))?;
            Ok((p.display().to_string(), w))
        })
        .collect()
}

/// The line that says what the search calibrates on and looks for.
fn calibration_note(
    f: &SearchConfig,
    config: &crate::checkpoint::ModelConfig,
    calibration: &calib::Calibration,
    budget: Budget,
) -> String {
    let layers = config.num_hidden_layers;
    format!(
        "calibration    {} tokens in {} windows of {} ({}{}); budget {}{}",
        calibration.tokens(),
        calibration.windows.len(),
        f.seq_len,
        if f.calib.is_empty() {
            "the built-in text"
        } else {
            "--calib"
        },
        match (f.max_tokens, Sizing::of(config)) {
            (Some(n), _) if calibration.tokens() + f.seq_len > n => format!(", --max-tokens {n}"),
            (None, s) if s.is_large() => format!(", {}", s.calibration_note()),
            _ => String::new(),
        },
        budget.describe(f.metric, f.unit),
        if f.budget.is_none() {
            format!(" (one per 8 of {layers} layers; --pairs, --min-similarity or --max-depth to choose)")
        } else {
            String::new()
        }
    )
}

/// Perplexity before and after the chosen plan on each held-out text, and
/// greedy generation agreement on their prompts: of the chosen plan per
/// text, and of the best plan of every pair count (recorded in `outcome`).
fn held_out_eval(
    forward: &Forward,
    outcome: &mut search::SearchOutcome,
    eval_texts: &[(String, Vec<Vec<u32>>)],
    progress: &dyn Progress,
) -> Result<(Vec<EvalSection>, Option<search::HeldOut>)> {
    Ok(if eval_texts.is_empty() {
        (Vec::new(), None)
    } else {
        // Perplexity on each text, the original's generation on the
        // held-out prompts of all of them, then every plan's.
        let bar = progress.bar("eval   {msg:>12} {bar:30} {pos}/{len} steps, {eta} left");
        bar.set_length((eval_texts.len() + outcome.best_by_pairs.len() + 2) as u64);
        bar.set_message("perplexity");
        let mut perplexities = Vec::new();
        let mut prompts = Vec::new();
        let mut ranges = Vec::new();
        for (_, w) in eval_texts {
            perplexities.push(search::evaluate(
                forward,
                Some(&outcome.chosen.plan),
                w,
                &ProgressBar::hidden(),
            )?);
            let p = search::prompts_of(w, search::HELD_OUT_PROMPTS, search::HELD_OUT_PROMPT_TOKENS);
            ranges.push(prompts.len()..prompts.len() + p.len());
            prompts.extend(p);
            bar.inc(1);
        }
        bar.set_message("generation");
        // Greedy generation on held-out prompts: the best plan of every pair
        // count (the depth/quality front, on all texts' prompts), and the
        // chosen plan (on each text's).
        let held_out = search::HeldOut::new(forward, prompts, search::HELD_OUT_GENERATED_TOKENS)?;
        bar.inc(1);
        for b in &mut outcome.best_by_pairs {
            b.quality.generation = Some(held_out.agreement(forward, &b.plan)?);
            // The chosen plan's was measured above.
            b.quality.perplexity = if b.plan == outcome.chosen.plan {
                perplexities.iter().map(|r| r.perplexity).collect()
            } else {
                perplexities_of(forward, &b.plan, eval_texts)?
            };
            bar.inc(1);
        }
        let chosen = held_out.continuations(forward, &outcome.chosen.plan)?;
        bar.finish_and_clear();
        let sections = eval_texts
            .iter()
            .zip(perplexities)
            .zip(ranges)
            .map(|(((text, _), r), range)| EvalSection {
                text: text.clone(),
                windows: r.windows,
                seq_len: r.seq_len,
                perplexity_before: r.perplexity_original.unwrap_or(r.perplexity),
                perplexity_after: r.perplexity,
                generation: search::Agreement::of(&chosen[range]),
            })
            .collect();
        (sections, Some(held_out))
    })
}

/// `plan`'s perplexity on each held-out text.
fn perplexities_of(
    forward: &Forward,
    plan: &Plan,
    eval_texts: &[(String, Vec<Vec<u32>>)],
) -> Result<Vec<f64>> {
    eval_texts
        .iter()
        .map(|(_, w)| search::perplexity(forward, plan, w))
        .collect()
}

/// `search --heal`: each plan of the front healed on the calibration
/// windows and measured again on what was measured unhealed (held-out
/// perplexity, generation agreement, task accuracy).
#[allow(clippy::too_many_arguments)]
fn healed_front(
    model: &Model,
    outcome: &mut search::SearchOutcome,
    windows: &[Vec<u32>],
    eval_texts: &[(String, Vec<Vec<u32>>)],
    held_out: Option<&search::HeldOut>,
    task_runs: &[TaskRun],
    opts: crate::heal::HealOptions,
    progress: &dyn Progress,
) -> Result<()> {
    let bar = progress.bar("heal   {msg:>12} {bar:30} {pos}/{len} plans, {eta} left");
    bar.set_length(outcome.best_by_pairs.len() as u64);
    let mut done: Vec<(Plan, search::HealedScores)> = Vec::new();
    for b in &mut outcome.best_by_pairs {
        bar.set_message(format!("depth {}", b.plan.depth()));
        if let Some((_, h)) = done.iter().find(|(p, _)| *p == b.plan) {
            b.healed = Some(h.clone());
            bar.inc(1);
            continue;
        }
        let (healed, report) =
            crate::heal::heal(model, &b.plan, windows, opts, &ProgressBar::hidden())?;
        let f = Forward::new(&healed);
        let tasks = task_runs
            .iter()
            .map(|run| run.score(&f, &b.plan, &ProgressBar::hidden()))
            .collect::<Result<Vec<_>>>()?;
        let h = search::HealedScores {
            groups_applied: report.groups.iter().filter(|g| g.applied).count(),
            quality: search::Quality {
                perplexity: perplexities_of(&f, &b.plan, eval_texts)?,
                generation: held_out.map(|h| h.agreement(&f, &b.plan)).transpose()?,
                accuracy_retained: search::tasks::mean_retained(tasks.iter().map(|t| t.retained)),
                tasks,
            },
        };
        done.push((b.plan.clone(), h.clone()));
        b.healed = Some(h);
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(())
}

/// Accuracy on each `--task` of the original, the chosen plan and the
/// best plan of every pair count (recorded in `outcome`); each plan scored
/// once.
fn task_eval<'t>(
    forward: &Forward,
    outcome: &mut search::SearchOutcome,
    tasks: &'t [Task],
    tokenizer: Option<&Tokenizer>,
    limit: Option<usize>,
    progress: &dyn Progress,
) -> Result<(Vec<TaskSection>, Vec<TaskRun<'t>>)> {
    let Some(tokenizer) = tokenizer.filter(|_| !tasks.is_empty()) else {
        return Ok((Vec::new(), Vec::new()));
    };
    let bar = progress.bar("tasks  {msg:>12} {bar:30} {pos}/{len} docs, {eta} left");
    bar.set_message("original");
    // Every plan scored runs the original's layers before this one; one
    // layer earlier, so that the same plans healed (`--heal` corrects the
    // step before a dropped layer) start there too.
    let keep = std::iter::once(&outcome.chosen.plan)
        .chain(outcome.best_by_pairs.iter().map(|b| &b.plan))
        .map(|p| p.unchanged_layers().saturating_sub(1))
        .min();
    let runs = tasks
        .iter()
        .map(|t| TaskRun::new(forward, t, tokenizer, limit, keep, &bar))
        .collect::<Result<Vec<_>>>()?;
    let mut scored: Vec<(Plan, Vec<Retained>)> = Vec::new();
    let mut score = |plan: &Plan| -> Result<Vec<Retained>> {
        if let Some((_, r)) = scored.iter().find(|(p, _)| p == plan) {
            return Ok(r.clone());
        }
        bar.set_message(format!("depth {}", plan.depth()));
        let r = runs
            .iter()
            .map(|run| run.score(forward, plan, &bar))
            .collect::<Result<Vec<_>>>()?;
        scored.push((plan.clone(), r.clone()));
        Ok(r)
    };
    let chosen = score(&outcome.chosen.plan)?;
    for b in &mut outcome.best_by_pairs {
        b.quality.tasks = score(&b.plan)?;
        b.quality.accuracy_retained =
            search::tasks::mean_retained(b.quality.tasks.iter().map(|t| t.retained));
    }
    bar.finish_and_clear();
    let sections = runs
        .iter()
        .zip(chosen)
        .map(|(run, c)| TaskSection {
            name: run.task.name.clone(),
            path: run.task.path.display().to_string(),
            primary_metric: run.task.primary,
            docs: run.docs(),
            original: run.original.clone(),
            chosen: c.accuracy,
            retained: c.retained,
        })
        .collect();
    Ok((sections, runs))
}

/// What `compile` does besides the search.
pub struct CompileOptions {
    pub search: SearchConfig,
    /// Element type of the emitted models' activations.
    pub float: ElemType,
    /// 4-bit linear weights in every emitted model (the baseline too).
    pub int4: Option<Int4>,
    /// The forms and op sets to try: every pair is emitted, validated and
    /// benchmarked against the unmodified model of its op set, and the
    /// fastest on `workload` is kept. `None` forms: as [`Sizing`] says.
    pub forms: Option<Vec<Form>>,
    pub ops: Vec<Ops>,
    pub workload: Workload,
    pub runtime: RuntimeOptions,
    /// Greedy decode steps of the validation.
    pub steps: usize,
    /// Batch size and measured rounds of the benchmark, and tokens each
    /// run decodes (`None`: as [`Sizing`] says).
    pub batch: usize,
    pub runs: usize,
    pub decode_tokens: Option<usize>,
    /// Replace an existing output directory (once the new one is complete).
    pub force: bool,
    /// Heal the chosen plan's groups on the search's calibration text before
    /// emitting it (the baseline stays the unmodified model).
    pub heal: Option<crate::heal::HealOptions>,
}

impl Default for CompileOptions {
    fn default() -> Self {
        CompileOptions {
            search: SearchConfig::default(),
            float: ElemType::F32,
            int4: None,
            forms: None,
            ops: vec![Ops::Portable],
            workload: Workload::Mixed,
            runtime: RuntimeOptions {
                library: None,
                device: crate::runtime::Device::Cpu,
                strict: false,
                threads: None,
            },
            steps: validate::DEFAULT_STEPS,
            batch: 1,
            runs: 3,
            decode_tokens: None,
            force: false,
            heal: None,
        }
    }
}

/// What `compile` made: the chosen plan, the three directories, and what
/// validation and the benchmark measured (also in `report`).
pub struct Compiled {
    pub plan: Plan,
    /// The defaults the model's size gives.
    pub sizing: Sizing,
    /// The search report with its validation, benchmark and speed sections.
    pub report: SearchReport,
    /// The unmodified model, the chosen plan, and the report's directory.
    pub baseline: PathBuf,
    pub compiled: PathBuf,
    pub report_dir: PathBuf,
    /// `("baseline", ..)` and `("compiled", ..)` of the kept candidate (and,
    /// for int4 at accuracy level 4, both again at level 0).
    pub validations: Vec<(String, Validation)>,
    /// Baseline (A) against compiled (B), of the kept candidate.
    pub benchmark: BenchResult,
    /// Every candidate's ratios and why the kept one was kept.
    pub speed: SpeedChoice,
}

/// Search `model_path`, then emit, validate and benchmark every candidate
/// form and op set, keep the fastest as `out/compiled` with the unmodified
/// model of its op set as `out/baseline`, and write `out/report`. `out` is
/// written under a temporary name and appears only when complete.
///
/// Stages, each timed with its peak memory: the search; per op set, the
/// baseline emitted and validated; per form, the candidate emitted,
/// validated and benchmarked against that baseline ([`Candidates`]); the
/// fastest kept ([`SpeedChoice::choose`]); the report written.
pub fn compile(
    model_path: &Path,
    out: &Path,
    opts: &CompileOptions,
    progress: &dyn Progress,
) -> Result<Compiled> {
    crate::output::check_output(out, opts.force, true)?;
    if opts.forms.as_ref().is_some_and(|f| f.is_empty()) || opts.ops.is_empty() {
        return Err(Error::Input(
            "compile needs at least one form and one op set".into(),
        ));
    }
    // Fail before the search, not after it, when ONNX Runtime is missing.
    crate::runtime::find_library(opts.runtime.library.as_deref())?;
    let stages = RefCell::new(Vec::new());
    let searched = timed(&stages, "search".into(), || {
        search(model_path, &opts.search, progress)
    })?;
    let mut report = searched.report.clone();
    let chosen = report.chosen_plan.clone();
    let healed = match opts.heal {
        Some(h) => {
            let s = &opts.search;
            let pb = progress.bar("heal   {bar:30} {pos}/{len} window steps, {eta} left");
            let (model, r) = timed(&stages, "heal".into(), || {
                crate::heal::heal_on(
                    &searched.model,
                    model_path,
                    searched.tokenizer.as_ref(),
                    &chosen,
                    &crate::heal::HealCalibration {
                        calib: &s.calib,
                        seq_len: s.seq_len,
                        max_tokens: s.max_tokens_for(&searched.model.config),
                    },
                    h,
                    &pb,
                )
            })?;
            pb.finish_and_clear();
            report.healing = Some(r);
            Some(model)
        }
        None => None,
    };
    let sizing = searched.sizing.clone();
    let candidates = Candidates {
        model: &searched.model,
        compiled_model: healed.as_ref().unwrap_or(&searched.model),
        source: Source {
            path: model_path,
            tokenizer: searched.tokenizer.as_ref(),
        },
        prompt: validate::prompt(
            searched.tokenizer.as_ref(),
            None,
            validate::DEFAULT_PROMPT_TOKENS,
            searched.model.config.vocab_size,
        )?,
        opts,
        sizing,
        stages: &stages,
        progress,
    };
    let (benchmark, validations, speed) = crate::output::write_directory(out, opts.force, |dir| {
        let work = dir.join(".candidates");
        std::fs::create_dir(&work).map_err(|e| Error::io(&work, e))?;
        let (speed, mut checked) = candidates.try_all(&work, &chosen)?;
        let kept = checked.swap_remove(speed.chosen);
        let rename =
            |from: &Path, to: &Path| std::fs::rename(from, to).map_err(|e| Error::io(to, e));
        rename(&kept.baseline, &dir.join("baseline"))?;
        rename(&kept.compiled, &dir.join("compiled"))?;
        std::fs::remove_dir_all(&work).map_err(|e| Error::io(&work, e))?;
        let validations = kept.validations();
        let r = speed.candidates[speed.chosen].benchmark.clone();
        report.validation = Some(validations.iter().cloned().collect());
        report.benchmark = Some(r.clone());
        report.speed = Some(speed.clone());
        report.stages = Some(stages.borrow().clone());
        let report_dir = dir.join("report");
        std::fs::create_dir(&report_dir).map_err(|e| Error::io(&report_dir, e))?;
        report.write(&report_dir)?;
        Ok((r, validations, speed))
    })?;
    Ok(Compiled {
        sizing: searched.sizing.clone(),
        plan: chosen,
        report,
        baseline: out.join("baseline"),
        compiled: out.join("compiled"),
        report_dir: out.join("report"),
        validations,
        benchmark,
        speed,
    })
}

/// `compile --format gguf`: the search, its plan healed with `heal`, and
/// `out/model.gguf` of llama.cpp's `deci` architecture ([`crate::llamacpp`])
/// with `out/report/`. ONNX Runtime plays no part: the GGUF is checked
/// against the reference forward by llama.cpp itself (tests/llamacpp.rs).
pub struct CompiledGguf {
    pub plan: Plan,
    /// The defaults the model's size gives.
    pub sizing: Sizing,
    pub report: SearchReport,
    pub gguf: PathBuf,
    pub report_dir: PathBuf,
    pub written: crate::llamacpp::Written,
}

pub fn compile_gguf(
    model_path: &Path,
    out: &Path,
    opts: &CompileOptions,
    encoding: crate::llamacpp::Encoding,
    progress: &dyn Progress,
) -> Result<CompiledGguf> {
    crate::output::check_output(out, opts.force, true)?;
    // Fail before the search, not after it, on a source the writer refuses.
    let ckpt = crate::checkpoint::Checkpoint::open(model_path)?;
    crate::llamacpp::check_source(&ckpt.config)?;
    drop(ckpt);
    let origin = crate::llamacpp::Origin::open(model_path)?;
    let stages = RefCell::new(Vec::new());
    let searched = timed(&stages, "search".into(), || {
        search(model_path, &opts.search, progress)
    })?;
    let mut report = searched.report.clone();
    let chosen = report.chosen_plan.clone();
    let healed = match opts.heal {
        Some(h) => {
            let s = &opts.search;
            let pb = progress.bar("heal   {bar:30} {pos}/{len} window steps, {eta} left");
            let (model, r) = timed(&stages, "heal".into(), || {
                crate::heal::heal_on(
                    &searched.model,
                    model_path,
                    searched.tokenizer.as_ref(),
                    &chosen,
                    &crate::heal::HealCalibration {
                        calib: &s.calib,
                        seq_len: s.seq_len,
                        max_tokens: s.max_tokens_for(&searched.model.config),
                    },
                    h,
                    &pb,
                )
            })?;
            pb.finish_and_clear();
            report.healing = Some(r);
            Some(model)
        }
        None => None,
    };
    let model = healed.as_ref().unwrap_or(&searched.model);
    let written = crate::output::write_directory(out, opts.force, |dir| {
        let pb = progress.spinner("writing model.gguf");
        let w = timed(&stages, "write gguf".into(), || {
            crate::llamacpp::write_into(model, &chosen, &origin, encoding, healed.is_some(), dir)
        })?;
        pb.finish_and_clear();
        report.stages = Some(stages.borrow().clone());
        let report_dir = dir.join("report");
        std::fs::create_dir(&report_dir).map_err(|e| Error::io(&report_dir, e))?;
        report.write(&report_dir)?;
        Ok(w)
    })?;
    Ok(CompiledGguf {
        sizing: searched.sizing.clone(),
        plan: chosen,
        report,
        gguf: out.join(crate::llamacpp::FILE),
        report_dir: out.join("report"),
        written,
    })
}

/// What `compile` emits, validates and benchmarks its candidates with.
struct Candidates<'a> {
    /// The unmodified model (the baselines).
    model: &'a Model,
    /// The model the chosen plan is emitted from (healed with `--heal`).
    compiled_model: &'a Model,
    source: Source<'a>,
    /// The prefill of every validation.
    prompt: Vec<u32>,
    opts: &'a CompileOptions,
    /// The forms and decode length when `opts` leaves them to the model.
    sizing: Sizing,
    stages: &'a RefCell<Vec<crate::measure::StageCost>>,
    progress: &'a dyn Progress,
}

/// A candidate that passed validation: its directory and its baseline's,
/// with what validation measured of each.
struct Checked {
    baseline: PathBuf,
    baseline_validation: Vec<Validation>,
    compiled: PathBuf,
    compiled_validation: Vec<Validation>,
}

impl Checked {
    /// Each model as written; an int4 model at accuracy level 4 also at
    /// level 0 (the same graph and weights, checked to float rounding).
    fn validations(self) -> Vec<(String, Validation)> {
        let mut validations = Vec::new();
        for (name, vs) in [
            ("baseline", self.baseline_validation),
            ("compiled", self.compiled_validation),
        ] {
            for (k, v) in vs.into_iter().enumerate() {
                let label = if k == 0 {
                    name.to_string()
                } else {
                    format!("{name} at accuracy level 0")
                };
                validations.push((label, v));
            }
        }
        validations
    }
}

impl Candidates<'_> {
    /// Every op set's baseline, and every form of `chosen` in it, emitted
    /// into `work`, validated and benchmarked; the fastest chosen.
    fn try_all(&self, work: &Path, chosen: &Plan) -> Result<(SpeedChoice, Vec<Checked>)> {
        let layers = self.model.config.num_hidden_layers;
        let mut ops_list = self.opts.ops.clone();
        ops_list.dedup();
        let mut candidates = Vec::new();
        let mut checked = Vec::new();
        for &ops in &ops_list {
            let base_dir = work.join(format!("baseline-{}", ops.name()));
            let label = format!("baseline {}", ops.name());
            let base_v = self.emit_checked(
                self.model,
                &base_dir,
                &Plan::sequential(layers),
                Form::Fused,
                ops,
                &label,
            )?;
            let mut written = Vec::new();
            for &form in self.opts.forms.as_ref().unwrap_or(&self.sizing.forms) {
                // A group without an exact fused form is written as branches.
                let form = crate::graph::written_form(self.model, chosen, form);
                if written.contains(&form) {
                    continue;
                }
                written.push(form);
                let name = format!("{}-{}", ops.name(), form.name());
                let dir = work.join(&name);
                let v = self.emit_checked(self.compiled_model, &dir, chosen, form, ops, &name)?;
                let r = self.bench(&base_dir, &dir, &name)?;
                candidates.push(CandidateSpeed {
                    form: form.name().to_string(),
                    ops: ops.name().to_string(),
                    workload: self.opts.workload.of(&r),
                    benchmark: r,
                });
                checked.push(Checked {
                    baseline: base_dir.clone(),
                    baseline_validation: base_v.clone(),
                    compiled: dir,
                    compiled_validation: v,
                });
            }
        }
        Ok((SpeedChoice::choose(self.opts.workload, candidates), checked))
    }

    /// Emit one model to `path` and check it against the reference forward.
    fn emit_checked(
        &self,
        model: &Model,
        path: &Path,
        plan: &Plan,
        form: Form,
        ops: Ops,
        label: &str,
    ) -> Result<Vec<Validation>> {
        let pb = self.progress.bar(&format!(
            "emit {label:<18} {{bar:30}} {{pos}}/{{len}} weights"
        ));
        let emit = EmitOptions {
            form,
            float: self.opts.float,
            ops,
            int4: self.opts.int4,
            healed: !std::ptr::eq(model, self.model),
        };
        timed(self.stages, format!("emit {label}"), || {
            package::emit(model, plan, &self.source, &emit, path, &pb)
        })?;
        pb.finish_and_clear();
        let sp = self.progress.spinner(&format!("validate {label}"));
        // Validation closes its sessions: ONNX Runtime holds a copy of the
        // weights per session, so only the benchmark opens two at once.
        let results = timed(self.stages, format!("validate {label}"), || {
            validate_emitted(
                &Emitted::open(path)?,
                model,
                &self.prompt,
                self.opts.steps,
                None,
                &self.opts.runtime,
            )
        })?;
        sp.finish_and_clear();
        for (what, v) in &results {
            if !v.passed() {
                let what = if what.is_empty() {
                    String::new()
                } else {
                    format!(" ({what})")
                };
                return Err(Error::Input(format!(
                    "{label} model{what} failed validation: {}{}",
                    v.failures.join("; "),
                    if v.tokens_agree {
                        ""
                    } else {
                        "; greedy tokens differ"
                    }
                )));
            }
        }
        Ok(results.into_iter().map(|(_, v)| v).collect())
    }

    /// The model in `dir` against the baseline in `base_dir`.
    fn bench(&self, base_dir: &Path, dir: &Path, name: &str) -> Result<BenchResult> {
        let open = |path: &Path| Emitted::open(path)?.session(&self.opts.runtime);
        let options = BenchOptions {
            batch: self.opts.batch.max(1),
            runs: self.opts.runs.max(1),
            decode_tokens: self.opts.decode_tokens.unwrap_or(self.sizing.decode_tokens),
            ..BenchOptions::default()
        };
        let pb = self.progress.bar(&format!(
            "bench {name:<16} {{bar:30}} {{pos}}/{{len}} rounds, {{eta}} left"
        ));
        let r = timed(self.stages, format!("bench {name}"), || {
            let (mut base, mut session) = (open(base_dir)?, open(dir)?);
            bench(
                &mut base,
                &mut session,
                self.model.config.vocab_size,
                &options,
                &pb,
            )
        })?;
        pb.finish_and_clear();
        Ok(r)
    }
}
