//! Reference forward pass in f32 that executes a [`Plan`]
//! (docs/DESIGN.md section 1). For a parallel group `G` with input residual `x`:
//!
//! ```text
//! h = x + sum_{i in G} Attn_i(RMSNorm_in_i(x))
//! y = h + sum_{i in G} MLP_i(RMSNorm_post_i(h))
//! ```
//!
//! Each layer keeps its own norms, RoPE positions and KV cache (layer `j`'s
//! K/V come from `x`, not from layer `i`'s output). The sequential plan is the
//! original model, equal to Hugging Face transformers' `LlamaForCausalLM`.

pub mod gemm;
pub mod ops;

use rayon::prelude::*;

use crate::checkpoint::config::Activation;
use crate::model::panels::AlignedF32;
use crate::model::Rope;
use crate::model::{Attention, DecoderLayer, Mlp, Model};
use crate::plan::Plan;
use crate::{Error, Result};
use gemm::{Causal, Nn};
use ops::{matmul_t, matmul_t_many, rms_norm, softmax_within};

/// The index of `plan`'s step that starts at `first_layer`, when every step
/// before it is the original's own layer.
fn entering(plan: &Plan, first_layer: usize) -> Result<usize> {
    if plan.unchanged_layers() < first_layer {
        return Err(Error::Input(format!(
            "plan `{plan}` changes layers before {first_layer}"
        )));
    }
    Ok(first_layer)
}

/// Cached keys and values of one original layer: `len` rows of
/// `[kv_heads * head_dim]`, RoPE already applied to the keys.
#[derive(Debug, Clone, Default)]
pub struct LayerKv {
    pub k: Vec<f32>,
    pub v: Vec<f32>,
}

/// One [`LayerKv`] per original layer, whatever the plan.
#[derive(Debug, Clone)]
pub struct KvCache {
    pub layers: Vec<LayerKv>,
    len: usize,
}

impl KvCache {
    pub fn new(num_layers: usize) -> KvCache {
        KvCache {
            layers: vec![LayerKv::default(); num_layers],
            len: 0,
        }
    }
    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// One sequence of a forward over several: its cache and its new rows.
struct Seq<'c> {
    cache: &'c mut KvCache,
    t: usize,
}

/// Which positions get logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    All,
    Last,
    None,
}

#[derive(Debug, Clone, Copy)]
pub struct Options {
    pub logits: Logits,
    /// Keep the residual stream at every step boundary.
    pub capture_residuals: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            logits: Logits::All,
            capture_residuals: false,
        }
    }
}

pub struct Output {
    /// `[rows, vocab]`, rows as asked by [`Logits`].
    pub logits: Vec<f32>,
    /// Hidden states after the final norm, `[T, hidden]`.
    pub final_hidden: Vec<f32>,
    /// Residual stream before each step and after the last one (before the
    /// final norm), each `[T, hidden]`; empty unless captured.
    pub residuals: Vec<Vec<f32>>,
}

/// The reference forward pass of one model.
pub struct Forward<'m> {
    pub model: &'m Model,
    /// Per layer (layers share one table when their RoPE base is the same).
    ropes: Vec<std::sync::Arc<Rope>>,
}

impl<'m> Forward<'m> {
    pub fn new(model: &'m Model) -> Self {
        Forward {
            model,
            ropes: {
                let cfg = &model.config;
                let mut by_theta: Vec<(u64, std::sync::Arc<Rope>)> = Vec::new();
                (0..cfg.num_hidden_layers)
                    .map(|l| {
                        let key = cfg.rope_theta_of(l).to_bits();
                        match by_theta.iter().find(|(k, _)| *k == key) {
                            Some((_, r)) => r.clone(),
                            None => {
                                let r = std::sync::Arc::new(Rope::of_layer(cfg, l));
                                by_theta.push((key, r.clone()));
                                r
                            }
                        }
                    })
                    .collect()
            },
        }
    }

