//! Healing the parallel groups of a plan without training: a least-squares
//! correction folded into the weights the model already has, as ReplaceMe
//! (arXiv 2505.02819) heals depth pruning, here applied to Layer Parallelism
//! (docs/DESIGN.md section 12).
//!
//! For each group, in plan order, on the calibration windows passed through
//! the model as healed so far: `x` is the residual entering the group,
//! `h = x + sum Attn_i(x)` (what the group's attentions give), `X` the
//! group's summed MLP output on `h`, and `Y` what the group's layers give
//! when run one after another on `x`, less `h`. `T` minimises
//! `|X T - Y|^2 + lambda |T - I|^2` (`lambda` the ridge strength times the
//! mean diagonal of `X^T X`), accumulated in f64 over the fitting windows:
//!
//! ```text
//! (X^T X + lambda I) T = X^T Y + lambda I
//! ```
//!
//! and is folded into every `down_proj` of the group: `W' = T^T W` (and its
//! bias), since `X T = sum_i a_i W_i^T T = sum_i a_i (T^T W_i)^T`. No new
//! operator, the same FLOPs. The last eighth of the windows is held out: a
//! group whose held-out deviation `|X T - Y|^2 / |Y|^2` is not below its
//! unhealed `|X - Y|^2 / |Y|^2` is left as it was, so healing never makes a
//! group worse than unhealed on text it did not fit; one that passes is
//! fitted again on every window before it is folded in. `T` is dense, or
//! diagonal, or whichever of the two holds out better ([`TKind`]).
//!
//! With [`HealOptions::attention`] (`--heal-attention`) a group's attention
//! half is corrected first, the same way: `A` the group's attentions summed
//! on `x`, `A_seq` each layer's attention on its own input with the layers
//! run in turn, `T` folded into every `o_proj` of the group; the MLP half is
//! then fitted on the `h` that leaves.
//!
//! Dropped layers (depth pruning, the baseline) are healed as ReplaceMe
//! heals them: the step before them stands in for them, with `Y` its
//! layers and the dropped ones run in turn on `x`, less `h`, and `T` folded
//! into its `down_proj`. Layers dropped before any step that computes are
//! not healed.
//!
//! Families with a norm after each sublayer (Gemma 3) are not healed: the
//! norm between the summed MLP output and the residual keeps `T` from
//! passing through to `down_proj`.

use std::time::Instant;

use indicatif::ProgressBar;
use rayon::prelude::*;
use serde::Serialize;

use crate::forward::Forward;
use crate::model::{Matrix, Model};
use crate::plan::{Plan, Step};
use crate::{Error, Result};

/// How a plan is healed.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct HealOptions {
    /// Ridge strength, relative to the mean diagonal of `X^T X`.
    pub ridge: f64,
    pub kind: TKind,
    /// Also correct each group's attention half: its summed attention
    /// output towards each layer's attention on its own input in turn,
    /// folded into every `o_proj` of the group, before the MLP half is fitted.
    pub attention: bool,
}

impl Default for HealOptions {
    fn default() -> Self {
        HealOptions {
            ridge: 0.1,
            kind: TKind::Full,
            attention: false,
        }
    }
}

/// The correction fitted to each group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TKind {
    /// A dense `hidden x hidden` `T`.
    Full,
    /// A diagonal `T`: one scale per hidden dimension,
    /// `t_j = (X^T Y + lambda)_jj / (X^T X + lambda)_jj`.
    Diagonal,
    /// Both fitted; each group keeps the one with the lower held-out
    /// deviation.
    Best,
}

impl TKind {
    pub fn name(self) -> &'static str {
        match self {
            TKind::Full => "full",
            TKind::Diagonal => "diagonal",
            TKind::Best => "best",
        }
    }
}

