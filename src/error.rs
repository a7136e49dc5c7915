//! Typed errors of the library, grouped by pipeline stage. Every message names
//! the file, tensor, plan or key at fault so that one line tells the user what
//! to fix.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    // ---- checkpoint stage -------------------------------------------------
    // The io error is shown in the message, not chained as a source, so that
    // the one-line report does not repeat it.
    #[error("{}: {error}", path.display())]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    /// The file is not a well-formed safetensors / GGUF / config file.
    #[error("{}: {msg}", path.display())]
    Format { path: PathBuf, msg: String },
    /// One tensor is missing, mis-shaped, out of bounds or of an unsupported type.
    #[error("{}: tensor `{tensor}`: {msg}", path.display())]
    Tensor {
        path: PathBuf,
        tensor: String,
        msg: String,
    },
    /// `config.json` or GGUF metadata describes something depthc does not handle.
    #[error("{}: {msg}", path.display())]
    Config { path: PathBuf, msg: String },
    #[error("tokenizer ({}): {msg}", path.display())]
    Tokenizer { path: PathBuf, msg: String },

    // ---- plan stage -------------------------------------------------------
    #[error("plan `{spec}`: {msg}")]
    Plan { spec: String, msg: String },

    // ---- forward / evaluation ---------------------------------------------
    #[error("{0}")]
    Input(String),
    /// The NaN/Inf watch of the forward pass: the first sublayer whose output
    /// makes the residual stream non-finite.
    #[error("non-finite activations (NaN or Inf) first appear in layer {layer} ({sublayer})")]
    NonFinite {
        layer: usize,
        sublayer: &'static str,
    },

    // ---- ONNX emission ----------------------------------------------------
    #[error("{}: {msg}", path.display())]
    Output { path: PathBuf, msg: String },

    // ---- ONNX Runtime -----------------------------------------------------
    #[error("ONNX Runtime: {0}")]
    Runtime(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, error: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            error,
        }
    }
    pub fn format(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Format {
            path: path.into(),
            msg: msg.into(),
        }
    }
    pub fn tensor(
        path: impl Into<PathBuf>,
        tensor: impl Into<String>,
        msg: impl Into<String>,
    ) -> Self {
        Error::Tensor {
            path: path.into(),
            tensor: tensor.into(),
            msg: msg.into(),
        }
    }
    pub fn output(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Output {
            path: path.into(),
            msg: msg.into(),
        }
    }
    pub fn config(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Config {
            path: path.into(),
            msg: msg.into(),
        }
    }
}
