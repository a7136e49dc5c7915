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
//! original head counts as literal dims (a layer the plan drops is not in the
//! model: the config counts the layers kept).
//!
//! The model also carries what depthc wrote it with, as [`Metadata`]: written
//! by [`Metadata::entries`] and read back by [`Metadata::parse`], which
//! refuses a missing or unknown value instead of guessing.

use std::path::Path;

use super::{Dim, ElemType, Form, Ops, ValueInfo};
use crate::checkpoint::ModelConfig;
use crate::model::{Int4, Int4Source};
use crate::plan::Plan;
use crate::{Error, Result};

pub const INPUT_IDS: &str = "input_ids";
pub const ATTENTION_MASK: &str = "attention_mask";
pub const POSITION_IDS: &str = "position_ids";
pub const LOGITS: &str = "logits";

pub const BATCH: Dim = Dim::Symbolic("batch_size");
pub const SEQUENCE: Dim = Dim::Symbolic("sequence_length");
pub const TOTAL_SEQUENCE: Dim = Dim::Symbolic("total_sequence_length");
pub const PAST_SEQUENCE: Dim = Dim::Symbolic("past_sequence_length");

/// The per-layer cache names, with `%d` where the layer index goes (the form
/// onnxruntime-genai's `genai_config.json` takes them in).
pub const PAST_KEY: &str = "past_key_values.%d.key";
pub const PAST_VALUE: &str = "past_key_values.%d.value";
pub const PRESENT_KEY: &str = "present.%d.key";
pub const PRESENT_VALUE: &str = "present.%d.value";

fn of_layer(pattern: &str, layer: usize) -> String {
    pattern.replace("%d", &layer.to_string())
}
pub fn past_key(layer: usize) -> String {
    of_layer(PAST_KEY, layer)
}
pub fn past_value(layer: usize) -> String {
    of_layer(PAST_VALUE, layer)
}
pub fn present_key(layer: usize) -> String {
    of_layer(PRESENT_KEY, layer)
}
pub fn present_value(layer: usize) -> String {
    of_layer(PRESENT_VALUE, layer)
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

/// Metadata keys of an emitted model (`metadata_props` of `model.onnx`).
pub const PLAN: &str = "depthc.plan";
pub const FORM: &str = "depthc.form";
pub const DTYPE: &str = "depthc.dtype";
pub const OPS: &str = "depthc.ops";
pub const WEIGHTS: &str = "depthc.weights";
pub const INT4_BLOCK_SIZE: &str = "depthc.int4.block_size";
pub const INT4_ACCURACY_LEVEL: &str = "depthc.int4.accuracy_level";
pub const INT4_SOURCE: &str = "depthc.int4.source";
/// `true` when the plan's groups were healed (`--heal`); absent otherwise.
pub const HEALED: &str = "depthc.healed";
/// The source's layer count, when the plan drops layers (the model holds
/// fewer; `depthc.plan` is over the source's); absent otherwise.
pub const SOURCE_LAYERS: &str = "depthc.source_layers";

/// What an emitted model was written with: the plan, the form its groups are
/// in, its float type, its op set and its 4-bit weight settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Metadata {
    /// The plan over the source's layers (those it drops are not in the
    /// model).
    pub plan: Plan,
    pub form: Form,
    pub float: ElemType,
    pub ops: Ops,
    pub int4: Option<Int4>,
    /// The groups' down_proj weights carry a healing correction.
    pub healed: bool,
}

impl Metadata {
    /// The `key = value` pairs, in the order they are written.
    pub fn entries(&self) -> Vec<(&'static str, String)> {
        let mut v = vec![
            (PLAN, self.plan.to_string()),
            (FORM, self.form.name().to_string()),
            (DTYPE, self.float.name().to_string()),
            (OPS, self.ops.name().to_string()),
        ];
        if let Some(q) = self.int4 {
            v.push((WEIGHTS, "int4".to_string()));
            v.push((INT4_BLOCK_SIZE, q.block_size.to_string()));
            v.push((INT4_ACCURACY_LEVEL, q.accuracy_level.to_string()));
            v.push((INT4_SOURCE, q.source.name().to_string()));
        }
        if self.healed {
            v.push((HEALED, "true".to_string()));
        }
        if !self.plan.dropped().is_empty() {
            v.push((SOURCE_LAYERS, self.plan.num_layers.to_string()));
        }
        v
    }

