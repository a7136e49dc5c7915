//! `--ops portable`: the decoder in plain ONNX operators (opset 21), which
//! every runtime loads; ONNX Runtime's optimiser fuses its RMS norm pattern
//! into `SimplifiedLayerNormalization`.
//!
//! Attention is written out: a packed QKV MatMul, a Split, heads reshaped
//! and transposed to `[B, heads, S, hd]`, per-head q/k norms (Qwen3, Gemma),
//! RoPE in the `rotate_half` convention, the KV cache grown by `Concat`
//! (`present.{l}` = `Concat(past.{l}, new)`), and grouped-query attention
//! that reads each KV head once. One RoPE table pair and one additive mask
//! per kind of layer (Gemma 3: local and global).
//!
//! A fused group's attention is one attention over the heads of all its
//! layers: the packed projection is `[q_i q_j | k_i k_j | v_i v_j]`, so the
//! query heads are `[A; B]` and each still reads its own layer's KV heads;
//! the keys and values are split per layer into that layer's cache.

use super::contract::{self, ATTENTION_MASK, INPUT_IDS, POSITION_IDS};
use super::decoder::{param_name, Decoder, Packed};
use super::lp::{layer_prefix, BranchOrder, OpSet};
use super::{Attr, Builder, ElemType};
use crate::model::{Attention, DecoderLayer, Rope};

/// Lowest finite value of the float type: the additive mask of hidden keys.
fn mask_fill(float: ElemType) -> f32 {
    match float {
        ElemType::F16 => -65504.0,
        _ => f32::MIN,
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

/// The portable op set: the shared makers, and per layer its RoPE `cos`,
/// `sin` and its attention mask.
pub(super) struct Portable<'m> {
    d: Decoder<'m>,
    layers: Vec<(String, String, String)>,
}

impl<'m> OpSet<'m> for Portable<'m> {
    type Residual = String;
    const BRANCH_ORDER: BranchOrder = BranchOrder::WholeBranches;

    fn start(d: Decoder<'m>, b: &mut Builder<'m>) -> Self {
        let mut ops = Portable {
            d,
            layers: Vec::new(),
        };
        let cfg = &d.model.config;
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
                let (cos, sin) = ops.make_rope_caches(b, first, &tag);
                let mask = ops.make_attention_mask(b, window, &tag);
                (cos, sin, mask)
            })
            .collect();
        ops.layers = kind_of.iter().map(|&k| per_kind[k].clone()).collect();
        ops
    }

    fn residual_stream(&self, embedding: String) -> String {
        embedding
    }

    fn residual_norm(
        &mut self,
        b: &mut Builder<'m>,
        p: &str,
        r: &mut String,
        weight: Option<&'m [f32]>,
    ) -> String {
        let norm = match weight {
            Some(w) => Norm::Weight(w),
            None => Norm::Folded,
        };
        self.make_rms_norm(b, p, r, norm)
    }

    fn output_norm(&mut self, b: &mut Builder<'m>, p: &str, x: &str, weight: &'m [f32]) -> String {
        self.make_rms_norm(b, p, x, Norm::Weight(weight))
    }

    fn residual_add(&mut self, b: &mut Builder<'m>, p: &str, r: &mut String, out: &str) {
        *r = b.node(&format!("{p}/Add"), "Add", &[r, out], vec![]);
    }

    /// ```text
    /// xn ─ MatMul[q | k | v] ─ Split ─ heads ─ q/k head norms ─ RoPE
    ///    k, v ─ Concat(past) = present.{l} ─ attention ─ context [B, S, n*heads*hd]
    /// ```
    /// For a fused group the keys and values are split per layer before the
    /// cache and concatenated after it.
    fn attention(&mut self, b: &mut Builder<'m>, p: &str, layers: &[usize], xn: &str) -> String {
        let d = self.d;
        let cfg = &d.model.config;
        let n = layers.len();
        let (nh, nkv, hd) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );
        let ls: Vec<&'m DecoderLayer> = layers.iter().map(|&l| &d.model.layers[l]).collect();
        let (parts, bias) = if n == 1 {
            d.qkv_columns(ls[0], false)
        } else {
            // [q_i q_j | k_i k_j | v_i v_j], biases following their columns.
            let per: Vec<_> = ls.iter().map(|l| d.qkv_columns(l, true)).collect();
            let spans = [
                (0, nh * hd),
                (nh * hd, nkv * hd),
                ((nh + nkv) * hd, nkv * hd),
            ];
            let parts = (0..3)
                .flat_map(|pick| per.iter().map(move |(cols, _)| cols[pick]))
                .collect();
            let bias = cfg.qkv_bias.then(|| {
                spans
                    .iter()
                    .flat_map(|&(at, len)| {
                        per.iter().flat_map(move |(_, bias)| {
                            bias.as_deref().expect("qkv_bias")[at..at + len]
                                .iter()
                                .copied()
                        })
                    })
                    .collect()
            });
            (parts, bias)
        };
        let p_qkv = format!("{p}/attn/qkv_proj");
        let qkv = d.make_linear(b, &p_qkv, xn, Packed::Columns(parts), bias);
        let qkv = d.make_qkv_split(b, &p_qkv, &qkv, n);
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
        // A fused group has one RoPE base and one mask (`lp::fusable`).
        let first = layers[0];
        let q = self.make_rope(b, &format!("{p}/attn/q_rotary"), &q, first);
        let k = self.make_rope(b, &format!("{p}/attn/k_rotary"), &k, first);
        let (k, v) = if n == 1 {
            (
                self.make_present(b, first, "key", &k),
                self.make_present(b, first, "value", &v),
            )
        } else {
            (
                self.make_group_present(b, p, layers, "key", &k),
                self.make_group_present(b, p, layers, "value", &v),
            )
        };
        let mask = self.layers[first].2.clone();
        self.make_attend(b, &format!("{p}/attn"), &q, &k, &v, n * nh, n * nkv, &mask)
    }
}