    /// Run `ids` through `plan`, appending to `cache`; positions continue from
    /// `cache.len()`. A fresh cache gives the full-sequence forward.
    pub fn run(
        &self,
        plan: &Plan,
        ids: &[u32],
        cache: &mut KvCache,
        opts: Options,
    ) -> Result<Output> {
        self.run_many(plan, &[ids], std::slice::from_mut(cache), opts)
    }

    /// Run several sequences through `plan` at once, `ids[i]` appended to
    /// `caches[i]`: every product reads each weight once for all of their
    /// rows, and attention runs per sequence over its own cache. Rows of the
    /// output follow the sequences in order ([`Logits::Last`]: one row per
    /// sequence). Each sequence's outputs are the same bits as
    /// [`Forward::run`] of it alone (every output of a product is its own
    /// chain of multiply-adds, whatever the other rows).
    pub fn run_many(
        &self,
        plan: &Plan,
        ids: &[&[u32]],
        caches: &mut [KvCache],
        opts: Options,
    ) -> Result<Output> {
        let cfg = &self.model.config;
        if plan.num_layers != cfg.num_hidden_layers {
            return Err(Error::Input(format!(
                "plan is for {} layers, the model has {}",
                plan.num_layers, cfg.num_hidden_layers
            )));
        }
        assert_eq!(ids.len(), caches.len(), "one cache per sequence");
        if caches
            .iter()
            .any(|c| c.layers.len() != cfg.num_hidden_layers)
        {
            return Err(Error::Input("KV cache was made for another model".into()));
        }
        let x = self.embed(&ids.concat())?;
        let mut seqs: Vec<Seq> = caches
            .iter_mut()
            .zip(ids)
            .map(|(cache, ids)| Seq {
                cache,
                t: ids.len(),
            })
            .collect();
        self.run_steps(&plan.steps, x, &mut seqs, opts)
    }

