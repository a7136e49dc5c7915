//! Similarity of a rewritten model to the original, per position, in f64.

/// Natural-log probability of `target` under the softmax of one row of
/// logits.
pub fn log_prob(logits: &[f32], target: usize) -> f64 {
    logits[target] as f64 - log_sum_exp(logits)
}

pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut ab, mut aa, mut bb) = (0f64, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (x as f64, y as f64);
        ab += x * y;
        aa += x * x;
        bb += y * y;
    }
    if aa == 0.0 || bb == 0.0 {
        return if aa == bb { 1.0 } else { 0.0 };
    }
    ab / (aa.sqrt() * bb.sqrt())
}

pub use crate::forward::ops::argmax;

/// `log sum exp` of a row, accumulated in f64.
fn log_sum_exp(row: &[f32]) -> f64 {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    max as f64 + crate::forward::ops::sum_exp(row, max).ln()
}

/// Sums of a plan's metrics against the original over positions: cosine of
/// final hidden states, KL(original || plan) of next-token distributions,
/// top-1 agreement.
#[derive(Debug, Clone, Copy, Default)]
pub struct Similarity {
    pub cosine: f64,
    pub kl: f64,
    pub top1: usize,
    pub positions: usize,
}

impl Similarity {
    pub fn add(&mut self, other: &Similarity) {
        self.cosine += other.cosine;
        self.kl += other.kl;
        self.top1 += other.top1;
        self.positions += other.positions;
    }
    pub fn mean_cosine(&self) -> f64 {
        self.cosine / self.positions.max(1) as f64
    }
    pub fn mean_kl(&self) -> f64 {
        self.kl / self.positions.max(1) as f64
    }
    pub fn top1_agreement(&self) -> f64 {
        self.top1 as f64 / self.positions.max(1) as f64
    }
}

/// The original model on one window, kept to compare plans with: its
/// next-token probabilities, `sum_v p log p` and argmax per position, and its
/// final hidden states (after the final norm).
pub struct Reference {
    /// Probabilities `[T, V]`.
    probs: Vec<f32>,
    neg_entropy: Vec<f64>,
    argmax: Vec<usize>,
    final_hidden: Vec<f32>,
    vocab: usize,
}

impl Reference {
    /// From the original's `logits [T, vocab]` and `final_hidden [T, hidden]`.
    pub fn new(logits: &[f32], final_hidden: Vec<f32>, vocab: usize) -> Reference {
        use rayon::prelude::*;
        let mut probs = vec![0f32; logits.len()];
        // Rows split over the thread pool.
        let (neg_entropy, arg): (Vec<f64>, Vec<usize>) = logits
            .par_chunks_exact(vocab)
            .zip(probs.par_chunks_exact_mut(vocab))
            .map(|(row, p)| {
                let lse = log_sum_exp(row);
                let mut ne = 0f64;
                for (pv, &l) in p.iter_mut().zip(row) {
                    let lp = l as f64 - lse;
                    let pr = lp.exp();
                    *pv = pr as f32;
                    ne += pr * lp;
                }
                (ne, argmax(row))
            })
            .unzip();
        Reference {
            probs,
            neg_entropy,
            argmax: arg,
            final_hidden,
            vocab,
        }
    }

    /// A plan's final hidden states and logits on the same window, against
    /// the original, summed over positions.
    pub fn compare(&self, hidden: &[f32], logits: &[f32]) -> Similarity {
        let vocab = self.vocab;
        let width = self.final_hidden.len() / self.neg_entropy.len().max(1);
        let mut s = Similarity::default();
        for (pos, row) in logits.chunks_exact(vocab).enumerate() {
            let p = &self.probs[pos * vocab..(pos + 1) * vocab];
            // KL(p || q) = sum p log p - sum p l + logsumexp(l)
            let dot = crate::forward::ops::dot_f64(p, row);
            s.kl += self.neg_entropy[pos] - dot + log_sum_exp(row);
            s.top1 += usize::from(argmax(row) == self.argmax[pos]);
            let span = pos * width..(pos + 1) * width;
            s.cosine += cosine(&hidden[span.clone()], &self.final_hidden[span]);
            s.positions += 1;
        }
        s
    }
}