impl<'m> Portable<'m> {
    /// `cos`/`sin` tables `[max_position, head_dim]` gathered by `position_ids`
    /// and unsqueezed to `[batch, 1, seq, head_dim]`.
    /// Of layer `l`'s RoPE base; `tag` tells the tables of each base apart.
    fn make_rope_caches(&self, b: &mut Builder<'m>, l: usize, tag: &str) -> (String, String) {
        let cfg = &self.d.model.config;
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
        let cfg = &self.d.model.config;
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
            vec![("to", Attr::Type(ElemType::Bool))],
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
        let fill = b.scalar(mask_fill(self.d.float));
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
        let h = self.d.model.config.hidden_size;
        let f16 = self.d.float == ElemType::F16;
        let x = if f16 {
            b.node(
                &format!("{p}/Cast"),
                "Cast",
                &[x],
                vec![("to", Attr::Type(ElemType::F32))],
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
        let eps = b.scalar_f32(self.d.model.config.rms_norm_eps as f32);
        let add = b.node(&format!("{p}/Add"), "Add", &[&mean, &eps], vec![]);
        let sqrt = b.node(&format!("{p}/Sqrt"), "Sqrt", &[&add], vec![]);
        let mut div = b.node(&format!("{p}/Div"), "Div", &[x, &sqrt], vec![]);
        if f16 {
            div = b.node(
                &format!("{p}/Cast_1"),
                "Cast",
                &[&div],
                vec![("to", Attr::Type(ElemType::F16))],
            );
        }
        let weight_name = param_name(p, "weight");
        let w = match norm {
            Norm::Weight(w) => b.weight(&weight_name, vec![h], Box::new(move || w.to_vec())),
            Norm::Folded => b.weight(&weight_name, vec![h], Box::new(move || vec![1.0; h])),
            Norm::Heads(parts, heads_each) => {
                let hd = self.d.model.config.head_dim;
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

    /// `[B, S, heads*hd] -> [B, heads, S, hd]`.
    fn make_split_heads(&self, b: &mut Builder<'m>, p: &str, x: &str, heads: usize) -> String {
        let hd = self.d.model.config.head_dim as i64;
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
    fn make_rope(&self, b: &mut Builder<'m>, p: &str, x: &str, l: usize) -> String {
        let half = (self.d.model.config.head_dim / 2) as i64;
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
        let a = b.node(
            &format!("{p}/Mul_cos"),
            "Mul",
            &[x, &self.layers[l].0],
            vec![],
        );
        let c = b.node(
            &format!("{p}/Mul_sin"),
            "Mul",
            &[&rot, &self.layers[l].1],
            vec![],
        );
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
            &format!("{}/attn/{kind}/Concat", layer_prefix(l)),
            "Concat",
            &[&past, new],
            &present,
            vec![("axis", Attr::Int(2))],
        )
    }

    /// A fused group's new keys or values `[B, n*kv_heads, S, hd]`, split
    /// per layer, appended to each layer's cache and concatenated again.
    fn make_group_present(
        &self,
        b: &mut Builder<'m>,
        p: &str,
        layers: &[usize],
        kind: &str,
        all: &str,
    ) -> String {
        let n = layers.len();
        let per_layer = b.ints(&vec![self.d.model.config.num_key_value_heads as i64; n]);
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
        let hd = self.d.model.config.head_dim as i64;
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
        let scale = b.scalar(self.d.model.config.query_scale as f32);
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
}
