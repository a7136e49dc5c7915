//! Command-line interface: one struct per subcommand (clap derive); the doc
//! comment of each flag is its help.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use depthc::pipeline::{CompileOptions, SearchConfig};
use depthc::runtime::bench::BenchOptions;
use depthc::runtime::validate;
use depthc::search;
use depthc::search::strategy::{Metric, Strategy};

// Every default below is the library's own ([`SearchConfig::default`],
// [`CompileOptions::default`], [`BenchOptions::default`], the constants of
// `validate` and `search`): one place states it, the flags read it.
fn search_default() -> SearchConfig {
    SearchConfig::default()
}
fn compile_default() -> CompileOptions {
    CompileOptions::default()
}
fn bench_default() -> BenchOptions {
    BenchOptions::default()
}

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
    /// MiB of weights kept widened to float32 between uses. Weights stay in
    /// the checkpoint's stored form (BF16, F16, Q8_0, Q4_K, Q6_K, ...) and are
    /// widened when used; the first that fit this budget are kept, the rest
    /// widened again each time (less memory, more time). A model whose float32
    /// weights fit runs as if loaded whole. Default: half of the memory
    /// available when the command starts (at least 1024)
    #[arg(long, global = true, value_name = "MIB")]
    pub weight_cache: Option<usize>,
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
    /// Write the model, or a plan of it, as an ONNX directory that ONNX Runtime,
    /// onnxruntime-genai, Optimum and transformers.js load as is.
    ///
    /// The directory holds model.onnx (opset 21, IR 10) with its weights in
    /// model.onnx_data, the same two files linked under onnx/ (where
    /// transformers.js looks), genai_config.json, config.json,
    /// generation_config.json and the tokenizer files. Inputs: input_ids, attention_mask, position_ids and
    /// past_key_values.{i}.key/.value for every original layer; outputs: logits and
    /// present.{i}.key/.value. Written under a temporary name, renamed when complete.
    Emit(EmitArgs),
    /// Check an emitted directory through ONNX Runtime against the reference forward.
    ///
    /// Runs a prefill of real text and --steps greedy decode steps with the KV cache
    /// in ONNX Runtime and in the reference forward of the plan recorded in the model,
    /// then prints the max abs and relative error of every output and whether the
    /// greedy tokens agree. Exit code 1 when any output exceeds --tolerance or a
    /// token differs; every failing output is listed.
    Validate(ValidateArgs),
    /// Search the layer pairing that keeps the model closest to itself, and write a report.
    ///
    /// The original model runs once over the calibration windows, keeping the residual
    /// stream at every layer boundary (the activation cache); every candidate plan then
    /// starts at its first changed layer. Strategies: `contiguous` (every even-length
    /// range [s, e) split into pairs: the paper's family and the heatmap's landscape),
    /// `greedy` (disjoint adjacent pairs anywhere, adding the cheapest pair each round),
    /// `beam` (the --beam-width best plans kept each round). The budget is one of
    /// --pairs, --min-similarity or --max-depth (default: --pairs L/8). Writes
    /// search-report.json, search-report.md, heatmap.svg and pairs.svg into -o DIR.
    Search(SearchArgs),
    /// From checkpoint to a validated, faster ONNX model in one command.
    ///
    /// Loads the model, searches the plan for the budget, emits OUT/baseline (the
    /// unmodified model) and OUT/compiled (the chosen plan), validates both in ONNX
    /// Runtime against the reference forward, benchmarks both, and writes OUT/report
    /// (the search artifacts plus validation and benchmark sections). OUT is written
    /// under a temporary name and renamed when complete.
    Compile(CompileArgs),
    /// Compare two emitted models in ONNX Runtime: prefill latency and decode tokens/s.
    ///
    /// A and B alternate in the same run: prefill of --prefill-tokens, then greedy decode
    /// of --decode-tokens new tokens after a --prompt-tokens prompt with the KV cache;
    /// medians over --runs and the B/A ratios.
    Bench(BenchArgs),
    /// Time the full-sequence reference forward (tokens/s, peak memory).
    BenchForward(BenchForwardArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StrategyArg {
    Contiguous,
    Greedy,
    Beam,
}

impl StrategyArg {
    const ALL: [(StrategyArg, Strategy); 3] = [
        (StrategyArg::Contiguous, Strategy::Contiguous),
        (StrategyArg::Greedy, Strategy::Greedy),
        (StrategyArg::Beam, Strategy::Beam),
    ];
    pub fn strategy(self) -> Strategy {
        Self::ALL
            .iter()
            .find(|(a, _)| *a == self)
            .expect("every flag value")
            .1
    }
    fn of(s: Strategy) -> StrategyArg {
        Self::ALL
            .iter()
            .find(|(_, x)| *x == s)
            .expect("every strategy")
            .0
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MetricArg {
    /// Mean cosine of final hidden states (higher is better).
    Cosine,
    /// Mean KL(original || candidate) of next-token distributions (lower is better).
    Kl,
    /// Top-1 next-token agreement (higher is better).
    Top1,
}

impl MetricArg {
    const ALL: [(MetricArg, Metric); 3] = [
        (MetricArg::Cosine, Metric::Cosine),
        (MetricArg::Kl, Metric::Kl),
        (MetricArg::Top1, Metric::Top1),
    ];
    pub fn metric(self) -> Metric {
        Self::ALL
            .iter()
            .find(|(a, _)| *a == self)
            .expect("every flag value")
            .1
    }
    fn of(m: Metric) -> MetricArg {
        Self::ALL
            .iter()
            .find(|(_, x)| *x == m)
            .expect("every metric")
            .0
    }
}

#[derive(Debug, Args)]
pub struct SearchArgs {
    /// Model directory or .gguf file.
    pub model: PathBuf,
    /// Report directory (must not exist yet).
    #[arg(short, long)]
    pub output: PathBuf,
    #[command(flatten)]
    pub flags: SearchFlags,
    /// `--heal`: every plan of the front is also healed on the calibration
    /// text and measured again (perplexity on --eval, generation, --task).
    #[command(flatten)]
    pub heal: HealArgs,
    /// Print the summary as one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// Calibration, strategy and budget flags shared by `search` and `compile`.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("budget").args(["pairs", "min_similarity", "max_depth"])))]
pub struct SearchFlags {
    /// Calibration input, repeatable: text files or folders of them (tokenized with the
    /// model's tokenizer), or token ids (.json array, .npy integer array). Default: the
    /// built-in public-domain text (four Shakespeare plays).
    #[arg(long)]
    pub calib: Vec<PathBuf>,
    /// Strategies to run, comma-separated; the chosen plan is the best over all of them.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_values_t = search_default().strategies.into_iter().map(StrategyArg::of)
    )]
    pub strategy: Vec<StrategyArg>,
    /// Plans kept each round by the beam strategy.
    #[arg(long, default_value_t = search_default().beam_width)]
    pub beam_width: usize,
    /// Budget: exactly this many pairs (with --drop-layers: layers dropped).
    #[arg(long)]
    pub pairs: Option<usize>,
    /// Drop whole layers instead of pairing them: depth pruning, the baseline
    /// Layer Parallelism is measured against. The same strategies, budget and
    /// metric choose which layers (each dropped layer takes one step of depth
    /// away, as a pair does); plans read `d12,d20`.
    #[arg(long)]
    pub drop_layers: bool,
    /// Budget: the most pairs whose --metric stays at least this good (for kl: at most).
    #[arg(long)]
    pub min_similarity: Option<f64>,
    /// Budget: at most this many layers deep after pairing.
    #[arg(long)]
    pub max_depth: Option<usize>,
    /// Never pair the first N layers.
    #[arg(long, default_value_t = search_default().protect_first)]
    pub protect_first: usize,
    /// Never pair the last N layers.
    #[arg(long, default_value_t = search_default().protect_last)]
    pub protect_last: usize,
    /// The metric that ranks candidates.
    #[arg(long, value_enum, default_value_t = MetricArg::of(search_default().metric))]
    pub metric: MetricArg,
    /// Tokens per calibration window.
    #[arg(long, default_value_t = search_default().seq_len)]
    pub seq_len: usize,
    /// Calibration tokens used at most. Default: 16384, or 2048 for a model of more
    /// than 500M parameters (so that the search takes minutes on a 2-core machine).
    #[arg(long)]
    pub max_tokens: Option<usize>,
    /// Text for perplexity before and after the chosen plan, and greedy generation on its
    /// held-out prompts, kept apart from calibration; repeatable (e.g. prose and code:
    /// each text is reported on its own, the front's generation on all of them).
    #[arg(long)]
    pub eval: Vec<PathBuf>,
    /// Task accuracy, repeatable (as `depthc eval --task`): the original, the
    /// chosen plan and every pair count's best plan are scored, and the
    /// report gives the accuracy each retains.
    #[arg(long, value_name = "NAME|FILE")]
    pub task: Vec<String>,
    /// Score only the first N docs of each --task.
    #[arg(long, value_name = "N")]
    pub task_limit: Option<usize>,
    /// Windows of --seq-len tokens of each --eval text.
    #[arg(long, default_value_t = search_default().eval_windows)]
    pub eval_windows: usize,
    /// Activation cache kept in memory (MiB); the rest spills to a temporary file.
    #[arg(long, default_value_t = search_default().memory_budget_mib)]
    pub memory_budget_mib: u64,
    /// Score every plan each strategy considers on every calibration window and
    /// position, instead of screening and scoring the closest on a sample: tens of
    /// forward passes; the reference the default search is measured against.
    #[arg(long)]
    pub exhaustive: bool,
}

#[derive(Debug, Args)]
pub struct CompileArgs {
    /// Model directory or .gguf file.
    pub model: PathBuf,
    /// Output directory: baseline/, compiled/ and report/ (must not exist unless --force).
    #[arg(short, long)]
    pub output: PathBuf,
    /// Replace an existing output directory (only once the new one is complete).
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub search: SearchFlags,
    /// `--heal`: fitted on the search's --calib text (up to --max-tokens).
    #[command(flatten)]
    pub heal: HealArgs,
    /// `--format gguf`: OUT/model.gguf for llama.cpp and OUT/report/ (no ONNX
    /// Runtime validation or benchmark; the options below are ONNX's).
    #[command(flatten)]
    pub format: FormatArgs,
    /// How parallel groups are written; `auto` emits both, benchmarks each against
    /// the unmodified model and keeps the faster on --workload (for a model of more
    /// than 500M parameters, `auto` is the fused form only).
    #[arg(long, value_enum, default_value_t = AutoFormArg::Auto)]
    pub form: AutoFormArg,
    /// Operators of the emitted graph; `auto` tries every op set --target loads.
    #[arg(long, value_enum, default_value_t = AutoOpsArg::Auto)]
    pub ops: AutoOpsArg,
    /// The serving stack the output must load in: `portable` (every client:
    /// ONNX Runtime, onnxruntime-genai, Optimum, transformers.js) limits --ops
    /// auto to plain operators; `ort` and `genai` also allow ONNX Runtime's fused ones.
    #[arg(long, value_enum, default_value_t = TargetArg::Portable)]
    pub target: TargetArg,
    /// What the kept candidate must be fastest at: prompt processing, token
    /// generation, or both (per round, the geometric mean of the two ratios).
    #[arg(long, value_enum, default_value_t = WorkloadArg::Mixed)]
    pub workload: WorkloadArg,
    /// Element type of the emitted models.
    #[arg(long, value_enum, default_value_t = OnnxDtype::F32)]
    pub dtype: OnnxDtype,
    #[command(flatten)]
    pub int4: Int4Args,
    /// Execution provider for validation and the benchmark.
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    pub device: DeviceArg,
    /// Greedy decode steps of the validation.
    #[arg(long, default_value_t = compile_default().steps)]
    pub steps: usize,
    /// Batch size of the benchmark.
    #[arg(long, default_value_t = compile_default().batch)]
    pub batch: usize,
    /// Measured benchmark runs (after one warm-up each).
    #[arg(long, default_value_t = compile_default().runs)]
    pub runs: usize,
    /// Tokens each benchmark run decodes after its prompt. Default: 128, or 32 for a
    /// model of more than 500M parameters.
    #[arg(long)]
    pub decode_tokens: Option<usize>,
    /// ONNX Runtime shared library (default: $ORT_DYLIB_PATH, then .cache/onnxruntime/).
    #[arg(long)]
    pub ort_lib: Option<PathBuf>,
    /// Print the summary as one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Baseline directory written by `depthc emit` (A).
    pub a: PathBuf,
    /// Directory to compare with it (B).
    pub b: PathBuf,
    /// Batch size: every row gets the same tokens.
    #[arg(long, default_value_t = bench_default().batch)]
    pub batch: usize,
    /// Tokens of the timed prefill.
    #[arg(long, default_value_t = bench_default().prefill_tokens)]
    pub prefill_tokens: usize,
    /// Prompt tokens before the timed decode.
    #[arg(long, default_value_t = bench_default().prompt_tokens)]
    pub prompt_tokens: usize,
    /// Greedy decode steps timed.
    #[arg(long, default_value_t = bench_default().decode_tokens)]
    pub decode_tokens: usize,
    /// Measured runs (after one warm-up each); medians are reported.
    #[arg(long, default_value_t = bench_default().runs)]
    pub runs: usize,
    /// Intra-op threads of both sessions (default: ONNX Runtime's choice).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Execution provider.
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    pub device: DeviceArg,
    /// ONNX Runtime shared library (default: $ORT_DYLIB_PATH, then .cache/onnxruntime/).
    #[arg(long)]
    pub ort_lib: Option<PathBuf>,
    /// Print one JSON object with `a`, `b`, `prefill_speedup` and `decode_speedup`.
    #[arg(long)]
    pub json: bool,
}

/// Which operators the emitted graph uses.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum OpsArg {
    /// Plain ONNX operators (opset 21): ONNX Runtime, Optimum, transformers.js and
    /// onnxruntime-genai all load it.
    Portable,
    /// ONNX Runtime's fused operators (SimplifiedLayerNormalization,
    /// SkipSimplifiedLayerNormalization, GroupQueryAttention with RoPE, packed
    /// QKV): faster in ONNX Runtime and onnxruntime-genai, loadable nowhere else.
    Ort,
}

/// `compile --form`: a form, or every form (`auto`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AutoFormArg {
    /// Both forms, the faster kept (the fused form only above 500M parameters).
    Auto,
    Fused,
    Branches,
}

