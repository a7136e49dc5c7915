//! `emit`, `validate`, `bench`: ONNX emission and ONNX Runtime.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use std::sync::Arc;

use depthc::model::WeightCache;

use crate::cli::*;
use depthc::checkpoint::Checkpoint;
use depthc::model::Model;
use depthc::plan::Plan;

use super::*;

pub fn emit(a: EmitArgs, weight_cache: &Arc<WeightCache>) -> Result<()> {
    use depthc::onnx::package::{self, Source};
    depthc::output::check_output(&a.output, false, false)?;
    let ckpt = Checkpoint::open(&a.model)?;
    let plan = Plan::parse(
        a.plan.as_deref().unwrap_or(""),
        ckpt.config.num_hidden_layers,
    )?;
    let pb = spinner(&format!("loading {}", a.model.display()));
    let model = Model::load(&ckpt.source, &ckpt.config, weight_cache)?;
    pb.finish_and_clear();
    let mut opts = emit_options(a.form, a.dtype, a.int4, a.ops);
    let model = if a.heal.heal {
        if plan.is_sequential() {
            bail!("--heal heals a plan's parallel groups: give --plan");
        }
        opts.healed = true;
        super::heal(
            &model,
            &a.model,
            ckpt.tokenizer.as_ref(),
            &plan,
            &a.heal,
            &a.heal_calib,
        )?
    } else {
        model
    };
    if a.format.format == crate::cli::FormatArg::Gguf {
        return emit_gguf(&a, &model, &plan, opts.healed);
    }
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
    let form = depthc::graph::written_form(&model, &plan, opts.form);
    if form != opts.form {
        println!(
            "note: {} has no exact fused form (see `depthc inspect`): groups written as branches",
            model.config.family.name()
        );
    }
    let dtype = match opts.int4 {
        Some(q) => format!(
            "int4 weights (block {}, accuracy level {}), {} activations",
            q.block_size,
            q.accuracy_level,
            opts.float.name()
        ),
        None => opts.float.name().to_string(),
    };
    println!(
        "wrote {} ({} form, {dtype}, plan `{plan}`, depth {} of {layers})",
        a.output.display(),
        form.name(),
        plan.depth()
    );
    println!(
        "  model.onnx {:.1} KiB, model.onnx_data {:.1} MiB ({} weights) in {:.1} s",
        written.model_bytes as f64 / 1024.0,
        written.data_bytes as f64 / 1048576.0,
        written.weights,
        t0.elapsed().as_secs_f64()
    );
    if let Some(p) = depthc::measure::peak_rss_bytes() {
        println!("  peak RSS {:.1} MiB", p as f64 / 1048576.0);
    }
    Ok(())
}

