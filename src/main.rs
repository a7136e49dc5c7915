//! `depthc` binary: argument parsing, dispatch and exit codes only.
//! Exit codes: 0 success, 1 error (one line on stderr), 2 bad usage (clap).

mod cli;

use std::io::IsTerminal;
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Parser;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::json;

use cli::{
    BenchArgs, BenchForwardArgs, Cli, Command, CompileArgs, ConvertArgs, DeviceArg, EmitArgs,
    EvalArgs, FormArg, InspectArgs, MetricArg, OnnxDtype, SearchArgs, SearchFlags, StoreDtype,
    StrategyArg, ValidateArgs,
};
use depthc::checkpoint::{safetensors, Checkpoint};
use depthc::forward::{Forward, KvCache, Logits, Options};
use depthc::model::Model;
use depthc::plan::Plan;
use depthc::search;

fn main() {
    // Die quietly on a closed pipe (`depthc inspect MODEL | head`), as command
    // line tools do, instead of panicking on the next print.
    #[cfg(unix)]
    // SAFETY: resetting a signal disposition to its default before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    depthc::output::remove_partial_outputs_on_interrupt();
    let result = match cli.command {
        Command::Inspect(a) => inspect(a),
        Command::Eval(a) => eval(a),
        Command::Convert(a) => convert(a),
        Command::Emit(a) => emit(a),
        Command::Validate(a) => validate(a),
        Command::Search(a) => search_command(a),
        Command::Compile(a) => compile_command(a),
        Command::Bench(a) => bench_command(a),
        Command::BenchForward(a) => bench_forward(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn spinner(msg: &str) -> ProgressBar {
    let pb = if std::io::stderr().is_terminal() {
        ProgressBar::new_spinner()
    } else {
        ProgressBar::with_draw_target(None, ProgressDrawTarget::hidden())
    };
    pb.set_message(msg.to_string());
    pb.enable_steady_tick(std::time::Duration::from_millis(120));
    pb
}

/// Open a checkpoint and load its weights as f32, then release the mapping.
fn load(path: &Path) -> Result<(Model, Option<depthc::checkpoint::tokenizer::Tokenizer>)> {
    let pb = spinner(&format!("loading {}", path.display()));
    let ckpt = Checkpoint::open(path)?;
    let model = Model::load(ckpt.source.as_ref(), &ckpt.config)?;
    pb.finish_and_clear();
    Ok((model, ckpt.tokenizer))
}

fn inspect(a: InspectArgs) -> Result<()> {
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
    Ok(())
}

fn eval(a: EvalArgs) -> Result<()> {
    let text = std::fs::read_to_string(&a.text)
        .with_context(|| format!("{}: cannot read text", a.text.display()))?;
    let ckpt = Checkpoint::open(&a.model)?;
    let layers = ckpt.config.num_hidden_layers;
    let plan = match a.plan.as_deref() {
        Some(spec) => Some(Plan::parse(spec, layers)?),
        None => None,
    };
    let ids = ckpt.require_tokenizer()?.encode(&text)?;
    let windows = search::windows(&ids, a.seq_len, a.max_windows)?;
    let pb = spinner(&format!("loading {}", a.model.display()));
    let model = Model::load(ckpt.source.as_ref(), &ckpt.config)?;
    drop(ckpt);
    pb.finish_and_clear();
    let forward = Forward::new(&model);
    let progress = if std::io::stderr().is_terminal() {
        let pb = ProgressBar::new(windows.len() as u64);
        pb.set_style(ProgressStyle::with_template(
            "eval {bar:30} {pos}/{len} windows, {eta} left",
        )?);
        pb
    } else {
        ProgressBar::hidden()
    };
    let plan = plan.filter(|p| !p.is_sequential());
    let report = search::evaluate(&forward, plan.as_ref(), &windows, &progress)?;
    progress.finish_and_clear();
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
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
        }
        _ => println!("perplexity     {:.4}", report.perplexity),
    }
    Ok(())
}

fn convert(a: ConvertArgs) -> Result<()> {
    if a.output.exists() {
        bail!(
            "{}: already exists; choose a new output directory",
            a.output.display()
        );
    }
    let ckpt = Checkpoint::open(&a.model)?;
    let model = Model::load(ckpt.source.as_ref(), &ckpt.config)?;
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

/// Peak resident set size of this process, from /proc (Linux).
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn bench_forward(a: BenchForwardArgs) -> Result<()> {
    if a.tokens == 0 || a.repeats == 0 {
        bail!("--tokens and --repeats must be positive");
    }
    let (model, _) = load(&a.model)?;
    let cfg = &model.config;
    let weight_bytes: usize = model
        .named_tensors()
        .iter()
        .map(|(_, _, d)| d.len() * 4)
        .sum();
    let plan = Plan::sequential(cfg.num_hidden_layers);
    // Deterministic spread of ids over the vocabulary.
    let ids: Vec<u32> = (0..a.tokens)
        .map(|i| ((i * 7919 + 13) % cfg.vocab_size) as u32)
        .collect();
    let forward = Forward::new(&model);
    let opts = Options {
        logits: Logits::All,
        capture_residuals: false,
    };
    let mut times = Vec::new();
    for rep in 0..=a.repeats {
        let t0 = Instant::now();
        forward.run(&plan, &ids, &mut KvCache::new(cfg.num_hidden_layers), opts)?;
        if rep > 0 {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let peak = peak_rss_bytes();
    let tps = a.tokens as f64 / median;
    if a.json {
        let v = json!({
            "tokens": a.tokens, "repeats": a.repeats, "median_s": median, "tokens_per_s": tps,
            "peak_rss_bytes": peak, "f32_weight_bytes": weight_bytes,
            "threads": rayon::current_num_threads(),
        });
        println!("{v}");
    } else {
        println!(
            "forward 1x{}: median {:.1} ms, {:.1} tokens/s",
            a.tokens,
            median * 1e3,
            tps
        );
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

fn bar(len: u64, template: &str) -> Result<ProgressBar> {
    Ok(if std::io::stderr().is_terminal() {
        let pb = ProgressBar::new(len);
        pb.set_style(ProgressStyle::with_template(template)?);
        pb
    } else {
        ProgressBar::hidden()
    })
}

fn emit(a: EmitArgs) -> Result<()> {
    use depthc::graph::{ElemType, Form};
    use depthc::onnx::package::{self, EmitOptions, Source};
    if a.output.exists() {
        bail!(
            "{}: already exists; choose a new output directory",
            a.output.display()
        );
    }
    let ckpt = Checkpoint::open(&a.model)?;
    let plan = Plan::parse(
        a.plan.as_deref().unwrap_or(""),
        ckpt.config.num_hidden_layers,
    )?;
    let pb = spinner(&format!("loading {}", a.model.display()));
    let model = Model::load(ckpt.source.as_ref(), &ckpt.config)?;
    pb.finish_and_clear();
    let opts = EmitOptions {
        form: match a.form {
            FormArg::Fused => Form::Fused,
            FormArg::Branches => Form::Branches,
        },
        float: match a.dtype {
            OnnxDtype::F32 => ElemType::F32,
            OnnxDtype::F16 => ElemType::F16,
        },
    };
    let progress = bar(0, "emit {bar:30} {pos}/{len} weights, {eta} left")?;
    let t0 = Instant::now();
    let written = package::emit(
        &model,
        &plan,
        &Source {
            path: &a.model,
            tokenizer: ckpt.tokenizer.as_ref(),
        },
        &opts,
        &a.output,
        &progress,
    )?;
    progress.finish_and_clear();
    let layers = model.config.num_hidden_layers;
    println!(
        "wrote {} ({} form, {}, plan `{plan}`, depth {} of {layers})",
        a.output.display(),
        opts.form.name(),
        opts.float.name(),
        plan.depth()
    );
    println!(
        "  model.onnx {:.1} KiB, model.onnx.data {:.1} MiB ({} weights) in {:.1} s",
        written.model_bytes as f64 / 1024.0,
        written.data_bytes as f64 / 1048576.0,
        written.weights,
        t0.elapsed().as_secs_f64()
    );
    if let Some(p) = peak_rss_bytes() {
        println!("  peak RSS {:.1} MiB", p as f64 / 1048576.0);
    }
    Ok(())
}

/// A public-domain passage (Hamlet, Act III, Scene 1) for the default prefill.
const DEFAULT_PROMPT: &str = "To be, or not to be, that is the question:\n\
Whether 'tis nobler in the mind to suffer\n\
The slings and arrows of outrageous fortune,\n\
Or to take arms against a sea of troubles\n\
And by opposing end them. To die: to sleep;\n\
No more; and by a sleep to say we end\n\
The heart-ache and the thousand natural shocks\n\
That flesh is heir to, 'tis a consummation\n\
Devoutly to be wish'd. To die, to sleep;\n\
To sleep: perchance to dream: ay, there's the rub;\n\
For in that sleep of death what dreams may come\n";

fn validate(a: ValidateArgs) -> Result<()> {
    use depthc::runtime::validate::{validate, Tolerance};
    use depthc::runtime::{Device, Emitted, RuntimeOptions};
    let emitted = Emitted::open(&a.dir)?;
    let float = emitted.float;
    let ckpt = Checkpoint::open(&a.model)?;
    let plan = Plan::parse(&emitted.plan, ckpt.config.num_hidden_layers)?;
    let text = match &a.text {
        Some(p) => std::fs::read_to_string(p)
            .with_context(|| format!("{}: cannot read text", p.display()))?,
        None => DEFAULT_PROMPT.to_string(),
    };
    let mut prompt = ckpt.require_tokenizer()?.encode(&text)?;
    prompt.truncate(a.prompt_tokens.max(1));
    let opts = RuntimeOptions {
        library: a.ort_lib.clone(),
        device: match a.device {
            DeviceArg::Cpu => Device::Cpu,
            DeviceArg::Cuda => Device::Cuda,
        },
        strict: a.strict,
        threads: None,
    };
    let pb = spinner(&format!("loading {}", a.model.display()));
    let model = Model::load(ckpt.source.as_ref(), &ckpt.config)?;
    drop(ckpt);
    pb.set_message(format!("loading {}", emitted.model_path.display()));
    let mut session = emitted.session(&opts)?;
    pb.set_message("validating");
    let forward = Forward::new(&model);
    let tolerance = if a.tolerance.is_some() || a.rel_tolerance.is_some() {
        Tolerance {
            abs: a.tolerance,
            rel: a.rel_tolerance,
        }
    } else {
        Tolerance::default_for(float)
    };
    let v = validate(&mut session, &forward, &plan, &prompt, a.steps, tolerance)?;
    pb.finish_and_clear();
    if a.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "plan `{}`: prefill {} tokens + {} decode steps, tolerance {}",
            v.plan, v.prompt_tokens, v.steps, v.tolerance
        );
        let worst_present = v
            .outputs
            .iter()
            .skip(1)
            .max_by(|x, y| x.max_abs.total_cmp(&y.max_abs));
        for o in v.outputs.iter().take(1).chain(worst_present) {
            println!(
                "  {:<24} max abs {:.3e}  max rel {:.3e}  ({}{})",
                o.name,
                o.max_abs,
                o.max_rel,
                o.worst_at,
                if o.passed { "" } else { ", FAILED" }
            );
        }
        println!(
            "  {} present outputs checked, {} over tolerance",
            v.outputs.len() - 1,
            v.outputs.iter().skip(1).filter(|o| !o.passed).count()
        );
        println!(
            "  greedy tokens {}",
            if v.tokens_agree { "agree" } else { "DIFFER" }
        );
        for f in &v.failures {
            println!("  FAILED {f}");
        }
        if !v.tokens_agree {
            println!(
                "  FAILED greedy tokens: reference {:?}, onnx {:?}",
                v.tokens_reference, v.tokens_onnx
            );
        }
    }
    if !v.passed() {
        let worst = v
            .outputs
            .iter()
            .filter(|o| !o.passed)
            .max_by(|x, y| x.max_rel.total_cmp(&y.max_rel));
        bail!(
            "validation failed: {} of {} outputs over tolerance{}{}",
            v.failures.len(),
            v.outputs.len(),
            worst.map_or(String::new(), |o| format!(
                " (worst {}: max abs {:.3e}, max rel {:.3e})",
                o.name, o.max_abs, o.max_rel
            )),
            if v.tokens_agree {
                ""
            } else {
                "; greedy tokens differ"
            }
        );
    }
    Ok(())
}

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
            let w: Vec<Vec<u32>> = search::windows(&ids, f.seq_len, Some(f.eval_windows))?
                .into_iter()
                .map(<[u32]>::to_vec)
                .collect();
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
    let outcome = search::search(&forward, &calibration.windows, &opts, &progress)?;
    progress.finish_and_clear();
    let t_eval = Instant::now();
    let eval = match &eval_windows {
        Some((text, w)) => {
            let plan = Plan::parse(&outcome.chosen.plan, layers)?;
            let refs: Vec<&[u32]> = w.iter().map(Vec::as_slice).collect();
            let r = search::evaluate(&forward, Some(&plan), &refs, &ProgressBar::hidden())?;
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

fn search_command(a: SearchArgs) -> Result<()> {
    if a.output.exists() {
        bail!(
            "{}: already exists; choose a new output directory",
            a.output.display()
        );
    }
    let searched = run_search(&a.model, &a.flags)?;
    let report = &searched.report;
    depthc::output::new_directory(&a.output, |dir| report.write(dir))?;
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "chosen_plan": report.chosen_plan,
                "depth_before": report.depth_before,
                "depth_after": report.depth_after,
                "cosine": report.chosen.scores.cosine,
                "kl": report.chosen.scores.kl,
                "top1_agreement": report.chosen.scores.top1_agreement,
                "eval": report.eval,
                "candidates": report.candidates.len(),
                "search_forward_multiple": report.timings.search_forward_multiple,
                "report": a.output.join("search-report.json"),
            }))?
        );
        return Ok(());
    }
    print_search_summary(report);
    println!("report         {}", a.output.display());
    Ok(())
}

fn runtime_options(
    lib: &Option<std::path::PathBuf>,
    device: DeviceArg,
    threads: Option<usize>,
) -> depthc::runtime::RuntimeOptions {
    depthc::runtime::RuntimeOptions {
        library: lib.clone(),
        device: match device {
            DeviceArg::Cpu => depthc::runtime::Device::Cpu,
            DeviceArg::Cuda => depthc::runtime::Device::Cuda,
        },
        strict: false,
        threads,
    }
}

fn print_bench(r: &depthc::runtime::bench::BenchResult, a: &str, b: &str) {
    let o = &r.options;
    println!(
        "batch {}: prefill {} tokens; decode {} tokens after a {}-token prompt; median of {} runs",
        o.batch, o.prefill_tokens, o.decode_tokens, o.prompt_tokens, o.runs
    );
    println!(
        "  {:<10} {:>12} {:>16}",
        "", "prefill ms", "decode tokens/s"
    );
    println!(
        "  {:<10} {:>12.2} {:>16.1}",
        a, r.a.prefill_ms, r.a.decode_tokens_per_s
    );
    println!(
        "  {:<10} {:>12.2} {:>16.1}",
        b, r.b.prefill_ms, r.b.decode_tokens_per_s
    );
    println!(
        "  speedup    prefill x{:.3}, decode x{:.3}",
        r.prefill_speedup, r.decode_speedup
    );
}

fn bench_command(a: BenchArgs) -> Result<()> {
    use depthc::runtime::bench::{bench, BenchOptions};
    use depthc::runtime::Emitted;
    let ea = Emitted::open(&a.a)?;
    let eb = Emitted::open(&a.b)?;
    if ea.config.vocab_size != eb.config.vocab_size || ea.float != eb.float {
        bail!(
            "{} and {} are not the same model in the same dtype",
            a.a.display(),
            a.b.display()
        );
    }
    if a.batch == 0 || a.runs == 0 || a.prefill_tokens == 0 || a.prompt_tokens == 0 {
        bail!("--batch, --runs, --prefill-tokens and --prompt-tokens must be positive");
    }
    let opts = runtime_options(&a.ort_lib, a.device, a.threads);
    let mut sa = ea.session(&opts)?;
    let mut sb = eb.session(&opts)?;
    let bo = BenchOptions {
        batch: a.batch,
        prefill_tokens: a.prefill_tokens,
        prompt_tokens: a.prompt_tokens,
        decode_tokens: a.decode_tokens,
        runs: a.runs,
    };
    let progress = bar(0, "bench {bar:30} {pos}/{len} runs, {eta} left")?;
    let r = bench(&mut sa, &mut sb, ea.config.vocab_size, &bo, &progress)?;
    progress.finish_and_clear();
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        print_bench(&r, "A", "B");
    }
    Ok(())
}

