//! Checkpoint readers: a Hugging Face directory (`config.json` + safetensors,
//! single or sharded) or a GGUF v3 file (llama.cpp). Both are exposed through
//! [`TensorSource`] under Hugging Face tensor names and shapes, so the model
//! stage never knows which format it reads.

pub mod config;
pub mod dequant;
pub mod gguf;
pub mod gguf_writer;
pub mod safetensors;
pub mod tokenizer;

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use config::{Family, ModelConfig, RopeScaling};

use crate::{Error, Result};

/// Element type of a stored tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(non_camel_case_types)] // ggml's names
pub enum DType {
    F32,
    F16,
    BF16,
    Q8_0,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q4_K,
    Q5_K,
    Q6_K,
}

impl DType {
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::Q8_0 => "Q8_0",
            DType::Q4_0 => "Q4_0",
            DType::Q4_1 => "Q4_1",
            DType::Q5_0 => "Q5_0",
            DType::Q5_1 => "Q5_1",
            DType::Q4_K => "Q4_K",
            DType::Q5_K => "Q5_K",
            DType::Q6_K => "Q6_K",
        }
    }
}

/// Name, type and shape of a stored tensor (shape in Hugging Face order:
/// `[out_features, in_features]` for a linear weight).
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
}

impl TensorInfo {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Read access to the tensors of a checkpoint by Hugging Face name.
pub trait TensorSource: Send + Sync {
    /// Every tensor, in a stable order.
    fn tensors(&self) -> Vec<&TensorInfo>;
    fn info(&self, name: &str) -> Option<&TensorInfo>;
    /// Rows `rows` of the tensor (its first axis; a 1-D tensor is one row)
    /// dequantised / converted to f32 into `out` (`rows.len() * cols`
    /// elements), row-major in HF layout. Every widening of a stored weight
    /// goes through here: the bytes stay in the file until read, and their
    /// pages are released again afterwards.
    fn read_rows(&self, name: &str, rows: Range<usize>, out: &mut [f32]) -> Result<()> {
        self.read_rows_with(name, rows, out, Pages::Release)
    }
    /// [`TensorSource::read_rows`], the file's pages released or not.
    fn read_rows_with(
        &self,
        name: &str,
        rows: Range<usize>,
        out: &mut [f32],
        pages: Pages,
    ) -> Result<()>;
    /// The whole tensor as f32, row-major in HF layout.
    fn load_f32(&self, name: &str) -> Result<Vec<f32>> {
        let info = self
            .info(name)
            .ok_or_else(|| Error::tensor(self.file_of(name), name, "not found"))?;
        let (rows, cols) = rows_cols(&info.shape);
        let mut out = vec![0f32; rows * cols];
        self.read_rows(name, 0..rows, &mut out)?;
        Ok(out)
    }
    /// The tensor's own 4-bit blocks of 32 (GGUF Q4_0, Q4_1, Q4_K), in Hugging
    /// Face row order; `None` when it is stored otherwise.
    fn load_four_bit(&self, _name: &str) -> Option<Result<dequant::FourBitBlocks>> {
        None
    }
    /// The tensor's bytes as stored (ggml blocks, or elements) with rows in
    /// Hugging Face order, and their type: what a writer copies instead of
    /// encoding again. `None` where the values read differ from the bytes
    /// (Gemma's `1 + w` norms) or the source does not offer them.
    fn stored(&self, _name: &str) -> Option<Result<(DType, Vec<u8>)>> {
        None
    }
    /// The file a tensor lives in, for error messages.
    fn file_of(&self, name: &str) -> PathBuf;
    /// Why a tensor the file lists cannot be read (e.g. an unsupported
    /// quantisation); such tensors are absent from `tensors` and `info`.
    fn unsupported(&self, _name: &str) -> Option<String> {
        None
    }
    /// Every tensor the file lists that cannot be read, with why (what
    /// `inspect` reports before any load fails on it).
    fn unsupported_tensors(&self) -> Vec<(String, String)> {
        Vec::new()
    }
}

/// Where `scripts/setup.sh` may have put what it fetches (ONNX Runtime,
/// task request files), in the order looked in: `$DEPTHC_CACHE`, `.cache`
/// in the working directory, and `.cache` of the checkout whose
/// `target/{profile}/` holds this binary.
pub fn setup_caches() -> Vec<PathBuf> {
    let mut caches = Vec::new();
    if let Some(c) = std::env::var_os("DEPTHC_CACHE") {
        caches.push(PathBuf::from(c));
    }
    caches.push(PathBuf::from(".cache"));
    if let Some(root) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent()?.parent()?.parent().map(Path::to_path_buf))
    {
        caches.push(root.join(".cache"));
    }
    caches
}

