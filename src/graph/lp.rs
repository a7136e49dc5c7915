//! Layer Parallelism as a graph rewrite ("Leveraging the true depth of LLMs",
//! arXiv 2502.02790; `docs/DESIGN.md`): the one place that says how a plan's
//! steps become a decoder graph, which groups have an exact fused form, and
//! how groups are named. The reference forward ([`crate::forward`]) is the
//! specification this rewrite is tested against.
//!
//! For a parallel group `G` reading the residual `x`:
//!
//! ```text
//! h = x + sum_{i in G} Attn_i(RMSNorm_in_i(x))
//! y = h + sum_{i in G} MLP_i(RMSNorm_post_i(h))
//! ```
//!
//! Two forms:
//!
//! ```text
//! branches:   x ─┬─ norm_i ─ Attn_i ─ o_i ─┐              fused:   x ─ norm(ones) ─ Attn over [i; j]
//!                └─ norm_j ─ Attn_j ─ o_j ─┴─ Add ─ Add(x)           (norm weights folded into QKV)
//!             (then the same for the MLPs on h)                   ─ MatMul[o_i; o_j] (sums) ─ Add(x)
//! ```
//!
//! A single layer is a group of one written as one branch. The operators
//! come from an [`OpSet`]: [`super::portable`] (plain ONNX) or [`super::ort`]
//! (ONNX Runtime's fused operators); the subgraphs both write alike are in
//! [`super::decoder`].

use std::borrow::Cow;

use super::contract;
use super::decoder::{o_bias_sum, Decoder, Packed};
use super::ort::Ort;
use super::portable::Portable;
use super::{Builder, ElemType, Graph};
use crate::checkpoint::ModelConfig;
use crate::model::{DecoderLayer, Int4, Matrix, Model};
use crate::plan::Plan;

/// How a parallel group is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    /// One branch per layer reading the shared residual, summed by `Add`.
    Branches,
    /// One wider layer per group: concatenated Q/K/V and gate/up, stacked
    /// o_proj and down_proj (the MatMul sums the branches).
    Fused,
}

impl Form {
    pub fn name(self) -> &'static str {
        match self {
            Form::Branches => "branches",
            Form::Fused => "fused",
        }
    }
}

/// Which operators the graph is written with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ops {
    /// Plain ONNX operators (opset 21): every runtime loads it, ONNX Runtime's
    /// optimiser fuses its norm and attention patterns.
    Portable,
    /// ONNX Runtime's fused operators (`SkipSimplifiedLayerNormalization`,
    /// `GroupQueryAttention`): faster in ONNX Runtime, not loadable elsewhere.
    Ort,
}

impl Ops {
    pub fn name(self) -> &'static str {
        match self {
            Ops::Portable => "portable",
            Ops::Ort => "ort",
        }
    }
}

/// The node and initializer namespace of layer `l`: `/model/layers.3`.
pub fn layer_prefix(l: usize) -> String {
    format!("/model/layers.{l}")
}

/// The node and initializer namespace of a step: `/model/layers.3` for a
/// single layer, `/model/parallel.20-21` for a group.
pub fn step_prefix(layers: &[usize]) -> String {
    match layers {
        [l] => layer_prefix(*l),
        _ => {
            let names: Vec<String> = layers.iter().map(|l| l.to_string()).collect();
            format!("/model/parallel.{}", names.join("-"))
        }
    }
}

