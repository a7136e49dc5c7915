//! ONNX Runtime sessions through the `ort` crate, loading the library at run
//! time (docs/DESIGN.md section 6): `--ort-lib`, `ORT_DYLIB_PATH`, or the copy
//! `scripts/setup.sh` extracts from the PyPI `onnxruntime` wheel of the version
//! pinned in `scripts/versions.env` ([`PINNED_VERSION`]).
//! Any ONNX Runtime 1.31 or newer works (the C API version 31 is required).

pub mod bench;
pub mod validate;

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ort::environment::Environment;
use ort::memory::{AllocationDevice, AllocatorType, MemoryInfo, MemoryType};
use ort::session::builder::GraphOptimizationLevel;
use ort::session::{Session, SessionInputValue};
use ort::value::{DynValue, Tensor};

use crate::checkpoint::ModelConfig;
use crate::graph::contract::{self, Metadata};
use crate::graph::ElemType;
use crate::{Error, Result};
use half::f16;

/// The pinned versions every script installs, one `NAME=value` a line.
const VERSIONS: &str = include_str!("../../scripts/versions.env");

/// The ONNX Runtime version `scripts/setup.sh` installs (`ONNXRUNTIME` in
/// `scripts/versions.env`).
pub static PINNED_VERSION: std::sync::LazyLock<&'static str> = std::sync::LazyLock::new(|| {
    VERSIONS
        .lines()
        .find_map(|l| l.trim().strip_prefix("ONNXRUNTIME="))
        .map(str::trim)
        .expect("scripts/versions.env pins ONNXRUNTIME")
});

/// The library `scripts/setup.sh` installs, relative to its cache.
pub fn setup_library() -> String {
    format!("onnxruntime/libonnxruntime.so.{}", *PINNED_VERSION)
}

/// How to get a library, for error messages.
fn how_to_get() -> String {
    let v = *PINNED_VERSION;
    format!(
        "pass --ort-lib PATH or set ORT_DYLIB_PATH to libonnxruntime.so (ONNX Runtime 1.31 or \
         newer, e.g. onnxruntime/capi/libonnxruntime.so.{v} from the PyPI wheel \
         onnxruntime=={v}, or the capi folder of an installed onnxruntime-gpu); \
         scripts/setup.sh puts one in .cache/onnxruntime/"
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda,
}

#[derive(Debug, Clone)]
pub struct RuntimeOptions {
    /// Explicit library path (`--ort-lib`).
    pub library: Option<PathBuf>,
    pub device: Device,
    /// Any node placed on the CPU while `device` is CUDA is an error.
    pub strict: bool,
    pub threads: Option<usize>,
}

impl Default for RuntimeOptions {
    fn default() -> Self {
        RuntimeOptions {
            library: None,
            device: Device::Cpu,
            strict: false,
            threads: None,
        }
    }
}

/// Find the ONNX Runtime shared library.
pub fn find_library(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        return if p.is_file() {
            Ok(p.to_path_buf())
        } else {
            Err(Error::Runtime(format!(
                "library {} not found; {}",
                p.display(),
                how_to_get()
            )))
        };
    }
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH") {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(Error::Runtime(format!(
                "ORT_DYLIB_PATH={} is not a file; {}",
                p.display(),
                how_to_get()
            )))
        };
    }
    crate::checkpoint::setup_caches()
        .into_iter()
        .map(|c| c.join(setup_library()))
        .find(|p| p.is_file())
        .ok_or_else(|| Error::Runtime(format!("library not found; {}", how_to_get())))
}

/// Load the library and create the environment, once per process.
fn environment(opts: &RuntimeOptions) -> Result<&'static Environment> {
    static ENVIRONMENT: OnceLock<std::result::Result<Environment, String>> = OnceLock::new();
    if let Some(Ok(env)) = ENVIRONMENT.get() {
        return Ok(env);
    }
    let path = find_library(opts.library.as_deref())?;
    let env = ENVIRONMENT.get_or_init(|| {
        ort::init_from(&path)
            .map_err(|e| format!("cannot load {}: {e}", path.display()))?
            .with_name("depthc")
            .build()
            .map_err(|e| format!("{}: {e}", path.display()))
    });
    env.as_ref().map_err(|e| Error::Runtime(e.clone()))
}

/// A directory written by `depthc emit`: its config and what it was
/// written with (plan, form, float type, op set, int4, healing).
pub struct Emitted {
    pub model_path: PathBuf,
    pub config: ModelConfig,
    pub metadata: Metadata,
}

