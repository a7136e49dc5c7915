//! `--ops ort`: the decoder written with ONNX Runtime's fused operators, the
//! way the onnxruntime-genai model builder writes it, keeping the I/O contract
//! and one KV cache per original layer:
//!
//! - `SimplifiedLayerNormalization` (default domain) for the first norm and
//!   `SkipSimplifiedLayerNormalization` (`com.microsoft`) for every later one:
//!   it adds the pending sublayer output to the residual and normalises the sum
//!   in one op (output 0: the normed sum, output 3: the sum; outputs 1 and 2
//!   left unnamed, so not computed);
//! - one packed QKV MatMul per layer (per group in the fused form, laid out
//!   `[q_i k_i v_i | q_j k_j v_j]` and split per layer) feeding one
//!   `GroupQueryAttention` (`com.microsoft`) per layer, which applies RoPE
//!   (`do_rotary`), appends to the layer's cache and attends;
//! - one packed gate/up MatMul per layer (per group), split, and the down
//!   MatMul after SwiGLU (GeGLU for Gemma), as in the portable op set (the
//!   shared makers of [`super::decoder`]);
//! - Qwen3's and Gemma's per-head q/k norms as `SimplifiedLayerNormalization`
//!   over `[B, S, heads, head_dim]` between the QKV MatMul and
//!   `GroupQueryAttention` (which then takes query, key and value apart and
//!   rotates the normed heads), and Gemma's norms of each sublayer's output as
//!   `SimplifiedLayerNormalization` before the residual add.
//!
//! `position_ids` stays a graph input (the contract) but is not read:
//! `GroupQueryAttention` takes positions from the cache length.
//!
//! Branches are written stage by stage (every branch's norm, then every
//! branch's attention, then every output projection), the order the
//! onnxruntime-genai builder uses.

use super::contract::{self, ATTENTION_MASK};
use super::decoder::{param_name, Decoder, Packed};
use super::lp::{layer_prefix, BranchOrder, OpSet};
use super::{Attr, Builder, ElemType};
use crate::model::Rope;

/// `GroupQueryAttention` input slots (ONNX Runtime contrib operator spec):
/// `0 query` (packed `[B, S, (heads + 2 kv_heads) * head_dim]` when key and
/// value are empty), `1 key`, `2 value` (empty), `3 past_key`, `4 past_value`
/// (`[B, kv_heads, past, head_dim]`), `5 seqlens_k` (int32 `[B]`: valid
/// tokens - 1), `6 total_sequence_length` (int32 scalar), `7 cos_cache`,
/// `8 sin_cache` (`[max_position, head_dim / 2]`); the optional `9
/// position_ids`, `10 attention_bias`, `11 head_sink` are left out. Outputs:
/// `0 output [B, S, heads * head_dim]`, `1 present_key`, `2 present_value`.
const GQA_INPUTS: usize = 9;

/// The residual stream: its value and the sublayer output not yet added.
pub(super) struct Residual {
    value: String,
    pending: Option<String>,
}

/// `GroupQueryAttention`'s length inputs, shared by every layer.
struct Lengths {
    seqlens_k: String,
    total: String,
}

/// The ort op set: the shared makers, the length inputs and, per layer, its
/// RoPE `cos` and `sin` caches.
pub(super) struct Ort<'m> {
    d: Decoder<'m>,
    lengths: Lengths,
    ropes: Vec<(String, String)>,
}