/// Whether the layers of a parallel group can be written as one wider layer
/// that computes exactly the LP formula; `Err(why not)` otherwise.
///
/// The fused form normalises `x` once without weights and folds each layer's
/// norm weight into the rows of its input projections (`rms(x)` and `eps`
/// are shared), and stacks the output projections so that one MatMul sums
/// the branches. That needs: no norm between a sublayer and the sum (a norm
/// of a sum is not the sum of the norms), and one RoPE base and one attention
/// window for the group (one attention runs over all its heads).
pub fn fusable(cfg: &ModelConfig, layers: &[usize]) -> Result<(), String> {
    if cfg.sandwich_norms {
        return Err(
            "each branch's output passes its own RMS norm before the sum, and a norm of a \
             sum is not the sum of the norms: a group's o_proj and down_proj cannot be \
             stacked into one MatMul, so groups are written as branches"
                .into(),
        );
    }
    let first = layers[0];
    if let Some(&other) = layers.iter().find(|&&l| {
        cfg.rope_theta_of(l) != cfg.rope_theta_of(first) || cfg.window_of(l) != cfg.window_of(first)
    }) {
        return Err(format!(
            "layers {first} and {other} differ in RoPE base or attention window, and one \
             attention runs over all the heads of a fused group: written as branches"
        ));
    }
    Ok(())
}

/// Whether a form of a parallel group is exact for a model, and why (what
/// `inspect` prints).
#[derive(Debug, Clone, serde::Serialize)]
pub struct FormSupport {
    pub form: &'static str,
    pub exact: bool,
    pub why: String,
}

/// How each form stands for this model: fused is exact when every pair of
/// adjacent layers is [`fusable`]; branches always are.
pub fn forms(cfg: &ModelConfig) -> Vec<FormSupport> {
    let not_fusable = (1..cfg.num_hidden_layers).find_map(|l| fusable(cfg, &[l - 1, l]).err());
    let fused = match not_fusable {
        Some(why) => FormSupport {
            form: "fused",
            exact: false,
            why,
        },
        None => {
            let mut why = vec!["input norms fold into one packed QKV and gate/up MatMul"];
            if cfg.qkv_bias {
                why.push("q/k/v biases concatenate with their columns");
            }
            if cfg.o_bias {
                why.push("o_proj biases add up under the stacked o_proj");
            }
            if cfg.qk_norm {
                why.push("each layer's q/k head norms stay on its own heads");
            }
            FormSupport {
                form: "fused",
                exact: true,
                why: why.join("; "),
            }
        }
    };
    let branches = FormSupport {
        form: "branches",
        exact: true,
        why: if cfg.sandwich_norms {
            "each layer's sublayers run as written, its post-sublayer norm included, and the \
             normed outputs are summed into the residual"
        } else {
            "each layer's sublayers run as written, summed into the residual"
        }
        .into(),
    };
    vec![fused, branches]
}

/// The form `build` writes: when a group of the plan is not [`fusable`],
/// `Fused` becomes `Branches` (recorded in the model's metadata).
pub fn written_form(model: &Model, plan: &Plan, form: Form) -> Form {
    match form {
        Form::Fused
            if plan
                .groups()
                .any(|g| fusable(&model.config, &g.layers).is_err()) =>
        {
            Form::Branches
        }
        _ => form,
    }
}

/// The layers whose norm weights the written graph folds into their
/// projections (every layer of a group written in the fused form): what
/// [`Model::to_int4`] must fold before it quantises.
pub fn folded_layers(model: &Model, plan: &Plan, form: Form) -> Vec<usize> {
    match written_form(model, plan, form) {
        Form::Fused => plan
            .groups()
            .flat_map(|g| g.layers.iter().copied())
            .collect(),
        Form::Branches => Vec::new(),
    }
}

/// `model` with the weights a graph of `plan` in `form` holds: itself in
/// float, or quantised to 4 bits after the fused form's norm folding. The
/// reference forward that validates an emitted model runs this model.
pub fn weights_as_emitted<'a>(
    model: &'a Model,
    plan: &Plan,
    form: Form,
    int4: Option<Int4>,
) -> crate::Result<Cow<'a, Model>> {
    Ok(match int4 {
        None => Cow::Borrowed(model),
        Some(q) => Cow::Owned(model.to_int4(&folded_layers(model, plan, form), q)?),
    })
}