/// What healing did to one group.
#[derive(Debug, Clone, Serialize)]
pub struct GroupHeal {
    /// The layers whose `down_proj` carries the correction: a parallel
    /// group's, or the single layer before dropped ones.
    pub layers: Vec<usize>,
    /// The dropped layers right after them, whose contribution the
    /// correction stands in for (none for a group alone).
    pub dropped: Vec<usize>,
    /// `full`: a dense `hidden x hidden` correction; `diagonal`: one scale
    /// per hidden dimension.
    pub kind: &'static str,
    pub ridge: f64,
    /// Tokens `T` was fitted on for the held-out check; an applied `T` is
    /// fitted again on these and the held-out tokens together.
    pub fit_tokens: usize,
    pub held_out_tokens: usize,
    /// Held-out `|X - Y|^2 / |Y|^2`: the group unhealed against its layers
    /// run in turn.
    pub deviation_before: f64,
    /// Held-out `|X T - Y|^2 / |Y|^2`.
    pub deviation_after: f64,
    /// Whether `T` was folded in (only when it lowers the held-out deviation).
    pub applied: bool,
    /// `--heal-attention`: the same for the group's attention half (its
    /// `o_proj` weights), fitted first.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attention: Option<HalfHeal>,
}

/// The correction of a group's attention half.
#[derive(Debug, Clone, Serialize)]
pub struct HalfHeal {
    pub kind: &'static str,
    /// Held-out `|A - A_seq|^2 / |A_seq|^2`: the summed attention output
    /// against each layer's attention on its own input in turn.
    pub deviation_before: f64,
    pub deviation_after: f64,
    pub applied: bool,
}

impl GroupHeal {
    /// `12-13` (a group), `11 for d12` (a layer standing in for the one
    /// dropped after it), `12-13 for d14-15`.
    pub fn name(&self) -> String {
        let layers: Vec<String> = self.layers.iter().map(|l| l.to_string()).collect();
        let mut name = layers.join("-");
        if let (Some(&a), Some(&b)) = (self.dropped.first(), self.dropped.last()) {
            name += &format!(" for {}", crate::plan::dropped_run(a, b));
        }
        name
    }
}

/// What healing did to a plan.
#[derive(Debug, Clone, Serialize)]
pub struct HealReport {
    pub groups: Vec<GroupHeal>,
    pub fit_windows: usize,
    pub held_out_windows: usize,
    pub seconds: f64,
}

/// Healing fitted on calibration text as `search` reads it (`--calib`
/// files, windows of `seq_len` tokens, at most `max_tokens`).
pub struct HealCalibration<'a> {
    pub calib: &'a [std::path::PathBuf],
    pub seq_len: usize,
    pub max_tokens: usize,
}

/// [`heal`] on the windows of `calibration`, for the checkpoint at
/// `model_path` (its tokenizer and the built-in text when `calib` is empty).
pub fn heal_on(
    model: &Model,
    model_path: &std::path::Path,
    tokenizer: Option<&crate::checkpoint::tokenizer::Tokenizer>,
    plan: &Plan,
    calibration: &HealCalibration,
    opts: HealOptions,
    progress: &ProgressBar,
) -> Result<(Model, HealReport)> {
    let cfg = &model.config;
    let c = crate::search::calib::load(
        calibration.calib,
        model_path,
        cfg.window_bos(),
        tokenizer,
        cfg.vocab_size,
        calibration.seq_len,
        calibration.max_tokens,
    )?;
    heal(model, plan, &c.windows, opts, progress)
}

