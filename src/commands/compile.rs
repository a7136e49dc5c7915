//! `search` and `compile`: flags to [`depthc::pipeline`] options, the call,
//! the summary.

use anyhow::Result;
use std::sync::Arc;

use depthc::model::WeightCache;
use serde_json::json;

use crate::cli::*;
use depthc::pipeline::{self, CompileOptions, SearchConfig, Sizing};
use depthc::search::strategy::Budget;

use super::onnx::print_bench;
use super::{float_of, int4_of, runtime_options, summary_json, Terminal};

/// The sizing to mention when the model's size chose the calibration length.
fn sized<'s>(f: &SearchFlags, s: &'s Sizing) -> Option<&'s Sizing> {
    (f.max_tokens.is_none() && s.is_large()).then_some(s)
}

/// The search flags as the library's options.
fn search_config(f: &SearchFlags, weight_cache: &WeightCache) -> SearchConfig {
    SearchConfig {
        weight_cache: weight_cache.budget(),
        tasks: f.task.clone(),
        task_limit: f.task_limit,
        heal: None,
        calib: f.calib.clone(),
        seq_len: f.seq_len,
        max_tokens: f.max_tokens,
        budget: match (f.pairs, f.min_similarity, f.max_depth) {
            (Some(k), _, _) => Some(Budget::Pairs(k)),
            (_, Some(x), _) => Some(Budget::MinSimilarity(x)),
            (_, _, Some(d)) => Some(Budget::MaxDepth(d)),
            _ => None,
        },
        unit: if f.drop_layers {
            depthc::search::strategy::Unit::Drop
        } else {
            depthc::search::strategy::Unit::Pair
        },
        protect_first: f.protect_first,
        protect_last: f.protect_last,
        metric: f.metric.metric(),
        strategies: f.strategy.iter().map(|s| s.strategy()).collect(),
        beam_width: f.beam_width,
        memory_budget_mib: f.memory_budget_mib,
        exhaustive: f.exhaustive,
        eval: f.eval.clone(),
        eval_windows: f.eval_windows,
    }
}

/// The search's summary; `sized`: the model's size chose the calibration
/// length (no --max-tokens given).
fn print_search_summary(report: &depthc::report::SearchReport, sized: Option<&Sizing>) {
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
    for e in &report.eval {
        println!(
            "perplexity     {:.4} -> {:.4} (x{:.4}) on {}",
            e.perplexity_before,
            e.perplexity_after,
            e.perplexity_after / e.perplexity_before,
            e.text
        );
        println!(
            "generation     {:.1}% of {} greedy tokens equal, first difference at {:.1} ({} held-out prompts of that text)",
            100.0 * e.generation.equal_fraction,
            e.generation.tokens,
            e.generation.mean_first_difference,
            e.generation.prompts
        );
    }
    for t in &report.tasks {
        let metric = t.primary_metric;
        println!(
            "task           {} ({} docs): {} {:.4} -> {:.4}, {:.1}% retained",
            t.name,
            t.docs,
            metric.name(),
            t.original.primary(metric),
            t.chosen.primary(metric),
            100.0 * t.retained
        );
    }
    if let Some(r) = report.accuracy_retained {
        println!(
            "accuracy       {:.1}% of the original's retained, averaged over {} tasks",
            100.0 * r,
            report.tasks.len()
        );
    }
    println!(
        "search         {} plans screened, {} scored end to end, in {:.1} s = {:.2}x one forward ({:.2} s, {} tokens); the front on every window {:.1} s = {:.2}x",
        report.screened.len(),
        report.candidates.len(),
        report.timings.search_s,
        report.timings.search_forward_multiple,
        report.timings.one_forward_s,
        report.calibration.tokens,
        report.timings.front_s,
        report.timings.front_forward_multiple
    );
    println!(
        "calibration    {} tokens in {} windows of {}{}; budget {}",
        report.calibration.tokens,
        report.calibration.windows,
        report.calibration.calibration.seq_len,
        sized.map_or(String::new(), |s| format!(" ({})", s.calibration_note())),
        report.budget.describe(report.metric, report.unit)
    );
    println!("why            {}", report.reason);
}

pub fn search_command(a: SearchArgs, weight_cache: &Arc<WeightCache>) -> Result<()> {
    depthc::output::check_output(&a.output, false, false)?;
    let mut config = search_config(&a.flags, weight_cache);
    config.heal = a.heal.options();
    let searched = pipeline::search(&a.model, &config, &Terminal)?;
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
    print_search_summary(report, sized(&a.flags, &searched.sizing));
    println!("report         {}", a.output.display());
    Ok(())
}

/// Each stage's time and peak memory.
fn print_stages(report: &depthc::report::SearchReport) {
    for st in report.stages.iter().flatten() {
        let rss = st.peak_rss_bytes.map_or("-".to_string(), |b| {
            format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)
        });
        println!(
            "stage          {:<24} {:>8.1} s  peak RSS {rss}",
            st.stage, st.seconds
        );
    }
}