fn compile_command(a: CompileArgs) -> Result<()> {
    use depthc::graph::{ElemType, Form};
    use depthc::onnx::package::{self, EmitOptions, Source};
    use depthc::runtime::bench::{bench, BenchOptions};
    use depthc::runtime::validate::{validate, Tolerance};
    use depthc::runtime::Emitted;
    if a.output.exists() && !a.force {
        bail!(
            "{}: already exists; pass --force to replace it",
            a.output.display()
        );
    }
    // Fail before the search, not after it, when ONNX Runtime is missing.
    depthc::runtime::find_library(a.ort_lib.as_deref())?;
    let searched = run_search(&a.model, &a.search)?;
    let mut report = searched.report.clone();
    let model = &searched.model;
    let layers = model.config.num_hidden_layers;
    let chosen = Plan::parse(&report.chosen_plan, layers)?;
    let opts = EmitOptions {
        form: match a.form {
            FormArg::Fused => Form::Fused,
            FormArg::Branches => Form::Branches,
        },
        float: match a.dtype {
            OnnxDtype::F32 => ElemType::F32,
            OnnxDtype::F16 => ElemType::F16,
        },
    };
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
    let replace = a.force && a.output.exists();
    let target = if replace {
        a.output.with_file_name(format!(
            ".{}.new-{}",
            a.output
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("out"),
            std::process::id()
        ))
    } else {
        a.output.clone()
    };
    let (bench_result, validations) = depthc::output::new_directory(&target, |dir| {
        let mut validations = Vec::new();
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
        }
        let mut sa = Emitted::open(&dir.join("baseline"))?.session(&rt)?;
        let mut sb = Emitted::open(&dir.join("compiled"))?.session(&rt)?;
        let bo = BenchOptions {
            batch: a.batch.max(1),
            runs: a.runs.max(1),
            ..BenchOptions::default()
        };
        let pb = bar(0, "bench {bar:30} {pos}/{len} runs, {eta} left")
            .map_err(|e| depthc::Error::Input(e.to_string()))?;
        let r = bench(&mut sa, &mut sb, model.config.vocab_size, &bo, &pb)?;
        pb.finish_and_clear();
        report.validation = Some(validations.iter().cloned().collect());
        report.benchmark = Some(r.clone());
        let report_dir = dir.join("report");
        std::fs::create_dir(&report_dir).map_err(|e| depthc::Error::io(&report_dir, e))?;
        report.write(&report_dir)?;
        Ok((r, validations))
    })?;
    if replace {
        std::fs::remove_dir_all(&a.output)
            .with_context(|| format!("{}: cannot remove the old output", a.output.display()))?;
        std::fs::rename(&target, &a.output).with_context(|| {
            format!(
                "{}: cannot move the new output in place",
                a.output.display()
            )
        })?;
    }
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "chosen_plan": report.chosen_plan,
                "depth_before": report.depth_before,
                "depth_after": report.depth_after,
                "cosine": report.chosen.scores.cosine,
                "kl": report.chosen.scores.kl,
                "top1_agreement": report.chosen.scores.top1_agreement,
                "eval": report.eval,
                "validation": validations.iter().map(|(n, v)| json!({
                    "model": n, "passed": v.passed(),
                    "logits_max_abs": v.outputs[0].max_abs,
                })).collect::<Vec<_>>(),
                "benchmark": bench_result,
                "output": a.output,
            }))?
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
