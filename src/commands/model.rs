//! `inspect`, `eval`, `convert`, `bench-forward`: the checkpoint and the reference forward.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use std::sync::Arc;

use depthc::model::WeightCache;
use indicatif::ProgressBar;
use serde_json::json;

use crate::cli::*;
use depthc::checkpoint::{safetensors, Checkpoint};
use depthc::forward::{Forward, KvCache, Logits, Options};
use depthc::model::Model;
use depthc::plan::Plan;
use depthc::search;
use depthc::search::tasks::Task;

use super::*;

pub fn inspect(a: InspectArgs) -> Result<()> {
    let ckpt = Checkpoint::open(&a.model)?;
    let c = &ckpt.config;
    let mut dtypes: std::collections::BTreeMap<&str, usize> = Default::default();
    let mut params = 0usize;
    for t in ckpt.source.tensors() {
        *dtypes.entry(t.dtype.name()).or_default() += 1;
        params += t.numel();
    }
    let rope = match &c.rope_scaling {
        depthc::checkpoint::RopeScaling::None => format!("theta {}", c.rope_theta),
        s => format!(
            "theta {}, scaling {}",
            c.rope_theta,
            serde_json::to_string(s)?
        ),
    };
    let unsupported = ckpt.source.unsupported_tensors();
    let tokenizer = ckpt
        .tokenizer
        .as_ref()
        .map(|t| format!("{} ({} tokens)", t.description, t.vocab_size()));
    if a.json {
        let v = json!({
            "path": ckpt.path,
            "format": format!("{:?}", ckpt.format).to_lowercase(),
            "family": c.family.name(),
            "layers": c.num_hidden_layers,
            "hidden_size": c.hidden_size,
            "attention_heads": c.num_attention_heads,
            "kv_heads": c.num_key_value_heads,
            "head_dim": c.head_dim,
            "intermediate_size": c.intermediate_size,
            "vocab_size": c.vocab_size,
            "rope_theta": c.rope_theta,
            "rope_scaling": c.rope_scaling,
            "rms_norm_eps": c.rms_norm_eps,
            "tie_word_embeddings": c.tie_word_embeddings,
            "parameters": params,
            "dtypes": dtypes,
            "tokenizer": tokenizer,
            "lp_forms": depthc::graph::forms(c),
            "unsupported": unsupported
                .iter()
                .map(|(name, why)| json!({"tensor": name, "why": why}))
                .collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let dt: Vec<String> = dtypes.iter().map(|(k, v)| format!("{k} x{v}")).collect();
    println!("model          {}", ckpt.path.display());
    println!("format         {:?}", ckpt.format);
    println!("family         {}", c.family.name());
    println!("layers         {}", c.num_hidden_layers);
    println!("hidden         {}", c.hidden_size);
    println!(
        "heads          {} query, {} KV, head dim {}",
        c.num_attention_heads, c.num_key_value_heads, c.head_dim
    );
    println!("ffn            {}", c.intermediate_size);
    println!("vocab          {}", c.vocab_size);
    println!("rope           {rope}");
    println!("rms norm eps   {}", c.rms_norm_eps);
    println!("tied embedding {}", c.tie_word_embeddings);
    println!("parameters     {params} ({:.1} M)", params as f64 / 1e6);
    println!("dtypes         {}", dt.join(", "));
    println!(
        "tokenizer      {}",
        tokenizer.unwrap_or_else(|| "none".into())
    );
    for (name, why) in &unsupported {
        println!("unsupported    {name}: {why}");
    }
    for f in depthc::graph::forms(c) {
        let exact = if f.exact { "exact" } else { "not exact" };
        println!("form {:<10}{exact}: {}", f.form, f.why);
    }
    Ok(())
}

pub fn eval(a: EvalArgs, weight_cache: &Arc<WeightCache>) -> Result<()> {
    let text = match &a.text {
        Some(p) => Some(
            std::fs::read_to_string(p)
                .with_context(|| format!("{}: cannot read text", p.display()))?,
        ),
        None => None,
    };
    let mut ckpt = Checkpoint::open(&a.model)?;
    let layers = ckpt.config.num_hidden_layers;
    let plan = match a.plan.as_deref() {
        Some(spec) => Some(Plan::parse(spec, layers)?),
        None => None,
    };
    let tasks = a
        .task
        .iter()
        .map(|t| Task::open(t, &depthc::checkpoint::setup_caches()))
        .collect::<depthc::Result<Vec<_>>>()?;
    ckpt.require_tokenizer()?;
    let tokenizer = ckpt.tokenizer.take().expect("required above");
    let windows = match &text {
        Some(text) => Some(search::windows(
            &tokenizer.encode(text)?,
            a.seq_len,
            a.max_windows,
            ckpt.config.window_bos(),
        )?),
        None => None,
    };
    let pb = spinner(&format!("loading {}", a.model.display()));
    let model = Model::load(&ckpt.source, &ckpt.config, weight_cache)?;
    drop(ckpt);
    pb.finish_and_clear();
    let forward = Forward::new(&model);
    let int4 = int4_of(a.dtype, a.int4);
    let candidate_plan = match (&plan, int4) {
        (Some(p), _) if !p.is_sequential() => Some(p.clone()),
        (_, Some(_)) => Some(Plan::sequential(layers)),
        _ => None,
    };
    if a.heal.heal && plan.as_ref().is_none_or(|p| p.is_sequential()) {
        bail!("--heal heals a plan's parallel groups: give --plan");
    }
    // --heal: the plan's groups healed on the calibration text (before int4,
    // which then quantises the healed matrices).
    let healed = match (&candidate_plan, a.heal.heal) {
        (Some(p), true) => Some(super::heal(
            &model,
            &a.model,
            Some(&tokenizer),
            p,
            &a.heal,
            &a.heal_calib,
        )?),
        _ => None,
    };
    // The candidate: the plan on the float (or healed) weights, or the
    // weights `emit --dtype int4` writes for the plan.
    let gguf = a.format.format == crate::cli::FormatArg::Gguf;
    if gguf && (int4.is_some() || candidate_plan.is_none()) {
        bail!("--format gguf scores the weights a GGUF of --plan holds: give --plan, not --dtype int4");
    }
    let quantised = match (int4, &candidate_plan) {
        (None, Some(p)) if gguf => {
            let from = healed.as_ref().unwrap_or(&model);
            let enc = a.format.gguf_encoding.encoding();
            Some(depthc::llamacpp::weights_as_written(from, p, enc)?)
        }
        (Some(q), Some(p)) => {
            let form = emit_options(a.form, a.dtype, a.int4, OpsArg::Portable).form;
            let from = healed.as_ref().unwrap_or(&model);
            Some(depthc::graph::lp::weights_as_emitted(from, p, form, Some(q))?.into_owned())
        }
        _ => None,
    };
    let candidate_forward = quantised.as_ref().or(healed.as_ref()).map(Forward::new);
    let candidate = candidate_plan
        .as_ref()
        .map(|p| (candidate_forward.as_ref().unwrap_or(&forward), p));
    let report = match &windows {
        Some(windows) => {
            let progress = bar(
                windows.len() as u64,
                "eval {msg:>10} {bar:30} {pos}/{len} windows, {eta} left",
            )?;
            let mut report = search::evaluate_against(&forward, candidate, windows, &progress)?;
            if let (Some(c), true) = (candidate, a.prompts > 0 && a.generate > 0) {
                progress.set_message("generating");
                let prompts =
                    search::prompts_of(windows, a.prompts, search::HELD_OUT_PROMPT_TOKENS);
                let held_out = search::HeldOut::new(&forward, prompts, a.generate)?;
                report.generation = Some(held_out.agreement(c.0, c.1)?);
            }
            progress.finish_and_clear();
            Some(report)
        }
        None => None,
    };
    let mut task_results = Vec::new();
    for task in &tasks {
        let progress = bar(
            0,
            &format!(
                "{:<14} {{bar:30}} {{pos}}/{{len}} docs, {{eta}} left",
                task.name
            ),
        )?;
        task_results.push(depthc::search::tasks::evaluate(
            &forward, candidate, task, &tokenizer, a.limit, &progress,
        )?);
        progress.finish_and_clear();
    }
    if a.json {
        let mut out = match &report {
            Some(r) => serde_json::to_value(r)?,
            None => json!({}),
        };
        if !tasks.is_empty() {
            out["tasks"] = serde_json::to_value(&task_results)?;
            if let Some(mean) = mean_retained(&task_results) {
                out["accuracy_retained"] = json!(mean);
            }
            if let Some(p) = &candidate_plan {
                out["plan"] = json!(p.to_string());
            }
        }
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    if let Some(q) = int4 {
        println!(
            "weights        int4 (block {}, accuracy level {}) against the float original",
            q.block_size, q.accuracy_level
        );
    }
    if let Some(report) = &report {
        print_text_eval(report, layers);
    } else if let Some(p) = &candidate_plan {
        println!("plan           {p} (depth {} of {layers})", p.depth());
    }
    for t in &task_results {
        print_task(t);
    }
    if let Some(mean) = mean_retained(&task_results) {
        println!(
            "retained       {:.1}% of the original's accuracy, averaged over {} tasks",
            100.0 * mean,
            task_results.len()
        );
    }
    Ok(())
}

/// The mean of the tasks' retained accuracy (with a candidate).
fn mean_retained(results: &[depthc::search::tasks::TaskResult]) -> Option<f64> {
    depthc::search::tasks::mean_retained(results.iter().filter_map(|t| t.retained))
}

fn print_text_eval(report: &search::EvalReport, layers: usize) {
    println!(
        "windows        {} x {} tokens ({} predictions)",
        report.windows, report.seq_len, report.predictions
    );
    match (&report.plan, report.perplexity_original) {
        (Some(p), Some(orig)) => {
            println!(
                "plan           {p} (depth {} of {layers})",
                report.depth.unwrap_or(layers)
            );
            println!(
                "perplexity     {:.4} (original {orig:.4}, x{:.4})",
                report.perplexity,
                report.perplexity / orig
            );
            println!("cosine         {:.6}", report.cosine.unwrap_or(f64::NAN));
            println!("kl             {:.6}", report.kl.unwrap_or(f64::NAN));
            println!(
                "top-1 agree    {:.4}",
                report.top1_agreement.unwrap_or(f64::NAN)
            );
            if let Some(g) = &report.generation {
                println!(
                    "generation     {:.4} of {} greedy tokens equal to the original's on {} held-out prompts, first difference at {:.1} on average",
                    g.equal_fraction, g.tokens, g.prompts, g.mean_first_difference
                );
            }
        }
        _ => println!("perplexity     {:.4}", report.perplexity),
    }
}

/// One task: the primary metric first, then the other, each with its
/// standard error; with a candidate, both models and the accuracy retained.
fn print_task(t: &depthc::search::tasks::TaskResult) {
    use depthc::search::tasks::{Accuracy, PrimaryMetric};
    let both = |a: &Accuracy| {
        let raw = format!("acc_raw {:.4} +- {:.4}", a.acc_raw, a.acc_raw_stderr);
        let per_char = format!(
            "acc_per_char {:.4} +- {:.4}",
            a.acc_per_char, a.acc_per_char_stderr
        );
        match t.primary_metric {
            PrimaryMetric::AccRaw => format!("{raw}, {per_char}"),
            PrimaryMetric::AccPerChar => format!("{per_char}, {raw}"),
        }
    };
    let label = format!("{} ({} docs, {:.0} s)", t.name, t.docs, t.seconds);
    match &t.candidate {
        Some(c) => {
            println!("task           {label}");
            println!("  original     {}", both(&t.original));
            println!("  candidate    {}", both(c));
            println!(
                "  retained     {:.1}% ({})",
                100.0 * t.retained.unwrap_or(f64::NAN),
                t.primary_metric.name()
            );
        }
        None => println!("task           {label}: {}", both(&t.original)),
    }
}

pub fn convert(a: ConvertArgs, weight_cache: &Arc<WeightCache>) -> Result<()> {
    depthc::output::check_output(&a.output, false, false)?;
    let ckpt = Checkpoint::open(&a.model)?;
    let model = Model::load(&ckpt.source, &ckpt.config, weight_cache)?;
    let store = match a.dtype {
        StoreDtype::F32 => safetensors::StoreType::F32,
        StoreDtype::F16 => safetensors::StoreType::F16,
        StoreDtype::Bf16 => safetensors::StoreType::BF16,
    };
    model.write_hf_dir(
        &a.output,
        ckpt.tokenizer.as_ref().map(|t| t.to_json()),
        store,
    )?;
    println!("wrote {}", a.output.display());
    Ok(())
}

pub fn bench_forward(a: BenchForwardArgs, weight_cache: &Arc<WeightCache>) -> Result<()> {
    if a.tokens == 0 || a.repeats == 0 {
        bail!("--tokens and --repeats must be positive");
    }
    let (model, tokenizer) = load(&a.model, weight_cache)?;
    let cfg = &model.config;
    let weight_bytes: usize = model
        .named_tensors()
        .iter()
        .map(|(_, shape, _)| shape.iter().product::<usize>() * 4)
        .sum();
    let plan = Plan::sequential(cfg.num_hidden_layers);
    let ids = depthc::checkpoint::tokenizer::stand_in_ids(a.tokens, cfg.vocab_size);
    let forward = Forward::new(&model);
    let opts = Options {
        logits: Logits::All,
        capture_residuals: false,
    };
    let threads = rayon::current_num_threads();
    // ONNX Runtime on the model as emitted, prefilling the same ids.
    let ort = if a.against_ort {
        let dir = tempfile::tempdir().context("a temporary directory for the emitted model")?;
        let out = dir.path().join("model");
        let pb = spinner("emitting the unmodified model for ONNX Runtime");
        depthc::onnx::package::emit(
            &model,
            &plan,
            &depthc::onnx::package::Source {
                path: &a.model,
                tokenizer: tokenizer.as_ref(),
            },
            &depthc::onnx::package::EmitOptions {
                ops: depthc::graph::Ops::Portable,
                form: depthc::graph::Form::Fused,
                float: depthc::graph::ElemType::F32,
                int4: None,
                healed: false,
            },
            &out,
            &ProgressBar::hidden(),
        )?;
        pb.finish_and_clear();
        let emitted = depthc::runtime::Emitted::open(&out)?;
        let session = emitted.session(&super::runtime_options(
            &a.ort_lib,
            DeviceArg::Cpu,
            Some(threads),
        ))?;
        Some((dir, session))
    } else {
        None
    };
    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    let pb = bar(
        (a.repeats + 1) as u64,
        "forward {bar:30} {pos}/{len} rounds, {eta} left",
    )?;
    let mut ort = ort;
    for round in 0..=a.repeats {
        let time_ours = || -> Result<f64> {
            let t0 = Instant::now();
            forward.run(&plan, &ids, &mut KvCache::new(cfg.num_hidden_layers), opts)?;
            Ok(t0.elapsed().as_secs_f64())
        };
        let time_ort = |s: &mut depthc::runtime::DecoderSession| -> Result<f64> {
            let t0 = Instant::now();
            s.step(&ids, None)?;
            Ok(t0.elapsed().as_secs_f64())
        };
        // The first round warms both up and is not counted.
        let (o, t) = match ort.as_mut() {
            Some((_, s)) if round % 2 == 1 => {
                let t = time_ort(s)?;
                (time_ours()?, Some(t))
            }
            Some((_, s)) => {
                let o = time_ours()?;
                (o, Some(time_ort(s)?))
            }
            None => (time_ours()?, None),
        };
        if round > 0 {
            ours.push(o);
            theirs.extend(t);
        }
        pb.inc(1);
    }
    pb.finish_and_clear();
    drop(ort);
    use depthc::measure::median;
    let med = median(&ours);
    let peak = depthc::measure::peak_rss_bytes();
    let tps = a.tokens as f64 / med;
    // Per round, ONNX Runtime's time over ours: > 1 when depthc is faster.
    let ratios: Vec<f64> = theirs.iter().zip(&ours).map(|(t, o)| t / o).collect();
    let ort_json = (!theirs.is_empty()).then(|| {
        let m = median(&theirs);
        json!({
            "median_s": m,
            "tokens_per_s": a.tokens as f64 / m,
            "ratio": median(&ratios),
            "ratio_min": ratios.iter().copied().fold(f64::INFINITY, f64::min),
            "ratio_max": ratios.iter().copied().fold(0.0, f64::max),
        })
    });
    if a.json {
        let v = json!({
            "tokens": a.tokens, "repeats": a.repeats, "median_s": med, "tokens_per_s": tps,
            "peak_rss_bytes": peak, "f32_weight_bytes": weight_bytes,
            "threads": threads, "ort": ort_json,
        });
        println!("{v}");
    } else {
        println!(
            "forward 1x{}, {threads} threads, median of {}: depthc {:.1} ms, {:.1} tokens/s",
            a.tokens,
            a.repeats,
            med * 1e3,
            tps
        );
        if let Some(o) = &ort_json {
            println!(
                "ONNX Runtime (CPU, same ids, the unmodified model as emitted): {:.1} ms, {:.1} tokens/s",
                o["median_s"].as_f64().unwrap_or(0.0) * 1e3,
                o["tokens_per_s"].as_f64().unwrap_or(0.0)
            );
            println!(
                "depthc / ONNX Runtime: x{:.3} (rounds {:.3}..{:.3})",
                o["ratio"].as_f64().unwrap_or(0.0),
                o["ratio_min"].as_f64().unwrap_or(0.0),
                o["ratio_max"].as_f64().unwrap_or(0.0)
            );
        }
        if let Some(p) = peak {
            println!(
                "peak RSS {:.1} MiB = {:.2}x the f32 weights ({:.1} MiB)",
                p as f64 / 1048576.0,
                p as f64 / weight_bytes as f64,
                weight_bytes as f64 / 1048576.0
            );
        }
    }
    Ok(())
}
