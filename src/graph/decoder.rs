//! The subgraphs of a decoder that both op sets write the same way: the
//! token embedding, MatMul weights packed from Hugging Face matrices (with
//! norm weights folded in for the fused form), linear projections with their
//! bias, the packed QKV split, the gated MLP, the sum of parallel branches and
//! the LM head. One `make_*` function per subgraph; node names live in a
//! namespace (`/model/layers.3/mlp/down_proj/MatMul`), initializer names follow
//! them (`model.layers.3.mlp.down_proj.weight`).

use super::contract::{INPUT_IDS, LOGITS};
use super::{Attr, Builder, ElemType};
use crate::checkpoint::config::Activation;
use crate::model::matrix::TILE_VALUES;
use crate::model::{DecoderLayer, Int4, Matrix, Model, Q4};

/// The model a graph is written for, the float type of its values, and
/// whether its projections are written as 4-bit `MatMulNBits`.
#[derive(Clone, Copy)]
pub(super) struct Decoder<'m> {
    pub model: &'m Model,
    pub float: ElemType,
    pub int4: Option<Int4>,
}

/// A packed projection's columns: each matrix with the RMSNorm weight folded
/// into its input rows, if any.
pub(super) type Columns<'m> = Vec<(&'m Matrix, Option<&'m [f32]>)>;

impl<'m> Decoder<'m> {
    pub fn make_embedding(&self, b: &mut Builder<'m>) -> String {
        let e = &self.model.embed_tokens;
        let x = match (self.int4, &e.int4) {
            // Tied, in 4 bits: the LM head's codes `[vocab, blocks, block/2]`
            // read as `[vocab, hidden/2]` rows, one scale per block.
            (Some(int4), Some(q)) => {
                let q4 = self.q4_initializers(b, "lm_head", Packed::t(e), int4);
                let (codes, scales) = (&q4[0], &q4[1]);
                let rows = b.ints(&[q.n as i64, (q.k / 2) as i64]);
                let data = b.node(
                    "/model/embed_tokens/Reshape",
                    "Reshape",
                    &[codes, &rows],
                    vec![],
                );
                b.node(
                    "/model/embed_tokens/GatherBlockQuantized",
                    "GatherBlockQuantized",
                    &[&data, INPUT_IDS, scales],
                    vec![
                        ("bits", Attr::Int(4)),
                        ("block_size", Attr::Int(int4.block_size as i64)),
                        ("gather_axis", Attr::Int(0)),
                        ("quantize_axis", Attr::Int(1)),
                    ],
                )
            }
            // Tied, in floats: the LM head's `[hidden, vocab]` weight, transposed
            // back (ONNX Runtime folds the Transpose when the session loads), so
            // that the file holds the table once, as the builder's export does.
            (None, _) if self.model.lm_head.is_none() => {
                let w = self.lm_head_weight(b);
                let table = b.node(
                    "/model/embed_tokens/Transpose",
                    "Transpose",
                    &[&w],
                    vec![("perm", Attr::Ints(vec![1, 0]))],
                );
                b.node(
                    "/model/embed_tokens/Gather",
                    "Gather",
                    &[&table, INPUT_IDS],
                    vec![("axis", Attr::Int(0))],
                )
            }
            _ => {
                let w = b.weight(
                    "model.embed_tokens.weight",
                    vec![e.rows, e.cols],
                    Box::new(move || e.values().into_owned()),
                );
                b.node(
                    "/model/embed_tokens/Gather",
                    "Gather",
                    &[&w, INPUT_IDS],
                    vec![("axis", Attr::Int(0))],
                )
            }
        };
        match self.model.config.embed_scale {
            None => x,
            Some(s) => {
                let s = b.scalar(s);
                b.node("/model/embed_tokens/Mul", "Mul", &[&x, &s], vec![])
            }
        }
    }

    /// `x @ W` for a weight written `[in, out]`.
    pub fn make_matmul(&self, b: &mut Builder<'m>, p: &str, x: &str, weight: Packed<'m>) -> String {
        self.matmul_to(b, p, x, weight, None)
    }