/// `compile --ops`: an op set, or every op set --target loads (`auto`).
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum AutoOpsArg {
    Auto,
    Portable,
    Ort,
}

/// The serving stack `compile`'s output must load in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TargetArg {
    /// Every client (plain operators only).
    Portable,
    /// ONNX Runtime (plain or fused operators).
    Ort,
    /// onnxruntime-genai (plain or fused operators).
    Genai,
}

/// What `compile` optimises for.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum WorkloadArg {
    Prefill,
    Decode,
    Mixed,
}

/// How a parallel group is written in ONNX.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum FormArg {
    /// One wider layer per group: concatenated Q/K/V and gate/up, stacked o/down
    /// projections (exact; fewer, wider ops: the fast form).
    Fused,
    /// Each layer's sublayer as its own branch on the shared residual, summed by Add.
    Branches,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnnxDtype {
    /// float32 weights, activations and KV cache.
    F32,
    /// float16 weights, activations and KV cache.
    F16,
    /// 4-bit linear weights (ONNX Runtime's `MatMulNBits`, symmetric blocks as
    /// the onnxruntime-genai builder's `-p int4`), float32 activations and KV
    /// cache; the token embedding stays float32.
    Int4,
}

fn block_size(s: &str) -> Result<usize, String> {
    use depthc::model::int4::BLOCK_SIZES;
    s.parse::<usize>()
        .ok()
        .filter(|n| BLOCK_SIZES.contains(n))
        .ok_or_else(|| format!("`{s}` is not one of {BLOCK_SIZES:?}"))
}

