//! `search` and `compile` (search, emit, validate, benchmark, report).

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use indicatif::ProgressBar;
use serde_json::json;

use crate::cli::*;
use depthc::checkpoint::Checkpoint;
use depthc::forward::Forward;
use depthc::model::Model;
use depthc::plan::Plan;
use depthc::search;

use super::onnx::print_bench;
use super::{bar, emit_options, runtime_options, spinner, summary_json, DEFAULT_PROMPT};

/// The model and its search report (not yet written).
struct Searched {
    model: Model,
    tokenizer: Option<depthc::checkpoint::tokenizer::Tokenizer>,
    report: depthc::report::SearchReport,
}

fn run_search(model_path: &Path, f: &SearchFlags) -> Result<Searched> {
    use depthc::report::{EvalSection, ModelIdentity, SearchReport, Timings};
    use depthc::search::strategy::{Budget, Metric, SearchSpace, Strategy};
    use depthc::search::{calib, SearchOptions};
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
        f.max_tokens,
    )?;
    let eval_windows = match &f.eval {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("{}: cannot read --eval text", p.display()))?;
            let ids = ckpt.require_tokenizer()?.encode(&text)?;
            let bos = cfg.window_bos();
            let w = search::windows(&ids, f.seq_len, Some(f.eval_windows), bos)?;
            Some((p.display().to_string(), w))
        }
        None => None,
    };
    let budget = match (f.pairs, f.min_similarity, f.max_depth) {
        (Some(k), _, _) => Budget::Pairs(k),
        (_, Some(x), _) => Budget::MinSimilarity(x),
        (_, _, Some(d)) => Budget::MaxDepth(d),
        _ => Budget::Pairs((layers / 8).max(1)),
    };
    let space = SearchSpace {
        num_layers: layers,
        protect_first: f.protect_first,
        protect_last: f.protect_last,
    };
    depthc::search::strategy::pairs_for(budget, &space)?;
    let metric = match f.metric {
        MetricArg::Cosine => Metric::Cosine,
        MetricArg::Kl => Metric::Kl,
        MetricArg::Top1 => Metric::Top1,
    };
    let mut strategies: Vec<Strategy> = Vec::new();
    for s in &f.strategy {
        let s = match s {
            StrategyArg::Contiguous => Strategy::Contiguous,
            StrategyArg::Greedy => Strategy::Greedy,
            StrategyArg::Beam => Strategy::Beam,
        };
        if !strategies.contains(&s) {
            strategies.push(s);
        }
    }
    let content_hash = calib::content_hash(model_path)?;
    let pb = spinner(&format!("loading {}", model_path.display()));
    let model = Model::load(ckpt.source.as_ref(), &ckpt.config)?;
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
    let progress = bar(
        0,
        "search {msg:>12} {bar:30} {pos}/{len} window runs, {eta} left",
    )?;
    let opts = SearchOptions {
        strategies: strategies.clone(),
        beam_width: f.beam_width,
        budget,
        space,
        metric,
        memory_budget_bytes: f.memory_budget_mib * 1024 * 1024,
    };
    let outcome = search::search(&forward, &calibration.windows, &opts, &progress)
        .with_context(|| model_path.display().to_string())?;
    progress.finish_and_clear();
    let t_eval = Instant::now();
    let eval = match &eval_windows {
        Some((text, w)) => {
            let plan = outcome.chosen.plan.clone();
            let r = search::evaluate(&forward, Some(&plan), w, &ProgressBar::hidden())?;
            Some(EvalSection {
                text: text.clone(),
                windows: r.windows,
                seq_len: r.seq_len,
                perplexity_before: r.perplexity_original.unwrap_or(r.perplexity),
                perplexity_after: r.perplexity,
            })
        }
        None => None,
    };
    let eval_s = t_eval.elapsed().as_secs_f64();
    let timings = Timings {
        load_s,
        one_forward_s: outcome.timings.one_forward_s,
        search_s: outcome.timings.search_s,
        search_forward_multiple: outcome.timings.search_s / outcome.timings.one_forward_s,
        strategy_forward_multiples: outcome.timings.strategy_forward_multiples.clone(),
        eval_s,
        total_s: t0.elapsed().as_secs_f64(),
    };
    let report = SearchReport::new(
        identity,
        &calibration,
        &outcome,
        metric,
        &strategies,
        f.beam_width,
        budget,
        (f.protect_first, f.protect_last),
        eval,
        timings,
    );
    drop(forward);
    Ok(Searched {
        model,
        tokenizer,
        report,
    })
}

fn print_search_summary(report: &depthc::report::SearchReport) {
    let c = &report.chosen;
    println!(
        "chosen plan    {} ({}, depth {} -> {})",
        report.chosen_plan,
        c.strategy.name(),
        report.depth_before,
        report.depth_after
    );
    println!(
        "similarity     cosine {:.6}, kl {:.6}, top-1 {:.4}",
        c.scores.cosine, c.scores.kl, c.scores.top1_agreement
    );
    if let Some(e) = &report.eval {
        println!(
            "perplexity     {:.4} -> {:.4} (x{:.4}) on {}",
            e.perplexity_before,
            e.perplexity_after,
            e.perplexity_after / e.perplexity_before,
            e.text
        );
    }
    println!(
        "search         {} candidates in {:.1} s = {:.2}x one forward ({:.2} s, {} tokens)",
        report.candidates.len(),
        report.timings.search_s,
        report.timings.search_forward_multiple,
        report.timings.one_forward_s,
        report.calibration.tokens
    );
    println!("why            {}", report.reason);
}