/// Greedy generation of a candidate against the original's on the same
/// prompts: what users see, where perplexity and KL can barely move while
/// the text goes elsewhere.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Agreement {
    pub prompts: usize,
    /// Tokens generated per prompt (by each model).
    pub tokens: usize,
    /// Of all generated positions, the fraction where the candidate's token is
    /// the original's.
    pub equal_fraction: f64,
    /// Mean over prompts of the first position (0-based) where they differ;
    /// `tokens` when a prompt's continuations agree throughout.
    pub mean_first_difference: f64,
}

impl Agreement {
    /// From each prompt's pair of continuations (original, candidate).
    pub fn of(pairs: &[(Vec<u32>, Vec<u32>)]) -> Agreement {
        let tokens = pairs.first().map_or(0, |(a, _)| a.len());
        let (mut equal, mut first) = (0usize, 0usize);
        for (a, b) in pairs {
            equal += a.iter().zip(b).filter(|(x, y)| x == y).count();
            first += a.iter().zip(b).position(|(x, y)| x != y).unwrap_or(a.len());
        }
        let n = pairs.len().max(1) as f64;
        Agreement {
            prompts: pairs.len(),
            tokens,
            equal_fraction: equal as f64 / (n * tokens.max(1) as f64),
            mean_first_difference: first as f64 / n,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kl_and_top1_of_known_distributions() {
        // p = (1/2, 1/2), q = (1/4, 3/4): KL = 1/2 ln 2 + 1/2 ln(2/3).
        let p = [0.0f32, 0.0];
        let q = [0.25f32.ln(), 0.75f32.ln()];
        let want = 0.5 * 2f64.ln() + 0.5 * (2.0f64 / 3.0).ln();
        let reference = Reference::new(&p, vec![1.0, 0.0], 2);
        let s = reference.compare(&[1.0, 0.0], &q);
        assert!((s.mean_kl() - want).abs() < 1e-7, "{}", s.mean_kl());
        assert_eq!(s.positions, 1);
        assert!(reference.compare(&[1.0, 0.0], &p).mean_kl().abs() < 1e-12);
        // argmax of p is 0 (first of equals), of q is 1.
        assert_eq!(s.top1, 0);
        assert!((s.mean_cosine() - 1.0).abs() < 1e-12);
    }

    #[test]
    fn agreement_counts_positions_and_first_differences() {
        let pairs = vec![
            (vec![1, 2, 3, 4], vec![1, 2, 3, 4]),
            (vec![1, 2, 3, 4], vec![1, 9, 3, 9]),
        ];
        let a = Agreement::of(&pairs);
        assert_eq!((a.prompts, a.tokens), (2, 4));
        assert!((a.equal_fraction - 6.0 / 8.0).abs() < 1e-12);
        assert!((a.mean_first_difference - 2.5).abs() < 1e-12);
    }

    /// Log-probabilities of a row (long enough for the vector path, with a
    /// tail) against f64, and they normalise.
    #[test]
    fn log_probs_match_f64_and_normalise() {
        let row: Vec<f32> = (0..1000)
            .map(|i| ((i * 37) % 101) as f32 * 0.3 - 10.0)
            .collect();
        let max = row.iter().fold(f64::MIN, |m, &v| m.max(v as f64));
        let z: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
        let mut total = 0f64;
        for (t, &v) in row.iter().enumerate() {
            let lp = log_prob(&row, t);
            assert!((lp - (v as f64 - max - z.ln())).abs() < 1e-6, "{t}");
            total += lp.exp();
        }
        assert!((total - 1.0).abs() < 1e-6);
    }

    #[test]
    fn cosine_of_orthogonal_and_parallel() {
        assert!(cosine(&[1.0, 0.0], &[0.0, 2.0]).abs() < 1e-12);
        assert!((cosine(&[1.0, 2.0], &[2.0, 4.0]) - 1.0).abs() < 1e-12);
    }
}