/// A tensor's shape as `[rows, cols]`: its first axis by the product of
/// the others (a 1-D tensor is one row).
pub fn rows_cols(shape: &[usize]) -> (usize, usize) {
    match shape {
        [] => (1, 1),
        [n] => (1, *n),
        [rows, rest @ ..] => (*rows, rest.iter().product()),
    }
}

/// Check a row range and output length against a tensor of `rows` x `cols`.
pub(crate) fn check_rows(
    file: &Path,
    name: &str,
    (rows, cols): (usize, usize),
    range: &Range<usize>,
    out: &[f32],
) -> Result<()> {
    if range.start > range.end || range.end > rows || out.len() != range.len() * cols {
        return Err(Error::tensor(
            file,
            name,
            format!(
                "rows {range:?} into {} values do not fit a tensor of {rows} rows of {cols}",
                out.len()
            ),
        ));
    }
    Ok(())
}

/// What becomes of a mapped file's pages once rows are read from them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pages {
    /// Released ([`release_pages`]): a matrix widened to be kept, or for
    /// emission, is not held twice.
    Release,
    /// Left resident: a panel of rows a product is about to use, read again
    /// on every forward pass. Releasing costs a TLB flush on every core
    /// (measured: 14% of a SmolLM2 forward with nothing kept, for a
    /// release per panel); the file's pages are at most its size.
    Keep,
}

/// Drop the resident pages of `mmap[begin..end]` once a tensor has been
/// converted, so that loading never holds the file and the f32 weights in
/// memory at once. The mapping is read-only and file-backed: a later read
/// of the range faults the pages in from the file again.
pub(crate) fn release_pages(mmap: &memmap2::Mmap, begin: usize, end: usize, pages: Pages) {
    #[cfg(unix)]
    if end > begin && pages == Pages::Release {
        // SAFETY: DONTNEED on a read-only, file-backed mapping only discards
        // clean page-cache references; the contents stay those of the file.
        let _ = unsafe {
            mmap.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, begin, end - begin)
        };
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    HuggingFace,
    Gguf,
}

/// An opened checkpoint: validated configuration, tensors and tokenizer.
pub struct Checkpoint {
    pub path: PathBuf,
    pub format: Format,
    pub config: ModelConfig,
    pub source: Arc<dyn TensorSource>,
    pub tokenizer: Option<tokenizer::Tokenizer>,
}

impl Checkpoint {
    /// Open a Hugging Face directory or a `.gguf` file.
    pub fn open(path: &Path) -> Result<Checkpoint> {
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        if meta.is_dir() {
            let config = config::ModelConfig::from_hf_dir(path)?;
            let source = safetensors::SafetensorsSource::open_dir(path)?;
            let tokenizer = tokenizer::Tokenizer::from_hf_dir(path)?;
            Ok(Checkpoint {
                path: path.to_path_buf(),
                format: Format::HuggingFace,
                config,
                source: Arc::new(source),
                tokenizer,
            })
        } else {
            let file = gguf::GgufFile::open(path)?;
            let config = file.model_config()?;
            let tokenizer = file.tokenizer()?;
            let source = gguf::GgufSource::new(file, &config)?;
            Ok(Checkpoint {
                path: path.to_path_buf(),
                format: Format::Gguf,
                config,
                source: Arc::new(source),
                tokenizer,
            })
        }
    }

    /// The tokenizer, or an error naming the checkpoint when it has none.
    pub fn require_tokenizer(&self) -> Result<&tokenizer::Tokenizer> {
        self.tokenizer.as_ref().ok_or_else(|| Error::Tokenizer {
            path: self.path.clone(),
            msg: "the checkpoint has no tokenizer (tokenizer.json or GGUF tokenizer.ggml.*)".into(),
        })
    }
}
