//! The Layer Parallelism plan (arXiv 2502.02790, section 3; docs/DESIGN.md section 1):
//! an ordered list of steps, each a single layer or a [`ParallelGroup`] of
//! consecutive layers whose attentions read the same residual, then whose MLPs
//! read the same residual. The original model is the plan of single layers.
//!
//! Command-line syntax, comma-separated items:
//! - `20-21` an explicit group of consecutive layers (`20-22` is a group of three);
//! - `20+21` the same group as a list of its layers (which must still be consecutive);
//! - `20..24` the paper's contiguous range `[20, 24)`, split into adjacent pairs;
//! - `d12` layer 12 dropped, `d12-14` layers 12, 13 and 14 dropped: depth
//!   pruning, the baseline Layer Parallelism is measured against.
//!
//! The empty string is the original model. A dropped layer is skipped by the
//! reference forward and absent from what is emitted: the emitted model is
//! the one of [`Plan::without_dropped`], with fewer layers.

use std::fmt;

use crate::{Error, Result};

/// Layers evaluated in parallel from one residual, in ascending order.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ParallelGroup {
    pub layers: Vec<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Layer(usize),
    Parallel(ParallelGroup),
    /// A layer skipped: the residual stream passes it unchanged.
    Dropped(usize),
}

impl Step {
    /// The original layers the step stands for (a dropped layer's too: steps
    /// start at layer boundaries whatever they compute).
    pub fn layers(&self) -> &[usize] {
        match self {
            Step::Layer(i) | Step::Dropped(i) => std::slice::from_ref(i),
            Step::Parallel(g) => &g.layers,
        }
    }

    /// The layers the step computes: none for a dropped layer.
    pub fn computed(&self) -> &[usize] {
        match self {
            Step::Dropped(_) => &[],
            s => s.layers(),
        }
    }

    pub fn is_dropped(&self) -> bool {
        matches!(self, Step::Dropped(_))
    }
}

/// `d12` or `d12-14`: the dropped layers `a..=b` as the plan syntax writes them.
pub fn dropped_run(a: usize, b: usize) -> String {
    if a == b {
        format!("d{a}")
    } else {
        format!("d{a}-{b}")
    }
}

/// `a+b+c`, the way a group is written in messages.
fn group_name(layers: &[usize]) -> String {
    let names: Vec<String> = layers.iter().map(usize::to_string).collect();
    names.join("+")
}

/// A full plan over `num_layers` layers: every layer appears exactly once, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub num_layers: usize,
    pub steps: Vec<Step>,
}

impl Plan {
    /// The original model: one step per layer.
    pub fn sequential(num_layers: usize) -> Plan {
        Plan {
            num_layers,
            steps: (0..num_layers).map(Step::Layer).collect(),
        }
    }

    /// A plan from parallel groups (each ascending, consecutive, at least two layers);
    /// every other layer runs on its own.
    pub fn from_groups(num_layers: usize, groups: Vec<Vec<usize>>) -> Result<Plan> {
        Plan::new(num_layers, groups, Vec::new())
    }