/// `compile --format gguf`.
fn compile_gguf(a: &CompileArgs, opts: &depthc::pipeline::CompileOptions) -> Result<()> {
    let enc = a.format.gguf_encoding.encoding();
    let c = pipeline::compile_gguf(&a.model, &a.output, opts, enc, &Terminal)?;
    let report = &c.report;
    if a.json {
        let mut v = summary_json(report);
        v["gguf"] = json!(c.written);
        v["stages"] = json!(report.stages);
        v["output"] = json!(a.output);
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    print_search_summary(report, sized(&a.search, &c.sizing));
    if let Some(h) = &report.healing {
        super::print_heal(h);
    }
    let w = &c.written;
    println!(
        "wrote          {} (llama.cpp `deci`, {} layers, {:.1} MiB: {} matrices copied as stored, {} encoded as {})",
        c.gguf.display(),
        w.layers,
        w.bytes as f64 / 1048576.0,
        w.copied,
        w.encoded,
        w.encoding
    );
    print_stages(report);
    println!("report         {}", c.report_dir.display());
    Ok(())
}

pub fn compile_command(a: CompileArgs, weight_cache: &Arc<WeightCache>) -> Result<()> {
    use depthc::graph::{Form, Ops};
    use depthc::runtime::bench::Workload;
    let forms = match a.form {
        AutoFormArg::Auto => None,
        AutoFormArg::Fused => Some(vec![Form::Fused]),
        AutoFormArg::Branches => Some(vec![Form::Branches]),
    };
    let ops = match (a.ops, a.target) {
        (AutoOpsArg::Auto, TargetArg::Portable) => vec![Ops::Portable],
        (AutoOpsArg::Auto, _) => vec![Ops::Portable, Ops::Ort],
        (AutoOpsArg::Portable, _) => vec![Ops::Portable],
        (AutoOpsArg::Ort, TargetArg::Portable) => anyhow::bail!(
            "--ops ort writes ONNX Runtime's own operators, which --target portable excludes: \
             pass --target ort (or genai), or --ops portable"
        ),
        (AutoOpsArg::Ort, _) => vec![Ops::Ort],
    };
    let opts = CompileOptions {
        search: search_config(&a.search, weight_cache),
        float: float_of(a.dtype),
        int4: int4_of(a.dtype, a.int4),
        forms,
        ops,
        workload: match a.workload {
            WorkloadArg::Prefill => Workload::Prefill,
            WorkloadArg::Decode => Workload::Decode,
            WorkloadArg::Mixed => Workload::Mixed,
        },
        runtime: runtime_options(&a.ort_lib, a.device, None),
        steps: a.steps,
        batch: a.batch,
        runs: a.runs,
        decode_tokens: a.decode_tokens,
        force: a.force,
        heal: a.heal.options(),
    };
    if a.format.format == FormatArg::Gguf {
        return compile_gguf(&a, &opts);
    }
    let compiled = pipeline::compile(&a.model, &a.output, &opts, &Terminal)?;
    let report = &compiled.report;
    let validations = &compiled.validations;
    let bench_result = &compiled.benchmark;
    let speed = &compiled.speed;
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&{
                let mut v = summary_json(report);
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
                v["speed"] = json!(speed);
                v["stages"] = json!(report.stages);
                v["output"] = json!(a.output);
                v
            })?
        );
        return Ok(());
    }
    print_search_summary(report, sized(&a.search, &compiled.sizing));
    if let Some(h) = &report.healing {
        super::print_heal(h);
    }
    let s = &compiled.sizing;
    if s.is_large() && (a.form == AutoFormArg::Auto || a.decode_tokens.is_none()) {
        println!(
            "sized          a model of {:.2}B parameters: {}{} decode tokens a benchmark run (--form, --decode-tokens to change)",
            s.parameters as f64 / 1e9,
            if a.form == AutoFormArg::Auto { "the fused form only, " } else { "" },
            a.decode_tokens.unwrap_or(s.decode_tokens)
        );
    }
    for (name, v) in validations {
        println!(
            "validated      {name}: logits max abs {:.2e}, greedy tokens {}",
            v.outputs[0].max_abs,
            v.tokens_word()
        );
    }
    for (k, c) in speed.candidates.iter().enumerate() {
        println!(
            "candidate      {:<8} {:<8} prefill x{:.3} ({}), decode x{:.3} ({}){}",
            c.form,
            c.ops,
            c.benchmark.prefill_speedup,
            c.benchmark.prefill.verdict.name(),
            c.benchmark.decode_speedup,
            c.benchmark.decode.verdict.name(),
            if k == speed.chosen { "  <- kept" } else { "" }
        );
    }
    println!("kept           {}", speed.why);
    print_bench(bench_result, "baseline", "compiled");
    print_stages(report);
    println!(
        "output         {}/{{baseline,compiled,report}}",
        a.output.display()
    );
    Ok(())
}
