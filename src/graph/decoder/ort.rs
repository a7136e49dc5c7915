//! `--ops ort`: the decoder written with ONNX Runtime's fused operators, the
//! way the onnxruntime-genai model builder writes it, keeping the I/O contract
//! and one KV cache per original layer:
//!
//! - `SimplifiedLayerNormalization` (default domain) for the first norm and
//!   `SkipSimplifiedLayerNormalization` (`com.microsoft`) for every later one:
//!   it adds the pending sublayer output to the residual and normalises the sum
//!   in one op (output 0: the normed sum, output 3: the sum);
//! - one packed QKV MatMul per layer (per group in the fused form) feeding
//!   `GroupQueryAttention` (`com.microsoft`), which applies RoPE (`do_rotary`),
//!   appends to the layer's cache and attends;
//! - gate/up and down MatMuls with SwiGLU (GeGLU for Gemma), packed across a
//!   group in the fused form exactly as in the portable fused form;
//! - Qwen3's and Gemma's per-head q/k norms as `SimplifiedLayerNormalization`
//!   over `[B, S, heads, head_dim]` between the QKV MatMul and
//!   `GroupQueryAttention` (which then takes query, key and value apart and
//!   rotates the normed heads), and Gemma's norms of each sublayer's output as
//!   `SimplifiedLayerNormalization` before the residual add.
//!
//! `position_ids` stays a graph input (the contract) but is not read:
//! `GroupQueryAttention` takes positions from the cache length.

use super::*;

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
struct Residual {
    value: String,
    pending: Option<String>,
}

/// What every layer reads: per layer, its RoPE caches; the GQA length inputs.
struct Lengths {
    seqlens_k: String,
    total: String,
}

pub(super) fn build<'m>(d: &Decoder<'m>, b: &mut Builder<'m>, plan: &Plan, form: Form) -> String {
    let cfg = &d.model.config;
    let x = d.make_embedding(b);
    let lengths = make_lengths(b);
    let ropes: Vec<(String, String)> = (0..cfg.num_hidden_layers)
        .map(|l| make_half_caches(d, b, l))
        .collect();
    let mut r = Residual {
        value: x,
        pending: None,
    };
    for step in &plan.steps {
        match step {
            Step::Layer(l) => layer(d, b, &mut r, &[*l], false, &lengths, &ropes),
            // `form` is already what `written_form` allows.
            Step::Parallel(g) => {
                let fused = form == Form::Fused;
                layer(d, b, &mut r, &g.layers, fused, &lengths, &ropes)
            }
        }
    }
    norm(d, b, &mut r, "/model/norm", Some(&d.model.norm))
}