/// `emit --format gguf`.
fn emit_gguf(a: &EmitArgs, model: &Model, plan: &Plan, healed: bool) -> Result<()> {
    use crate::cli::{FormArg, OnnxDtype};
    if matches!(a.form, FormArg::Branches) || a.dtype != OnnxDtype::F32 {
        bail!(
            "--format gguf writes each parallel group as one wider layer: --form branches and \
             --dtype are ONNX options (the GGUF keeps the checkpoint's own encodings; \
             --gguf-encoding sets the groups')"
        );
    }
    let t0 = Instant::now();
    let pb = spinner(&format!("writing {}", a.output.display()));
    let enc = a.format.gguf_encoding.encoding();
    let w = depthc::llamacpp::emit(model, plan, &a.model, enc, healed, &a.output)?;
    pb.finish_and_clear();
    println!(
        "wrote {} (llama.cpp `deci`, plan `{plan}`, depth {} of {})",
        a.output.join(depthc::llamacpp::FILE).display(),
        plan.depth(),
        model.config.num_hidden_layers
    );
    println!(
        "  {:.1} MiB, {} tensors: {} matrices copied as stored, {} encoded as {} in {:.1} s",
        w.bytes as f64 / 1048576.0,
        w.tensors,
        w.copied,
        w.encoded,
        w.encoding,
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

pub fn validate(a: ValidateArgs, weight_cache: &Arc<WeightCache>) -> Result<()> {
    use depthc::runtime::validate::{validate_emitted, Tolerance};
    use depthc::runtime::{Device, Emitted, RuntimeOptions};
    let emitted = Emitted::open(&a.dir)?;
    let ckpt = Checkpoint::open(&a.model)?;
    let text = match &a.text {
        Some(p) => Some(
            std::fs::read_to_string(p)
                .with_context(|| format!("{}: cannot read text", p.display()))?,
        ),
        None => None,
    };
    let prompt = depthc::runtime::validate::prompt(
        Some(ckpt.require_tokenizer()?),
        text.as_deref(),
        a.prompt_tokens,
        ckpt.config.vocab_size,
    )?;
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
    let model = Model::load(&ckpt.source, &ckpt.config, weight_cache)?;
    let model = match (emitted.metadata.healed, a.heal.heal) {
        (true, true) => super::heal(
            &model,
            &a.model,
            ckpt.tokenizer.as_ref(),
            &emitted.metadata.plan,
            &a.heal,
            &a.heal_calib,
        )?,
        (false, false) => model,
        (true, false) => bail!(
            "{} was emitted with --heal: pass --heal with the --calib and --max-tokens it was \
             emitted with, so that the reference heals the same way",
            a.dir.display()
        ),
        (false, true) => bail!(
            "{} was emitted without --heal: validate it without --heal",
            a.dir.display()
        ),
    };
    drop(ckpt);
    pb.set_message(format!("validating {}", emitted.model_path.display()));
    let tolerance = (a.tolerance.is_some() || a.rel_tolerance.is_some()).then_some(Tolerance {
        abs: a.tolerance,
        rel: a.rel_tolerance,
    });
    // The reference runs the weights the emitted model holds (int4: the
    // same quantisation, after the same norm folding).
    let results = validate_emitted(&emitted, &model, &prompt, a.steps, tolerance, &opts)?;
    pb.finish_and_clear();
    if a.json {
        let mut out = serde_json::to_value(&results[0].1)?;
        if let Some((_, twin)) = results.get(1) {
            out["at_accuracy_level_0"] = serde_json::to_value(twin)?;
        }
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        for (label, v) in &results {
            print_validation(label, v);
        }
    }
    let failed: Vec<String> = results
        .iter()
        .filter(|(_, v)| !v.passed())
        .map(|(label, v)| {
            let worst = v
                .outputs
                .iter()
                .filter(|o| !o.passed)
                .max_by(|x, y| x.max_rel.total_cmp(&y.max_rel));
            format!(
                "{}{} of {} outputs over tolerance{}{}",
                if label.is_empty() {
                    String::new()
                } else {
                    format!("{label}: ")
                },
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
            )
        })
        .collect();
    if !failed.is_empty() {
        bail!("validation failed: {}", failed.join("; "));
    }
    Ok(())
}

fn print_validation(label: &str, v: &depthc::runtime::validate::Validation) {
    let plan = if v.plan.is_sequential() {
        "the original model".to_string()
    } else {
        format!("plan `{}`", v.plan)
    };
    let label = if label.is_empty() {
        String::new()
    } else {
        format!(" ({label})")
    };
    println!(
        "{plan}{label}: prefill {} tokens + {} decode steps, tolerance {}",
        v.prompt_tokens, v.steps, v.tolerance
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
    println!("  greedy tokens {}", v.tokens_word());
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

pub fn print_bench(r: &depthc::runtime::bench::BenchResult, a: &str, b: &str) {
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
    for (name, c) in [("prefill", &r.prefill), ("decode", &r.decode)] {
        println!(
            "  {name:<10} per round x{:.3}..x{:.3}: {}",
            c.min,
            c.max,
            c.verdict.name()
        );
    }
}

pub fn bench_command(a: BenchArgs) -> Result<()> {
    use depthc::runtime::bench::{bench, BenchOptions};
    use depthc::runtime::Emitted;
    let ea = Emitted::open(&a.a)?;
    let eb = Emitted::open(&a.b)?;
    if ea.config.vocab_size != eb.config.vocab_size || ea.metadata.float != eb.metadata.float {
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
