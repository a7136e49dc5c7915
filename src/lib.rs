//! depthc: an offline compiler that applies Layer Parallelism ("Leveraging the
//! true depth of LLMs", arXiv 2502.02790) to pretrained checkpoints.
//!
//! The pipeline, one module per stage, data flowing one way:
//! checkpoint -> model -> forward -> search (calibration windows, metrics).
//! [`plan`] describes which layers run in parallel and is shared by all stages.

pub mod checkpoint;
pub mod error;
pub mod forward;
pub mod model;
pub mod plan;
pub mod search;

pub use error::{Error, Result};