/// The 4-bit settings of `--dtype int4`.
#[derive(Debug, Clone, Copy, Args)]
pub struct Int4Args {
    /// int4: weights per quantisation block (one scale each) along a row's inputs.
    #[arg(long, default_value_t = depthc::model::int4::DEFAULT_BLOCK_SIZE, value_parser = block_size)]
    pub block_size: usize,
    /// int4: `MatMulNBits` accuracy level; 4 (the builder's CPU default) computes
    /// in int8, fastest on CPU; 0 computes in float32, bit-for-bit the
    /// dequantised weights.
    #[arg(long, default_value_t = depthc::model::int4::DEFAULT_ACCURACY_LEVEL,
          value_parser = clap::value_parser!(u8).range(0..=4))]
    pub accuracy_level: u8,
    /// int4: where the 4-bit weights come from: `rtn` rounds the float weights
    /// (the builder's quantiser); `gguf` keeps a GGUF's own Q4_0, Q4_1 and Q4_K
    /// blocks unchanged (Q4_1 and Q4_K with float zero points, which ONNX
    /// Runtime's CPU kernels run far slower) and rounds the rest.
    #[arg(long, value_enum, default_value_t = Int4SourceArg::Rtn)]
    pub int4_source: Int4SourceArg,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Int4SourceArg {
    Rtn,
    Gguf,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum DeviceArg {
    Cpu,
    Cuda,
}

/// Healing of a plan's parallel groups (`--heal`).
#[derive(Debug, Clone, Args)]
pub struct HealArgs {
    /// Heal each parallel group of the plan: a least-squares correction of
    /// its summed MLP output towards its layers run in turn, fitted on
    /// calibration text and folded into its down_proj weights (no new
    /// operator, the same cost); a group it does not improve on held-out
    /// calibration windows is left as it was
    #[arg(long)]
    pub heal: bool,
    /// Ridge strength of the fit, relative to the mean diagonal of X^T X.
    #[arg(long, default_value_t = depthc::heal::HealOptions::default().ridge)]
    pub heal_ridge: f64,
    /// The correction fitted to each group: a dense hidden x hidden matrix (`full`), one
    /// scale per hidden dimension (`diagonal`), or both with each group keeping the one
    /// with the lower held-out deviation (`best`).
    #[arg(long, value_enum, default_value_t = HealKindArg::of(depthc::heal::HealOptions::default().kind))]
    pub heal_kind: HealKindArg,
    /// Also correct each group's attention half: its summed attention output towards
    /// each layer's attention on its own input in turn, folded into its o_proj weights
    /// (checked on held-out windows the same way), before the MLP half is fitted.
    #[arg(long)]
    pub heal_attention: bool,
}

/// `--heal-kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum HealKindArg {
    Full,
    Diagonal,
    Best,
}