    /// A plan from parallel groups and dropped layers; every other layer runs
    /// on its own. At least one layer must be kept.
    pub fn new(
        num_layers: usize,
        mut groups: Vec<Vec<usize>>,
        dropped: Vec<usize>,
    ) -> Result<Plan> {
        groups.sort();
        let err = |msg: String| {
            let mut spec: Vec<String> = groups.iter().map(|g| group_name(g)).collect();
            spec.extend(dropped.iter().map(|l| format!("d{l}")));
            Err(Error::Plan {
                spec: spec.join(","),
                msg,
            })
        };
        let out_of_range = |l: usize| {
            format!(
                "layer {l} is out of range (the model has {num_layers} layers, 0 to {})",
                num_layers.saturating_sub(1)
            )
        };
        let mut owner = vec![None; num_layers];
        for (g, layers) in groups.iter().enumerate() {
            if layers.len() < 2 {
                return err(format!("group {layers:?} has fewer than two layers"));
            }
            for w in layers.windows(2) {
                if w[1] <= w[0] {
                    return err(format!(
                        "group {} must list distinct layers in ascending order",
                        group_name(layers)
                    ));
                }
                if w[1] != w[0] + 1 {
                    return err(format!(
                        "group {} is not consecutive (layer {} lies between): only adjacent \
                         layers run in parallel, e.g. {}-{}",
                        group_name(layers),
                        w[0] + 1,
                        w[0],
                        w[0] + 1
                    ));
                }
            }
            for &l in layers {
                if l >= num_layers {
                    return err(out_of_range(l));
                }
                if let Some(other) = owner[l] {
                    let o: &Vec<usize> = &groups[other];
                    return err(format!(
                        "layer {l} is in two groups ({}-{} and {}-{})",
                        o[0],
                        o[o.len() - 1],
                        layers[0],
                        layers[layers.len() - 1]
                    ));
                }
                owner[l] = Some(g);
            }
        }
        let mut is_dropped = vec![false; num_layers];
        for &l in &dropped {
            if l >= num_layers {
                return err(out_of_range(l));
            }
            if let Some(g) = owner[l] {
                let o: &Vec<usize> = &groups[g];
                return err(format!(
                    "layer {l} is dropped and in group {}-{}",
                    o[0],
                    o[o.len() - 1]
                ));
            }
            if is_dropped[l] {
                return err(format!("layer {l} is dropped twice"));
            }
            is_dropped[l] = true;
        }
        if num_layers > 0 && dropped.len() == num_layers {
            return err(format!(
                "every layer is dropped: keep at least one of the {num_layers}"
            ));
        }
        let mut steps = Vec::new();
        let mut l = 0;
        while l < num_layers {
            if is_dropped[l] {
                steps.push(Step::Dropped(l));
                l += 1;
                continue;
            }
            match owner[l] {
                Some(g) => {
                    steps.push(Step::Parallel(ParallelGroup {
                        layers: groups[g].clone(),
                    }));
                    l += groups[g].len();
                }
                None => {
                    steps.push(Step::Layer(l));
                    l += 1;
                }
            }
        }
        Ok(Plan { num_layers, steps })
    }

