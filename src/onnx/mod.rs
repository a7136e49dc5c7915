//! ONNX encoding of a [`Graph`]: protobuf messages ([`proto`]), weights
//! streamed one by one into external data (`model.onnx_data`, large tensors
//! 4096-aligned, shape tensors inline), and the directory serving stacks load
//! ([`package`]: `genai_config.json`, `config.json`, tokenizer files).
//!
//! Spec: ONNX IR version 10, default opset 21; external data as in
//! `onnx/external_data_helper.py` (`location`, `offset`, `length`).

pub mod package;
pub mod proto;

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use indicatif::ProgressBar;
use prost::Message;

use crate::graph::{Attr, Dim, ElemType, Graph, InitData, ValueInfo};
use crate::{Error, Result};
use proto::*;

pub const IR_VERSION: i64 = 10;
pub const OPSET: i64 = 21;
/// Domain of ONNX Runtime's contrib operators (`--ops ort`), opset 1.
pub const MS_DOMAIN: &str = "com.microsoft";
/// Offsets of external tensors are multiples of this.
pub const ALIGNMENT: u64 = 4096;
/// A protobuf file must stay below 2 GiB.
const PROTOBUF_LIMIT: usize = (1 << 31) - 1;

/// What [`write`] wrote.
#[derive(Debug, Clone, Copy)]
pub struct Written {
    pub model_bytes: u64,
    pub data_bytes: u64,
    pub weights: usize,
}

fn elem_type(e: ElemType) -> i32 {
    match e {
        ElemType::F32 => data_type::FLOAT,
        ElemType::F16 => data_type::FLOAT16,
        ElemType::I64 => data_type::INT64,
        ElemType::I32 => data_type::INT32,
        ElemType::Bool => data_type::BOOL,
    }
}

fn value_info(v: &ValueInfo) -> ValueInfoProto {
    let dim = v
        .dims
        .iter()
        .map(|d| tensor_shape_proto::Dimension {
            value: Some(match d {
                Dim::Fixed(n) => tensor_shape_proto::dimension::Value::DimValue(*n as i64),
                Dim::Symbolic(s) => tensor_shape_proto::dimension::Value::DimParam(s.to_string()),
            }),
        })
        .collect();
    ValueInfoProto {
        name: v.name.clone(),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: elem_type(v.elem),
                shape: Some(TensorShapeProto { dim }),
            })),
        }),
        doc_string: String::new(),
    }
}

fn attribute(name: &str, a: &Attr) -> AttributeProto {
    let mut p = AttributeProto {
        name: name.to_string(),
        ..Default::default()
    };
    match a {
        Attr::Int(i) => {
            p.r#type = attribute_type::INT;
            p.i = *i;
        }
        Attr::Type(e) => {
            p.r#type = attribute_type::INT;
            p.i = elem_type(*e) as i64;
        }
        Attr::Ints(v) => {
            p.r#type = attribute_type::INTS;
            p.ints = v.clone();
        }
        Attr::Float(f) => {
            p.r#type = attribute_type::FLOAT;
            p.f = *f;
        }
        Attr::Str(s) => {
            p.r#type = attribute_type::STRING;
            p.s = s.as_bytes().to_vec();
        }
    }
    p
}

/// Little-endian bytes of `values` in the float type `float`.
fn float_bytes(values: &[f32], float: ElemType) -> Vec<u8> {
    match float {
        ElemType::F16 => values
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect(),
        _ => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    }
}

/// Stream `values` as little-endian bytes of `float` in small chunks (no
/// second copy of a large weight); returns the bytes written.
fn write_floats(out: &mut impl Write, values: &[f32], float: ElemType) -> std::io::Result<u64> {
    let mut written = 0u64;
    for chunk in values.chunks(16384) {
        let bytes = float_bytes(chunk, float);
        out.write_all(&bytes)?;
        written += bytes.len() as u64;
    }
    Ok(written)
}

/// The external data file of the model file `model_file`: `model.onnx_data`
/// beside `model.onnx`, the name Optimum and transformers.js fetch from a
/// model hub.
pub fn external_data_name(model_file: &str) -> String {
    format!("{model_file}_data")
}