    /// The residual stream entering the first layer: the token embedding
    /// of `ids` (scaled where the family scales it).
    pub fn embed(&self, ids: &[u32]) -> Result<Vec<f32>> {
        let cfg = &self.model.config;
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= cfg.vocab_size) {
            return Err(Error::Input(format!(
                "token id {bad} is outside the vocabulary of {}",
                cfg.vocab_size
            )));
        }
        let h = cfg.hidden_size;
        let mut x = vec![0f32; ids.len() * h];
        for (row, &id) in x.chunks_exact_mut(h).zip(ids) {
            let id = id as usize;
            self.model.embed_tokens.read_rows(id..id + 1, row);
        }
        if let Some(s) = cfg.embed_scale {
            x.iter_mut().for_each(|v| *v *= s);
        }
        watch(&x, 0, "the token embedding it reads")?;
        Ok(x)
    }

    /// `n` greedy next tokens of `plan` after `prompt`, decoded with the KV
    /// cache (end-of-sequence tokens included, not stopped at).
    pub fn greedy(&self, plan: &Plan, prompt: &[u32], n: usize) -> Result<Vec<u32>> {
        Ok(self
            .greedy_many(plan, &[prompt.to_vec()], n)?
            .pop()
            .unwrap_or_default())
    }

    /// [`Forward::greedy`] after each of `prompts`, all decoded together: one
    /// decode step reads the weights once for every prompt. Each prompt's
    /// tokens are those it gets alone.
    pub fn greedy_many(
        &self,
        plan: &Plan,
        prompts: &[Vec<u32>],
        n: usize,
    ) -> Result<Vec<Vec<u32>>> {
        let layers = self.model.config.num_hidden_layers;
        let vocab = self.model.config.vocab_size;
        let mut caches = vec![KvCache::new(layers); prompts.len()];
        let opts = Options {
            logits: Logits::Last,
            capture_residuals: false,
        };
        let mut ids: Vec<Vec<u32>> = prompts.to_vec();
        let mut out = vec![Vec::with_capacity(n); prompts.len()];
        for _ in 0..n {
            let refs: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
            let logits = self.run_many(plan, &refs, &mut caches, opts)?.logits;
            ids = logits
                .chunks_exact(vocab)
                .map(|row| vec![ops::argmax(row) as u32])
                .collect();
            for (o, next) in out.iter_mut().zip(&ids) {
                o.push(next[0]);
            }
        }
        Ok(out)
    }

    /// Continue the full-sequence forward of `plan` from the residual stream
    /// `x [T, hidden]` entering `first_layer` (the activation cache of the
    /// search): the plan's steps before it must be the original's single layers.
    pub fn run_from(
        &self,
        plan: &Plan,
        first_layer: usize,
        x: Vec<f32>,
        opts: Options,
    ) -> Result<Output> {
        let at = entering(plan, first_layer)?;
        self.run_steps_from(&plan.steps[at..], x, opts)
    }

    /// [`Forward::run_many`] entered at `first_layer`: `x` holds the
    /// sequences' rows in order (`lens[i]` of sequence `i`), the residual
    /// stream the original's layers before it left there, and the plan's
    /// steps before it must be those layers. Each cache gets keys and values
    /// from `first_layer` on only (a run continuing one enters there too);
    /// positions continue from its length. Outputs are the bits of the whole
    /// run whose stream `x` is.
    pub fn run_many_from(
        &self,
        plan: &Plan,
        first_layer: usize,
        x: Vec<f32>,
        lens: &[usize],
        caches: &mut [KvCache],
        opts: Options,
    ) -> Result<Output> {
        let at = entering(plan, first_layer)?;
        assert_eq!(lens.len(), caches.len(), "one cache per sequence");
        assert_eq!(
            lens.iter().sum::<usize>() * self.model.config.hidden_size,
            x.len(),
            "rows of x"
        );
        let mut seqs: Vec<Seq> = caches
            .iter_mut()
            .zip(lens)
            .map(|(cache, &t)| Seq { cache, t })
            .collect();
        self.run_steps(&plan.steps[at..], x, &mut seqs, opts)
    }

    /// Continue a full-sequence forward with `steps` (whole steps of a plan,
    /// to its end) from the residual stream `x [T, hidden]` entering the
    /// first: the stream another plan that agrees before them left there.
    pub fn run_steps_from(
        &self,
        steps: &[crate::plan::Step],
        x: Vec<f32>,
        opts: Options,
    ) -> Result<Output> {
        self.alone(x.len(), |seqs| self.run_steps(steps, x, seqs, opts))
    }

    /// `f` on a residual stream of `len` values entered mid-model: one
    /// sequence with a fresh cache (no positions before it).
    fn alone<R>(&self, len: usize, f: impl FnOnce(&mut [Seq]) -> R) -> R {
        let cfg = &self.model.config;
        let mut cache = KvCache::new(cfg.num_hidden_layers);
        f(&mut [Seq {
            cache: &mut cache,
            t: len / cfg.hidden_size,
        }])
    }

    /// The residual stream `x [T, hidden]` after `steps` (whole steps of a
    /// plan, starting where `x` enters), without the final norm: how far a
    /// changed span moves the stream, for the search's local screening.
    pub fn advance(&self, steps: &[crate::plan::Step], x: Vec<f32>) -> Result<Vec<f32>> {
        Ok(self
            .alone(x.len(), |seqs| self.layers(steps, x, seqs, false))?
            .0)
    }

    /// The residual stream after each half of one `step` entering with
    /// `x [T, hidden]`: `h` after its attention sublayers and `y` after its
    /// MLP sublayers (healing fits the MLP half's output, `y - h`).
    pub fn advance_halves(
        &self,
        step: &crate::plan::Step,
        x: &[f32],
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        self.alone(x.len(), |seqs| self.step(step, x, seqs))
    }

    /// [`Forward::advance`], keeping the stream before each step and after
    /// the last.
    pub fn advance_capturing(
        &self,
        steps: &[crate::plan::Step],
        x: Vec<f32>,
    ) -> Result<Vec<Vec<f32>>> {
        let (x, mut residuals) = self.alone(x.len(), |seqs| self.layers(steps, x, seqs, true))?;
        residuals.push(x);
        Ok(residuals)
    }

    fn run_steps(
        &self,
        steps: &[crate::plan::Step],
        x: Vec<f32>,
        seqs: &mut [Seq],
        opts: Options,
    ) -> Result<Output> {
        let cfg = &self.model.config;
        let h = cfg.hidden_size;
        let t: usize = seqs.iter().map(|s| s.t).sum();
        let (x, mut residuals) = self.layers(steps, x, seqs, opts.capture_residuals)?;
        if opts.capture_residuals {
            residuals.push(x.clone());
        }
        let final_hidden = rms_norm(&x, &self.model.norm, cfg.rms_norm_eps);
        let logits = match opts.logits {
            Logits::All => matmul_t(&final_hidden, t, self.model.lm_head()),
            Logits::Last => {
                // The last row of each sequence (none of an empty one).
                let mut end = 0;
                let mut last = Vec::with_capacity(seqs.len() * h);
                for s in seqs.iter() {
                    end += s.t;
                    if s.t > 0 {
                        last.extend_from_slice(&final_hidden[(end - 1) * h..end * h]);
                    }
                }
                matmul_t(&last, last.len() / h, self.model.lm_head())
            }
            Logits::None => Vec::new(),
        };
        Ok(Output {
            logits,
            final_hidden,
            residuals,
        })
    }

    /// `steps` over `x` (the sequences' rows in order), appending to each
    /// sequence's cache; the stream before each step when `capture`.
    fn layers(
        &self,
        steps: &[crate::plan::Step],
        mut x: Vec<f32>,
        seqs: &mut [Seq],
        capture: bool,
    ) -> Result<(Vec<f32>, Vec<Vec<f32>>)> {
        let mut residuals = Vec::new();
        for step in steps {
            if capture {
                residuals.push(x.clone());
            }
            x = self.step(step, &x, seqs)?.1;
        }
        for s in seqs.iter_mut() {
            s.cache.len += s.t;
        }
        Ok((x, residuals))
    }

    /// One step of a plan over the residual `x`: its attention sublayers
    /// all read `x` (`h = x + sum Attn_i`), then its MLP sublayers all read
    /// `h` (`y = h + sum MLP_i`). Returns `(h, y)`; a dropped layer returns
    /// `(x, x)`.
    fn step(
        &self,
        step: &crate::plan::Step,
        x: &[f32],
        seqs: &mut [Seq],
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let cfg = &self.model.config;
        let t: usize = seqs.iter().map(|s| s.t).sum();
        // A dropped layer computes nothing: h = y = x.
        let layers = step.computed();
        // Attention sublayers all read x.
        let mut hsum = x.to_vec();
        for &l in layers {
            let layer = &self.model.layers[l];
            let xn = rms_norm(x, &layer.input_layernorm, cfg.rms_norm_eps);
            let mut a = self.attention(l, &xn, seqs);
            if let Some(w) = &layer.attn_out_norm {
                a = rms_norm(&a, w, cfg.rms_norm_eps);
            }
            add_assign(&mut hsum, &a);
            watch(&hsum, l, "self_attn")?;
        }
        // MLP sublayers all read h.
        let mut y = hsum.clone();
        for &l in layers {
            let layer: &DecoderLayer = &self.model.layers[l];
            let hn = rms_norm(&hsum, &layer.post_attention_layernorm, cfg.rms_norm_eps);
            let mut m = mlp(&layer.mlp, &hn, t, cfg.activation);
            if let Some(w) = &layer.mlp_out_norm {
                m = rms_norm(&m, w, cfg.rms_norm_eps);
            }
            add_assign(&mut y, &m);
            watch(&y, l, "mlp")?;
        }
        Ok((hsum, y))
    }

    /// Grouped-query causal attention of one layer on normed input `xn`
    /// (the sequences' rows in order), each sequence over its own cache.
    fn attention(&self, l: usize, xn: &[f32], seqs: &mut [Seq]) -> Vec<f32> {
        let cfg = &self.model.config;
        let attn: &Attention = &self.model.layers[l].self_attn;
        let rope = &self.ropes[l];
        let (nh, nkv, hd) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );
        let t: usize = seqs.iter().map(|s| s.t).sum();
        let [mut q, mut k, v]: [Vec<f32>; 3] =
            linears(xn, t, [&attn.q_proj, &attn.k_proj, &attn.v_proj]);
        // Qwen3: RMS norm over each head (rows of head_dim), before the rotation.
        if let Some(w) = &attn.q_norm {
            q = rms_norm(&q, w, cfg.rms_norm_eps);
        }
        if let Some(w) = &attn.k_norm {
            k = rms_norm(&k, w, cfg.rms_norm_eps);
        }
        let (qw, kvw) = (nh * hd, nkv * hd);
        let mut merged = vec![0f32; t * qw];
        let mut row = 0;
        for seq in seqs.iter_mut() {
            let (start, n) = (seq.cache.len, seq.t);
            let q = &mut q[row * qw..(row + n) * qw];
            let k = &mut k[row * kvw..(row + n) * kvw];
            rope.apply(q, nh, k, nkv, start);
            let kv = &mut seq.cache.layers[l];
            kv.k.extend_from_slice(k);
            kv.v.extend_from_slice(&v[row * kvw..(row + n) * kvw]);
            self.attend(l, q, n, start, kv, &mut merged[row * qw..(row + n) * qw]);
            row += n;
        }
        linear(&merged, t, &attn.o_proj)
    }

    /// One sequence's `t` query rows `q [t, heads * hd]` (positions from
    /// `start`) against its cached keys and values: `merged [t, heads * hd]`.
    fn attend(
        &self,
        l: usize,
        q: &[f32],
        t: usize,
        start: usize,
        kv: &LayerKv,
        merged: &mut [f32],
    ) {
        let cfg = &self.model.config;
        let (nh, nkv, hd) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );
        let s = start + t;
        let (qw, kvw) = (nh * hd, nkv * hd);
        let group = nh / nkv;
        let scale = cfg.query_scale as f32;
        let window = cfg.window_of(l);
        let (keys, values) = (&kv.k, &kv.v);
        // Rows of the scores and of the transposed keys start on cache
        // lines: `sp` is S rounded up to 16 values.
        let sp = s.next_multiple_of(16);
        // Each key-value group's keys, transposed to [hd, S], so that the
        // scores are a product of the same shape as the weighted sums of the
        // values (`x b`, `b` read along its rows).
        let keys_t: Vec<AlignedF32> = (0..nkv)
            .map(|g| {
                let mut kt = AlignedF32::zeroed(hd * sp);
                gemm::transpose(&keys[g * hd..], kvw, s, hd, &mut kt, sp);
                kt
            })
            .collect();
        // One task per head and block of query rows, so that both threads
        // stay busy whatever the number of heads.
        let tasks: Vec<(usize, usize)> = (0..nh)
            .flat_map(|head| (0..t).step_by(ATTENTION_ROWS).map(move |r0| (head, r0)))
            .collect();
        let blocks: Vec<Vec<f32>> = tasks
            .par_iter()
            .map(|&(head, r0)| {
                let g = head / group;
                let rows = ATTENTION_ROWS.min(t - r0);
                let first = start + r0;
                // Every entry a row reads is written: scores up to its
                // position, zeros after them from the softmax.
                let mut scores = SCORES.with(|b| b.take());
                if scores.len() < rows * sp {
                    scores.resize_zeroed(rows * sp);
                }
                let scores_len = rows * sp;
                // scores[rows, S] = q_head [rows, hd] . k_g^T [hd, S], up to each row's position
                Nn {
                    m: rows,
                    n: s,
                    k: hd,
                    x: &q[r0 * qw + head * hd..],
                    x_stride: qw,
                    b: &keys_t[g],
                    b_stride: sp,
                }
                .run(
                    &mut scores[..scores_len],
                    sp,
                    false,
                    Causal::Outputs { first },
                );
                for (i, row) in scores[..scores_len].chunks_exact_mut(sp).enumerate() {
                    let pos = first + i;
                    let lo = window.map_or(0, |w| (pos + 1).saturating_sub(w));
                    row[lo..=pos].iter_mut().for_each(|sc| *sc *= scale);
                    softmax_within(&mut row[..s], lo, pos);
                }
                let mut out = vec![0f32; rows * hd];
                // out [rows, hd] = P [rows, S] . v_g [S, hd]; P is zero past each row's position
                Nn {
                    m: rows,
                    n: hd,
                    k: s,
                    x: &scores[..scores_len],
                    x_stride: sp,
                    b: &values[g * hd..],
                    b_stride: kvw,
                }
                .run(&mut out, hd, false, Causal::Terms { first });
                SCORES.with(|b| b.replace(scores));
                out
            })
            .collect();
        for (&(head, r0), out) in tasks.iter().zip(&blocks) {
            for (i, row) in out.chunks_exact(hd).enumerate() {
                let at = (r0 + i) * qw + head * hd;
                merged[at..at + hd].copy_from_slice(row);
            }
        }
    }
}

