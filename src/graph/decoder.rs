//! The decoder of a Llama-family model as an ONNX graph (opset 21, plain ops),
//! executing a [`Plan`]. One `make_*` function per subgraph; node names live
//! in a namespace (`/model/layers.3/attn/q_proj/MatMul`).
//!
//! A parallel group (DESIGN.md section 1) has two forms:
//!
//! ```text
//! branches:   x ─┬─ norm_i ─ Attn_i ─┐                fused:   x ─ norm ─ MatMul[QKV_i|QKV_j] ─ Split
//!                └─ norm_j ─ Attn_j ─┴─ Add ─ Add(x)             ─ attention over heads [A;B]
//!             (then the same for the MLPs on h)                  ─ MatMul[o_i;o_j] (sums) ─ Add(x)
//! ```
//!
//! The fused form folds each layer's RMSNorm weight into the rows of its
//! input projections (`rms(x)` is shared), so it is exact up to rounding.

use super::contract::{self, ATTENTION_MASK, INPUT_IDS, LOGITS, POSITION_IDS};
use super::{Attr, Builder, ElemType, Graph};
use crate::checkpoint::config::Activation;
use crate::forward::ops::Rope;
use crate::model::{Attention, DecoderLayer, Matrix, Model};
use crate::plan::{Plan, Step};

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
    /// ONNX Runtime's fused operators (see [`ort`]): faster in ONNX Runtime,
    /// not loadable elsewhere.
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

pub mod ort;

/// Lowest finite value of the float type: the additive mask of hidden keys.
fn mask_fill(float: ElemType) -> f32 {
    match float {
        ElemType::F16 => -65504.0,
        _ => f32::MIN,
    }
}

/// The form `build` writes: groups without an exact fused form (Gemma's
/// post-sublayer norms, layers of different RoPE bases or windows) are
/// written as branches; the model's metadata says which.
pub fn written_form(model: &Model, plan: &Plan, form: Form) -> Form {
    match form {
        Form::Fused if plan.groups().any(|g| !fusable(&model.config, &g.layers)) => Form::Branches,
        _ => form,
    }
}

/// Whether a group can be written as one wider layer exactly: no
/// post-sublayer norms, and one RoPE base and window for all its layers.
fn fusable(cfg: &crate::checkpoint::ModelConfig, layers: &[usize]) -> bool {
    let same = |l: &usize| {
        cfg.rope_theta_of(*l) == cfg.rope_theta_of(layers[0])
            && cfg.window_of(*l) == cfg.window_of(layers[0])
    };
    !cfg.sandwich_norms && layers.iter().all(same)
}

/// The whole decoder graph of `model` under `plan`.
pub fn build<'m>(
    model: &'m Model,
    plan: &Plan,
    form: Form,
    ops: Ops,
    float: ElemType,
) -> Graph<'m> {
    let cfg = &model.config;
    let mut b = Builder::new("depthc", float);
    for v in contract::inputs(cfg, float) {
        b.input(v);
    }
    for v in contract::outputs(cfg, float) {
        b.output(v);
    }
    let d = Decoder { model, float };
    let form = written_form(model, plan, form);
    b.metadata("depthc.plan", plan.to_string());
    b.metadata("depthc.form", form.name());
    b.metadata("depthc.dtype", float.name());
    b.metadata("depthc.ops", ops.name());
    let xn = match ops {
        Ops::Ort => ort::build(&d, &mut b, plan, form),
        Ops::Portable => d.make_portable(&mut b, plan, form),
    };
    let lm_head = model.lm_head();

    let w = b.weight(
        "lm_head.MatMul.weight",
        vec![lm_head.cols, lm_head.rows],
        Box::new(move || transposed(lm_head)),
    );
    b.node_to("/lm_head/MatMul", "MatMul", &[&xn, &w], LOGITS, vec![]);
    b.finish()
}

/// Values the layers read: per layer, its RoPE `cos`, `sin` and its mask.
struct Shared<'a> {
    layers: Vec<&'a (String, String, String)>,
}

impl Shared<'_> {
    fn cos(&self, l: usize) -> &str {
        &self.layers[l].0
    }
    fn sin(&self, l: usize) -> &str {
        &self.layers[l].1
    }
    fn mask(&self, l: usize) -> &str {
        &self.layers[l].2
    }
}

enum Norm<'m> {
    Weight(&'m [f32]),
    /// Over each head of `[B, heads, S, hd]`: one `[hd]` weight per part,
    /// each repeated for `usize` heads; written `[heads, 1, hd]`.
    Heads(Vec<&'m [f32]>, usize),
    /// Folded into the next projection: normalise only (a weight of ones
    /// keeps the pattern ONNX Runtime fuses into SimplifiedLayerNormalization).
    Folded,
}

struct Decoder<'m> {
    model: &'m Model,
    float: ElemType,
}