    /// Parse the command-line syntax (see the module doc).
    pub fn parse(spec: &str, num_layers: usize) -> Result<Plan> {
        let err = |msg: String| Error::Plan {
            spec: spec.to_string(),
            msg,
        };
        let num = |s: &str| -> Result<usize> {
            s.trim()
                .parse::<usize>()
                .map_err(|_| err(format!("`{}` is not a layer index", s.trim())))
        };
        // Checked before any group is built, so that a huge index costs nothing.
        let in_range = |l: usize| -> Result<usize> {
            if l < num_layers {
                Ok(l)
            } else {
                Err(err(format!(
                    "layer {l} is out of range (the model has {num_layers} layers, 0 to {})",
                    num_layers.saturating_sub(1)
                )))
            }
        };
        let mut groups = Vec::new();
        let mut dropped = Vec::new();
        for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            if let Some(d) = item.strip_prefix('d') {
                let (first, last) = match d.split_once('-') {
                    Some((a, b)) => (num(a)?, num(b)?),
                    None => {
                        let l = num(d)?;
                        (l, l)
                    }
                };
                if last < first {
                    return Err(err(format!(
                        "dropped range d{first}-{last} must name ascending layers"
                    )));
                }
                in_range(last)?;
                dropped.extend(first..=last);
            } else if let Some((a, b)) = item.split_once("..") {
                let (start, end) = (num(a)?, num(b)?);
                if end <= start || (end - start) % 2 != 0 {
                    return Err(err(format!(
                        "range {start}..{end} must be non-empty and of even length: it is split into adjacent pairs"
                    )));
                }
                in_range(end - 1)?;
                for s in (start..end).step_by(2) {
                    groups.push(vec![s, s + 1]);
                }
            } else if item.contains('+') {
                let layers = item.split('+').map(|s| num(s).and_then(in_range));
                groups.push(layers.collect::<Result<Vec<_>>>()?);
            } else if let Some((a, b)) = item.split_once('-') {
                let (first, last) = (num(a)?, num(b)?);
                if last <= first {
                    return Err(err(format!(
                        "group {first}-{last} must name ascending layers, at least two"
                    )));
                }
                in_range(last)?;
                groups.push((first..=last).collect());
            } else {
                let l = num(item)?;
                return Err(err(format!(
                    "`{l}` alone is not a group: write a pair like {l}-{} or a range like {l}..{} \
                     (or d{l} to drop it)",
                    l + 1,
                    l + 2
                )));
            }
        }
        Plan::new(num_layers, groups, dropped).map_err(|e| match e {
            Error::Plan { msg, .. } => err(msg),
            e => e,
        })
    }

    /// A plan of adjacent pairs `(i, i + 1)`, as the search builds them.
    pub fn from_pairs(num_layers: usize, pairs: &[(usize, usize)]) -> Result<Plan> {
        let groups = pairs.iter().map(|&(a, b)| (a..=b).collect()).collect();
        Plan::from_groups(num_layers, groups)
    }

    /// A plan of dropped layers only, as the search's depth-pruning baseline
    /// builds them.
    pub fn from_dropped(num_layers: usize, dropped: &[usize]) -> Result<Plan> {
        Plan::new(num_layers, Vec::new(), dropped.to_vec())
    }

    pub fn groups(&self) -> impl Iterator<Item = &ParallelGroup> {
        self.steps.iter().filter_map(|s| match s {
            Step::Parallel(g) => Some(g),
            _ => None,
        })
    }

    /// The dropped layers, ascending.
    pub fn dropped(&self) -> Vec<usize> {
        self.steps
            .iter()
            .filter_map(|s| match s {
                Step::Dropped(l) => Some(*l),
                _ => None,
            })
            .collect()
    }

    /// The original model: no group, no layer dropped.
    pub fn is_sequential(&self) -> bool {
        self.steps.iter().all(|s| matches!(s, Step::Layer(_)))
    }

    /// Layers before the first step that is not the original's own layer:
    /// the plan runs them as the original does.
    pub fn unchanged_layers(&self) -> usize {
        self.steps
            .iter()
            .enumerate()
            .take_while(|(i, s)| **s == Step::Layer(*i))
            .count()
    }

    /// Effective depth: the number of steps that compute.
    pub fn depth(&self) -> usize {
        self.steps.iter().filter(|s| !s.is_dropped()).count()
    }

    /// The layers kept (original indices, ascending) and this plan over them
    /// alone, renumbered `0..kept.len()`: the model an emitted file holds
    /// when layers are dropped. Without dropped layers, every layer and the
    /// plan itself.
    pub fn without_dropped(&self) -> (Vec<usize>, Plan) {
        let kept: Vec<usize> = (0..self.num_layers)
            .filter(|l| !self.steps.contains(&Step::Dropped(*l)))
            .collect();
        let index = |l: usize| kept.binary_search(&l).expect("a kept layer");
        let steps = self
            .steps
            .iter()
            .filter_map(|s| match s {
                Step::Dropped(_) => None,
                Step::Layer(l) => Some(Step::Layer(index(*l))),
                Step::Parallel(g) => Some(Step::Parallel(ParallelGroup {
                    layers: g.layers.iter().map(|&l| index(l)).collect(),
                })),
            })
            .collect();
        let plan = Plan {
            num_layers: kept.len(),
            steps,
        };
        (kept, plan)
    }
}