impl Emitted {
    pub fn open(dir: &Path) -> Result<Emitted> {
        use crate::onnx::package::MODEL_FILE;
        let model_path = dir.join(MODEL_FILE);
        if !model_path.is_file() {
            return Err(Error::Input(format!(
                "{}: no {MODEL_FILE}; expected a directory written by `depthc emit`",
                dir.display()
            )));
        }
        let metadata = crate::onnx::read_metadata(&model_path)?;
        let config = ModelConfig::from_hf_dir(dir)?;
        let metadata = Metadata::parse(&metadata, config.num_hidden_layers, &model_path)?;
        Ok(Emitted {
            model_path,
            config,
            metadata,
        })
    }

    pub fn session(&self, opts: &RuntimeOptions) -> Result<DecoderSession> {
        DecoderSession::open(&self.model_path, &self.config, self.metadata.float, opts)
    }

    /// A session of this graph with its `MatMulNBits` at accuracy level 0
    /// (float32; see [`crate::onnx::at_accuracy_level_zero`]). The graph file
    /// it loads is removed again once the session holds it.
    pub fn session_at_accuracy_level_zero(&self, opts: &RuntimeOptions) -> Result<DecoderSession> {
        let path = crate::onnx::at_accuracy_level_zero(&self.model_path)?;
        let session = DecoderSession::open(&path, &self.config, self.metadata.float, opts);
        std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
        session
    }
}

/// Outputs of one run.
pub struct StepOutput {
    /// `[batch, S, vocab]`.
    pub logits: Vec<f32>,
    /// Per original layer, `[batch, kv_heads, total, head_dim]` keys and values.
    pub present: Vec<(Vec<f32>, Vec<f32>)>,
    pub total_len: usize,
}

/// A decoder session with the I/O contract of [`contract`].
pub struct DecoderSession {
    session: Session,
    /// Float type of the KV cache and logits (float16 values are converted
    /// to and from f32 at the boundary).
    float: ElemType,
    layers: usize,
    kv_heads: usize,
    head_dim: usize,
    vocab: usize,
    device: Device,
}

/// What [`DecoderSession::greedy_bound`] measured.
#[derive(Debug, Clone)]
pub struct BoundDecode {
    /// Per row, the greedy token after the prefill and after each step.
    pub tokens: Vec<Vec<u32>>,
    /// Seconds of the prefill run (the last position's logits copied out).
    pub prefill_s: f64,
    /// Seconds of the decode steps, each with its logits copied out.
    pub decode_s: f64,
}

fn ort_err(context: &str) -> impl Fn(ort::Error) -> Error + '_ {
    move |e| Error::Runtime(format!("{context}: {e}"))
}

impl DecoderSession {
    pub fn open(
        model_path: &Path,
        cfg: &ModelConfig,
        float: ElemType,
        opts: &RuntimeOptions,
    ) -> Result<Self> {
        let env = environment(opts)?;
        let mut builder = Session::builder(env)
            .map_err(ort_err("session options"))?
            .with_optimization_level(GraphOptimizationLevel::Level3)
            .map_err(|e| Error::Runtime(format!("session options: {e}")))?;
        if let Some(n) = opts.threads {
            builder = builder
                .with_intra_threads(n)
                .map_err(|e| Error::Runtime(format!("session options: {e}")))?;
        }
        if opts.device == Device::Cuda {
            use ort::ep::ExecutionProvider;
            ort::ep::CUDA::default()
                .register(&mut builder)
                .map_err(|e| Error::Runtime(format!("CUDA execution provider: {e}")))?;
            if opts.strict {
                builder = builder
                    .with_config_entry("session.disable_cpu_ep_fallback", "1")
                    .map_err(|e| Error::Runtime(format!("session options: {e}")))?;
            }
        }
        let session = builder
            .commit_from_file(model_path)
            .map_err(|e| Error::Runtime(format!("{}: {e}", model_path.display())))?;
        Ok(DecoderSession {
            session,
            float,
            layers: cfg.num_hidden_layers,
            kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
            vocab: cfg.vocab_size,
            device: opts.device,
        })
    }