    /// Read the metadata of `file` (a model of `num_layers` layers) back from
    /// its `entries`. A key missing or a value not among those depthc writes
    /// is an error naming the key and the file.
    pub fn parse(entries: &[(String, String)], num_layers: usize, file: &Path) -> Result<Metadata> {
        let get = |key: &str| {
            entries
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.as_str())
        };
        let bad = |key: &str, why: String| {
            Error::Input(format!("{}: metadata `{key}`: {why}", file.display()))
        };
        let need = |key: &str| {
            get(key).ok_or_else(|| {
                bad(
                    key,
                    "missing; was the model written by `depthc emit`?".to_string(),
                )
            })
        };
        let one_of = |key: &str, names: &[&str]| -> Result<usize> {
            let v = need(key)?;
            names
                .iter()
                .position(|n| *n == v)
                .ok_or_else(|| bad(key, format!("`{v}` is not one of {}", names.join(", "))))
        };
        let source_layers = match get(SOURCE_LAYERS) {
            None => num_layers,
            Some(v) => v
                .parse::<usize>()
                .map_err(|_| bad(SOURCE_LAYERS, format!("`{v}` is not a whole number")))?,
        };
        let plan = Plan::parse(need(PLAN)?, source_layers).map_err(|e| bad(PLAN, e.to_string()))?;
        // The plan parsed over `source_layers`: it drops fewer than that.
        let left = source_layers - plan.dropped().len();
        if left != num_layers {
            return Err(bad(
                PLAN,
                format!("`{plan}` over {source_layers} layers leaves {left}, the model has {num_layers}"),
            ));
        }
        let forms = [Form::Branches, Form::Fused];
        let form = forms[one_of(FORM, &forms.map(Form::name))?];
        let floats = [ElemType::F32, ElemType::F16];
        let float = floats[one_of(DTYPE, &floats.map(ElemType::name))?];
        let all_ops = [Ops::Portable, Ops::Ort];
        let ops = all_ops[one_of(OPS, &all_ops.map(Ops::name))?];
        let int4 = match get(WEIGHTS) {
            None => None,
            Some("int4") => {
                let number = |key: &str| {
                    let v = need(key)?;
                    v.parse::<usize>()
                        .map_err(|_| bad(key, format!("`{v}` is not a whole number")))
                };
                let accuracy_level = number(INT4_ACCURACY_LEVEL)?;
                let sources = [Int4Source::Rtn, Int4Source::Gguf];
                Some(Int4 {
                    block_size: number(INT4_BLOCK_SIZE)?,
                    accuracy_level: u8::try_from(accuracy_level).map_err(|_| {
                        bad(
                            INT4_ACCURACY_LEVEL,
                            format!("`{accuracy_level}` is out of range"),
                        )
                    })?,
                    source: sources[one_of(INT4_SOURCE, &sources.map(Int4Source::name))?],
                })
            }
            Some(v) => return Err(bad(WEIGHTS, format!("`{v}` is not int4"))),
        };
        let healed = match get(HEALED) {
            None => false,
            Some("true") => true,
            Some(v) => return Err(bad(HEALED, format!("`{v}` is not true"))),
        };
        Ok(Metadata {
            plan,
            form,
            float,
            ops,
            int4,
            healed,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(m: &Metadata) -> Vec<(String, String)> {
        m.entries()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect()
    }

    #[test]
    fn metadata_round_trips() {
        let plan = Plan::parse("2-3,5-6", 8).unwrap();
        for int4 in [
            None,
            Some(Int4 {
                block_size: 32,
                accuracy_level: 4,
                source: Int4Source::Gguf,
            }),
        ] {
            for (form, float, ops) in [
                (Form::Fused, ElemType::F32, Ops::Portable),
                (Form::Branches, ElemType::F16, Ops::Ort),
            ] {
                let m = Metadata {
                    plan: plan.clone(),
                    form,
                    float,
                    ops,
                    int4,
                    healed: int4.is_some(),
                };
                let back = Metadata::parse(&entries(&m), 8, Path::new("m.onnx")).unwrap();
                assert_eq!(back, m);
            }
        }
    }

    #[test]
    fn a_plan_that_drops_layers_is_over_the_source() {
        let m = Metadata {
            plan: Plan::parse("2-3,d5-6", 8).unwrap(),
            form: Form::Fused,
            float: ElemType::F32,
            ops: Ops::Portable,
            int4: None,
            healed: false,
        };
        let e = entries(&m);
        assert!(e.contains(&(SOURCE_LAYERS.to_string(), "8".to_string())));
        // The model holds the 6 layers left.
        assert_eq!(Metadata::parse(&e, 6, Path::new("m.onnx")).unwrap(), m);
        let err = Metadata::parse(&e, 8, Path::new("m.onnx")).unwrap_err();
        assert!(
            err.to_string().contains("leaves 6, the model has 8"),
            "{err}"
        );
    }

    #[test]
    fn unknown_or_missing_values_name_key_and_file() {
        let m = Metadata {
            plan: Plan::parse("2-3", 8).unwrap(),
            form: Form::Fused,
            float: ElemType::F32,
            ops: Ops::Ort,
            int4: Some(Int4 {
                block_size: 32,
                accuracy_level: 4,
                source: Int4Source::Rtn,
            }),
            healed: true,
        };
        let file = Path::new("dir/model.onnx");
        for (key, value, says) in [
            (FORM, Some("wide"), "`wide` is not one of branches, fused"),
            (
                DTYPE,
                Some("bfloat16"),
                "`bfloat16` is not one of float32, float16",
            ),
            (OPS, None, "missing"),
            (INT4_SOURCE, Some("awq"), "`awq` is not one of rtn, gguf"),
            (INT4_BLOCK_SIZE, Some("x"), "`x` is not a whole number"),
            (WEIGHTS, Some("int8"), "`int8` is not int4"),
            (HEALED, Some("yes"), "`yes` is not true"),
        ] {
            let mut e = entries(&m);
            e.retain(|(k, _)| k != key);
            if let Some(v) = value {
                e.push((key.to_string(), v.to_string()));
            }
            let err = Metadata::parse(&e, 8, file).unwrap_err().to_string();
            assert!(
                err.starts_with(&format!("dir/model.onnx: metadata `{key}`: {says}")),
                "{key}: {err}"
            );
        }
    }
}
