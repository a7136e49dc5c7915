//! The subcommands, one file per pipeline area; shared terminal helpers here.

pub mod compile;
pub mod model;
pub mod onnx;

use std::io::IsTerminal;
use std::path::Path;

use anyhow::Result;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::cli::*;
use depthc::checkpoint::Checkpoint;
use depthc::model::Model;

pub fn spinner(msg: &str) -> ProgressBar {
    let pb = if std::io::stderr().is_terminal() {
        ProgressBar::new_spinner()
    } else {
        ProgressBar::with_draw_target(None, plain_lines())
    };
    pb.set_message(msg.to_string());
    pb.enable_steady_tick(std::time::Duration::from_millis(120));
    pb
}

pub fn bar(len: u64, template: &str) -> Result<ProgressBar> {
    let pb = if std::io::stderr().is_terminal() {
        ProgressBar::new(len)
    } else {
        ProgressBar::with_draw_target(Some(len), plain_lines())
    };
    pb.set_style(ProgressStyle::with_template(template)?);
    Ok(pb)
}

/// Where progress goes when stderr is not a terminal (a log, CI): a plain
/// line now and then instead of a bar redrawn in place.
fn plain_lines() -> ProgressDrawTarget {
    ProgressDrawTarget::term_like_with_hz(Box::new(PlainLines::default()), 1)
}

/// A progress line on stderr at most every [`PlainLines::EVERY`], the first
/// once the work has taken that long (quick work and errors print nothing
/// more), and only when it says something new.
#[derive(Debug)]
struct PlainLines {
    last: std::sync::Mutex<(std::time::Instant, String)>,
}

impl Default for PlainLines {
    fn default() -> Self {
        PlainLines {
            last: std::sync::Mutex::new((std::time::Instant::now(), String::new())),
        }
    }
}

impl PlainLines {
    const EVERY: std::time::Duration = std::time::Duration::from_secs(10);
}