/// `model` with each parallel group of `plan` healed on `windows` (token
/// ids of calibration text, at least two windows: the last eighth, and at
/// least one, is held out).
pub fn heal(
    model: &Model,
    plan: &Plan,
    windows: &[Vec<u32>],
    opts: HealOptions,
    progress: &ProgressBar,
) -> Result<(Model, HealReport)> {
    let t0 = Instant::now();
    let cfg = &model.config;
    if cfg.sandwich_norms {
        return Err(Error::Input(format!(
            "--heal: {} is not healed: a norm follows each sublayer, so the summed MLP output \
             passes a norm before the residual and a correction cannot be folded into down_proj",
            cfg.family.name()
        )));
    }
    if windows.len() < 2 {
        return Err(Error::Input(format!(
            "--heal needs at least 2 calibration windows (one is held out), got {}; give more \
             --calib text or a larger --max-tokens",
            windows.len()
        )));
    }
    let held = (windows.len() / 8).max(1);
    let fit = windows.len() - held;
    let h = cfg.hidden_size;
    let mut healed = model.clone();
    let mut streams: Vec<Vec<f32>> = {
        let f = Forward::new(model);
        windows.iter().map(|w| f.embed(w)).collect::<Result<_>>()?
    };
    progress.set_length((plan.steps.len() * windows.len()) as u64);
    let mut groups = Vec::new();
    for (i, step) in plan.steps.iter().enumerate() {
        // The layers dropped right after this step: its correction stands in
        // for them too.
        let dropped: Vec<usize> = plan.steps[i + 1..]
            .iter()
            .take_while(|s| s.is_dropped())
            .map(|s| s.layers()[0])
            .collect();
        let computed = step.computed();
        if !computed.is_empty() && (computed.len() > 1 || !dropped.is_empty()) {
            // The attention half first (a group's only: one layer's attention
            // reads its own input), then the MLP half on what it leaves.
            let attention = if opts.attention && computed.len() > 1 {
                let f = Forward::new(&healed);
                // Per window: A (the attentions summed on x) and A_seq (each
                // layer's attention on its own input, the layers in turn).
                let parts = streams
                    .iter()
                    .map(|x| -> Result<(Vec<f32>, Vec<f32>)> {
                        let (hh, _) = f.advance_halves(step, x)?;
                        let mut xs = x.clone();
                        let mut a_seq = vec![0f32; x.len()];
                        for &l in computed {
                            let (hl, yl) = f.advance_halves(&Step::Layer(l), &xs)?;
                            for ((a, &hv), &xv) in a_seq.iter_mut().zip(&hl).zip(&xs) {
                                *a += hv - xv;
                            }
                            xs = yl;
                        }
                        Ok((diff(&hh, x), a_seq))
                    })
                    .collect::<Result<Vec<_>>>()?;
                let half = fit_half(&parts, fit, opts, h, computed)?;
                if let Some(t) = &half.t {
                    for &l in computed {
                        fold(&mut healed.layers[l].self_attn.o_proj, t, h);
                    }
                }
                Some(HalfHeal {
                    kind: half.kind.name(),
                    deviation_before: half.before,
                    deviation_after: half.after,
                    applied: half.t.is_some(),
                })
            } else {
                None
            };
            let f = Forward::new(&healed);
            let singles: Vec<Step> = computed
                .iter()
                .chain(&dropped)
                .map(|&l| Step::Layer(l))
                .collect();
            // Per window: X (the step's MLP output) and Y (its layers and the
            // dropped ones in turn, less h).
            let parts = streams
                .iter()
                .map(|x| -> Result<(Vec<f32>, Vec<f32>)> {
                    let (hh, y) = f.advance_halves(step, x)?;
                    let y_seq = f.advance(&singles, x.clone())?;
                    Ok((diff(&y, &hh), diff(&y_seq, &hh)))
                })
                .collect::<Result<Vec<_>>>()?;
            let half = fit_half(&parts, fit, opts, h, computed)?;
            if let Some(t) = &half.t {
                for &l in computed {
                    fold(&mut healed.layers[l].mlp.down_proj, t, h);
                }
            }
            groups.push(GroupHeal {
                layers: computed.to_vec(),
                dropped,
                kind: half.kind.name(),
                ridge: opts.ridge,
                fit_tokens: windows[..fit].iter().map(Vec::len).sum(),
                held_out_tokens: windows[fit..].iter().map(Vec::len).sum(),
                deviation_before: half.before,
                deviation_after: half.after,
                applied: half.t.is_some(),
                attention,
            });
        }
        let f = Forward::new(&healed);
        streams = streams
            .into_iter()
            .map(|x| {
                progress.inc(1);
                f.advance(std::slice::from_ref(step), x)
            })
            .collect::<Result<_>>()?;
    }
    Ok((
        healed,
        HealReport {
            groups,
            fit_windows: fit,
            held_out_windows: held,
            seconds: t0.elapsed().as_secs_f64(),
        },
    ))
}

/// One half's fit: the kind that held out best, its held-out deviations,
/// and `T` fitted again on every window when it is applied.
struct Half {
    kind: TKind,
    before: f64,
    after: f64,
    t: Option<Vec<f64>>,
}