impl HealKindArg {
    fn of(k: depthc::heal::TKind) -> HealKindArg {
        match k {
            depthc::heal::TKind::Full => HealKindArg::Full,
            depthc::heal::TKind::Diagonal => HealKindArg::Diagonal,
            depthc::heal::TKind::Best => HealKindArg::Best,
        }
    }

    fn kind(self) -> depthc::heal::TKind {
        match self {
            HealKindArg::Full => depthc::heal::TKind::Full,
            HealKindArg::Diagonal => depthc::heal::TKind::Diagonal,
            HealKindArg::Best => depthc::heal::TKind::Best,
        }
    }
}

impl HealArgs {
    /// How the fit is made (`--heal-ridge`).
    pub fn fit(&self) -> depthc::heal::HealOptions {
        depthc::heal::HealOptions {
            ridge: self.heal_ridge,
            kind: self.heal_kind.kind(),
            attention: self.heal_attention,
        }
    }

    /// The healing `--heal` asks for, if it does.
    pub fn options(&self) -> Option<depthc::heal::HealOptions> {
        self.heal.then(|| self.fit())
    }
}

/// The calibration text healing fits on, for commands without search flags.
#[derive(Debug, Clone, Args)]
pub struct HealCalibArgs {
    /// With --heal: calibration input, repeatable (as `search --calib`);
    /// default: the built-in text. `emit --heal` and `validate --heal` of the
    /// same model need the same --calib and --max-tokens.
    #[arg(long)]
    pub calib: Vec<PathBuf>,
    /// With --heal: calibration tokens used at most (windows of 256).
    #[arg(long, default_value_t = 8192)]
    pub max_tokens: usize,
}