impl<'m> OpSet<'m> for Ort<'m> {
    type Residual = Residual;
    const BRANCH_ORDER: BranchOrder = BranchOrder::StageByStage;

    fn start(d: Decoder<'m>, b: &mut Builder<'m>) -> Self {
        let lengths = make_lengths(b);
        let ropes = (0..d.model.config.num_hidden_layers)
            .map(|l| make_half_caches(&d, b, l))
            .collect();
        Ort { d, lengths, ropes }
    }

    fn residual_stream(&self, embedding: String) -> Residual {
        Residual {
            value: embedding,
            pending: None,
        }
    }

    fn residual_norm(
        &mut self,
        b: &mut Builder<'m>,
        p: &str,
        r: &mut Residual,
        weight: Option<&'m [f32]>,
    ) -> String {
        norm(&self.d, b, r, p, weight)
    }

    fn output_norm(&mut self, b: &mut Builder<'m>, p: &str, x: &str, weight: &'m [f32]) -> String {
        let w = b.weight(
            &param_name(p, "weight"),
            vec![weight.len()],
            Box::new(move || weight.to_vec()),
        );
        simplified_norm(&self.d, b, p, x, &w)
    }

    /// The sublayer output is added by the next norm
    /// (`SkipSimplifiedLayerNormalization`).
    fn residual_add(&mut self, _b: &mut Builder<'m>, _p: &str, r: &mut Residual, out: &str) {
        debug_assert!(r.pending.is_none(), "a residual add not read by a norm");
        r.pending = Some(out.to_string());
    }

    /// One layer: its packed `[q | k | v]` MatMul and `GroupQueryAttention`.
    /// A fused group: one MatMul `[q_i k_i v_i | q_j k_j v_j]` (input norm
    /// weights folded in), split per layer, one `GroupQueryAttention` per
    /// layer, contexts concatenated.
    fn attention(&mut self, b: &mut Builder<'m>, p: &str, layers: &[usize], xn: &str) -> String {
        let d = self.d;
        let cfg = &d.model.config;
        let p_qkv = format!("{p}/attn/qkv_proj");
        if let [l] = layers {
            let (parts, bias) = d.qkv_columns(&d.model.layers[*l], false);
            let qkv = d.make_linear(b, &p_qkv, xn, Packed::Columns(parts), bias);
            return self.make_group_query_attention(b, *l, &qkv);
        }
        let packed = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim;
        let mut parts = Vec::new();
        let mut bias = Vec::new();
        for &l in layers {
            let (pa, bi) = d.qkv_columns(&d.model.layers[l], true);
            parts.extend(pa);
            bias.extend(bi.unwrap_or_default());
        }
        let bias = cfg.qkv_bias.then_some(bias);
        let all = d.make_linear(b, &p_qkv, xn, Packed::Columns(parts), bias);
        let sizes = b.ints(&vec![packed as i64; layers.len()]);
        let per_layer = b.node_n(
            &format!("{p_qkv}/Split"),
            "Split",
            &[&all, &sizes],
            layers.len(),
            vec![("axis", Attr::Int(-1))],
        );
        let contexts: Vec<String> = layers
            .iter()
            .zip(&per_layer)
            .map(|(&l, part)| self.make_group_query_attention(b, l, part))
            .collect();
        let refs: Vec<&str> = contexts.iter().map(String::as_str).collect();
        b.node(
            &format!("{p}/attn/Concat"),
            "Concat",
            &refs,
            vec![("axis", Attr::Int(-1))],
        )
    }
}

impl<'m> Ort<'m> {
    /// Layer `l`'s `GroupQueryAttention` on its packed `[q | k | v]`
    /// projection, reading `past_key_values.{l}` and writing `present.{l}`.
    fn make_group_query_attention(&self, b: &mut Builder<'m>, l: usize, qkv: &str) -> String {
        let d = &self.d;
        let cfg = &d.model.config;
        let (nh, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        let (cos, sin) = &self.ropes[l];
        let past_k = contract::past_key(l);
        let past_v = contract::past_value(l);
        let [q, k, v] = attention_inputs(d, b, l, qkv);
        let inputs: [&str; GQA_INPUTS] = [
            &q,
            &k,
            &v,
            &past_k,
            &past_v,
            &self.lengths.seqlens_k,
            &self.lengths.total,
            cos,
            sin,
        ];
        let name = format!("{}/attn/GroupQueryAttention", layer_prefix(l));
        // The same count as Hugging Face's `sliding_window` (checked against
        // the reference on a Mistral with window 5: `w - 1` is off by one).
        let window = cfg.window_of(l).map_or(-1, |w| w as i64);
        b.push_outputs(
            &name,
            "GroupQueryAttention",
            &inputs,
            vec![
                format!("{name}/output_0"),
                contract::present_key(l),
                contract::present_value(l),
            ],
            vec![
                ("num_heads", Attr::Int(nh as i64)),
                ("kv_num_heads", Attr::Int(nkv as i64)),
                ("scale", Attr::Float(cfg.query_scale as f32)),
                ("local_window_size", Attr::Int(window)),
                ("do_rotary", Attr::Int(1)),
                ("rotary_interleaved", Attr::Int(0)),
            ],
        );
        format!("{name}/output_0")
    }
}

/// `seqlens_k = ReduceSum(attention_mask) - 1` and `total_sequence_length =
/// Shape(attention_mask)[1]`, both int32.
fn make_lengths(b: &mut Builder) -> Lengths {
    let p = "/model/attn_mask_reformat";
    let int32 = || vec![("to", Attr::Type(ElemType::I32))];
    let axes = b.ints(&[1]);
    let sum = b.node(
        &format!("{p}/ReduceSum"),
        "ReduceSum",
        &[ATTENTION_MASK, &axes],
        vec![("keepdims", Attr::Int(0))],
    );
    let one = b.ints(&[1]);
    let last = b.node(&format!("{p}/Sub"), "Sub", &[&sum, &one], vec![]);
    let seqlens_k = b.node(&format!("{p}/Sub/Cast"), "Cast", &[&last], int32());
    let shape = b.node(&format!("{p}/Shape"), "Shape", &[ATTENTION_MASK], vec![]);
    let index = b.const_i64(&[1], &[]);
    let t = b.node(
        &format!("{p}/Gather"),
        "Gather",
        &[&shape, &index],
        vec![("axis", Attr::Int(0))],
    );
    let total = b.node(&format!("{p}/Gather/Cast"), "Cast", &[&t], int32());
    Lengths { seqlens_k, total }
}

/// `cos` and `sin` of layer `l`'s RoPE base, `[max_position, head_dim / 2]`
/// (one pair of tables per distinct base).
fn make_half_caches<'m>(d: &Decoder<'m>, b: &mut Builder<'m>, l: usize) -> (String, String) {
    let cfg = &d.model.config;
    let theta = cfg.rope_theta_of(l);
    let tag = if theta == cfg.rope_theta {
        String::new()
    } else {
        format!("_{theta}")
    };
    let (positions, half) = (cfg.max_position_embeddings, cfg.head_dim / 2);
    let rope = Rope::of_layer(cfg, l);
    let mut out = Vec::new();
    for (name, sin) in [("cos", false), ("sin", true)] {
        let name = format!("{name}_cache{tag}");
        if !b.has(&name) {
            let rope = rope.clone();
            let full = move || -> Vec<f32> {
                rope.table(positions, sin)
                    .chunks_exact(2 * half)
                    .flat_map(|row| row[..half].to_vec())
                    .collect()
            };
            b.weight(&name, vec![positions, half], Box::new(full));
        }
        out.push(name);
    }
    let sin = out.pop().expect("two tables");
    (out.pop().expect("two tables"), sin)
}

