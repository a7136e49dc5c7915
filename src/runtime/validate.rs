//! Validation of an emitted model: a prefill of real text and N greedy
//! decode steps with the KV cache, in ONNX Runtime and in the reference
//! forward of the same plan. Every output (`logits`, each `present.*`) is
//! compared at every step; all failing outputs are reported, not just the
//! first (as Optimum's `validate_model_outputs` does).

use serde::Serialize;

use super::{DecoderSession, StepOutput};
use crate::checkpoint::tokenizer::{stand_in_ids, Tokenizer};
use crate::forward::ops::argmax;
use crate::forward::{Forward, KvCache, Logits, Options};
use crate::graph::contract;
use crate::model::Int4;
use crate::plan::Plan;
use crate::Result;

/// Greedy decode steps after the prefill, unless told otherwise.
pub const DEFAULT_STEPS: usize = 16;
/// Tokens of the prefill, unless told otherwise.
pub const DEFAULT_PROMPT_TOKENS: usize = 64;

/// A public-domain passage (Hamlet, Act III, Scene 1): the default prefill
/// of validation.
pub const DEFAULT_PROMPT: &str = "To be, or not to be, that is the question:\n\
Whether 'tis nobler in the mind to suffer\n\
The slings and arrows of outrageous fortune,\n\
Or to take arms against a sea of troubles\n\
And by opposing end them. To die: to sleep;\n\
No more; and by a sleep to say we end\n\
The heart-ache and the thousand natural shocks\n\
That flesh is heir to, 'tis a consummation\n\
Devoutly to be wish'd. To die, to sleep;\n\
To sleep: perchance to dream: ay, there's the rub;\n\
For in that sleep of death what dreams may come\n";

/// The prefill of a validation: the first `tokens` tokens of `text` (default
/// [`DEFAULT_PROMPT`]); without a tokenizer, stand-in ids
/// ([`stand_in_ids`]).
pub fn prompt(
    tokenizer: Option<&Tokenizer>,
    text: Option<&str>,
    tokens: usize,
    vocab_size: usize,
) -> Result<Vec<u32>> {
    Ok(match tokenizer {
        Some(t) => {
            let mut ids = t.encode(text.unwrap_or(DEFAULT_PROMPT))?;
            ids.truncate(tokens.max(1));
            ids
        }
        None => stand_in_ids(tokens.max(1), vocab_size),
    })
}

/// Largest difference seen on one output over all steps.
#[derive(Debug, Clone, Serialize)]
pub struct OutputError {
    pub name: String,
    pub max_abs: f32,
    /// `max_abs` over the largest magnitude of the reference values.
    pub max_rel: f32,
    /// Where `max_abs` was seen: `prefill` or `decode N`.
    pub worst_at: String,
    pub passed: bool,
}

/// What an output must stay within; both bounds apply when both are set.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Tolerance {
    /// Largest accepted absolute difference.
    pub abs: Option<f32>,
    /// Largest accepted difference relative to the largest reference magnitude.
    pub rel: Option<f32>,
}

impl Tolerance {
    /// float32: 1e-3 absolute. float16 (11-bit mantissa): 1e-2 relative.
    /// int4 weights: the reference runs the same dequantised weights, so the
    /// float type's bound holds at accuracy level 0. At level 4
    /// `MatMulNBits` rounds its activations to int8; the reference rounds
    /// them the same way, but float differences of 1e-6 upstream move values
    /// across rounding boundaries, a step of 1/127 of the block's largest
    /// activation each, and 30 layers compound them: 0.35 relative applies
    /// (a check of the graph's structure, not of its last bits; accuracy
    /// level 0 checks those). SmolLM2 with 6 pairs measures 0.12 to 0.21.
    pub fn default_for(float: crate::graph::ElemType, int4: Option<Int4>) -> Self {
        match (float, int4) {
            (_, Some(q)) if q.accuracy_level > 0 => Tolerance {
                abs: None,
                rel: Some(0.35),
            },
            (crate::graph::ElemType::F16, _) => Tolerance {
                abs: None,
                rel: Some(1e-2),
            },
            _ => Tolerance {
                abs: Some(1e-3),
                rel: None,
            },
        }
    }

    /// The largest accepted difference of one logit, given the largest
    /// reference logit magnitude of the step.
    fn logit_margin(&self, magnitude: f32) -> f32 {
        match (self.abs, self.rel) {
            (Some(a), Some(r)) => a.min(r * magnitude),
            (Some(a), None) => a,
            (None, Some(r)) => r * magnitude,
            (None, None) => 0.0,
        }
    }