#[derive(Debug, Args)]
pub struct EmitArgs {
    /// Model directory or .gguf file.
    pub model: PathBuf,
    /// Layers to run in parallel (`20-21,22-23` or `20..24`), or to drop (`d12`,
    /// `d12-14`); none or empty: the unmodified model.
    #[arg(long)]
    pub plan: Option<String>,
    /// Output directory (must not exist yet).
    #[arg(short, long)]
    pub output: PathBuf,
    /// How parallel groups are written.
    #[arg(long, value_enum, default_value_t = FormArg::Fused)]
    pub form: FormArg,
    /// Operators of the emitted graph.
    #[arg(long, value_enum, default_value_t = OpsArg::Portable)]
    pub ops: OpsArg,
    /// Element type of weights, activations and KV cache.
    #[arg(long, value_enum, default_value_t = OnnxDtype::F32)]
    pub dtype: OnnxDtype,
    #[command(flatten)]
    pub int4: Int4Args,
    #[command(flatten)]
    pub heal: HealArgs,
    #[command(flatten)]
    pub heal_calib: HealCalibArgs,
    #[command(flatten)]
    pub format: FormatArgs,
}

/// What the output is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FormatArg {
    /// An ONNX directory (ONNX Runtime, onnxruntime-genai, Optimum, transformers.js).
    Onnx,
    /// `model.gguf` of llama.cpp's `deci` architecture (per-layer head counts):
    /// llama.cpp and the apps built on it. From a GGUF source (its tokenizer is
    /// copied); Llama, Mistral and Qwen2 families; groups in the fused form.
    Gguf,
}