/// Write `graph` as `model_path` plus its external data ([`external_data_name`])
/// (the name Optimum and transformers.js fetch from a model hub),
/// computing each weight only when it is written.
pub fn write(graph: &Graph, model_path: &Path, progress: &ProgressBar) -> Result<Written> {
    let file_name = model_path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| Error::output(model_path, "the model file needs a UTF-8 name"))?;
    let data_name = external_data_name(file_name);
    let data_path = model_path.with_file_name(&data_name);
    let mut data = BufWriter::with_capacity(
        1 << 20,
        File::create(&data_path).map_err(|e| Error::io(&data_path, e))?,
    );
    let mut offset = 0u64;
    let mut initializer = Vec::with_capacity(graph.initializers.len());
    let weights = graph
        .initializers
        .iter()
        .filter(|i| matches!(i.data, InitData::Weight(_) | InitData::Bytes(_)))
        .count();
    progress.set_length(weights as u64);
    for init in &graph.initializers {
        let dims: Vec<i64> = init.dims.iter().map(|&d| d as i64).collect();
        let numel: usize = init.dims.iter().product();
        let mut t = TensorProto {
            dims,
            name: init.name.clone(),
            ..Default::default()
        };
        match &init.data {
            InitData::I64(v) => {
                t.data_type = data_type::INT64;
                t.raw_data = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            }
            InitData::Scalar(v) => {
                t.data_type = elem_type(graph.float);
                t.raw_data = float_bytes(&[*v], graph.float);
            }
            InitData::ScalarF32(v) => {
                t.data_type = data_type::FLOAT;
                t.raw_data = v.to_le_bytes().to_vec();
            }
            InitData::Weight(_) | InitData::Bytes(_) => {
                let pad = offset.next_multiple_of(ALIGNMENT) - offset;
                data.write_all(&vec![0u8; pad as usize])
                    .map_err(|e| Error::io(&data_path, e))?;
                offset += pad;
                let (count, length, data_type) = match &init.data {
                    InitData::Weight(values) => {
                        let values = values();
                        let length = write_floats(&mut data, &values, graph.float)
                            .map_err(|e| Error::io(&data_path, e))?;
                        (values.len(), length, elem_type(graph.float))
                    }
                    InitData::Bytes(values) => {
                        let bytes = values();
                        data.write_all(&bytes)
                            .map_err(|e| Error::io(&data_path, e))?;
                        (bytes.len(), bytes.len() as u64, data_type::UINT8)
                    }
                    _ => unreachable!("inline initializers are written above"),
                };
                if count != numel {
                    return Err(Error::output(
                        model_path,
                        format!(
                            "weight `{}` has {count} values for dims {:?}",
                            init.name, init.dims
                        ),
                    ));
                }
                t.data_type = data_type;
                t.data_location = DATA_LOCATION_EXTERNAL;
                let entry = |k: &str, v: String| StringStringEntryProto {
                    key: k.to_string(),
                    value: v,
                };
                t.external_data = vec![
                    entry("location", data_name.clone()),
                    entry("offset", offset.to_string()),
                    entry("length", length.to_string()),
                ];
                offset += length;
                progress.inc(1);
            }
        }
        initializer.push(t);
    }
    data.into_inner()
        .map_err(|e| Error::io(&data_path, e.into_error()))?
        .sync_all()
        .map_err(|e| Error::io(&data_path, e))?;

    let node: Vec<NodeProto> = graph
        .nodes
        .iter()
        .map(|n| NodeProto {
            input: n.inputs.clone(),
            output: n.outputs.clone(),
            name: n.name.clone(),
            op_type: n.op_type.to_string(),
            domain: if crate::graph::MS_DOMAIN_OPS.contains(&n.op_type) {
                MS_DOMAIN.into()
            } else {
                String::new()
            },
            attribute: n.attrs.iter().map(|(k, a)| attribute(k, a)).collect(),
            ..Default::default()
        })
        .collect();
    let mut opset_import = vec![OperatorSetIdProto {
        domain: String::new(),
        version: OPSET,
    }];
    if node.iter().any(|n| n.domain == MS_DOMAIN) {
        opset_import.push(OperatorSetIdProto {
            domain: MS_DOMAIN.into(),
            version: 1,
        });
    }
    let model = ModelProto {
        ir_version: IR_VERSION,
        producer_name: "depthc".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        model_version: 1,
        graph: Some(GraphProto {
            node,
            name: graph.name.clone(),
            initializer,
            input: graph.inputs.iter().map(value_info).collect(),
            output: graph.outputs.iter().map(value_info).collect(),
            ..Default::default()
        }),
        opset_import,
        metadata_props: graph
            .metadata
            .iter()
            .map(|(k, v)| StringStringEntryProto {
                key: k.clone(),
                value: v.clone(),
            })
            .collect(),
        ..Default::default()
    };
    let bytes = model.encode_to_vec();
    if bytes.len() > PROTOBUF_LIMIT {
        return Err(Error::output(
            model_path,
            format!(
                "the graph encodes to {} bytes, over protobuf's 2 GiB limit",
                bytes.len()
            ),
        ));
    }
    std::fs::write(model_path, &bytes).map_err(|e| Error::io(model_path, e))?;
    Ok(Written {
        model_bytes: bytes.len() as u64,
        data_bytes: offset,
        weights,
    })
}

/// `depthc.*` metadata of an emitted `model.onnx` (plan, form, dtype).
pub fn read_metadata(model_path: &Path) -> Result<Vec<(String, String)>> {
    let bytes = std::fs::read(model_path).map_err(|e| Error::io(model_path, e))?;
    let model = ModelProto::decode(bytes.as_slice())
        .map_err(|e| Error::format(model_path, format!("not an ONNX model: {e}")))?;
    Ok(model
        .metadata_props
        .into_iter()
        .map(|e| (e.key, e.value))
        .collect())
}

/// The graph at `model_path` with every `MatMulNBits` computing in float32
/// (`accuracy_level` 0): the same weights and structure, whose results the
/// reference forward matches to float rounding. Written beside the original
/// as `.{name}.accuracy0` so that its external data resolves to the same
/// `model.onnx_data` (ONNX Runtime refuses data outside the model's
/// directory, links included); the caller removes it once loaded.
pub fn at_accuracy_level_zero(model_path: &Path) -> Result<std::path::PathBuf> {
    let bytes = std::fs::read(model_path).map_err(|e| Error::io(model_path, e))?;
    let mut model = ModelProto::decode(bytes.as_slice())
        .map_err(|e| Error::format(model_path, format!("not an ONNX model: {e}")))?;
    let graph = model
        .graph
        .as_mut()
        .ok_or_else(|| Error::format(model_path, "the model has no graph"))?;
    for node in graph.node.iter_mut().filter(|n| n.op_type == "MatMulNBits") {
        for a in node
            .attribute
            .iter_mut()
            .filter(|a| a.name == "accuracy_level")
        {
            a.i = 0;
        }
    }
    let name = model_path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("model.onnx");
    let out = model_path.with_file_name(format!(".{name}.accuracy0"));
    std::fs::write(&out, model.encode_to_vec()).map_err(|e| Error::io(&out, e))?;
    Ok(out)
}