impl<'m> Decoder<'m> {
    /// The decoder in plain operators, up to the final norm.
    fn make_portable(&self, b: &mut Builder<'m>, plan: &Plan, form: Form) -> String {
        let d = self;
        let cfg = &self.model.config;
        let mut x = d.make_embedding(b);
        // One RoPE table and one mask per kind of layer (Gemma 3: local and global).
        let mut kinds: Vec<(u64, Option<usize>)> = Vec::new();
        let mut kind_of = Vec::new();
        for l in 0..cfg.num_hidden_layers {
            let kind = (cfg.rope_theta_of(l).to_bits(), cfg.window_of(l));
            kind_of.push(kinds.iter().position(|k| *k == kind).unwrap_or_else(|| {
                kinds.push(kind);
                kinds.len() - 1
            }));
        }
        let per_kind: Vec<(String, String, String)> = kinds
            .iter()
            .enumerate()
            .map(|(i, &(_, window))| {
                let first = kind_of
                    .iter()
                    .position(|&k| k == i)
                    .expect("a layer of each kind");
                let tag = if i == 0 {
                    String::new()
                } else {
                    format!("_{i}")
                };
                let (cos, sin) = d.make_rope_caches(b, first, &tag);
                let mask = d.make_attention_mask(b, window, &tag);
                (cos, sin, mask)
            })
            .collect();
        let io = Shared {
            layers: kind_of.iter().map(|&k| &per_kind[k]).collect(),
        };
        for step in &plan.steps {
            x = match step {
                Step::Layer(l) => d.make_layer(b, *l, &x, &io),
                Step::Parallel(group) => match form {
                    Form::Fused => d.make_group_fused(b, &group.layers, &x, &io),
                    Form::Branches => d.make_group_branches(b, &group.layers, &x, &io),
                },
            };
        }
        d.make_rms_norm(b, "/model/norm", &x, Norm::Weight(&self.model.norm))
    }

    fn make_embedding(&self, b: &mut Builder<'m>) -> String {
        let e = &self.model.embed_tokens;
        let w = b.weight(
            "model.embed_tokens.weight",
            vec![e.rows, e.cols],
            Box::new(move || e.data.clone()),
        );
        let x = b.node(
            "/model/embed_tokens/Gather",
            "Gather",
            &[&w, INPUT_IDS],
            vec![("axis", Attr::Int(0))],
        );
        match self.model.config.embed_scale {
            None => x,
            Some(s) => {
                let s = b.scalar(s);
                b.node("/model/embed_tokens/Mul", "Mul", &[&x, &s], vec![])
            }
        }
    }

    /// `cos`/`sin` tables `[max_position, head_dim]` gathered by `position_ids`
    /// and unsqueezed to `[batch, 1, seq, head_dim]`.
    /// Of layer `l`'s RoPE base; `tag` tells the tables of each base apart.
    fn make_rope_caches(&self, b: &mut Builder<'m>, l: usize, tag: &str) -> (String, String) {
        let cfg = &self.model.config;
        let (positions, hd) = (cfg.max_position_embeddings, cfg.head_dim);
        let rope = Rope::of_layer(cfg, l);
        let mut out = Vec::new();
        for (name, use_sin) in [("cos", false), ("sin", true)] {
            let rope = rope.clone();
            let w = b.weight(
                &format!("{name}_cache{tag}"),
                vec![positions, hd],
                Box::new(move || rope.table(positions, use_sin)),
            );
            let g = b.node(
                &format!("/model/rotary_emb{tag}/{name}/Gather"),
                "Gather",
                &[&w, POSITION_IDS],
                vec![("axis", Attr::Int(0))],
            );
            let axes = b.ints(&[1]);
            out.push(b.node(
                &format!("/model/rotary_emb{tag}/{name}/Unsqueeze"),
                "Unsqueeze",
                &[&g, &axes],
                vec![],
            ));
        }
        let sin = out.pop().expect("two tables");
        let cos = out.pop().expect("two tables");
        (cos, sin)
    }