/// How `--format gguf` encodes the matrices a fused group changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum GgufEncodingArg {
    #[value(name = "q8_0")]
    Q8_0,
    F16,
    F32,
    #[value(name = "q4_0")]
    Q4_0,
    #[value(name = "q4_1")]
    Q4_1,
}

impl GgufEncodingArg {
    pub fn encoding(self) -> depthc::llamacpp::Encoding {
        use depthc::llamacpp::Encoding;
        match self {
            GgufEncodingArg::Q8_0 => Encoding::Q8_0,
            GgufEncodingArg::F16 => Encoding::F16,
            GgufEncodingArg::F32 => Encoding::F32,
            GgufEncodingArg::Q4_0 => Encoding::Q4_0,
            GgufEncodingArg::Q4_1 => Encoding::Q4_1,
        }
    }
}

#[derive(Debug, Args)]
pub struct FormatArgs {
    /// Output format.
    #[arg(long, value_enum, default_value_t = FormatArg::Onnx)]
    pub format: FormatArg,
    /// --format gguf: encoding of the q/k/v and gate/up matrices of each parallel
    /// group (their input norms are folded in, so they are encoded again; every
    /// other tensor is copied as stored).
    #[arg(long, value_enum, default_value_t = GgufEncodingArg::Q8_0)]
    pub gguf_encoding: GgufEncodingArg,
}