pub fn search_command(a: SearchArgs) -> Result<()> {
    depthc::output::check_output(&a.output, false, false)?;
    let searched = run_search(&a.model, &a.flags)?;
    let report = &searched.report;
    depthc::output::new_directory(&a.output, |dir| report.write(dir))?;
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&{
                let mut v = summary_json(report);
                v["report"] = json!(a.output.join("search-report.json"));
                v
            })?
        );
        return Ok(());
    }
    print_search_summary(report);
    println!("report         {}", a.output.display());
    Ok(())
}

pub fn compile_command(a: CompileArgs) -> Result<()> {
    use depthc::onnx::package::{self, Source};
    use depthc::runtime::bench::{bench, BenchOptions};
    use depthc::runtime::validate::{validate, Tolerance};
    use depthc::runtime::Emitted;
    depthc::output::check_output(&a.output, a.force, true)?;
    // Fail before the search, not after it, when ONNX Runtime is missing.
    depthc::runtime::find_library(a.ort_lib.as_deref())?;
    let searched = run_search(&a.model, &a.search)?;
    let mut report = searched.report.clone();
    let model = &searched.model;
    let layers = model.config.num_hidden_layers;
    let chosen = report.chosen_plan.clone();
    let opts = emit_options(a.form, a.dtype, a.ops);
    let rt = runtime_options(&a.ort_lib, a.device, None);
    let source = Source {
        path: &a.model,
        tokenizer: searched.tokenizer.as_ref(),
    };
    let prompt: Vec<u32> = match &searched.tokenizer {
        Some(t) => {
            let mut ids = t.encode(DEFAULT_PROMPT)?;
            ids.truncate(64);
            ids
        }
        None => (0..32)
            .map(|i| (i * 7919 + 13) % model.config.vocab_size as u32)
            .collect(),
    };
    let (bench_result, validations) = depthc::output::write_directory(&a.output, a.force, |dir| {
        let mut validations = Vec::new();
        let mut sessions = Vec::new();
        for (name, plan) in [
            ("baseline", Plan::sequential(layers)),
            ("compiled", chosen.clone()),
        ] {
            let out = dir.join(name);
            let pb = bar(
                0,
                &format!("emit {name:<9} {{bar:30}} {{pos}}/{{len}} weights"),
            )
            .map_err(|e| depthc::Error::Input(e.to_string()))?;
            package::emit(model, &plan, &source, &opts, &out, &pb)?;
            pb.finish_and_clear();
            let emitted = Emitted::open(&out)?;
            let mut session = emitted.session(&rt)?;
            let sp = spinner(&format!("validate {name}"));
            let v = validate(
                &mut session,
                &Forward::new(model),
                &plan,
                &prompt,
                a.steps,
                Tolerance::default_for(opts.float),
            )?;
            sp.finish_and_clear();
            if !v.passed() {
                return Err(depthc::Error::Input(format!(
                    "{name} model failed validation: {}",
                    v.failures.join("; ")
                )));
            }
            validations.push((name.to_string(), v));
            sessions.push(session);
        }
        // The validated sessions are the ones benchmarked: baseline (A), compiled (B).
        let (sa, sb) = sessions.split_at_mut(1);
        let bo = BenchOptions {
            batch: a.batch.max(1),
            runs: a.runs.max(1),
            ..BenchOptions::default()
        };
        let pb = bar(0, "bench {bar:30} {pos}/{len} runs, {eta} left")
            .map_err(|e| depthc::Error::Input(e.to_string()))?;
        let r = bench(&mut sa[0], &mut sb[0], model.config.vocab_size, &bo, &pb)?;
        pb.finish_and_clear();
        report.validation = Some(validations.iter().cloned().collect());
        report.benchmark = Some(r.clone());
        let report_dir = dir.join("report");
        std::fs::create_dir(&report_dir).map_err(|e| depthc::Error::io(&report_dir, e))?;
        report.write(&report_dir)?;
        Ok((r, validations))
    })?;
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&{
                let mut v = summary_json(&report);
                v["validation"] = validations
                    .iter()
                    .map(|(n, v)| {
                        json!({
                            "model": n, "passed": v.passed(),
                            "logits_max_abs": v.outputs[0].max_abs,
                        })
                    })
                    .collect();
                v["benchmark"] = json!(bench_result);
                v["output"] = json!(a.output);
                v
            })?
        );
        return Ok(());
    }
    print_search_summary(&report);
    for (name, v) in &validations {
        println!(
            "validated      {name}: logits max abs {:.2e}, greedy tokens {}",
            v.outputs[0].max_abs,
            if v.tokens_agree { "agree" } else { "differ" }
        );
    }
    print_bench(&bench_result, "baseline", "compiled");
    println!(
        "output         {}/{{baseline,compiled,report}}",
        a.output.display()
    );
    Ok(())
}