/// Each kind of `T` fitted on the fitting windows of `parts` (per window:
/// `X`, `Y`) and checked on the held-out ones (from `fit` on); the lowest
/// held-out deviation is the half's, applied only when below the unhealed
/// one, then fitted again on every window (the held-out windows' terms
/// added to the fitting ones').
fn fit_half(
    parts: &[(Vec<f32>, Vec<f32>)],
    fit: usize,
    opts: HealOptions,
    h: usize,
    layers: &[usize],
) -> Result<Half> {
    let mut grams = Grams::of(&parts[..fit], h);
    let (mut kind, mut before, mut after) = (opts.kind, 0.0, f64::INFINITY);
    for (k, t) in fit_t(&grams, opts, h, layers)? {
        let (b0, a0) = held_out_deviation(&parts[fit..], &t, h);
        if a0 < after {
            (kind, before, after) = (k, b0, a0);
        }
    }
    let t = if after < before {
        grams.add(&parts[fit..], h);
        let one = HealOptions { kind, ..opts };
        Some(fit_t(&grams, one, h, layers)?.remove(0).1)
    } else {
        None
    };
    Ok(Half {
        kind,
        before,
        after,
        t,
    })
}

/// `X^T X` and `X^T Y` summed over windows (per window: `X`, `Y`), in f64.
struct Grams {
    xx: Vec<f64>,
    xy: Vec<f64>,
}

impl Grams {
    fn of(parts: &[(Vec<f32>, Vec<f32>)], h: usize) -> Grams {
        let mut g = Grams {
            xx: vec![0f64; h * h],
            xy: vec![0f64; h * h],
        };
        g.add(parts, h);
        g
    }

    /// The windows' terms added, in order.
    fn add(&mut self, parts: &[(Vec<f32>, Vec<f32>)], h: usize) {
        for (xx, yy) in parts {
            add_gram(&mut self.xx, xx, xx, h);
            add_gram(&mut self.xy, xx, yy, h);
        }
    }
}

/// `T` of each kind `opts` asks for (`Best`: diagonal, then full) from the
/// sums `g`, with the ridge towards the identity.
fn fit_t(
    g: &Grams,
    opts: HealOptions,
    h: usize,
    layers: &[usize],
) -> Result<Vec<(TKind, Vec<f64>)>> {
    let (mut a, mut b) = (g.xx.clone(), g.xy.clone());
    let mean_diag = (0..h).map(|i| a[i * h + i]).sum::<f64>() / h as f64;
    let lambda = opts.ridge * mean_diag.max(f64::MIN_POSITIVE);
    for i in 0..h {
        a[i * h + i] += lambda;
        b[i * h + i] += lambda;
    }
    let mut fits = Vec::new();
    if opts.kind != TKind::Full {
        let mut t = vec![0f64; h * h];
        for j in 0..h {
            t[j * h + j] = b[j * h + j] / a[j * h + j];
        }
        fits.push((TKind::Diagonal, t));
    }
    if opts.kind != TKind::Diagonal {
        let t = solve_spd(a, b, h).ok_or_else(|| {
            Error::Input(format!(
                "--heal: group {layers:?}: the least-squares system is not positive definite"
            ))
        })?;
        fits.push((TKind::Full, t));
    }
    Ok(fits)
}

fn diff(a: &[f32], b: &[f32]) -> Vec<f32> {
    a.iter().zip(b).map(|(x, y)| x - y).collect()
}

/// `acc [h, h] += u^T v` for `u, v [T, h]`, in f64.
fn add_gram(acc: &mut [f64], u: &[f32], v: &[f32], h: usize) {
    let t = u.len() / h;
    let u: Vec<f64> = u.iter().map(|&x| x as f64).collect();
    let v: Vec<f64> = v.iter().map(|&x| x as f64).collect();
    // SAFETY: `acc` is [h, h] row-major, `u` and `v` are [t, h] row-major;
    // every stride stays inside them.
    unsafe {
        gemm::gemm(
            h,
            h,
            t,
            acc.as_mut_ptr(),
            1,
            h as isize,
            true,
            u.as_ptr(),
            h as isize,
            1,
            v.as_ptr(),
            1,
            h as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(0),
        )
    }
}