    /// `x @ W` as `MatMul` (float weights `[in, out]`) or, in int4,
    /// `MatMulNBits` (codes `[out, blocks, block/2]`, scales `[out * blocks]`);
    /// into the graph output `output` when given.
    fn matmul_to(
        &self,
        b: &mut Builder<'m>,
        p: &str,
        x: &str,
        weight: Packed<'m>,
        output: Option<&str>,
    ) -> String {
        let name = param_name(p, "weight");
        let (k, n) = (weight.rows(), weight.cols());
        let (node, op, inputs, attrs) = match self.int4 {
            None => {
                let w = b.weight(&name, vec![k, n], Box::new(move || weight.values()));
                (format!("{p}/MatMul"), "MatMul", vec![w], vec![])
            }
            Some(int4) => {
                let bs = int4.block_size;
                let inputs = self.q4_initializers(b, p, weight, int4);
                let attrs = vec![
                    ("K", Attr::Int(k as i64)),
                    ("N", Attr::Int(n as i64)),
                    ("bits", Attr::Int(4)),
                    ("block_size", Attr::Int(bs as i64)),
                    ("accuracy_level", Attr::Int(int4.accuracy_level as i64)),
                ];
                (format!("{p}/MatMulNBits"), "MatMulNBits", inputs, attrs)
            }
        };
        let mut ins = vec![x];
        ins.extend(inputs.iter().map(String::as_str));
        match output {
            None => b.node(&node, op, &ins, attrs),
            Some(out) => b.node_to(&node, op, &ins, out, attrs),
        }
    }

