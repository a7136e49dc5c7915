//! The rewritten model as a graph of its own: named values, nodes with
//! attributes, and initializers whose weights are computed only when the
//! writer streams them to disk (so a fused weight never exists next to a
//! second copy of every other one). Nothing here knows ONNX's encoding
//! ([`crate::onnx`] writes it) or runs a model.
//!
//! - [`contract`]: the I/O names, dtypes and symbolic dims serving stacks read;
//! - [`lp`]: Layer Parallelism as a rewrite: the step loop over a plan, the
//!   branches and fused forms of a group, which groups can be fused exactly,
//!   group naming, driving an op set;
//! - [`decoder`]: the subgraphs both op sets write alike (embedding, packed
//!   projections, gated MLP, branch sums, LM head);
//! - [`portable`] and [`ort`]: the two op sets (plain ONNX; ONNX Runtime's
//!   fused operators).

pub mod contract;
mod decoder;
pub mod lp;
mod ort;
mod portable;

use std::collections::HashSet;

pub use lp::{build, forms, fusable, written_form, Form, FormSupport, Ops};

/// Element type of a graph value or initializer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ElemType {
    F32,
    F16,
    I64,
    I32,
    Bool,
}

impl ElemType {
    pub fn name(self) -> &'static str {
        match self {
            ElemType::F32 => "float32",
            ElemType::F16 => "float16",
            ElemType::I64 => "int64",
            ElemType::I32 => "int32",
            ElemType::Bool => "bool",
        }
    }
}

/// One dimension of a graph input or output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dim {
    Fixed(usize),
    Symbolic(&'static str),
}

/// A typed graph input or output.
#[derive(Debug, Clone)]
pub struct ValueInfo {
    pub name: String,
    pub elem: ElemType,
    pub dims: Vec<Dim>,
}

#[derive(Debug, Clone)]
pub enum Attr {
    Int(i64),
    Ints(Vec<i64>),
    Float(f32),
    Str(String),
    /// An element type (`Cast`'s `to`), written as the ONNX data type number.
    Type(ElemType),
}

/// ONNX Runtime's contrib operators (domain `com.microsoft`) that `--ops ort`
/// writes. `SimplifiedLayerNormalization` is registered in the default domain.
/// `MatMulNBits` and `GatherBlockQuantized` (4-bit weights) are written in
/// both op modes.
pub const MS_DOMAIN_OPS: [&str; 4] = [
    "GroupQueryAttention",
    "SkipSimplifiedLayerNormalization",
    "MatMulNBits",
    "GatherBlockQuantized",
];

#[derive(Debug, Clone)]
pub struct Node {
    pub name: String,
    pub op_type: &'static str,
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
    pub attrs: Vec<(&'static str, Attr)>,
}

/// Produces a weight's f32 values, row-major in the initializer's dims.
pub type WeightFn<'m> = Box<dyn Fn() -> Vec<f32> + Send + Sync + 'm>;

/// Produces a uint8 initializer's bytes (packed 4-bit codes).
pub type BytesFn<'m> = Box<dyn Fn() -> Vec<u8> + Send + Sync + 'm>;

/// The values of an initializer.
pub enum InitData<'m> {
    /// Shape, axes and index constants: always stored inline.
    I64(Vec<i64>),
    /// Small float constants (eps, scale, mask fill), stored inline in the
    /// model's float type.
    Scalar(f32),
    /// A float32 scalar whatever the model's float type (norm statistics are
    /// computed in float32).
    ScalarF32(f32),
    /// Model weights, computed when written, stored in the model's float type.
    Weight(WeightFn<'m>),
    /// uint8 weights (4-bit codes two a byte), computed when written.
    Bytes(BytesFn<'m>),
}

pub struct Initializer<'m> {
    pub name: String,
    pub dims: Vec<usize>,
    pub data: InitData<'m>,
}

/// A whole model graph.
pub struct Graph<'m> {
    pub name: String,
    /// Element type of every float value (activations, weights, KV cache).
    pub float: ElemType,
    pub inputs: Vec<ValueInfo>,
    pub outputs: Vec<ValueInfo>,
    pub nodes: Vec<Node>,
    pub initializers: Vec<Initializer<'m>>,
    /// `key = value` pairs recorded in the model's metadata.
    pub metadata: Vec<(String, String)>,
}

/// Builds a [`Graph`] node by node. Node outputs are named
/// `{node name}/output_{k}`; constants are deduplicated by name.
pub struct Builder<'m> {
    graph: Graph<'m>,
    names: HashSet<String>,
}

impl<'m> Builder<'m> {
    pub fn new(name: &str, float: ElemType) -> Self {
        Builder {
            graph: Graph {
                name: name.to_string(),
                float,
                inputs: Vec::new(),
                outputs: Vec::new(),
                nodes: Vec::new(),
                initializers: Vec::new(),
                metadata: Vec::new(),
            },
            names: HashSet::new(),
        }
    }