/// Held-out `(|X - Y|^2 / |Y|^2, |X T - Y|^2 / |Y|^2)` over all rows.
fn held_out_deviation(parts: &[(Vec<f32>, Vec<f32>)], t: &[f64], h: usize) -> (f64, f64) {
    let (mut before, mut after, mut norm) = (0f64, 0f64, 0f64);
    for (xx, yy) in parts {
        let rows: Vec<(f64, f64, f64)> = xx
            .par_chunks_exact(h)
            .zip(yy.par_chunks_exact(h))
            .map(|(x, y)| {
                let (mut b, mut a, mut n) = (0f64, 0f64, 0f64);
                for (j, &yj) in y.iter().enumerate() {
                    let yj = yj as f64;
                    let xt: f64 = x
                        .iter()
                        .enumerate()
                        .map(|(i, &xi)| xi as f64 * t[i * h + j])
                        .sum();
                    b += (x[j] as f64 - yj).powi(2);
                    a += (xt - yj).powi(2);
                    n += yj * yj;
                }
                (b, a, n)
            })
            .collect();
        for (b, a, n) in rows {
            before += b;
            after += a;
            norm += n;
        }
    }
    let norm = norm.max(f64::MIN_POSITIVE);
    (before / norm, after / norm)
}

/// `lin`'s weight `[h, inter]` becomes `T^T W`, its bias `T^T b`.
fn fold(lin: &mut crate::model::Linear, t: &[f64], h: usize) {
    let w = &lin.weight;
    let inter = w.cols;
    let values: Vec<f64> = w.values().iter().map(|&v| v as f64).collect();
    let mut out = vec![0f64; h * inter];
    // SAFETY: `out` is [h, inter], `t` is [h, h] read transposed, `values`
    // is [h, inter]; every stride stays inside them.
    unsafe {
        gemm::gemm(
            h,
            inter,
            h,
            out.as_mut_ptr(),
            1,
            inter as isize,
            false,
            t.as_ptr(),
            h as isize,
            1,
            values.as_ptr(),
            1,
            inter as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(0),
        )
    }
    lin.weight = Matrix::new(h, inter, out.iter().map(|&v| v as f32).collect());
    if let Some(b) = &mut lin.bias {
        let old: Vec<f64> = b.iter().map(|&v| v as f64).collect();
        for (j, v) in b.iter_mut().enumerate() {
            *v = (0..h).map(|i| t[i * h + j] * old[i]).sum::<f64>() as f32;
        }
    }
}