/// `model` and `plan` as an emitted file holds them: without the layers
/// `plan` drops (the model's config counts the rest) and the plan over the
/// rest ([`Plan::without_dropped`]); both as they are when none is dropped.
pub fn without_dropped<'a>(model: &'a Model, plan: &Plan) -> (Cow<'a, Model>, Plan) {
    if plan.dropped().is_empty() {
        return (Cow::Borrowed(model), plan.clone());
    }
    let (kept, emitted) = plan.without_dropped();
    (Cow::Owned(model.keep_layers(&kept)), emitted)
}

/// The whole decoder graph of `model` under `plan`, with the I/O contract of
/// [`contract`] and the plan, form, dtype and op set in its metadata. A plan
/// that drops layers comes with the model [`without_dropped`] leaves: the
/// metadata keeps the plan over the source's layers.
pub fn build<'m>(
    model: &'m Model,
    plan: &Plan,
    form: Form,
    ops: Ops,
    float: ElemType,
    int4: Option<Int4>,
    healed: bool,
) -> Graph<'m> {
    assert!(
        int4.is_none() || model.int4_block_size() == int4.map(|q| q.block_size),
        "an int4 graph needs the model from Model::to_int4 with the same block size"
    );
    let source_plan = plan;
    let (kept, plan) = plan.without_dropped();
    assert_eq!(
        kept.len(),
        model.config.num_hidden_layers,
        "a plan that drops layers needs the model without them (graph::lp::without_dropped)"
    );
    let plan = &plan;
    let cfg = &model.config;
    let mut b = Builder::new("depthc", float);
    for v in contract::inputs(cfg, float) {
        b.input(v);
    }
    for v in contract::outputs(cfg, float) {
        b.output(v);
    }
    let form = written_form(model, plan, form);
    let metadata = contract::Metadata {
        plan: source_plan.clone(),
        form,
        float,
        ops,
        int4,
        healed,
    };
    for (key, value) in metadata.entries() {
        b.metadata(key, value);
    }
    let d = Decoder { model, float, int4 };
    let xn = match ops {
        Ops::Portable => rewrite::<Portable>(d, &mut b, plan, form),
        Ops::Ort => rewrite::<Ort>(d, &mut b, plan, form),
    };
    d.make_lm_head(&mut b, &xn);
    b.finish()
}

/// The order in which the branches of a group are written. Both are
/// topological orders of the same graph; the op set keeps the one its
/// emitted files have always had.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum BranchOrder {
    /// Each branch whole (its norm, attention, output projection), then the next.
    WholeBranches,
    /// Each stage across the branches: every norm, then every attention, ...
    StageByStage,
}

