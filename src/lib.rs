//! depthc: an offline compiler that applies Layer Parallelism ("Leveraging the
//! true depth of LLMs", arXiv 2502.02790) to pretrained checkpoints.
//!
//! The pipeline, one module per stage, data flowing one way:
//! checkpoint -> model -> forward -> search (calibration windows, metrics)
//! -> graph (the LP rewrite, [`graph::lp`]) -> onnx (protobuf, external data,
//! package) -> runtime (validation, benchmark) -> report. [`plan`] describes which
//! layers run in parallel and travels between the stages as a value;
//! [`pipeline`] runs them in order (`depthc search`, `depthc compile`).

pub mod checkpoint;
pub mod error;
pub mod forward;
pub mod graph;
pub mod heal;
pub mod llamacpp;
pub mod measure;
pub mod model;
pub mod onnx;
pub mod output;
pub mod pipeline;
pub mod plan;
pub mod report;
pub mod runtime;
pub mod search;

pub use error::{Error, Result};