impl indicatif::TermLike for PlainLines {
    fn width(&self) -> u16 {
        100
    }
    fn move_cursor_up(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_down(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_right(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_left(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn write_line(&self, s: &str) -> std::io::Result<()> {
        let line = s.trim_end();
        if line.is_empty() {
            return Ok(());
        }
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if last.1 != line && last.0.elapsed() >= Self::EVERY {
            eprintln!("{line}");
            *last = (std::time::Instant::now(), line.to_string());
        }
        Ok(())
    }
    fn write_str(&self, s: &str) -> std::io::Result<()> {
        self.write_line(s)
    }
    fn clear_line(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Open a checkpoint and load its weights as f32, then release the mapping.
pub fn load(
    path: &Path,
    weight_cache: &std::sync::Arc<depthc::model::WeightCache>,
) -> Result<(Model, Option<depthc::checkpoint::tokenizer::Tokenizer>)> {
    let pb = spinner(&format!("loading {}", path.display()));
    let ckpt = Checkpoint::open(path)?;
    let model = Model::load(&ckpt.source, &ckpt.config, weight_cache)?;
    pb.finish_and_clear();
    Ok((model, ckpt.tokenizer))
}

pub fn runtime_options(
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

/// Progress on the terminal: bars and spinners on stderr when it is one.
pub struct Terminal;

impl depthc::pipeline::Progress for Terminal {
    fn bar(&self, template: &str) -> ProgressBar {
        bar(0, template).unwrap_or_else(|_| ProgressBar::hidden())
    }
    fn spinner(&self, msg: &str) -> ProgressBar {
        spinner(msg)
    }
    /// On the terminal, like the bars (the summary repeats it on stdout).
    fn note(&self, line: &str) {
        if std::io::stderr().is_terminal() {
            eprintln!("{line}");
        }
    }
}

/// The emission options of `--form`, `--dtype` and `--ops`.
pub fn emit_options(
    form: FormArg,
    dtype: OnnxDtype,
    int4: Int4Args,
    ops: OpsArg,
) -> depthc::onnx::package::EmitOptions {
    use depthc::graph::{Form, Ops};
    depthc::onnx::package::EmitOptions {
        ops: match ops {
            OpsArg::Portable => Ops::Portable,
            OpsArg::Ort => Ops::Ort,
        },
        form: match form {
            FormArg::Fused => Form::Fused,
            FormArg::Branches => Form::Branches,
        },
        float: float_of(dtype),
        int4: int4_of(dtype, int4),
        healed: false,
    }
}

/// The activations' element type of `--dtype`.
pub fn float_of(dtype: OnnxDtype) -> depthc::graph::ElemType {
    match dtype {
        OnnxDtype::F32 | OnnxDtype::Int4 => depthc::graph::ElemType::F32,
        OnnxDtype::F16 => depthc::graph::ElemType::F16,
    }
}

/// The 4-bit settings of `--dtype int4`, `None` for a float dtype.
pub fn int4_of(dtype: OnnxDtype, a: Int4Args) -> Option<depthc::model::Int4> {
    use depthc::model::int4::Int4Source;
    (dtype == OnnxDtype::Int4).then_some(depthc::model::Int4 {
        block_size: a.block_size,
        accuracy_level: a.accuracy_level,
        source: match a.int4_source {
            Int4SourceArg::Rtn => Int4Source::Rtn,
            Int4SourceArg::Gguf => Int4Source::Gguf,
        },
    })
}

/// The chosen plan and its similarity, as `search` and `compile` print with `--json`.
pub fn summary_json(report: &depthc::report::SearchReport) -> serde_json::Value {
    serde_json::json!({
        "chosen_plan": report.chosen_plan,
        "depth_before": report.depth_before,
        "depth_after": report.depth_after,
        "cosine": report.chosen.scores.cosine,
        "kl": report.chosen.scores.kl,
        "top1_agreement": report.chosen.scores.top1_agreement,
        "eval": report.eval,
        "tasks": report.tasks,
        "accuracy_retained": report.accuracy_retained,
        "healing": report.healing,
        "candidates": report.candidates.len(),
        "search_forward_multiple": report.timings.search_forward_multiple,
    })
}

/// `model` with `plan`'s groups healed as `--heal` asks, the fit's report
/// printed to stderr.
pub fn heal(
    model: &Model,
    model_path: &Path,
    tokenizer: Option<&depthc::checkpoint::tokenizer::Tokenizer>,
    plan: &depthc::plan::Plan,
    args: &HealArgs,
    calib: &HealCalibArgs,
) -> Result<Model> {
    let pb = spinner(&format!("healing {plan}"));
    let (healed, report) = depthc::heal::heal_on(
        model,
        model_path,
        tokenizer,
        plan,
        &depthc::heal::HealCalibration {
            calib: &calib.calib,
            seq_len: depthc::pipeline::SearchConfig::default().seq_len,
            max_tokens: calib.max_tokens,
        },
        args.fit(),
        &pb,
    )?;
    pb.finish_and_clear();
    print_heal(&report);
    Ok(healed)
}

/// One line per group healed, on stderr (stdout may be JSON).
pub fn print_heal(report: &depthc::heal::HealReport) {
    for g in &report.groups {
        eprintln!(
            "heal           group {}: held-out deviation {:.4} -> {:.4} ({}, {} ridge {}, checked fitting {} / holding out {} tokens{})",
            g.name(),
            g.deviation_before,
            g.deviation_after,
            if g.applied { "applied" } else { "left as it was" },
            g.kind,
            g.ridge,
            g.fit_tokens,
            g.held_out_tokens,
            if g.applied { ", then fitted on all" } else { "" }
        );
        if let Some(a) = &g.attention {
            eprintln!(
                "heal           group {} attention (o_proj, fitted first): held-out deviation {:.4} -> {:.4} ({}, {})",
                g.name(),
                a.deviation_before,
                a.deviation_after,
                if a.applied { "applied" } else { "left as it was" },
                a.kind
            );
        }
    }
}