/// `down(act(gate(x)) * up(x))`: SwiGLU or GeGLU.
fn mlp(mlp: &Mlp, xn: &[f32], t: usize, act: Activation) -> Vec<f32> {
    let [gate, mut up]: [Vec<f32>; 2] =
        matmul_t_many(xn, t, &[&mlp.gate_proj.weight, &mlp.up_proj.weight])
            .try_into()
            .expect("two products");
    ops::gate(&mut up, &gate, act);
    matmul_t(&up, t, &mlp.down_proj.weight)
}

/// `x W^T + b` for `x [T, in]`.
fn linear(x: &[f32], t: usize, lin: &crate::model::Linear) -> Vec<f32> {
    let mut y = matmul_t(x, t, &lin.weight);
    add_bias(&mut y, lin);
    y
}

/// [`linear`] of several layers reading the same `x`, computed together.
fn linears<const N: usize>(x: &[f32], t: usize, lins: [&crate::model::Linear; N]) -> [Vec<f32>; N] {
    let weights: Vec<&crate::model::Matrix> = lins.iter().map(|l| &l.weight).collect();
    let mut ys = matmul_t_many(x, t, &weights);
    for (y, lin) in ys.iter_mut().zip(lins) {
        add_bias(y, lin);
    }
    ys.try_into()
        .unwrap_or_else(|_| unreachable!("one output per layer"))
}

fn add_bias(y: &mut [f32], lin: &crate::model::Linear) {
    if let Some(b) = &lin.bias {
        for row in y.chunks_exact_mut(b.len()) {
            add_assign(row, b);
        }
    }
}

/// No NaN or infinity in `x` (one pass without an early exit, which
/// vectorises).
fn all_finite(x: &[f32]) -> bool {
    !x.iter().fold(false, |bad, v| bad | !v.is_finite())
}

thread_local! {
    /// Attention scores of one task, reused across tasks.
    static SCORES: std::cell::RefCell<AlignedF32> = std::cell::RefCell::new(AlignedF32::default());
}

/// Query rows per attention task.
const ATTENTION_ROWS: usize = 64;

/// The NaN/Inf watch: the residual after `layer`'s `sublayer` must be finite.
fn watch(x: &[f32], layer: usize, sublayer: &'static str) -> Result<()> {
    if all_finite(x) {
        Ok(())
    } else {
        Err(Error::NonFinite { layer, sublayer })
    }
}

fn add_assign(acc: &mut [f32], x: &[f32]) {
    acc.iter_mut().zip(x).for_each(|(a, &b)| *a += b);
}