/// The solution `X` of `A X = B` for symmetric positive definite `a [n, n]`
/// and `b [n, n]` (row-major), by Cholesky; `None` when `a` is not
/// positive definite.
fn solve_spd(mut a: Vec<f64>, b: Vec<f64>, n: usize) -> Option<Vec<f64>> {
    // A = L L^T, L in the lower triangle of `a`.
    for j in 0..n {
        let mut d = a[j * n + j];
        for k in 0..j {
            d -= a[j * n + k] * a[j * n + k];
        }
        if d <= 0.0 || !d.is_finite() {
            return None;
        }
        let d = d.sqrt();
        a[j * n + j] = d;
        let (head, tail) = a.split_at_mut((j + 1) * n);
        let row_j = &head[j * n..j * n + j];
        tail.par_chunks_exact_mut(n).for_each(|row_i| {
            let s: f64 = row_i[..j].iter().zip(row_j).map(|(x, y)| x * y).sum();
            row_i[j] = (row_i[j] - s) / d;
        });
    }
    // Each column of B on its own: L z = b, then L^T x = z.
    let mut cols: Vec<Vec<f64>> = (0..n)
        .map(|c| (0..n).map(|r| b[r * n + c]).collect())
        .collect();
    cols.par_iter_mut().for_each(|x| {
        for i in 0..n {
            let s: f64 = a[i * n..i * n + i]
                .iter()
                .zip(&x[..i])
                .map(|(l, v)| l * v)
                .sum();
            x[i] = (x[i] - s) / a[i * n + i];
        }
        for i in (0..n).rev() {
            let s: f64 = (i + 1..n).map(|k| a[k * n + i] * x[k]).sum();
            x[i] = (x[i] - s) / a[i * n + i];
        }
    });
    let mut out = vec![0f64; n * n];
    for (c, col) in cols.iter().enumerate() {
        for (r, v) in col.iter().enumerate() {
            out[r * n + c] = *v;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cholesky_solves_a_known_system() {
        // A = M M^T + I is positive definite; B = A X0 for a known X0.
        let n = 5;
        let m: Vec<f64> = (0..n * n)
            .map(|i| ((i * 7 % 11) as f64 - 5.0) / 3.0)
            .collect();
        let mut a = vec![0f64; n * n];
        for i in 0..n {
            for j in 0..n {
                a[i * n + j] = (0..n).map(|k| m[i * n + k] * m[j * n + k]).sum::<f64>()
                    + if i == j { 1.0 } else { 0.0 };
            }
        }
        let x0: Vec<f64> = (0..n * n).map(|i| (i as f64 * 0.37).sin()).collect();
        let b: Vec<f64> = (0..n * n)
            .map(|e| (0..n).map(|k| a[(e / n) * n + k] * x0[k * n + e % n]).sum())
            .collect();
        let x = solve_spd(a, b, n).unwrap();
        for (got, want) in x.iter().zip(&x0) {
            assert!((got - want).abs() < 1e-10, "{got} {want}");
        }
        assert!(solve_spd(vec![1.0, 2.0, 2.0, 1.0], vec![1.0; 4], 2).is_none());
    }

    #[test]
    fn gram_and_fold_match_their_definitions() {
        let (t_rows, h, inter) = (7, 4, 3);
        let u: Vec<f32> = (0..t_rows * h).map(|i| (i as f32 * 0.3).cos()).collect();
        let v: Vec<f32> = (0..t_rows * h).map(|i| (i as f32 * 0.7).sin()).collect();
        let mut acc = vec![1f64; h * h];
        add_gram(&mut acc, &u, &v, h);
        for i in 0..h {
            for j in 0..h {
                let want: f64 = 1.0
                    + (0..t_rows)
                        .map(|r| u[r * h + i] as f64 * v[r * h + j] as f64)
                        .sum::<f64>();
                assert!((acc[i * h + j] - want).abs() < 1e-9);
            }
        }
        let t: Vec<f64> = (0..h * h).map(|i| (i as f64 * 0.11).cos()).collect();
        let w: Vec<f32> = (0..h * inter).map(|i| i as f32 * 0.5 - 1.0).collect();
        let mut lin = crate::model::Linear {
            weight: Matrix::new(h, inter, w.clone()),
            bias: Some(vec![1.0, -2.0, 0.5, 3.0]),
        };
        fold(&mut lin, &t, h);
        let got = lin.weight.values();
        for r in 0..h {
            for c in 0..inter {
                let want: f64 = (0..h).map(|k| t[k * h + r] * w[k * inter + c] as f64).sum();
                assert!((got[r * inter + c] as f64 - want).abs() < 1e-5);
            }
        }
        let b = lin.bias.unwrap();
        let want0: f64 = [1.0, -2.0, 0.5, 3.0]
            .iter()
            .enumerate()
            .map(|(k, v)| t[k * h] * v)
            .sum();
        assert!((b[0] as f64 - want0).abs() < 1e-5);
    }

    /// With `Y = X diag(s)` and a negligible ridge, the diagonal fit finds
    /// `s` and the full fit `diag(s)`; `Best` fits both, diagonal first.
    #[test]
    fn each_kind_of_fit_recovers_a_diagonal_map() {
        let (rows, h) = (40, 6);
        let s: Vec<f32> = (0..h).map(|j| 0.5 + j as f32 * 0.25).collect();
        // Full rank: values from a multiplicative hash, not a smooth sequence.
        let x: Vec<f32> = (0..rows * h)
            .map(|i| ((i * 7919 + 13) % 1009) as f32 / 1009.0 - 0.5)
            .collect();
        let y: Vec<f32> = x.iter().enumerate().map(|(i, v)| v * s[i % h]).collect();
        let grams = Grams::of(&[(x, y)], h);
        let fit = |kind| {
            let opts = HealOptions {
                ridge: 1e-9,
                kind,
                attention: false,
            };
            fit_t(&grams, opts, h, &[1, 2]).unwrap()
        };
        let best = fit(TKind::Best);
        let kinds: Vec<TKind> = best.iter().map(|(k, _)| *k).collect();
        assert_eq!(kinds, [TKind::Diagonal, TKind::Full]);
        for (kind, t) in [fit(TKind::Diagonal), fit(TKind::Full)]
            .into_iter()
            .flatten()
        {
            for i in 0..h {
                for j in 0..h {
                    let want = if i == j { s[j] as f64 } else { 0.0 };
                    let got = t[i * h + j];
                    assert!((got - want).abs() < 1e-5, "{kind:?} [{i}, {j}]: {got}");
                }
            }
        }
    }
}