    fn accepts(&self, abs: f32, rel: f32) -> bool {
        self.abs.is_none_or(|t| abs <= t) && self.rel.is_none_or(|t| rel <= t)
    }
}

impl std::fmt::Display for Tolerance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.abs, self.rel) {
            (Some(a), Some(r)) => write!(f, "abs {a:e}, rel {r:e}"),
            (Some(a), None) => write!(f, "abs {a:e}"),
            (None, Some(r)) => write!(f, "rel {r:e}"),
            (None, None) => write!(f, "none"),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Validation {
    pub plan: Plan,
    pub prompt_tokens: usize,
    pub steps: usize,
    pub tolerance: Tolerance,
    pub outputs: Vec<OutputError>,
    /// Greedy next tokens of the reference after the prefill and each step.
    pub tokens_reference: Vec<u32>,
    /// The same from ONNX Runtime's logits.
    pub tokens_onnx: Vec<u32>,
    /// Every ONNX Runtime token is the reference's, or a near-tie of it: a
    /// token whose reference logit is within the logits tolerance of the
    /// largest (a difference the tolerance accepts cannot decide it).
    pub tokens_agree: bool,
    /// Steps whose tokens differ within such a near-tie.
    pub near_ties: usize,
    /// One line per failing output.
    pub failures: Vec<String>,
}

impl Validation {
    pub fn passed(&self) -> bool {
        self.failures.is_empty() && self.tokens_agree
    }

