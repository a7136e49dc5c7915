//! Benchmark of two emitted models in ONNX Runtime, A and B alternating in
//! the same run: prefill latency of `prefill_tokens`, and greedy decode
//! throughput of `decode_tokens` new tokens after a `prompt_tokens` prompt
//! with the KV cache; medians over runs and the B/A ratios. Same batch,
//! dtype, threads and execution provider for both. Both are timed through an
//! I/O binding ([`DecoderSession::greedy_bound`]): the KV cache stays on the
//! device between decode steps, and only ids and the last logits cross to
//! the host, so a GPU run measures the model, not host copies.

use serde::Serialize;

use super::DecoderSession;
use crate::checkpoint::tokenizer::stand_in_ids;
use crate::measure::median;
use crate::Result;

#[derive(Debug, Clone, Serialize)]
pub struct BenchOptions {
    pub batch: usize,
    pub prefill_tokens: usize,
    pub prompt_tokens: usize,
    pub decode_tokens: usize,
    pub runs: usize,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            batch: 1,
            prefill_tokens: 128,
            prompt_tokens: 32,
            decode_tokens: 128,
            runs: 5,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchSide {
    /// Median prefill latency.
    pub prefill_ms: f64,
    /// Median decode throughput: `batch * decode_tokens` over the decode time.
    pub decode_tokens_per_s: f64,
    pub prefill_runs_ms: Vec<f64>,
    pub decode_runs_tokens_per_s: Vec<f64>,
}

/// What the rounds say about B against A on one measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// B was faster in every round.
    Faster,
    /// B was slower in every round.
    Slower,
    /// The rounds disagree: the difference is within this run's noise.
    NoMeasurableDifference,
}

impl Verdict {
    pub fn name(self) -> &'static str {
        match self {
            Verdict::Faster => "faster",
            Verdict::Slower => "slower",
            Verdict::NoMeasurableDifference => "no measurable difference",
        }
    }
}

/// B's speed over A's in each round (A and B measured back to back), their
/// range, and the verdict that range supports.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    /// Per round, above 1 when B was faster.
    pub ratios: Vec<f64>,
    pub min: f64,
    pub max: f64,
    pub verdict: Verdict,
}