    pub fn float(&self) -> ElemType {
        self.graph.float
    }

    pub fn input(&mut self, v: ValueInfo) {
        self.graph.inputs.push(v);
    }

    pub fn output(&mut self, v: ValueInfo) {
        self.graph.outputs.push(v);
    }

    pub fn metadata(&mut self, key: &str, value: impl Into<String>) {
        self.graph.metadata.push((key.to_string(), value.into()));
    }

    /// Add a node with `outputs` outputs named after it.
    pub fn node_n(
        &mut self,
        name: &str,
        op_type: &'static str,
        inputs: &[&str],
        outputs: usize,
        attrs: Vec<(&'static str, Attr)>,
    ) -> Vec<String> {
        let outs: Vec<String> = (0..outputs).map(|k| format!("{name}/output_{k}")).collect();
        self.push_outputs(name, op_type, inputs, outs.clone(), attrs);
        outs
    }

    /// Add a node with one output, returning that output's name.
    pub fn node(
        &mut self,
        name: &str,
        op_type: &'static str,
        inputs: &[&str],
        attrs: Vec<(&'static str, Attr)>,
    ) -> String {
        self.node_n(name, op_type, inputs, 1, attrs).remove(0)
    }

    /// Whether a node or initializer of this name exists.
    pub fn has(&self, name: &str) -> bool {
        self.names.contains(name)
    }

    /// Add a node whose single output is a graph output named `output`.
    pub fn node_to(
        &mut self,
        name: &str,
        op_type: &'static str,
        inputs: &[&str],
        output: &str,
        attrs: Vec<(&'static str, Attr)>,
    ) -> String {
        self.push_outputs(name, op_type, inputs, vec![output.to_string()], attrs);
        output.to_string()
    }

    /// Add a node with outputs of the given names (graph outputs among them).
    pub fn push_outputs(
        &mut self,
        name: &str,
        op_type: &'static str,
        inputs: &[&str],
        outputs: Vec<String>,
        attrs: Vec<(&'static str, Attr)>,
    ) {
        assert!(
            self.names.insert(name.to_string()),
            "graph builder: node name `{name}` used twice"
        );
        self.graph.nodes.push(Node {
            name: name.to_string(),
            op_type,
            inputs: inputs.iter().map(|s| s.to_string()).collect(),
            outputs,
            attrs,
        });
    }

    /// An int64 constant (shape, axes, index), inline, shared by name.
    pub fn const_i64(&mut self, values: &[i64], dims: &[usize]) -> String {
        let list: Vec<String> = values.iter().map(|v| v.to_string()).collect();
        let name = if dims.is_empty() {
            format!("/model/constants/INT64/{}", list.join("_"))
        } else {
            format!("/model/constants/INT64/[{}]", list.join(","))
        };
        if self.names.insert(name.clone()) {
            self.graph.initializers.push(Initializer {
                name: name.clone(),
                dims: dims.to_vec(),
                data: InitData::I64(values.to_vec()),
            });
        }
        name
    }

    /// A 1-D int64 constant.
    pub fn ints(&mut self, values: &[i64]) -> String {
        self.const_i64(values, &[values.len()])
    }

    /// A float scalar in the model's float type, shared by name.
    pub fn scalar(&mut self, value: f32) -> String {
        let name = format!("/model/constants/{:?}/{value:e}", self.graph.float);
        if self.names.insert(name.clone()) {
            self.graph.initializers.push(Initializer {
                name: name.clone(),
                dims: Vec::new(),
                data: InitData::Scalar(value),
            });
        }
        name
    }

    /// A float32 scalar, shared by name.
    pub fn scalar_f32(&mut self, value: f32) -> String {
        if self.graph.float == ElemType::F32 {
            return self.scalar(value);
        }
        let name = format!("/model/constants/F32/{value:e}");
        if self.names.insert(name.clone()) {
            self.graph.initializers.push(Initializer {
                name: name.clone(),
                dims: Vec::new(),
                data: InitData::ScalarF32(value),
            });
        }
        name
    }

    /// A weight, computed when written.
    pub fn weight(&mut self, name: &str, dims: Vec<usize>, values: WeightFn<'m>) -> String {
        self.initializer(name, dims, InitData::Weight(values))
    }

    /// A uint8 weight, computed when written.
    pub fn bytes(&mut self, name: &str, dims: Vec<usize>, values: BytesFn<'m>) -> String {
        self.initializer(name, dims, InitData::Bytes(values))
    }

    fn initializer(&mut self, name: &str, dims: Vec<usize>, data: InitData<'m>) -> String {
        assert!(
            self.names.insert(name.to_string()),
            "graph builder: initializer `{name}` added twice"
        );
        self.graph.initializers.push(Initializer {
            name: name.to_string(),
            dims,
            data,
        });
        name.to_string()
    }

    pub fn finish(self) -> Graph<'m> {
        self.graph
    }
}