    /// Where the execution provider keeps its outputs.
    fn device_memory(&self) -> Result<MemoryInfo<'static>> {
        let device = match self.device {
            Device::Cpu => AllocationDevice::CPU,
            Device::Cuda => AllocationDevice::CUDA,
        };
        MemoryInfo::new(device, 0, AllocatorType::Device, MemoryType::Default)
            .map_err(ort_err("memory info"))
    }

    /// An empty `[batch, kv_heads, 0, head_dim]` cache in the model's float type.
    fn empty_cache(&self, batch: usize) -> Result<DynValue> {
        let shape = vec![batch as i64, self.kv_heads as i64, 0, self.head_dim as i64];
        Ok(if self.float == ElemType::F16 {
            Tensor::from_array((shape, Vec::<f16>::new()))
                .map_err(ort_err("input"))?
                .into_dyn()
        } else {
            Tensor::from_array((shape, Vec::<f32>::new()))
                .map_err(ort_err("input"))?
                .into_dyn()
        })
    }

    /// Prefill `prompt` (`batch` rows of `prompt.len() / batch` ids), then
    /// `steps` greedy decode steps, through an I/O binding, as
    /// onnxruntime-genai decodes: each step's `present.*` stay where the
    /// execution provider wrote them (GPU memory with CUDA) and are bound as
    /// the next step's `past_key_values.*`; only the new ids go in, and the
    /// logits come out for the argmax. The timings include that copy and
    /// nothing else from the host side. With `steps == 0` (a timed prefill)
    /// the logits stay on the device too and no token is read.
    pub fn greedy_bound(
        &mut self,
        prompt: &[u32],
        batch: usize,
        steps: usize,
    ) -> Result<BoundDecode> {
        let batch = batch.max(1);
        let device = self.device_memory()?;
        let host = MemoryInfo::new(
            AllocationDevice::CPU,
            0,
            AllocatorType::Device,
            MemoryType::Default,
        )
        .map_err(ort_err("memory info"))?;
        let mut binding = self
            .session
            .create_binding()
            .map_err(ort_err("I/O binding"))?;
        let mut past: Vec<DynValue> = Vec::with_capacity(2 * self.layers);
        for _ in 0..2 * self.layers {
            past.push(self.empty_cache(batch)?);
        }
        let mut ids: Vec<u32> = prompt.to_vec();
        let (mut total, mut tokens) = (0usize, vec![Vec::new(); batch]);
        let (mut prefill_s, mut decode_s) = (0.0, 0.0);
        let bind_err = ort_err("I/O binding");
        for step in 0..=steps {
            let seq = ids.len() / batch;
            let past_len = total;
            total += seq;
            let i64_tensor = |v: Vec<i64>| {
                let cols = (v.len() / batch) as i64;
                Tensor::from_array((vec![batch as i64, cols], v)).map_err(ort_err("input"))
            };
            let positions = (0..batch)
                .flat_map(|_| past_len as i64..total as i64)
                .collect();
            let inputs = [
                (contract::INPUT_IDS, ids.iter().map(|&i| i as i64).collect()),
                (contract::ATTENTION_MASK, vec![1i64; batch * total]),
                (contract::POSITION_IDS, positions),
            ];
            let t0 = std::time::Instant::now();
            for (name, values) in inputs {
                binding
                    .bind_input(name, &i64_tensor(values)?)
                    .map_err(&bind_err)?;
            }
            for l in 0..self.layers {
                binding
                    .bind_input(contract::past_key(l), &past[2 * l])
                    .map_err(&bind_err)?;
                binding
                    .bind_input(contract::past_value(l), &past[2 * l + 1])
                    .map_err(&bind_err)?;
                // Bound anew each step: the cache grows, a new buffer each time.
                for name in [contract::present_key(l), contract::present_value(l)] {
                    binding
                        .bind_output_to_device(name, &device)
                        .map_err(&bind_err)?;
                }
            }
            let logits_at = if steps == 0 { &device } else { &host };
            binding
                .bind_output_to_device(contract::LOGITS, logits_at)
                .map_err(&bind_err)?;
            let mut out = self.session.run_binding(&binding).map_err(ort_err("run"))?;
            if steps == 0 {
                prefill_s = t0.elapsed().as_secs_f64();
                break;
            }
            let logits = out
                .remove(contract::LOGITS)
                .ok_or_else(|| Error::Runtime("the model has no output `logits`".into()))?;
            let vocab = self.vocab;
            let last_rows: Vec<f32> = if self.float == ElemType::F16 {
                let (_, data) = logits
                    .try_extract_tensor::<f16>()
                    .map_err(ort_err("logits"))?;
                (0..batch)
                    .flat_map(|b| {
                        data[((b + 1) * seq - 1) * vocab..][..vocab]
                            .iter()
                            .map(|x| x.to_f32())
                    })
                    .collect()
            } else {
                let (_, data) = logits
                    .try_extract_tensor::<f32>()
                    .map_err(ort_err("logits"))?;
                (0..batch)
                    .flat_map(|b| data[((b + 1) * seq - 1) * vocab..][..vocab].to_vec())
                    .collect()
            };
            past.clear();
            for l in 0..self.layers {
                for name in [contract::present_key(l), contract::present_value(l)] {
                    past.push(out.remove(&name).ok_or_else(|| {
                        Error::Runtime(format!("the model has no output `{name}`"))
                    })?);
                }
            }
            drop(out);
            let secs = t0.elapsed().as_secs_f64();
            if step == 0 {
                prefill_s = secs;
            } else {
                decode_s += secs;
            }
            ids = last_rows
                .chunks_exact(vocab)
                .map(|row| crate::forward::ops::argmax(row) as u32)
                .collect();
            for (row, &t) in tokens.iter_mut().zip(&ids) {
                row.push(t);
            }
        }
        Ok(BoundDecode {
            tokens,
            prefill_s,
            decode_s,
        })
    }

    /// Run `ids` (batch 1) after `past` (`past_len` cached positions, as a
    /// previous step's `present`, or empty), with an all-ones attention mask.
    pub fn step(&mut self, ids: &[u32], past: Option<&StepOutput>) -> Result<StepOutput> {
        self.step_batch(ids, 1, past)
    }

    /// [`step`](Self::step) for `batch` rows of `ids.len() / batch` tokens each.
    pub fn step_batch(
        &mut self,
        ids: &[u32],
        batch: usize,
        past: Option<&StepOutput>,
    ) -> Result<StepOutput> {
        let s = ids.len() / batch.max(1);
        let past_len = past.map_or(0, |p| p.total_len);
        let total = past_len + s;
        let (nkv, hd) = (self.kv_heads, self.head_dim);
        let tensor_i64 = |v: Vec<i64>| -> Result<SessionInputValue<'static>> {
            let cols = v.len() / batch.max(1);
            Tensor::from_array((vec![batch as i64, cols as i64], v))
                .map(SessionInputValue::from)
                .map_err(ort_err("input"))
        };
        let positions: Vec<i64> = (0..batch)
            .flat_map(|_| (past_len..total).map(|p| p as i64))
            .collect();
        let mut inputs: Vec<(Cow<str>, SessionInputValue)> = vec![
            (
                contract::INPUT_IDS.into(),
                tensor_i64(ids.iter().map(|&i| i as i64).collect())?,
            ),
            (
                contract::ATTENTION_MASK.into(),
                tensor_i64(vec![1; batch * total])?,
            ),
            (contract::POSITION_IDS.into(), tensor_i64(positions)?),
        ];
        for l in 0..self.layers {
            let (k, v) = match past {
                Some(p) => (p.present[l].0.clone(), p.present[l].1.clone()),
                None => (Vec::new(), Vec::new()),
            };
            let shape = vec![batch as i64, nkv as i64, past_len as i64, hd as i64];
            for (name, data) in [(contract::past_key(l), k), (contract::past_value(l), v)] {
                let value: SessionInputValue = if self.float == ElemType::F16 {
                    let data: Vec<f16> = data.iter().map(|&x| f16::from_f32(x)).collect();
                    Tensor::from_array((shape.clone(), data))
                        .map_err(ort_err("input"))?
                        .into()
                } else {
                    Tensor::from_array((shape.clone(), data))
                        .map_err(ort_err("input"))?
                        .into()
                };
                inputs.push((name.into(), value));
            }
        }
        let outputs = self.session.run(inputs).map_err(ort_err("run"))?;
        let float = self.float;
        let extract = |name: &str, want: &[usize]| -> Result<Vec<f32>> {
            let value = outputs
                .get(name)
                .ok_or_else(|| Error::Runtime(format!("the model has no output `{name}`")))?;
            let (shape, data) = if float == ElemType::F16 {
                let (shape, data) = value.try_extract_tensor::<f16>().map_err(ort_err(name))?;
                (shape, data.iter().map(|x| x.to_f32()).collect())
            } else {
                let (shape, data) = value.try_extract_tensor::<f32>().map_err(ort_err(name))?;
                (shape, data.to_vec())
            };
            let got: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
            if got != want {
                return Err(Error::Runtime(format!(
                    "output `{name}` has shape {got:?}, expected {want:?}"
                )));
            }
            Ok(data)
        };
        let logits = extract(contract::LOGITS, &[batch, s, self.vocab])?;
        let mut present = Vec::with_capacity(self.layers);
        for l in 0..self.layers {
            let want = [batch, nkv, total, hd];
            present.push((
                extract(&contract::present_key(l), &want)?,
                extract(&contract::present_value(l), &want)?,
            ));
        }
        Ok(StepOutput {
            logits,
            present,
            total_len: total,
        })
    }
}
