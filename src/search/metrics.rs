//! Similarity of a rewritten model to the original, per position, in f64.

/// Natural-log softmax of one row of logits.
pub fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
    let sum: f64 = logits.iter().map(|&v| (v as f64 - max).exp()).sum();
    let log_z = max + sum.ln();
    logits.iter().map(|&v| v as f64 - log_z).collect()
}

/// `KL(p || q)` from log-probabilities.
pub fn kl_divergence(log_p: &[f64], log_q: &[f64]) -> f64 {
    log_p
        .iter()
        .zip(log_q)
        .map(|(&lp, &lq)| lp.exp() * (lp - lq))
        .sum()
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

/// Running means of the plan-vs-original metrics over positions.
#[derive(Debug, Default, Clone)]
pub struct PlanComparison {
    positions: usize,
    cosine_sum: f64,
    kl_sum: f64,
    top1_same: usize,
}

impl PlanComparison {
    /// Add one position: original and plan log-probabilities, and the cosine of
    /// their final hidden states.
    pub fn add(&mut self, log_original: &[f64], log_plan: &[f64], hidden_cosine: f64) {
        self.positions += 1;
        self.cosine_sum += hidden_cosine;
        self.kl_sum += kl_divergence(log_original, log_plan);
        self.top1_same += usize::from(argmax(log_original) == argmax(log_plan));
    }
    pub fn mean_cosine(&self) -> f64 {
        self.cosine_sum / self.positions.max(1) as f64
    }
    pub fn mean_kl(&self) -> f64 {
        self.kl_sum / self.positions.max(1) as f64
    }
    pub fn top1_agreement(&self) -> f64 {
        self.top1_same as f64 / self.positions.max(1) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kl_of_known_distributions() {
        // p = (1/2, 1/2), q = (1/4, 3/4): KL = 1/2 ln 2 + 1/2 ln(2/3)
        let p = [0.5f64.ln(), 0.5f64.ln()];
        let q = [0.25f64.ln(), 0.75f64.ln()];
        let want = 0.5 * 2f64.ln() + 0.5 * (2.0f64 / 3.0).ln();
        assert!((kl_divergence(&p, &q) - want).abs() < 1e-12);
        assert_eq!(kl_divergence(&p, &p), 0.0);
    }

    #[test]
    fn log_softmax_normalises() {
        let lp = log_softmax(&[1.0, 2.0, 3.0, 1000.0]);
        let total: f64 = lp.iter().map(|v| v.exp()).sum();
        assert!((total - 1.0).abs() < 1e-12);
        assert_eq!(argmax(&lp), 3);
    }

    #[test]
    fn cosine_of_orthogonal_and_parallel() {
        assert!(cosine(&[1.0, 0.0], &[0.0, 2.0]).abs() < 1e-12);
        assert!((cosine(&[1.0, 2.0], &[2.0, 4.0]) - 1.0).abs() < 1e-12);
    }
}