/// Plans travel between stages as values; reports and model metadata hold
/// their canonical text.
impl serde::Serialize for Plan {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Canonical syntax, in layer order: explicit groups `20-21,22-23` and
/// dropped runs `d12`, `d12-14`; empty for the original model.
impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts: Vec<String> = Vec::new();
        let mut run: Option<(usize, usize)> = None;
        let close = |run: &mut Option<(usize, usize)>, parts: &mut Vec<String>| {
            if let Some((a, b)) = run.take() {
                parts.push(dropped_run(a, b));
            }
        };
        for s in &self.steps {
            match s {
                Step::Dropped(l) => match &mut run {
                    Some((_, b)) if *b + 1 == *l => *b = *l,
                    _ => {
                        close(&mut run, &mut parts);
                        run = Some((*l, *l));
                    }
                },
                Step::Parallel(g) => {
                    close(&mut run, &mut parts);
                    parts.push(format!("{}-{}", g.layers[0], g.layers[g.layers.len() - 1]));
                }
                Step::Layer(_) => close(&mut run, &mut parts),
            }
        }
        close(&mut run, &mut parts);
        write!(f, "{}", parts.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(spec: &str, n: usize) -> String {
        Plan::parse(spec, n).unwrap_err().to_string()
    }

    #[test]
    fn range_splits_into_pairs() {
        let p = Plan::parse("20..24", 28).unwrap();
        assert_eq!(p.to_string(), "20-21,22-23");
        assert_eq!(p.depth(), 26);
        assert_eq!(
            p.steps[20],
            Step::Parallel(ParallelGroup {
                layers: vec![20, 21]
            })
        );
        assert_eq!(p.steps[22], Step::Layer(24));
    }

    #[test]
    fn explicit_groups_any_order_and_triples() {
        let p = Plan::parse("5-7, 1-2", 10).unwrap();
        assert_eq!(p.to_string(), "1-2,5-7");
        let flat: Vec<usize> = p.steps.iter().flat_map(|s| s.layers().to_vec()).collect();
        assert_eq!(flat, (0..10).collect::<Vec<_>>());
    }

    #[test]
    fn empty_is_original() {
        assert_eq!(Plan::parse("", 4).unwrap(), Plan::sequential(4));
        assert!(Plan::parse(" ", 4).unwrap().is_sequential());
    }

    #[test]
    fn errors_are_clear() {
        assert!(msg("2-3,3-4", 8).contains("layer 3 is in two groups"));
        assert!(msg("20..23", 28).contains("even length"));
        assert!(msg("26-28", 28)
            .contains("layer 28 is out of range (the model has 28 layers, 0 to 27)"));
        assert!(msg("4", 8).contains("alone is not a group"));
        assert!(msg("3-2", 8).contains("ascending"));
        assert!(msg("a-b", 8).contains("`a` is not a layer index"));
        assert!(msg("1+3", 8).contains("group 1+3 is not consecutive (layer 2 lies between)"));
        assert!(msg("3+3", 8).contains("distinct layers in ascending order"));
        assert!(msg("3+", 8).contains("`` is not a layer index"));
        // Huge indices are refused before anything is allocated for them.
        assert!(msg("22-12421242123", 28).contains("layer 12421242123 is out of range"));
        assert!(msg("0..99999999998", 28).contains("out of range"));
        assert!(msg("1+99999999999", 28).contains("out of range"));
    }

    #[test]
    fn dropped_layers() {
        let p = Plan::parse("d12-13, 4-5, d20", 24).unwrap();
        assert_eq!(p.to_string(), "4-5,d12-13,d20");
        assert_eq!(p.dropped(), [12, 13, 20]);
        assert_eq!(p.depth(), 24 - 1 - 3);
        assert!(!p.is_sequential());
        assert_eq!(Plan::parse(&p.to_string(), 24).unwrap(), p);
        let (kept, q) = p.without_dropped();
        assert_eq!(kept.len(), 21);
        assert_eq!(kept[12], 14);
        assert_eq!(q.num_layers, 21);
        assert_eq!(q.to_string(), "4-5");
        assert_eq!(q.depth(), p.depth());
        let q = Plan::parse("d3,5-6", 8).unwrap().without_dropped().1;
        assert_eq!(q.to_string(), "4-5");
        assert!(msg("d3,3-4", 8).contains("layer 3 is dropped and in group 3-4"));
        assert!(msg("d3,d3", 8).contains("dropped twice"));
        assert!(msg("d0-3", 4).contains("every layer is dropped"));
        assert!(msg("d9", 8).contains("out of range"));
        assert!(msg("d5-4", 8).contains("ascending"));
        assert!(msg("4", 8).contains("d4 to drop it"));
        // Adjacent drop items print as one run.
        assert_eq!(Plan::parse("d2,d3", 8).unwrap().to_string(), "d2-3");
    }

    #[test]
    fn plus_lists_the_layers_of_a_group() {
        assert_eq!(Plan::parse("4+5, 1+2+3", 8).unwrap().to_string(), "1-3,4-5");
    }
}
