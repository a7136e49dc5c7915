//! The I/O contract of an emitted decoder (docs/DESIGN.md section 4), in one table.
//! Serving stacks (ONNX Runtime, onnxruntime-genai, Optimum, transformers.js)
//! find the model's inputs and outputs by exactly these names.
//!
//! | name | dtype | shape |
//! |---|---|---|
//! | `input_ids` | int64 | `[batch_size, sequence_length]` |
//! | `attention_mask` | int64 | `[batch_size, total_sequence_length]` |
//! | `position_ids` | int64 | `[batch_size, sequence_length]` |
//! | `past_key_values.{i}.key` / `.value` | float | `[batch_size, kv_heads, past_sequence_length, head_dim]` |
//! | `logits` | float | `[batch_size, sequence_length, vocab_size]` |
//! | `present.{i}.key` / `.value` | float | `[batch_size, kv_heads, total_sequence_length, head_dim]` |
//!
//! One past/present pair for every original layer, paired or not, with the
//! original head counts as literal dims.

use super::{Dim, ElemType, ValueInfo};
use crate::checkpoint::ModelConfig;

pub const INPUT_IDS: &str = "input_ids";
pub const ATTENTION_MASK: &str = "attention_mask";
pub const POSITION_IDS: &str = "position_ids";
pub const LOGITS: &str = "logits";

pub const BATCH: Dim = Dim::Symbolic("batch_size");
pub const SEQUENCE: Dim = Dim::Symbolic("sequence_length");
pub const TOTAL_SEQUENCE: Dim = Dim::Symbolic("total_sequence_length");
pub const PAST_SEQUENCE: Dim = Dim::Symbolic("past_sequence_length");

pub fn past_key(layer: usize) -> String {
    format!("past_key_values.{layer}.key")
}
pub fn past_value(layer: usize) -> String {
    format!("past_key_values.{layer}.value")
}
pub fn present_key(layer: usize) -> String {
    format!("present.{layer}.key")
}
pub fn present_value(layer: usize) -> String {
    format!("present.{layer}.value")
}

/// Graph inputs, in order.
pub fn inputs(cfg: &ModelConfig, float: ElemType) -> Vec<ValueInfo> {
    let ids = |name: &str, seq: Dim| ValueInfo {
        name: name.to_string(),
        elem: ElemType::I64,
        dims: vec![BATCH, seq],
    };
    let mut v = vec![
        ids(INPUT_IDS, SEQUENCE),
        ids(ATTENTION_MASK, TOTAL_SEQUENCE),
        ids(POSITION_IDS, SEQUENCE),
    ];
    for layer in 0..cfg.num_hidden_layers {
        for name in [past_key(layer), past_value(layer)] {
            v.push(kv(name, cfg, float, PAST_SEQUENCE));
        }
    }
    v
}

/// Graph outputs, in order.
pub fn outputs(cfg: &ModelConfig, float: ElemType) -> Vec<ValueInfo> {
    let mut v = vec![ValueInfo {
        name: LOGITS.to_string(),
        elem: float,
        dims: vec![BATCH, SEQUENCE, Dim::Fixed(cfg.vocab_size)],
    }];
    for layer in 0..cfg.num_hidden_layers {
        for name in [present_key(layer), present_value(layer)] {
            v.push(kv(name, cfg, float, TOTAL_SEQUENCE));
        }
    }
    v
}

fn kv(name: String, cfg: &ModelConfig, float: ElemType, seq: Dim) -> ValueInfo {
    ValueInfo {
        name,
        elem: float,
        dims: vec![
            BATCH,
            Dim::Fixed(cfg.num_key_value_heads),
            seq,
            Dim::Fixed(cfg.head_dim),
        ],
    }
}