impl Comparison {
    fn of(ratios: Vec<f64>) -> Comparison {
        let min = ratios.iter().cloned().fold(f64::INFINITY, f64::min);
        let max = ratios.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let verdict = if min > 1.0 {
            Verdict::Faster
        } else if max < 1.0 {
            Verdict::Slower
        } else {
            Verdict::NoMeasurableDifference
        };
        Comparison {
            ratios,
            min,
            max,
            verdict,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchResult {
    pub options: BenchOptions,
    pub a: BenchSide,
    pub b: BenchSide,
    /// `a.prefill_ms / b.prefill_ms` (medians): above 1 when B is faster.
    pub prefill_speedup: f64,
    /// `b.decode_tokens_per_s / a.decode_tokens_per_s` (medians).
    pub decode_speedup: f64,
    /// Per-round prefill ratios (A's latency over B's) and their verdict.
    pub prefill: Comparison,
    /// Per-round decode ratios (B's tokens/s over A's) and their verdict.
    pub decode: Comparison,
}

/// The same stand-in ids for every row of the batch.
fn ids(n: usize, batch: usize, vocab: usize) -> Vec<u32> {
    stand_in_ids(n, vocab).repeat(batch)
}

/// One prefill, its outputs left where the execution provider wrote them.
fn prefill_ms(s: &mut DecoderSession, opts: &BenchOptions, vocab: usize) -> Result<f64> {
    let input = ids(opts.prefill_tokens, opts.batch, vocab);
    Ok(s.greedy_bound(&input, opts.batch, 0)?.prefill_s * 1e3)
}

/// Greedy decode with the KV cache kept on the device between steps.
fn decode_tokens_per_s(s: &mut DecoderSession, opts: &BenchOptions, vocab: usize) -> Result<f64> {
    let prompt = ids(opts.prompt_tokens, opts.batch, vocab);
    let r = s.greedy_bound(&prompt, opts.batch, opts.decode_tokens)?;
    Ok((opts.batch * opts.decode_tokens) as f64 / r.decode_s)
}

/// Run A and B alternately (one warm-up each, then `runs` measured rounds;
/// every other round measures B first, so that drift of the machine during a
/// round does not favour one side).
pub fn bench(
    a: &mut DecoderSession,
    b: &mut DecoderSession,
    vocab: usize,
    opts: &BenchOptions,
    progress: &indicatif::ProgressBar,
) -> Result<BenchResult> {
    let mut sides = [(Vec::new(), Vec::new()), (Vec::new(), Vec::new())];
    progress.set_length((opts.runs + 1) as u64);
    for run in 0..=opts.runs {
        let pair = [&mut *a, &mut *b];
        let order = if run % 2 == 0 { [1, 0] } else { [0, 1] };
        for k in order {
            let s = &mut *pair[k];
            let p = prefill_ms(s, opts, vocab)?;
            let d = decode_tokens_per_s(s, opts, vocab)?;
            if run > 0 {
                sides[k].0.push(p);
                sides[k].1.push(d);
            }
        }
        progress.inc(1);
    }
    let prefill = Comparison::of(
        sides[0]
            .0
            .iter()
            .zip(&sides[1].0)
            .map(|(a, b)| a / b)
            .collect(),
    );
    let decode = Comparison::of(
        sides[0]
            .1
            .iter()
            .zip(&sides[1].1)
            .map(|(a, b)| b / a)
            .collect(),
    );
    let side = |(p, d): &(Vec<f64>, Vec<f64>)| BenchSide {
        prefill_ms: median(p),
        decode_tokens_per_s: median(d),
        prefill_runs_ms: p.clone(),
        decode_runs_tokens_per_s: d.clone(),
    };
    let (sa, sb) = (side(&sides[0]), side(&sides[1]));
    Ok(BenchResult {
        options: opts.clone(),
        prefill_speedup: sa.prefill_ms / sb.prefill_ms,
        decode_speedup: sb.decode_tokens_per_s / sa.decode_tokens_per_s,
        a: sa,
        b: sb,
        prefill,
        decode,
    })
}

/// What the user's serving runs most, which `compile` optimises for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Workload {
    /// Prompt processing: the prefill ratio.
    Prefill,
    /// Token generation: the decode ratio.
    Decode,
    /// Both: per round, the geometric mean of the two ratios.
    Mixed,
}

impl Workload {
    pub fn name(self) -> &'static str {
        match self {
            Workload::Prefill => "prefill",
            Workload::Decode => "decode",
            Workload::Mixed => "mixed",
        }
    }

    /// The per-round ratios of this workload in `r`, their range and verdict.
    pub fn of(self, r: &BenchResult) -> Comparison {
        match self {
            Workload::Prefill => r.prefill.clone(),
            Workload::Decode => r.decode.clone(),
            Workload::Mixed => Comparison::of(
                r.prefill
                    .ratios
                    .iter()
                    .zip(&r.decode.ratios)
                    .map(|(p, d)| (p * d).sqrt())
                    .collect(),
            ),
        }
    }
}

/// One emitted candidate against the unmodified model of the same op set.
#[derive(Debug, Clone, Serialize)]
pub struct CandidateSpeed {
    /// The form as written (a group without an exact fused form is branches).
    pub form: String,
    pub ops: String,
    pub benchmark: BenchResult,
    /// The workload's per-round ratios, range and verdict.
    pub workload: Comparison,
}

/// Which candidate `compile` kept, and why.
#[derive(Debug, Clone, Serialize)]
pub struct SpeedChoice {
    pub workload: Workload,
    pub candidates: Vec<CandidateSpeed>,
    /// Index into `candidates`.
    pub chosen: usize,
    /// Whether the chosen one is faster than the unmodified model in every round.
    pub faster: bool,
    pub why: String,
}

impl SpeedChoice {
    /// Keep the candidate with the best median workload ratio.
    pub fn choose(workload: Workload, candidates: Vec<CandidateSpeed>) -> SpeedChoice {
        let median_of = |c: &CandidateSpeed| median(&c.workload.ratios);
        let chosen = (0..candidates.len())
            .max_by(|&a, &b| median_of(&candidates[a]).total_cmp(&median_of(&candidates[b])))
            .expect("at least one candidate");
        let c = &candidates[chosen];
        let faster = c.workload.verdict == Verdict::Faster;
        let what = format!(
            "{} form, {} ops: {} x{:.3} (rounds x{:.3}..x{:.3})",
            c.form,
            c.ops,
            workload.name(),
            median_of(c),
            c.workload.min,
            c.workload.max
        );
        let why = if faster {
            format!(
                "{what}, the best of {} candidates, faster than the unmodified model in every round",
                candidates.len()
            )
        } else {
            format!(
                "no candidate is faster than the unmodified model beyond this run's noise on the {} \
                 workload; the best of {} is {what}: {}",
                workload.name(),
                candidates.len(),
                c.workload.verdict.name()
            )
        };
        SpeedChoice {
            workload,
            candidates,
            chosen,
            faster,
            why,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Comparison, Verdict};

    #[test]
    fn verdict_needs_every_round_to_agree() {
        assert_eq!(
            Comparison::of(vec![1.02, 1.10, 1.05]).verdict,
            Verdict::Faster
        );
        assert_eq!(
            Comparison::of(vec![0.97, 0.99, 0.90]).verdict,
            Verdict::Slower
        );
        let mixed = Comparison::of(vec![1.20, 0.98, 1.05]);
        assert_eq!(mixed.verdict, Verdict::NoMeasurableDifference);
        assert_eq!((mixed.min, mixed.max), (0.98, 1.20));
    }
}
