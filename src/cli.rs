//! Command-line interface: one struct per subcommand (clap derive); the doc
//! comment of each flag is its help.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// depthc: make a pretrained LLM shallower with Layer Parallelism (arXiv 2502.02790).
///
/// Pairs of consecutive middle layers are evaluated in parallel: both attentions
/// read the same residual, then both MLPs read the same residual. MODEL is a
/// Hugging Face directory (config.json + safetensors) or a llama.cpp .gguf file.
#[derive(Debug, Parser)]
#[command(name = "depthc", version, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Describe a checkpoint: family, sizes, RoPE, parameter count, dtypes, tokenizer.
    Inspect(InspectArgs),
    /// Perplexity of the model (or of a plan) on a text, and a plan's similarity to the original.
    ///
    /// The whole file is tokenized without special tokens, cut into non-overlapping
    /// windows of --seq-len tokens from the start, and perplexity is exp of the mean
    /// next-token negative log-likelihood over all windows. With --plan, the same
    /// windows also run through the original model, giving the mean cosine of final
    /// hidden states, mean KL(original || plan) and top-1 agreement.
    Eval(EvalArgs),
    /// Write the checkpoint as a Hugging Face directory (config.json, f32/f16/bf16
    /// model.safetensors, tokenizer.json), e.g. to turn a GGUF into safetensors.
    Convert(ConvertArgs),
    /// Time the full-sequence reference forward (tokens/s, peak memory).
    BenchForward(BenchForwardArgs),
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// Model directory or .gguf file.
    pub model: PathBuf,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Model directory or .gguf file.
    pub model: PathBuf,
    /// UTF-8 text file to evaluate on.
    #[arg(long)]
    pub text: PathBuf,
    /// Layers to run in parallel: `20-21,22-23` (explicit groups) or `20..24`
    /// (the range [20, 24) split into adjacent pairs). Empty: the original model.
    #[arg(long)]
    pub plan: Option<String>,
    /// Tokens per window.
    #[arg(long, default_value_t = 256)]
    pub seq_len: usize,
    /// Use at most this many windows (default: all whole windows of the text).
    #[arg(long)]
    pub max_windows: Option<usize>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum StoreDtype {
    F32,
    F16,
    Bf16,
}

#[derive(Debug, Args)]
pub struct ConvertArgs {
    /// Model directory or .gguf file.
    pub model: PathBuf,
    /// Output directory (must not exist yet).
    #[arg(short, long)]
    pub output: PathBuf,
    /// Element type of the written weights (GGUF quantisations are dequantised first).
    #[arg(long, value_enum, default_value_t = StoreDtype::F32)]
    pub dtype: StoreDtype,
}

#[derive(Debug, Args)]
pub struct BenchForwardArgs {
    /// Model directory or .gguf file.
    pub model: PathBuf,
    /// Sequence length of the timed forward (batch 1).
    #[arg(long, default_value_t = 256)]
    pub tokens: usize,
    /// Timed repetitions after one warm-up run; the median is reported.
    #[arg(long, default_value_t = 5)]
    pub repeats: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}