/// What an op set writes for the LP rewrite. Everything else (the step loop,
/// the two forms, the sums, the output projections, the MLPs) is here or in
/// [`super::decoder`], written once.
pub(super) trait OpSet<'m>: Sized {
    /// The residual stream between sublayers (a value; or, for ops that add
    /// the residual inside the next norm, a value and a pending addend).
    type Residual;
    const BRANCH_ORDER: BranchOrder;

    /// After the token embedding: what every layer reads (RoPE tables,
    /// attention masks or lengths).
    fn start(d: Decoder<'m>, b: &mut Builder<'m>) -> Self;

    fn residual_stream(&self, embedding: String) -> Self::Residual;

    /// The RMS norm of the residual stream with `weight`; `None` normalises
    /// only (the weights are folded into the next MatMul: fused form).
    fn residual_norm(
        &mut self,
        b: &mut Builder<'m>,
        p: &str,
        r: &mut Self::Residual,
        weight: Option<&'m [f32]>,
    ) -> String;

    /// The RMS norm of a sublayer's output (Gemma's post-sublayer norms).
    fn output_norm(&mut self, b: &mut Builder<'m>, p: &str, x: &str, weight: &'m [f32]) -> String;

    /// Self-attention of `layers` on the normed `xn`, up to the context that
    /// o_proj reads (`[B, S, n * heads * head_dim]`, the layers' contexts
    /// side by side), writing each layer's `present.{l}`. One layer, or a
    /// fused group whose `xn` is normalised without weights: their
    /// input_layernorm weights fold into the packed QKV projection
    /// ([`super::decoder::Decoder::qkv_columns`]).
    fn attention(&mut self, b: &mut Builder<'m>, p: &str, layers: &[usize], xn: &str) -> String;

    /// `r + out`, named under `p`.
    fn residual_add(&mut self, b: &mut Builder<'m>, p: &str, r: &mut Self::Residual, out: &str);
}

/// The decoder under `plan` with the op set `O`, up to the final norm.
fn rewrite<'m, O: OpSet<'m>>(
    d: Decoder<'m>,
    b: &mut Builder<'m>,
    plan: &Plan,
    form: Form,
) -> String {
    let x = d.make_embedding(b);
    let mut ops = O::start(d, b);
    let mut r = ops.residual_stream(x);
    for step in &plan.steps {
        let layers = step.layers();
        let p = step_prefix(layers);
        // `form` is already what `written_form` allows.
        let fused = layers.len() > 1 && form == Form::Fused;
        let attn = if fused {
            fused_attention(&mut ops, d, b, &p, layers, &mut r)
        } else {
            attention_branches(&mut ops, d, b, &p, layers, &mut r)
        };
        ops.residual_add(b, &format!("{p}/residual_attn"), &mut r, &attn);
        let mlp = if fused {
            let hn = ops.residual_norm(b, &format!("{p}/post_attention_layernorm"), &mut r, None);
            fused_mlp(d, b, &p, layers, &hn)
        } else {
            mlp_branches(&mut ops, d, b, &p, layers, &mut r)
        };
        ops.residual_add(b, &format!("{p}/residual_mlp"), &mut r, &mlp);
    }
    ops.residual_norm(b, "/model/norm", &mut r, Some(&d.model.norm))
}

/// The branches of a group, one per layer, each a chain of `stages` steps
/// (`stage(ops, b, stage, layer, previous value)`), written in the op set's
/// [`BranchOrder`] and summed under `sum`.
fn sum_of_branches<'m, O: OpSet<'m>>(
    ops: &mut O,
    d: Decoder<'m>,
    b: &mut Builder<'m>,
    sum: &str,
    layers: &[usize],
    stages: usize,
    mut stage: impl FnMut(&mut O, &mut Builder<'m>, usize, usize, &str) -> String,
) -> String {
    let n = layers.len();
    let order: Vec<(usize, usize)> = match O::BRANCH_ORDER {
        BranchOrder::WholeBranches => (0..n)
            .flat_map(|k| (0..stages).map(move |s| (s, k)))
            .collect(),
        BranchOrder::StageByStage => (0..stages)
            .flat_map(|s| (0..n).map(move |k| (s, k)))
            .collect(),
    };
    let mut values = vec![String::new(); n];
    for (s, k) in order {
        values[k] = stage(ops, b, s, layers[k], &values[k]);
    }
    d.make_sum(b, sum, &values)
}

/// `sum_i Attn_i(RMSNorm_in_i(x))`: every layer's own input norm of the same
/// residual, its attention and o_proj (and Gemma's output norm), summed.
fn attention_branches<'m, O: OpSet<'m>>(
    ops: &mut O,
    d: Decoder<'m>,
    b: &mut Builder<'m>,
    p: &str,
    layers: &[usize],
    r: &mut O::Residual,
) -> String {
    let sum = format!("{p}/attn_branches");
    sum_of_branches(ops, d, b, &sum, layers, 3, |ops, b, stage, l, input| {
        let layer: &'m DecoderLayer = &d.model.layers[l];
        let lp = step_prefix(&[l]);
        match stage {
            0 => ops.residual_norm(
                b,
                &format!("{lp}/input_layernorm"),
                r,
                Some(&layer.input_layernorm),
            ),
            1 => ops.attention(b, &lp, &[l], input),
            _ => {
                let o_proj = &layer.self_attn.o_proj;
                let o = d.make_linear(
                    b,
                    &format!("{lp}/attn/o_proj"),
                    input,
                    Packed::t(&o_proj.weight),
                    o_proj.bias.clone(),
                );
                match &layer.attn_out_norm {
                    Some(w) => ops.output_norm(b, &format!("{lp}/post_attention_norm"), &o, w),
                    None => o,
                }
            }
        }
    })
}

/// `sum_i MLP_i(RMSNorm_post_i(h))`, each layer's own norm of the same `h`.
fn mlp_branches<'m, O: OpSet<'m>>(
    ops: &mut O,
    d: Decoder<'m>,
    b: &mut Builder<'m>,
    p: &str,
    layers: &[usize],
    r: &mut O::Residual,
) -> String {
    let sum = format!("{p}/mlp_branches");
    sum_of_branches(ops, d, b, &sum, layers, 2, |ops, b, stage, l, input| {
        let layer: &'m DecoderLayer = &d.model.layers[l];
        let lp = step_prefix(&[l]);
        match stage {
            0 => ops.residual_norm(
                b,
                &format!("{lp}/post_attention_layernorm"),
                r,
                Some(&layer.post_attention_layernorm),
            ),
            _ => {
                let m = d.make_mlp_normed(b, l, input);
                match &layer.mlp_out_norm {
                    Some(w) => ops.output_norm(b, &format!("{lp}/post_feedforward_norm"), &m, w),
                    None => m,
                }
            }
        }
    })
}

/// The attentions of a fused group: one weightless norm of `x`, the op set's
/// attention over all the group's heads, and o_proj rows stacked
/// `[o_i; o_j]` so that one MatMul sums the branches (biases summed).
fn fused_attention<'m, O: OpSet<'m>>(
    ops: &mut O,
    d: Decoder<'m>,
    b: &mut Builder<'m>,
    p: &str,
    layers: &[usize],
    r: &mut O::Residual,
) -> String {
    let xn = ops.residual_norm(b, &format!("{p}/input_layernorm"), r, None);
    let ctx = ops.attention(b, p, layers, &xn);
    let ls: Vec<&'m DecoderLayer> = layers.iter().map(|&l| &d.model.layers[l]).collect();
    let o: Vec<&'m Matrix> = ls.iter().map(|l| &l.self_attn.o_proj.weight).collect();
    let bias = o_bias_sum(&d.model.config, &ls);
    d.make_linear(b, &format!("{p}/attn/o_proj"), &ctx, Packed::Rows(o), bias)
}

/// The MLPs of a fused group on the weightless-normed `hn`: post-attention
/// norm weights folded into one `[gate_i gate_j | up_i up_j]` MatMul, the
/// gated activation, and down_proj rows stacked `[down_i; down_j]`.
fn fused_mlp<'m>(
    d: Decoder<'m>,
    b: &mut Builder<'m>,
    p: &str,
    layers: &[usize],
    hn: &str,
) -> String {
    let ls: Vec<&'m DecoderLayer> = layers.iter().map(|&l| &d.model.layers[l]).collect();
    let mut gu_parts = Vec::new();
    for pick in [0, 1] {
        for layer in &ls {
            let w = [&layer.mlp.gate_proj.weight, &layer.mlp.up_proj.weight][pick];
            gu_parts.push((w, Some(layer.post_attention_layernorm.as_slice())));
        }
    }
    let down: Vec<&'m Matrix> = ls.iter().map(|l| &l.mlp.down_proj.weight).collect();
    d.make_gated_mlp(b, &format!("{p}/mlp"), hn, gu_parts, Packed::Rows(down))
}