#[derive(Debug, Args)]
pub struct ValidateArgs {
    /// Directory written by `depthc emit`.
    pub dir: PathBuf,
    /// The checkpoint it was emitted from (directory or .gguf file).
    #[arg(long)]
    pub model: PathBuf,
    /// Execution provider: `cuda` registers CUDA and fails with its own error
    /// message when it cannot.
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    pub device: DeviceArg,
    /// Greedy decode steps after the prefill.
    #[arg(long, default_value_t = validate::DEFAULT_STEPS)]
    pub steps: usize,
    /// With --device cuda: any node placed on the CPU is an error.
    #[arg(long)]
    pub strict: bool,
    /// UTF-8 text whose first --prompt-tokens tokens are the prefill (default: a
    /// built-in passage of Hamlet).
    #[arg(long)]
    pub text: Option<PathBuf>,
    /// Tokens of the prefill.
    #[arg(long, default_value_t = validate::DEFAULT_PROMPT_TOKENS)]
    pub prompt_tokens: usize,
    /// Largest accepted absolute difference on any output (default: 1e-3 for
    /// float32 models; float16 models are held to --rel-tolerance 1e-2 instead).
    #[arg(long)]
    pub tolerance: Option<f32>,
    /// Largest accepted difference relative to the largest reference magnitude
    /// of each output.
    #[arg(long)]
    pub rel_tolerance: Option<f32>,
    /// ONNX Runtime shared library (default: $ORT_DYLIB_PATH, then the copy
    /// scripts/setup.sh installs in .cache/onnxruntime/).
    #[arg(long)]
    pub ort_lib: Option<PathBuf>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// A model emitted with --heal: heal the reference the same way (the same
    /// --calib and --max-tokens).
    #[command(flatten)]
    pub heal: HealArgs,
    #[command(flatten)]
    pub heal_calib: HealCalibArgs,
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
#[command(group(clap::ArgGroup::new("input").required(true).multiple(true).args(["text", "task"])))]
pub struct EvalArgs {
    /// Model directory or .gguf file.
    pub model: PathBuf,
    /// UTF-8 text file to evaluate on (perplexity, and with a candidate its
    /// distance from the original and greedy agreement).
    #[arg(long)]
    pub text: Option<PathBuf>,
    /// Task accuracy, repeatable: a task `scripts/setup.sh` installs
    /// (arc_easy, arc_challenge, hellaswag, boolq, piqa, sciq, openbookqa,
    /// winogrande, csqa, socialiqa) or the path of a request file in
    /// oe-eval's requests.jsonl format (gzipped or not). Prints acc_raw and
    /// acc_per_char with standard errors, the task's primary metric first;
    /// with a candidate, both models' and the accuracy retained.
    #[arg(long, value_name = "NAME|FILE")]
    pub task: Vec<String>,
    /// Score only the first N docs of each --task.
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
    #[command(flatten)]
    pub heal: HealArgs,
    #[command(flatten)]
    pub heal_calib: HealCalibArgs,
    /// Layers to run in parallel: `20-21,22-23` (explicit groups) or `20..24`
    /// (the range [20, 24) split into adjacent pairs); `d12` or `d12-14` drops
    /// layers. Empty: the original model.
    #[arg(long)]
    pub plan: Option<String>,
    /// Tokens per window.
    #[arg(long, default_value_t = search_default().seq_len)]
    pub seq_len: usize,
    /// Use at most this many windows (default: all whole windows of the text).
    #[arg(long)]
    pub max_windows: Option<usize>,
    /// Score the weights an emitted model of this dtype holds: `int4` compares
    /// the 4-bit model (with --plan, the 4-bit model running the plan) against
    /// the float original, so it shows what int4 alone costs and what int4
    /// plus a plan costs.
    #[arg(long, value_enum, default_value_t = OnnxDtype::F32)]
    pub dtype: OnnxDtype,
    #[command(flatten)]
    pub int4: Int4Args,
    /// `--format gguf`: score the weights `emit --format gguf` writes for --plan
    /// (the groups' folded projections in --gguf-encoding), against the original.
    #[command(flatten)]
    pub format: FormatArgs,
    /// With --dtype int4: the form the emitted model writes groups in (the
    /// fused form quantises norm-folded weights).
    #[arg(long, value_enum, default_value_t = FormArg::Fused)]
    pub form: FormArg,
    /// Held-out prompts for generation agreement: the first 32 tokens of each
    /// of the first N windows; the original and the candidate (the plan, or
    /// the int4 weights) each generate --generate greedy tokens after each,
    /// compared position by position. 0: skip.
    #[arg(long, default_value_t = search::HELD_OUT_PROMPTS)]
    pub prompts: usize,
    /// Greedy tokens generated after each held-out prompt.
    #[arg(long, default_value_t = search::HELD_OUT_GENERATED_TOKENS)]
    pub generate: usize,
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
    /// Also time ONNX Runtime (CPU) on the same ids: the unmodified model is
    /// emitted (f32, portable ops) to a temporary directory and prefilled with
    /// as many intra-op threads as the forward has, the two alternating
    /// (ONNX Runtime first every other round).
    #[arg(long)]
    pub against_ort: bool,
    /// ONNX Runtime shared library (default: $ORT_DYLIB_PATH, then .cache/onnxruntime/).
    #[arg(long)]
    pub ort_lib: Option<PathBuf>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}