/// The normed residual with `weight` (ones when `None`: folded into the next
/// MatMul), adding the pending sublayer output first.
fn norm<'m>(
    d: &Decoder<'m>,
    b: &mut Builder<'m>,
    r: &mut Residual,
    p: &str,
    weight: Option<&'m [f32]>,
) -> String {
    let cfg = &d.model.config;
    let h = cfg.hidden_size;
    let name = param_name(p, "weight");
    let w = match weight {
        Some(w) => b.weight(&name, vec![h], Box::new(move || w.to_vec())),
        None => b.weight(&name, vec![h], Box::new(move || vec![1.0; h])),
    };
    match r.pending.take() {
        None => simplified_norm(d, b, p, &r.value, &w),
        Some(pending) => {
            let eps = Attr::Float(cfg.rms_norm_eps as f32);
            // Outputs 1 and 2 (mean, inverse standard deviation) are left
            // unnamed, as the builder's export does: ONNX Runtime then
            // neither computes nor allocates them (measured: the op took 40%
            // longer in decode with them).
            let name = format!("{p}/SkipSimplifiedLayerNormalization");
            let (normed, sum) = (format!("{name}/output_0"), format!("{name}/output_3"));
            b.push_outputs(
                &name,
                "SkipSimplifiedLayerNormalization",
                &[&r.value, &pending, &w],
                vec![normed.clone(), String::new(), String::new(), sum.clone()],
                vec![("epsilon", eps)],
            );
            r.value = sum;
            normed
        }
    }
}

/// `SimplifiedLayerNormalization` of `x` over its last axis with the
/// initializer `w`.
fn simplified_norm(d: &Decoder, b: &mut Builder, p: &str, x: &str, w: &str) -> String {
    b.node(
        &format!("{p}/SimplifiedLayerNormalization"),
        "SimplifiedLayerNormalization",
        &[x, w],
        vec![
            ("epsilon", Attr::Float(d.model.config.rms_norm_eps as f32)),
            ("axis", Attr::Int(-1)),
            ("stash_type", Attr::Int(1)),
        ],
    )
}

/// `GroupQueryAttention`'s query, key and value inputs for layer `l` from its
/// packed `[q | k | v]` projection: the packed tensor itself (key and value
/// empty), or, with per-head q/k norms, the three parts with q and k normed
/// over each head (`[B, S, heads, head_dim]`, one `[head_dim]` weight).
fn attention_inputs<'m>(
    d: &Decoder<'m>,
    b: &mut Builder<'m>,
    l: usize,
    packed: &str,
) -> [String; 3] {
    let cfg = &d.model.config;
    let a = &d.model.layers[l].self_attn;
    let (Some(q_norm), Some(k_norm)) = (&a.q_norm, &a.k_norm) else {
        return [packed.to_string(), String::new(), String::new()];
    };
    let (nh, nkv, hd) = (
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
    );
    let p = format!("{}/attn", layer_prefix(l));
    let mut qkv = d.make_qkv_split(b, &format!("{p}/qkv_proj"), packed, 1);
    for (i, name, heads, w) in [(0, "q_norm", nh, q_norm), (1, "k_norm", nkv, k_norm)] {
        let pn = format!("{p}/{name}");
        let split = b.ints(&[0, 0, heads as i64, hd as i64]);
        let x = b.node(
            &format!("{pn}/Reshape"),
            "Reshape",
            &[&qkv[i], &split],
            vec![],
        );
        let w = b.weight(
            &param_name(&pn, "weight"),
            vec![hd],
            Box::new(move || w.clone()),
        );
        let normed = simplified_norm(d, b, &pn, &x, &w);
        let merge = b.ints(&[0, 0, (heads * hd) as i64]);
        qkv[i] = b.node(
            &format!("{pn}/Reshape_1"),
            "Reshape",
            &[&normed, &merge],
            vec![],
        );
    }
    let v = qkv.pop().expect("three parts");
    let k = qkv.pop().expect("three parts");
    [qkv.pop().expect("three parts"), k, v]
}