    /// `agree`, `agree (2 near-ties)` or `differ`.
    pub fn tokens_word(&self) -> String {
        match (self.tokens_agree, self.near_ties) {
            (false, _) => "differ".into(),
            (true, 0) => "agree".into(),
            (true, 1) => "agree (1 near-tie)".into(),
            (true, n) => format!("agree ({n} near-ties)"),
        }
    }
}

struct Tracker {
    outputs: Vec<OutputError>,
    ref_max: Vec<f32>,
}

impl Tracker {
    fn record(&mut self, k: usize, at: &str, got: &[f32], want: &[f32]) {
        let d = got
            .iter()
            .zip(want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, |m, x| {
                if x.is_nan() || m.is_nan() {
                    f32::NAN
                } else {
                    m.max(x)
                }
            });
        let mag = want.iter().fold(0f32, |m, x| m.max(x.abs()));
        let o = &mut self.outputs[k];
        if d.is_nan() || d > o.max_abs || o.worst_at.is_empty() {
            o.max_abs = d;
            o.worst_at = at.to_string();
        }
        self.ref_max[k] = self.ref_max[k].max(mag);
    }
}

/// Reference KV of one layer, `[T, kv_heads*hd]`, as `[kv_heads, T, hd]`.
fn heads_major(x: &[f32], kv_heads: usize, head_dim: usize) -> Vec<f32> {
    let t = x.len() / (kv_heads * head_dim);
    let mut out = vec![0f32; x.len()];
    for pos in 0..t {
        for h in 0..kv_heads {
            let src = &x[(pos * kv_heads + h) * head_dim..][..head_dim];
            out[(h * t + pos) * head_dim..][..head_dim].copy_from_slice(src);
        }
    }
    out
}

/// Run `prompt` then `steps` greedy steps through both and compare.
pub fn validate(
    session: &mut DecoderSession,
    forward: &Forward,
    plan: &Plan,
    prompt: &[u32],
    steps: usize,
    tolerance: Tolerance,
) -> Result<Validation> {
    let cfg = &forward.model.config;
    let (layers, nkv, hd, vocab) = (
        cfg.num_hidden_layers,
        cfg.num_key_value_heads,
        cfg.head_dim,
        cfg.vocab_size,
    );
    let mut names = vec![contract::LOGITS.to_string()];
    for l in 0..layers {
        names.push(contract::present_key(l));
        names.push(contract::present_value(l));
    }
    let mut tracker = Tracker {
        outputs: names
            .into_iter()
            .map(|name| OutputError {
                name,
                max_abs: 0.0,
                max_rel: 0.0,
                worst_at: String::new(),
                passed: true,
            })
            .collect(),
        ref_max: vec![0.0; 1 + 2 * layers],
    };
    let mut cache = KvCache::new(layers);
    let mut tokens_reference = Vec::new();
    let mut tokens_onnx = Vec::new();
    let mut past: Option<StepOutput> = None;
    let mut ids: Vec<u32> = prompt.to_vec();
    let (mut near_ties, mut tokens_agree) = (0, true);
    for step in 0..=steps {
        let at = if step == 0 {
            "prefill".to_string()
        } else {
            format!("decode {step}")
        };
        let reference = forward.run(
            plan,
            &ids,
            &mut cache,
            Options {
                logits: Logits::All,
                capture_residuals: false,
            },
        )?;
        let onnx = session.step(&ids, past.as_ref())?;
        tracker.record(0, &at, &onnx.logits, &reference.logits);
        for l in 0..layers {
            let kv = &cache.layers[l];
            tracker.record(
                1 + 2 * l,
                &at,
                &onnx.present[l].0,
                &heads_major(&kv.k, nkv, hd),
            );
            tracker.record(
                2 + 2 * l,
                &at,
                &onnx.present[l].1,
                &heads_major(&kv.v, nkv, hd),
            );
        }
        let last = ids.len() - 1;
        let next_ref = argmax(&reference.logits[last * vocab..]) as u32;
        let next_onnx = argmax(&onnx.logits[last * vocab..]) as u32;
        if next_onnx != next_ref {
            let row = &reference.logits[last * vocab..(last + 1) * vocab];
            let magnitude = row.iter().fold(0f32, |m, v| m.max(v.abs()));
            if row[next_ref as usize] - row[next_onnx as usize] <= tolerance.logit_margin(magnitude)
            {
                near_ties += 1;
            } else {
                tokens_agree = false;
            }
        }
        tokens_reference.push(next_ref);
        tokens_onnx.push(next_onnx);
        // Both continue from the reference's token so that every step compares
        // the same inputs.
        ids = vec![next_ref];
        past = Some(onnx);
    }
    let mut failures = Vec::new();
    for (o, mag) in tracker.outputs.iter_mut().zip(&tracker.ref_max) {
        o.max_rel = if *mag > 0.0 {
            o.max_abs / mag
        } else {
            o.max_abs
        };
        o.passed = tolerance.accepts(o.max_abs, o.max_rel);
        if !o.passed {
            failures.push(format!(
                "{}: max abs {:.3e}, max rel {:.3e} (at {}), tolerance {tolerance}",
                o.name, o.max_abs, o.max_rel, o.worst_at
            ));
        }
    }
    Ok(Validation {
        plan: plan.clone(),
        prompt_tokens: prompt.len(),
        steps,
        tolerance,
        tokens_agree,
        near_ties,
        outputs: tracker.outputs,
        tokens_reference,
        tokens_onnx,
        failures,
    })
}

/// Validate the emitted model `emitted` in ONNX Runtime (a session opened
/// here, one at a time: each holds a copy of the weights) against
/// the reference forward of the float `model` with the weights it holds
/// ([`crate::graph::lp::weights_as_emitted`]). The first result is the
/// model as written, labelled `""`. An int4 model whose `MatMulNBits` round
/// activations (accuracy level 4) is checked twice: as written, within the
/// loose bound that rounding allows, and as the same graph and weights at
/// accuracy level 0, within the float type's bound (`"accuracy level 0"`).
pub fn validate_emitted(
    emitted: &super::Emitted,
    model: &crate::model::Model,
    prompt: &[u32],
    steps: usize,
    tolerance: Option<Tolerance>,
    opts: &super::RuntimeOptions,
) -> Result<Vec<(String, Validation)>> {
    use crate::graph::lp::{weights_as_emitted, without_dropped};
    // A plan that drops layers: the model without them, as emitted.
    let (model, plan) = without_dropped(model, &emitted.metadata.plan);
    let plan = &plan;
    let mut written =
        weights_as_emitted(&model, plan, emitted.metadata.form, emitted.metadata.int4)?;
    let tol = tolerance.unwrap_or(Tolerance::default_for(
        emitted.metadata.float,
        emitted.metadata.int4,
    ));
    let mut session = emitted.session(opts)?;
    let v = validate(
        &mut session,
        &Forward::new(&written),
        plan,
        prompt,
        steps,
        tol,
    )?;
    // The twin opens once this session is gone.
    drop(session);
    let mut out = vec![(String::new(), v)];
    if let Some(q) = emitted.metadata.int4.filter(|q| q.accuracy_level != 0) {
        let exact = Int4 {
            accuracy_level: 0,
            ..q
        };
        let mut twin = emitted.session_at_accuracy_level_zero(opts)?;
        // The same 4-bit weights (an owned model: int4), computed in float32.
        written.to_mut().set_accuracy_level(0);
        let tol = tolerance.unwrap_or(Tolerance::default_for(emitted.metadata.float, Some(exact)));
        let v = validate(&mut twin, &Forward::new(&written), plan, prompt, steps, tol)?;
        out.push(("accuracy level 0".to_string(), v));
    }
    // Reported as written: over the source's layers.
    for (_, v) in &mut out {
        v.plan = emitted.metadata.plan.clone();
    }
    Ok(out)
}