/// `seqlens_k = ReduceSum(attention_mask) - 1` and `total_sequence_length =
/// Shape(attention_mask)[1]`, both int32.
fn make_lengths(b: &mut Builder) -> Lengths {
    let p = "/model/attn_mask_reformat";
    let int32 = || vec![("to", Attr::Int(crate::onnx::proto::data_type::INT32 as i64))];
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
            let outs = b.node_n(
                &format!("{p}/SkipSimplifiedLayerNormalization"),
                "SkipSimplifiedLayerNormalization",
                &[&r.value, &pending, &w],
                4,
                vec![("epsilon", eps)],
            );
            r.value = outs[3].clone();
            outs[0].clone()
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

/// Gemma's norm of a sublayer's output `x` (nothing for other families).
fn out_norm<'m>(
    d: &Decoder<'m>,
    b: &mut Builder<'m>,
    p: &str,
    x: String,
    weight: &'m Option<Vec<f32>>,
) -> String {
    match weight {
        None => x,
        Some(w) => {
            let w = b.weight(
                &param_name(p, "weight"),
                vec![w.len()],
                Box::new(move || w.clone()),
            );
            simplified_norm(d, b, p, &x, &w)
        }
    }
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
    let p = format!("/model/layers.{l}/attn");
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

/// Each branch's own norm of the residual, `weight(layer)` and named
/// `/model/layers.{l}/{name}`: the first adds the pending sublayer output, the
/// others read the sum it leaves in `r`.
fn branch_norms<'m>(
    d: &Decoder<'m>,
    b: &mut Builder<'m>,
    r: &mut Residual,
    layers: &[usize],
    name: &str,
    weight: impl Fn(&'m DecoderLayer) -> &'m [f32],
) -> Vec<String> {
    let mut out = Vec::new();
    for &l in layers {
        let p = format!("/model/layers.{l}/{name}");
        let w = Some(weight(&d.model.layers[l]));
        out.push(norm(d, b, r, &p, w));
        // `norm` has cleared `r.pending`: the next branch norms the same sum.
    }
    out
}

/// One original layer (`layers` of one) or a parallel group, as branches
/// (each layer its own norms and MatMuls, outputs summed) or fused (one
/// normalisation, norm weights folded into packed MatMuls across the group).
#[allow(clippy::too_many_arguments)]
fn layer<'m>(
    d: &Decoder<'m>,
    b: &mut Builder<'m>,
    r: &mut Residual,
    layers: &[usize],
    fused: bool,
    lengths: &Lengths,
    ropes: &[(String, String)],
) {
    let cfg = &d.model.config;
    let model: &'m Model = d.model;
    let (nh, nkv, hd) = (
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
    );
    let packed = (nh + 2 * nkv) * hd;
    let p = if layers.len() == 1 {
        format!("/model/layers.{}", layers[0])
    } else {
        group_prefix(layers)
    };
    let ls: Vec<&'m DecoderLayer> = layers.iter().map(|&l| &model.layers[l]).collect();
    let attend = |b: &mut Builder<'m>, l: usize, qkv: &str| -> String {
        let (cos, sin) = &ropes[l];
        let past_k = contract::past_key(l);
        let past_v = contract::past_value(l);
        let [q, k, v] = attention_inputs(d, b, l, qkv);
        let inputs: [&str; GQA_INPUTS] = [
            &q,
            &k,
            &v,
            &past_k,
            &past_v,
            &lengths.seqlens_k,
            &lengths.total,
            cos,
            sin,
        ];
        let name = format!("/model/layers.{l}/attn/GroupQueryAttention");
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
    };

    // Attention sublayers, all reading the same residual.
    let contexts: Vec<String> = if fused {
        let xn = norm(d, b, r, &format!("{p}/input_layernorm"), None);
        let mut parts = Vec::new();
        let mut bias = Vec::new();
        for &layer in &ls {
            let (pa, bi) = d.qkv_columns(layer, true);
            parts.extend(pa);
            bias.extend(bi.unwrap_or_default());
        }
        let bias = cfg.qkv_bias.then_some(bias);
        let all = d.make_linear(
            b,
            &format!("{p}/attn/qkv_proj"),
            &xn,
            Packed::Columns(parts),
            bias,
        );
        let sizes = b.ints(&vec![packed as i64; layers.len()]);
        let per_layer = b.node_n(
            &format!("{p}/attn/qkv_proj/Split"),
            "Split",
            &[&all, &sizes],
            layers.len(),
            vec![("axis", Attr::Int(-1))],
        );
        layers
            .iter()
            .zip(&per_layer)
            .map(|(&l, part)| attend(b, l, part))
            .collect()
    } else {
        let normed = branch_norms(d, b, r, layers, "input_layernorm", |l| &l.input_layernorm);
        let mut outs = Vec::new();
        for ((&l, &layer), xn) in layers.iter().zip(&ls).zip(&normed) {
            let (parts, bias) = d.qkv_columns(layer, false);
            let q = d.make_linear(
                b,
                &format!("/model/layers.{l}/attn/qkv_proj"),
                xn,
                Packed::Columns(parts),
                bias,
            );
            outs.push(attend(b, l, &q));
        }
        outs
    };
    let attn_out = if fused {
        let refs: Vec<&str> = contexts.iter().map(String::as_str).collect();
        let ctx = b.node(
            &format!("{p}/attn/Concat"),
            "Concat",
            &refs,
            vec![("axis", Attr::Int(-1))],
        );
        let o: Vec<&'m Matrix> = ls.iter().map(|l| &l.self_attn.o_proj.weight).collect();
        let bias = o_bias_sum(cfg, &ls);
        d.make_linear(b, &format!("{p}/attn/o_proj"), &ctx, Packed::Rows(o), bias)
    } else {
        let outs: Vec<String> = layers
            .iter()
            .zip(&ls)
            .zip(&contexts)
            .map(|((&l, layer), ctx)| {
                let a = &layer.self_attn;
                let o = d.make_linear(
                    b,
                    &format!("/model/layers.{l}/attn/o_proj"),
                    ctx,
                    Packed::t(&a.o_proj.weight),
                    a.o_proj.bias.clone(),
                );
                let p = format!("/model/layers.{l}/post_attention_norm");
                out_norm(d, b, &p, o, &layer.attn_out_norm)
            })
            .collect();
        d.make_sum(b, &format!("{p}/attn_branches"), &outs)
    };
    r.pending = Some(attn_out);

    // MLP sublayers, all reading the same residual.
    let mlp_out = if fused {
        let hn = norm(d, b, r, &format!("{p}/post_attention_layernorm"), None);
        d.make_fused_mlp(b, &p, &ls, &hn)
    } else {
        let normed = branch_norms(d, b, r, layers, "post_attention_layernorm", |l| {
            &l.post_attention_layernorm
        });
        let outs: Vec<String> = layers
            .iter()
            .zip(&ls)
            .zip(&normed)
            .map(|((&l, layer), hn)| {
                let m = d.make_mlp_normed(b, l, hn);
                let p = format!("/model/layers.{l}/post_feedforward_norm");
                out_norm(d, b, &p, m, &layer.mlp_out_norm)
            })
            .collect();
        d.make_sum(b, &format!("{p}/mlp_branches"), &outs)
    };
    r.pending = Some(mlp_out);
}