    /// `x @ W (+ bias)`: the bias (`[out]`, when the projection has one) is
    /// added after the MatMul, the pattern ONNX Runtime fuses.
    pub fn make_linear(
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

    /// The codes `[n, blocks, block/2]`, scales `[n, blocks]` and, when the
    /// weight has them, float zero points `[n, blocks]` of node prefix `p`'s
    /// 4-bit weight; written once (a tied embedding and the LM head share them).
    fn q4_initializers(
        &self,
        b: &mut Builder<'m>,
        p: &str,
        weight: Packed<'m>,
        int4: Int4,
    ) -> Vec<String> {
        let name = param_name(p, "weight");
        let names = [
            format!("{name}_Q4"),
            format!("{name}_scales"),
            format!("{name}_zero_points"),
        ];
        let with_zero_points = weight.has_zero_points();
        let used = if with_zero_points { 3 } else { 2 };
        if b.has(&names[0]) {
            return names[..used].to_vec();
        }
        let bs = int4.block_size;
        let (k, n) = (weight.rows(), weight.cols());
        let blocks = k.div_ceil(bs);
        let weight = std::sync::Arc::new(weight);
        let w = weight.clone();
        b.bytes(
            &names[0],
            vec![n, blocks, bs / 2],
            Box::new(move || w.q4().packed.to_vec()),
        );
        let w = weight.clone();
        b.weight(
            &names[1],
            vec![n, blocks],
            Box::new(move || w.q4().scales.to_vec()),
        );
        if with_zero_points {
            b.weight(
                &names[2],
                vec![n, blocks],
                Box::new(move || weight.q4().zero_points.expect("zero points").to_vec()),
            );
        }
        names[..used].to_vec()
    }

    /// Layer `layer`'s `[q | k | v]` projection columns (with its input norm
    /// folded in when `fold`) and their biases, if the family has them.
    pub fn qkv_columns(
        &self,
        layer: &'m DecoderLayer,
        fold: bool,
    ) -> (Columns<'m>, Option<Vec<f32>>) {
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
    pub fn make_qkv_split(
        &self,
        b: &mut Builder<'m>,
        p: &str,
        packed: &str,
        n: usize,
    ) -> Vec<String> {
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

    /// SwiGLU `down(silu(gate(x)) * up(x))` (or GeGLU with tanh GELU) on an
    /// already normed input.
    pub fn make_swiglu(
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

    /// Layer `l`'s MLP on its already normed input `hn` (no output norm).
    pub fn make_mlp_normed(&self, b: &mut Builder<'m>, l: usize, hn: &str) -> String {
        let m = &self.model.layers[l].mlp;
        self.make_gated_mlp(
            b,
            &format!("{}/mlp", super::lp::layer_prefix(l)),
            hn,
            vec![(&m.gate_proj.weight, None), (&m.up_proj.weight, None)],
            Packed::t(&m.down_proj.weight),
        )
    }

    /// A gated MLP on `hn`: the gate and up projections read the same input,
    /// so one MatMul (`gate_up_proj`) computes `gate_up` (all gate columns,
    /// then as many up columns), a Split parts them, and `down` follows the
    /// gated activation. One op instead of two per layer: the int4 model
    /// decodes faster with it (docs/RESULTS.md, "4-bit weights").
    pub fn make_gated_mlp(
        &self,
        b: &mut Builder<'m>,
        p: &str,
        hn: &str,
        gate_up: Columns<'m>,
        down: Packed<'m>,
    ) -> String {
        let gate_up = Packed::Columns(gate_up);
        let half = (gate_up.cols() / 2) as i64;
        let gu = self.make_matmul(b, &format!("{p}/gate_up_proj"), hn, gate_up);
        let sizes = b.ints(&[half, half]);
        let gu = b.node_n(
            &format!("{p}/gate_up_proj/Split"),
            "Split",
            &[&gu, &sizes],
            2,
            vec![("axis", Attr::Int(-1))],
        );
        self.make_swiglu(b, p, &gu[0], &gu[1], down)
    }

    pub fn make_sum(&self, b: &mut Builder<'m>, p: &str, branches: &[String]) -> String {
        let mut acc = branches[0].clone();
        for (k, br) in branches.iter().enumerate().skip(1) {
            acc = b.node(&format!("{p}/Add_{k}"), "Add", &[&acc, br], vec![]);
        }
        acc
    }

    /// `logits = x @ lm_head^T`, the graph output.
    pub fn make_lm_head(&self, b: &mut Builder<'m>, x: &str) -> String {
        let lm_head = self.model.lm_head();
        if self.int4.is_some() {
            return self.matmul_to(b, "/lm_head", x, Packed::t(lm_head), Some(LOGITS));
        }
        let w = self.lm_head_weight(b);
        b.node_to("/lm_head/MatMul", "MatMul", &[x, &w], LOGITS, vec![])
    }

    /// The float LM head's `[hidden, vocab]` MatMul weight, written once (a
    /// tied embedding reads it too).
    fn lm_head_weight(&self, b: &mut Builder<'m>) -> String {
        const NAME: &str = "lm_head.MatMul.weight";
        if b.has(NAME) {
            return NAME.to_string();
        }
        let lm_head = self.model.lm_head();
        b.weight(
            NAME,
            vec![lm_head.cols, lm_head.rows],
            Box::new(move || transposed(lm_head)),
        )
    }
}

/// The stacked o_proj of a fused group sums the layers' products, so their
/// biases add up.
pub(super) fn o_bias_sum(
    cfg: &crate::checkpoint::ModelConfig,
    ls: &[&DecoderLayer],
) -> Option<Vec<f32>> {
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
pub(super) fn param_name(p: &str, kind: &str) -> String {
    format!("{}.{kind}", p.trim_start_matches('/').replace('/', "."))
}

/// A MatMul weight `[in, out]` made from Hugging Face `[out, in]` matrices.
pub(super) enum Packed<'m> {
    /// Several matrices side by side (output columns concatenated), each
    /// optionally with an RMSNorm weight folded into its input rows.
    Columns(Columns<'m>),
    /// Several matrices stacked along the input (rows), so one MatMul sums
    /// their products.
    Rows(Vec<&'m Matrix>),
}

impl<'m> Packed<'m> {
    pub fn t(m: &'m Matrix) -> Self {
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
    fn has_zero_points(&self) -> bool {
        let has = |m: &Matrix| m.int4.as_ref().is_some_and(|q| q.zero_points.is_some());
        match self {
            Packed::Columns(parts) => parts.iter().any(|(m, _)| has(m)),
            Packed::Rows(parts) => parts.iter().any(|m| has(m)),
        }
    }

    /// The 4-bit codes of the packed weight, from each matrix's own
    /// ([`Model::to_int4`] has already folded any norm weight into them).
    fn q4(&self) -> Q4 {
        fn codes(m: &Matrix) -> &Q4 {
            m.int4
                .as_deref()
                .expect("an int4 graph of a model without 4-bit weights")
        }
        match self {
            Packed::Columns(parts) => {
                debug_assert!(parts
                    .iter()
                    .all(|(_, g)| g.is_none_or(|g| g.iter().all(|&v| v == 1.0))));
                Q4::concat_outputs(&parts.iter().map(|(m, _)| codes(m)).collect::<Vec<_>>())
            }
            Packed::Rows(parts) => {
                Q4::concat_inputs(&parts.iter().map(|m| codes(m)).collect::<Vec<_>>())
            }
        }
    }

    fn values(&self) -> Vec<f32> {
        match self {
            Packed::Columns(parts) => {
                let (k, n) = (self.rows(), self.cols());
                let mut out = vec![0f32; k * n];
                let mut col0 = 0;
                for (m, norm) in parts {
                    let values = m.values();
                    for (o, src) in values.chunks_exact(m.cols).enumerate() {
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
pub(super) fn transposed(m: &Matrix) -> Vec<f32> {
    const TILE: usize = 64;
    let (r, c) = (m.rows, m.cols);
    let mut out = vec![0f32; r * c];
    m.visit_tiles(TILE_VALUES, |rows, data| {
        for r0 in (0..rows.len()).step_by(TILE) {
            for c0 in (0..c).step_by(TILE) {
                for i in r0..(r0 + TILE).min(rows.len()) {
                    for j in c0..(c0 + TILE).min(c) {
                        out[j * r + rows.start + i] = data[i * c + j];
                    }
                }
            }
        }
    });
    out
}