    /// Additive mask `[batch, 1, group * seq, total_seq]`: 0 where query `i`
    /// (at absolute index `past + i`) may see key `j`, the lowest float
    /// elsewhere; repeated for the `group` query heads that share a KV head
    /// (see `make_attend`). Causal, padding from `attention_mask`, and the
    /// sliding window if any.
    ///
    /// ```text
    /// Shape(input_ids)[1] = S, Shape(attention_mask)[1] = T
    /// Range(0,T) <= Unsqueeze(Range(T-S,T)) ─ And ─ Tile(group, 1) ─ And(Cast(attention_mask)) ─ Where(0, min)
    /// ```
    fn make_attention_mask(&self, b: &mut Builder<'m>, window: Option<usize>, tag: &str) -> String {
        let p = format!("/model/attn_mask{tag}");
        let one_idx = b.const_i64(&[1], &[]);
        let zero = b.const_i64(&[0], &[]);
        let seq_len = |b: &mut Builder<'m>, name: &str, input: &str| {
            let shape = b.node(&format!("{p}/{name}/Shape"), "Shape", &[input], vec![]);
            b.node(
                &format!("{p}/{name}/Gather"),
                "Gather",
                &[&shape, &one_idx],
                vec![("axis", Attr::Int(0))],
            )
        };
        let s = seq_len(b, "sequence_length", INPUT_IDS);
        let t = seq_len(b, "total_sequence_length", ATTENTION_MASK);
        let past = b.node(&format!("{p}/past_length/Sub"), "Sub", &[&t, &s], vec![]);
        let key_pos = b.node(
            &format!("{p}/key_positions/Range"),
            "Range",
            &[&zero, &t, &one_idx],
            vec![],
        );
        let query_pos = b.node(
            &format!("{p}/query_positions/Range"),
            "Range",
            &[&past, &t, &one_idx],
            vec![],
        );
        let axes1 = b.ints(&[1]);
        let query_col = b.node(
            &format!("{p}/query_positions/Unsqueeze"),
            "Unsqueeze",
            &[&query_pos, &axes1],
            vec![],
        );
        let mut allowed = b.node(
            &format!("{p}/causal/LessOrEqual"),
            "LessOrEqual",
            &[&key_pos, &query_col],
            vec![],
        );
        if let Some(window) = window {
            let w = b.const_i64(&[window as i64], &[]);
            let lowest = b.node(
                &format!("{p}/sliding_window/Sub"),
                "Sub",
                &[&query_col, &w],
                vec![],
            );
            let inside = b.node(
                &format!("{p}/sliding_window/Greater"),
                "Greater",
                &[&key_pos, &lowest],
                vec![],
            );
            allowed = b.node(
                &format!("{p}/sliding_window/And"),
                "And",
                &[&allowed, &inside],
                vec![],
            );
        }
        let cfg = &self.model.config;
        let group = cfg.num_attention_heads / cfg.num_key_value_heads;
        if group > 1 {
            let repeats = b.ints(&[group as i64, 1]);
            allowed = b.node(
                &format!("{p}/query_groups/Tile"),
                "Tile",
                &[&allowed, &repeats],
                vec![],
            );
        }
        let pad = b.node(
            &format!("{p}/padding/Cast"),
            "Cast",
            &[ATTENTION_MASK],
            vec![("to", Attr::Int(crate::onnx::proto::data_type::BOOL as i64))],
        );
        let axes12 = b.ints(&[1, 2]);
        let pad = b.node(
            &format!("{p}/padding/Unsqueeze"),
            "Unsqueeze",
            &[&pad, &axes12],
            vec![],
        );
        let allowed = b.node(&format!("{p}/And"), "And", &[&allowed, &pad], vec![]);
        let zero_f = b.scalar(0.0);
        let fill = b.scalar(mask_fill(self.float));
        b.node(
            &format!("{p}/Where"),
            "Where",
            &[&allowed, &zero_f, &fill],
            vec![],
        )
    }

    /// `Pow(x,2) -> ReduceMean -> Add(eps) -> Sqrt -> Div -> Mul(w)`, the
    /// pattern ONNX Runtime fuses into SimplifiedLayerNormalization.
    /// In float16 models the statistics are computed in float32 (squares of
    /// residual values overflow float16): `Cast` before `Pow` and after `Div`.
    fn make_rms_norm(&self, b: &mut Builder<'m>, p: &str, x: &str, norm: Norm<'m>) -> String {
        let h = self.model.config.hidden_size;
        let f16 = self.float == ElemType::F16;
        let x = if f16 {
            b.node(
                &format!("{p}/Cast"),
                "Cast",
                &[x],
                vec![("to", Attr::Int(crate::onnx::proto::data_type::FLOAT as i64))],
            )
        } else {
            x.to_string()
        };
        let x = x.as_str();
        let two = b.scalar_f32(2.0);
        let pow = b.node(&format!("{p}/Pow"), "Pow", &[x, &two], vec![]);
        let axes = b.ints(&[-1]);
        let mean = b.node(
            &format!("{p}/ReduceMean"),
            "ReduceMean",
            &[&pow, &axes],
            vec![("keepdims", Attr::Int(1))],
        );
        let eps = b.scalar_f32(self.model.config.rms_norm_eps as f32);
        let add = b.node(&format!("{p}/Add"), "Add", &[&mean, &eps], vec![]);
        let sqrt = b.node(&format!("{p}/Sqrt"), "Sqrt", &[&add], vec![]);
        let mut div = b.node(&format!("{p}/Div"), "Div", &[x, &sqrt], vec![]);
        if f16 {
            div = b.node(
                &format!("{p}/Cast_1"),
                "Cast",
                &[&div],
                vec![(
                    "to",
                    Attr::Int(crate::onnx::proto::data_type::FLOAT16 as i64),
                )],
            );
        }
        let weight_name = param_name(p, "weight");
        let w = match norm {
            Norm::Weight(w) => b.weight(&weight_name, vec![h], Box::new(move || w.to_vec())),
            Norm::Folded => b.weight(&weight_name, vec![h], Box::new(move || vec![1.0; h])),
            Norm::Heads(parts, heads_each) => {
                let hd = self.model.config.head_dim;
                let dims = vec![parts.len() * heads_each, 1, hd];
                let values = move || {
                    parts
                        .iter()
                        .flat_map(|w| std::iter::repeat_n(*w, heads_each).flatten().copied())
                        .collect()
                };
                b.weight(&weight_name, dims, Box::new(values))
            }
        };
        b.node(&format!("{p}/Mul"), "Mul", &[&div, &w], vec![])
    }

    /// `x @ W` for a weight written `[in, out]`.
    fn make_matmul(&self, b: &mut Builder<'m>, p: &str, x: &str, weight: Packed<'m>) -> String {
        let name = param_name(p, "weight");
        let dims = vec![weight.rows(), weight.cols()];
        let w = b.weight(&name, dims, Box::new(move || weight.values()));
        b.node(&format!("{p}/MatMul"), "MatMul", &[x, &w], vec![])
    }

    /// `x @ W (+ bias)`: the bias (`[out]`, when the projection has one) is
    /// added after the MatMul, the pattern ONNX Runtime fuses.
    fn make_linear(
        &self,
        b: &mut Builder<'m>,
        p: &str,
        x: &str,
        weight: Packed<'m>,
        bias: Option<Vec<f32>>,
    ) -> String {
        let y = self.make_matmul(b, p, x, weight);
        match bias {
            None => y,
            Some(bias) => {
                let name = param_name(p, "bias");
                let bias = b.weight(&name, vec![bias.len()], Box::new(move || bias.clone()));
                b.node(&format!("{p}/Add"), "Add", &[&y, &bias], vec![])
            }
        }
    }

    /// Layer `layer`'s `[q | k | v]` projection columns (with its input norm
    /// folded in when `fold`) and their biases, if the family has them.
    #[allow(clippy::type_complexity)]
    fn qkv_columns(
        &self,
        layer: &'m DecoderLayer,
        fold: bool,
    ) -> (Vec<(&'m Matrix, Option<&'m [f32]>)>, Option<Vec<f32>>) {
        let a = &layer.self_attn;
        let g = fold.then_some(layer.input_layernorm.as_slice());
        let lins = [&a.q_proj, &a.k_proj, &a.v_proj];
        let parts = lins.iter().map(|lin| (&lin.weight, g)).collect();
        let bias = self.model.config.qkv_bias.then(|| {
            lins.iter()
                .flat_map(|lin| lin.bias.as_deref().expect("qkv_bias").iter().copied())
                .collect()
        });
        (parts, bias)
    }

    /// Split a packed projection `[B, S, n * (heads + 2 kv_heads) * hd]` laid
    /// out `[q.. | k.. | v..]` (`n` layers' each) into its q, k and v parts.
    fn make_qkv_split(&self, b: &mut Builder<'m>, p: &str, packed: &str, n: usize) -> Vec<String> {
        let cfg = &self.model.config;
        let (q, kv) = (
            n * cfg.num_attention_heads * cfg.head_dim,
            n * cfg.num_key_value_heads * cfg.head_dim,
        );
        let sizes = b.ints(&[q as i64, kv as i64, kv as i64]);
        b.node_n(
            &format!("{p}/Split"),
            "Split",
            &[packed, &sizes],
            3,
            vec![("axis", Attr::Int(-1))],
        )
    }

    /// `[B, S, heads*hd] -> [B, heads, S, hd]`.
    fn make_split_heads(&self, b: &mut Builder<'m>, p: &str, x: &str, heads: usize) -> String {
        let hd = self.model.config.head_dim as i64;
        let shape = b.ints(&[0, 0, heads as i64, hd]);
        let r = b.node(&format!("{p}/Reshape"), "Reshape", &[x, &shape], vec![]);
        b.node(
            &format!("{p}/Transpose"),
            "Transpose",
            &[&r],
            vec![("perm", Attr::Ints(vec![0, 2, 1, 3]))],
        )
    }

    /// Rotary embedding in the `rotate_half` convention:
    /// `x * cos + Concat(-x2, x1) * sin`.
    fn make_rope(&self, b: &mut Builder<'m>, p: &str, x: &str, io: &Shared, l: usize) -> String {
        let half = (self.model.config.head_dim / 2) as i64;
        let split = b.ints(&[half, half]);
        let halves = b.node_n(
            &format!("{p}/Split"),
            "Split",
            &[x, &split],
            2,
            vec![("axis", Attr::Int(-1))],
        );
        let neg = b.node(&format!("{p}/Neg"), "Neg", &[&halves[1]], vec![]);
        let rot = b.node(
            &format!("{p}/Concat"),
            "Concat",
            &[&neg, &halves[0]],
            vec![("axis", Attr::Int(-1))],
        );
        let a = b.node(&format!("{p}/Mul_cos"), "Mul", &[x, io.cos(l)], vec![]);
        let c = b.node(&format!("{p}/Mul_sin"), "Mul", &[&rot, io.sin(l)], vec![]);
        b.node(&format!("{p}/Add"), "Add", &[&a, &c], vec![])
    }

    /// Append this step's keys or values to layer `l`'s cache: the graph
    /// output `present.{l}.key|value`.
    fn make_present(&self, b: &mut Builder<'m>, l: usize, kind: &str, new: &str) -> String {
        let (past, present) = if kind == "key" {
            (contract::past_key(l), contract::present_key(l))
        } else {
            (contract::past_value(l), contract::present_value(l))
        };
        b.node_to(
            &format!("/model/layers.{l}/attn/{kind}/Concat"),
            "Concat",
            &[&past, new],
            &present,
            vec![("axis", Attr::Int(2))],
        )
    }

    /// Grouped-query attention of `q [B, hq, S, hd]` over `k, v [B, hkv, T, hd]`,
    /// returning `[B, S, hq*hd]`. Query head `h` reads KV head `h / group`:
    /// the `group` heads of each KV head are laid end to end as one longer
    /// query (`[B, hkv, group*S, hd]`), so the cache is read as it is, never
    /// repeated per query head; the mask is already `group*S` rows.
    ///
    /// ```text
    /// Softmax(Reshape(q) @ k^T * scale + mask) @ v ─ Reshape ─ Transpose ─ Reshape
    /// ```
    #[allow(clippy::too_many_arguments)]
    fn make_attend(
        &self,
        b: &mut Builder<'m>,
        p: &str,
        q: &str,
        k: &str,
        v: &str,
        hq: usize,
        hkv: usize,
        mask: &str,
    ) -> String {
        let hd = self.model.config.head_dim as i64;
        let grouped = b.ints(&[0, hkv as i64, -1, hd]);
        let q = b.node(
            &format!("{p}/query_groups/Reshape"),
            "Reshape",
            &[q, &grouped],
            vec![],
        );
        let kt = b.node(
            &format!("{p}/key/Transpose"),
            "Transpose",
            &[k],
            vec![("perm", Attr::Ints(vec![0, 1, 3, 2]))],
        );
        let scores = b.node(&format!("{p}/qk/MatMul"), "MatMul", &[&q, &kt], vec![]);
        let scale = b.scalar(self.model.config.query_scale as f32);
        let scaled = b.node(&format!("{p}/qk/Mul"), "Mul", &[&scores, &scale], vec![]);
        let masked = b.node(&format!("{p}/qk/Add"), "Add", &[&scaled, mask], vec![]);
        let probs = b.node(
            &format!("{p}/Softmax"),
            "Softmax",
            &[&masked],
            vec![("axis", Attr::Int(-1))],
        );
        let ctx = b.node(&format!("{p}/pv/MatMul"), "MatMul", &[&probs, v], vec![]);
        let heads = b.ints(&[0, hq as i64, -1, hd]);
        let ctx = b.node(
            &format!("{p}/pv/heads/Reshape"),
            "Reshape",
            &[&ctx, &heads],
            vec![],
        );
        let t = b.node(
            &format!("{p}/pv/Transpose"),
            "Transpose",
            &[&ctx],
            vec![("perm", Attr::Ints(vec![0, 2, 1, 3]))],
        );
        let shape = b.ints(&[0, 0, hq as i64 * hd]);
        b.node(&format!("{p}/pv/Reshape"), "Reshape", &[&t, &shape], vec![])
    }

    /// Attention sublayer of layer `l` on the residual `x`, without the residual add.
    fn make_attention(&self, b: &mut Builder<'m>, l: usize, x: &str, io: &Shared) -> String {
        let cfg = &self.model.config;
        let layer: &'m DecoderLayer = &self.model.layers[l];
        let a = &layer.self_attn;
        let p = format!("/model/layers.{l}");
        let xn = self.make_rms_norm(
            b,
            &format!("{p}/input_layernorm"),
            x,
            Norm::Weight(&layer.input_layernorm),
        );
        let (nh, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        // One packed [q | k | v] MatMul, split after it.
        let (parts, bias) = self.qkv_columns(layer, false);
        let p_qkv = format!("{p}/attn/qkv_proj");
        let qkv = self.make_linear(b, &p_qkv, &xn, Packed::Columns(parts), bias);
        let qkv = self.make_qkv_split(b, &p_qkv, &qkv, 1);
        let q = self.make_split_heads(b, &format!("{p}/attn/q_heads"), &qkv[0], nh);
        let k = self.make_split_heads(b, &format!("{p}/attn/k_heads"), &qkv[1], nkv);
        let v = self.make_split_heads(b, &format!("{p}/attn/v_heads"), &qkv[2], nkv);
        let q = self.make_head_norm(b, &format!("{p}/attn/q_norm"), &q, &[a], nh, |a| &a.q_norm);
        let k = self.make_head_norm(b, &format!("{p}/attn/k_norm"), &k, &[a], nkv, |a| &a.k_norm);
        let q = self.make_rope(b, &format!("{p}/attn/q_rotary"), &q, io, l);
        let k = self.make_rope(b, &format!("{p}/attn/k_rotary"), &k, io, l);
        let k = self.make_present(b, l, "key", &k);
        let v = self.make_present(b, l, "value", &v);
        let ctx = self.make_attend(b, &format!("{p}/attn"), &q, &k, &v, nh, nkv, io.mask(l));
        let o = self.make_linear(
            b,
            &format!("{p}/attn/o_proj"),
            &ctx,
            Packed::t(&a.o_proj.weight),
            a.o_proj.bias.clone(),
        );
        self.make_out_norm(
            b,
            &format!("{p}/post_attention_norm"),
            &o,
            &layer.attn_out_norm,
        )
    }

    /// Gemma's norm of a sublayer's output (nothing for other families).
    fn make_out_norm(
        &self,
        b: &mut Builder<'m>,
        p: &str,
        x: &str,
        norm: &'m Option<Vec<f32>>,
    ) -> String {
        match norm {
            Some(w) => self.make_rms_norm(b, p, x, Norm::Weight(w)),
            None => x.to_string(),
        }
    }

    /// Qwen3's RMS norm over each head of `x [B, heads, S, hd]` (nothing for
    /// families without one). The weight is `[heads, 1, hd]`: one head_dim
    /// vector per head, each layer's own for its heads in a fused group, so
    /// the fused form stays exact.
    fn make_head_norm(
        &self,
        b: &mut Builder<'m>,
        p: &str,
        x: &str,
        attns: &[&'m Attention],
        heads_each: usize,
        pick: impl Fn(&'m Attention) -> &'m Option<Vec<f32>>,
    ) -> String {
        let weights: Option<Vec<&'m [f32]>> = attns
            .iter()
            .map(|&a| pick(a).as_deref())
            .collect::<Option<_>>();
        match weights {
            None => x.to_string(),
            Some(w) => self.make_rms_norm(b, p, x, Norm::Heads(w, heads_each)),
        }
    }

    /// SwiGLU `down(silu(gate(x)) * up(x))` (or GeGLU with tanh GELU) on an
    /// already normed input.
    fn make_swiglu(
        &self,
        b: &mut Builder<'m>,
        p: &str,
        gate: &str,
        up: &str,
        down: Packed<'m>,
    ) -> String {
        let act = match self.model.config.activation {
            Activation::Silu => {
                let sig = b.node(&format!("{p}/act_fn/Sigmoid"), "Sigmoid", &[gate], vec![]);
                b.node(&format!("{p}/act_fn/Mul"), "Mul", &[gate, &sig], vec![])
            }
            Activation::GeluTanh => b.node(
                &format!("{p}/act_fn/Gelu"),
                "Gelu",
                &[gate],
                vec![("approximate", Attr::Str("tanh".into()))],
            ),
        };
        let prod = b.node(&format!("{p}/Mul"), "Mul", &[&act, up], vec![]);
        self.make_matmul(b, &format!("{p}/down_proj"), &prod, down)
    }

    /// MLP sublayer of layer `l` on the residual `h`, without the residual add.
    fn make_mlp(&self, b: &mut Builder<'m>, l: usize, h: &str) -> String {
        let layer: &'m DecoderLayer = &self.model.layers[l];
        let p = format!("/model/layers.{l}");
        let hn = self.make_rms_norm(
            b,
            &format!("{p}/post_attention_layernorm"),
            h,
            Norm::Weight(&layer.post_attention_layernorm),
        );
        let down = self.make_mlp_normed(b, l, &hn);
        self.make_out_norm(
            b,
            &format!("{p}/post_feedforward_norm"),
            &down,
            &layer.mlp_out_norm,
        )
    }

    /// One original layer.
    fn make_layer(&self, b: &mut Builder<'m>, l: usize, x: &str, io: &Shared) -> String {
        let p = format!("/model/layers.{l}");
        let a = self.make_attention(b, l, x, io);
        let h = b.node(&format!("{p}/residual_attn/Add"), "Add", &[x, &a], vec![]);
        let m = self.make_mlp(b, l, &h);
        b.node(&format!("{p}/residual_mlp/Add"), "Add", &[&h, &m], vec![])
    }

    /// A parallel group as branches: every attention reads `x`, their sum
    /// is added once; then every MLP reads `h`.
    fn make_group_branches(
        &self,
        b: &mut Builder<'m>,
        layers: &[usize],
        x: &str,
        io: &Shared,
    ) -> String {
        let p = group_prefix(layers);
        let attn: Vec<String> = layers
            .iter()
            .map(|&l| self.make_attention(b, l, x, io))
            .collect();
        let sum = self.make_sum(b, &format!("{p}/attn_branches"), &attn);
        let h = b.node(&format!("{p}/residual_attn/Add"), "Add", &[x, &sum], vec![]);
        let mlp: Vec<String> = layers.iter().map(|&l| self.make_mlp(b, l, &h)).collect();
        let sum = self.make_sum(b, &format!("{p}/mlp_branches"), &mlp);
        b.node(&format!("{p}/residual_mlp/Add"), "Add", &[&h, &sum], vec![])
    }

    fn make_sum(&self, b: &mut Builder<'m>, p: &str, branches: &[String]) -> String {
        let mut acc = branches[0].clone();
        for (k, br) in branches.iter().enumerate().skip(1) {
            acc = b.node(&format!("{p}/Add_{k}"), "Add", &[&acc, br], vec![]);
        }
        acc
    }

    /// A parallel group as one wider layer (DESIGN.md section 1, fused form).
    ///
    /// ```text
    /// x ─ norm(ones) ─ MatMul[q_i q_j | k_i k_j | v_i v_j] ─ Split ─ heads, RoPE
    ///   k, v ─ Split per layer ─ Concat(past) ─ present.{l} ─ Concat ─ attention (hq = n*heads)
    ///   ─ MatMul[o_i; o_j] ─ Add(x) = h
    /// h ─ norm(ones) ─ MatMul[gate_i gate_j | up_i up_j] ─ Split ─ SwiGLU ─ MatMul[down_i; down_j] ─ Add(h)
    /// ```
    fn make_group_fused(
        &self,
        b: &mut Builder<'m>,
        layers: &[usize],
        x: &str,
        io: &Shared,
    ) -> String {
        let cfg = &self.model.config;
        let model = self.model;
        let n = layers.len();
        let (nh, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        let p = group_prefix(layers);
        let ls: Vec<&'m DecoderLayer> = layers.iter().map(|&l| &model.layers[l]).collect();

        let xn = self.make_rms_norm(b, &format!("{p}/input_layernorm"), x, Norm::Folded);
        let mut qkv_parts = Vec::new();
        for pick in [0, 1, 2] {
            for layer in &ls {
                let a = &layer.self_attn;
                let w = [&a.q_proj.weight, &a.k_proj.weight, &a.v_proj.weight][pick];
                qkv_parts.push((w, Some(layer.input_layernorm.as_slice())));
            }
        }
        // Biases follow the columns: [q_i q_j | k_i k_j | v_i v_j].
        let qkv_bias = cfg.qkv_bias.then(|| {
            let mut bias = Vec::new();
            for pick in [0, 1, 2] {
                for layer in &ls {
                    let a = &layer.self_attn;
                    let lin = [&a.q_proj, &a.k_proj, &a.v_proj][pick];
                    bias.extend_from_slice(lin.bias.as_deref().expect("qkv_bias"));
                }
            }
            bias
        });
        let qkv = self.make_linear(
            b,
            &format!("{p}/attn/qkv_proj"),
            &xn,
            Packed::Columns(qkv_parts),
            qkv_bias,
        );
        let qkv = self.make_qkv_split(b, &format!("{p}/attn/qkv_proj"), &qkv, n);
        let q = self.make_split_heads(b, &format!("{p}/attn/q_heads"), &qkv[0], n * nh);
        let k = self.make_split_heads(b, &format!("{p}/attn/k_heads"), &qkv[1], n * nkv);
        let v = self.make_split_heads(b, &format!("{p}/attn/v_heads"), &qkv[2], n * nkv);
        let attns: Vec<&'m Attention> = ls.iter().map(|l| &l.self_attn).collect();
        let q = self.make_head_norm(b, &format!("{p}/attn/q_norm"), &q, &attns, nh, |a| {
            &a.q_norm
        });
        let k = self.make_head_norm(b, &format!("{p}/attn/k_norm"), &k, &attns, nkv, |a| {
            &a.k_norm
        });
        // `fusable`: one RoPE base and one mask for the whole group.
        let first = layers[0];
        let q = self.make_rope(b, &format!("{p}/attn/q_rotary"), &q, io, first);
        let k = self.make_rope(b, &format!("{p}/attn/k_rotary"), &k, io, first);
        let per_layer = b.ints(&vec![nkv as i64; n]);
        let cat = |b: &mut Builder<'m>, kind: &str, all: &str| -> String {
            let parts = b.node_n(
                &format!("{p}/attn/{kind}/Split"),
                "Split",
                &[all, &per_layer],
                n,
                vec![("axis", Attr::Int(1))],
            );
            let presents: Vec<String> = layers
                .iter()
                .zip(&parts)
                .map(|(&l, part)| self.make_present(b, l, kind, part))
                .collect();
            let refs: Vec<&str> = presents.iter().map(String::as_str).collect();
            b.node(
                &format!("{p}/attn/{kind}/Concat"),
                "Concat",
                &refs,
                vec![("axis", Attr::Int(1))],
            )
        };
        let k = cat(b, "key", &k);
        let v = cat(b, "value", &v);
        let mask = io.mask(first);
        let ctx = self.make_attend(b, &format!("{p}/attn"), &q, &k, &v, n * nh, n * nkv, mask);
        let o_parts: Vec<&'m Matrix> = ls.iter().map(|l| &l.self_attn.o_proj.weight).collect();
        let o_bias = o_bias_sum(cfg, &ls);
        let o = self.make_linear(
            b,
            &format!("{p}/attn/o_proj"),
            &ctx,
            Packed::Rows(o_parts),
            o_bias,
        );
        let h = b.node(&format!("{p}/residual_attn/Add"), "Add", &[x, &o], vec![]);

        let hn = self.make_rms_norm(
            b,
            &format!("{p}/post_attention_layernorm"),
            &h,
            Norm::Folded,
        );
        let m = self.make_fused_mlp(b, &p, &ls, &hn);
        b.node(&format!("{p}/residual_mlp/Add"), "Add", &[&h, &m], vec![])
    }

    /// The MLPs of a group on the weightless-normed `hn`: norm weights folded
    /// into one `[gate_i gate_j | up_i up_j]` MatMul, SwiGLU, stacked down_proj.
    fn make_fused_mlp(
        &self,
        b: &mut Builder<'m>,
        p: &str,
        ls: &[&'m DecoderLayer],
        hn: &str,
    ) -> String {
        let mut gu_parts = Vec::new();
        for pick in [0, 1] {
            for layer in ls {
                let w = [&layer.mlp.gate_proj.weight, &layer.mlp.up_proj.weight][pick];
                gu_parts.push((w, Some(layer.post_attention_layernorm.as_slice())));
            }
        }
        let i = (ls.len() * self.model.config.intermediate_size) as i64;
        let gu = self.make_matmul(
            b,
            &format!("{p}/mlp/gate_up_proj"),
            hn,
            Packed::Columns(gu_parts),
        );
        let sizes = b.ints(&[i, i]);
        let gu = b.node_n(
            &format!("{p}/mlp/gate_up_proj/Split"),
            "Split",
            &[&gu, &sizes],
            2,
            vec![("axis", Attr::Int(-1))],
        );
        let down: Vec<&'m Matrix> = ls.iter().map(|l| &l.mlp.down_proj.weight).collect();
        self.make_swiglu(b, &format!("{p}/mlp"), &gu[0], &gu[1], Packed::Rows(down))
    }

    /// Layer `l`'s MLP on its already normed input `hn` (no output norm).
    fn make_mlp_normed(&self, b: &mut Builder<'m>, l: usize, hn: &str) -> String {
        let m = &self.model.layers[l].mlp;
        let p = format!("/model/layers.{l}/mlp");
        let gate = self.make_matmul(
            b,
            &format!("{p}/gate_proj"),
            hn,
            Packed::t(&m.gate_proj.weight),
        );
        let up = self.make_matmul(b, &format!("{p}/up_proj"), hn, Packed::t(&m.up_proj.weight));
        self.make_swiglu(b, &p, &gate, &up, Packed::t(&m.down_proj.weight))
    }
}

/// The stacked o_proj of a fused group sums the layers' products, so their
/// biases add up.
fn o_bias_sum(cfg: &crate::checkpoint::ModelConfig, ls: &[&DecoderLayer]) -> Option<Vec<f32>> {
    cfg.o_bias.then(|| {
        let mut sum = vec![0f32; cfg.hidden_size];
        for l in ls {
            let bias = l.self_attn.o_proj.bias.as_deref().expect("o_bias");
            sum.iter_mut().zip(bias).for_each(|(s, &v)| *s += v);
        }
        sum
    })
}

/// The initializer name of node prefix `p`'s `kind` (`weight`, `bias`):
/// `/model/layers.3/attn/qkv_proj` -> `model.layers.3.attn.qkv_proj.weight`.
fn param_name(p: &str, kind: &str) -> String {
    format!("{}.{kind}", p.trim_start_matches('/').replace('/', "."))
}

fn group_prefix(layers: &[usize]) -> String {
    let names: Vec<String> = layers.iter().map(|l| l.to_string()).collect();
    format!("/model/parallel.{}", names.join("-"))
}

/// A MatMul weight `[in, out]` made from Hugging Face `[out, in]` matrices.
enum Packed<'m> {
    /// Several matrices side by side (output columns concatenated), each
    /// optionally with an RMSNorm weight folded into its input rows.
    Columns(Vec<(&'m Matrix, Option<&'m [f32]>)>),
    /// Several matrices stacked along the input (rows), so one MatMul sums
    /// their products.
    Rows(Vec<&'m Matrix>),
}

impl<'m> Packed<'m> {
    fn t(m: &'m Matrix) -> Self {
        Packed::Columns(vec![(m, None)])
    }
    fn rows(&self) -> usize {
        match self {
            Packed::Columns(parts) => parts[0].0.cols,
            Packed::Rows(parts) => parts.iter().map(|m| m.cols).sum(),
        }
    }
    fn cols(&self) -> usize {
        match self {
            Packed::Columns(parts) => parts.iter().map(|(m, _)| m.rows).sum(),
            Packed::Rows(parts) => parts[0].rows,
        }
    }
    fn values(&self) -> Vec<f32> {
        match self {
            Packed::Columns(parts) => {
                let (k, n) = (self.rows(), self.cols());
                let mut out = vec![0f32; k * n];
                let mut col0 = 0;
                for (m, norm) in parts {
                    for o in 0..m.rows {
                        let src = m.row(o);
                        for (i, &w) in src.iter().enumerate() {
                            let s = norm.map_or(1.0, |g| g[i]);
                            out[i * n + col0 + o] = w * s;
                        }
                    }
                    col0 += m.rows;
                }
                out
            }
            Packed::Rows(parts) => {
                let mut out = Vec::with_capacity(self.rows() * self.cols());
                for m in parts {
                    out.extend(transposed(m));
                }
                out
            }
        }
    }
}

/// `[rows, cols] -> [cols, rows]`, in cache-sized tiles.
fn transposed(m: &Matrix) -> Vec<f32> {
    const TILE: usize = 64;
    let (r, c) = (m.rows, m.cols);
    let mut out = vec![0f32; r * c];
    for r0 in (0..r).step_by(TILE) {
        for c0 in (0..c).step_by(TILE) {
            for i in r0..(r0 + TILE).min(r) {
                for j in c0..(c0 + TILE).min(c) {
                    out[j * r + i] = m.data[i * c + j];
                }
            }
        }
    }
    out
}
