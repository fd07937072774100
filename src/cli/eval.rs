//! `goodtriever eval`: the sampling and perplexity halves of the toxicity evaluation
//! (scripts/eval/evaluate.py does the scoring and the metrics).
//!
//! `eval generate` samples many continuations per prompt from the base model and, in the same
//! run and with the same seeds, under the Goodtriever control, so the two variants differ only
//! by the control (paired samples) and share one model load. Each prompt's samples are one
//! batch of the existing [`Generator`]; every sample's record carries its batch's wall time, so
//! latency per sequence and the control's share of it come out of the same run.
//!
//! `eval perplexity` scores those continuations given their prompts under a model (the base
//! model by default), batched per prompt (see [`goodtriever::eval::continuation_logprobs`]).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use goodtriever::eval::{continuation_logprobs, read_prompts};
use goodtriever::generate::{Generator, StopReason};
use goodtriever::hook::StepHook;
use goodtriever::model::WeightFormat;
use serde_json::{json, Value};

use super::args::{
    ModelArgs, ModelFlags, ReuseArgs, SamplingArgs, SamplingRuleArgs, SearchArgs, StoreArgs,
};

#[derive(Debug, Args)]
pub struct EvalArgs {
    #[command(subcommand)]
    pub command: EvalCommand,
}

#[derive(Debug, Subcommand)]
pub enum EvalCommand {
    /// Sample continuations of every prompt, base and controlled, as JSON Lines.
    Generate(Box<EvalGenerateArgs>),
    /// Conditional perplexity of generated continuations given their prompts.
    Perplexity(EvalPerplexityArgs),
}

/// Samples for the evaluation: `--num-samples` continuations of each prompt from the base
/// model, and the same from the controlled model when datastores are given.
#[derive(Debug, Args)]
pub struct EvalGenerateArgs {
    /// JSON Lines prompts (scripts/data/make_prompts.py writes data/prompts.jsonl); fields other
    /// than "prompt" are copied into every output record.
    #[arg(long)]
    pub prompts: PathBuf,
    /// Only the first N prompts.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Output JSON Lines, one record per sample.
    #[arg(long)]
    pub out: PathBuf,
    /// Continuations per prompt (the paper: 25), decoded as one batch.
    #[arg(long, default_value_t = 25)]
    pub num_samples: usize,
    // Sampling (the paper: top-p 0.9, 20 tokens). `--seed` is the run's: each prompt's
    // samples are seeded from (seed, prompt index), the same for the base and the controlled
    // variant.
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub model: ModelArgs<EvalGenerateModel>,
    #[command(flatten)]
    pub stores: StoreArgs,
    /// Only the controlled variant (for sweeps that share one base run).
    #[arg(long)]
    pub skip_base: bool,
    /// Name of the controlled variant in the output (e.g. "alpha=1" in a sweep).
    #[arg(long, default_value = "goodtriever")]
    pub variant: String,
    #[command(flatten)]
    pub rule: SamplingRuleArgs,
    #[command(flatten)]
    pub search: SearchArgs,
    #[command(flatten)]
    pub reuse: ReuseArgs,
}

/// Conditional perplexity: for each record of `eval generate`'s output, the log-likelihood of
/// its continuation's tokens given the prompt.
#[derive(Debug, Args)]
pub struct EvalPerplexityArgs {
    /// `eval generate` output.
    #[arg(long)]
    pub input: PathBuf,
    /// Output JSON Lines: prompt_index, variant, sample, tokens, nll (nats), ppl.
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub model: ModelArgs<PerplexityModel>,
}

/// `eval generate` decodes one prompt's samples as a batch of a few rows: the file's own
/// kernels are the fastest.
#[derive(Debug)]
pub enum EvalGenerateModel {}

impl ModelFlags for EvalGenerateModel {
    const MODEL_HELP: &'static str = "A GGUF llama-family model; the default model when omitted";
    const WEIGHTS_HELP: &'static str = "How the weights are held: native (the file's, our \
        kernels: the fastest decoding for the default model), q8_0 or f32";
    const DEFAULT_WEIGHTS: WeightFormat = WeightFormat::Native;
}

/// `eval perplexity` scores whole continuations at once: dequantised weights are the fastest.
#[derive(Debug)]
pub enum PerplexityModel {}

impl ModelFlags for PerplexityModel {
    const MODEL_HELP: &'static str = "The scoring model; the default model when omitted";
    const WEIGHTS_HELP: &'static str =
        "f32 (the default) is the file's weights dequantised, and the fastest for batches";
    const DEFAULT_WEIGHTS: WeightFormat = WeightFormat::F32;
}

pub fn run(args: EvalArgs) -> anyhow::Result<()> {
    match args.command {
        EvalCommand::Generate(a) => generate(*a),
        EvalCommand::Perplexity(a) => perplexity(a),
    }
}

fn create(path: &Path) -> anyhow::Result<BufWriter<File>> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    Ok(BufWriter::new(
        File::create(path).with_context(|| format!("creating {}", path.display()))?,
    ))
}

/// Each prompt's seed: distinct per prompt, independent of the batch and of `--limit`.
fn prompt_seed(seed: u64, prompt_index: usize) -> u64 {
    seed ^ (prompt_index as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03)
}

fn generate(args: EvalGenerateArgs) -> anyhow::Result<()> {
    let file =
        File::open(&args.prompts).with_context(|| format!("opening {}", args.prompts.display()))?;
    let mut prompts = read_prompts(BufReader::new(file))
        .with_context(|| format!("reading {}", args.prompts.display()))?;
    if let Some(n) = args.limit {
        prompts.truncate(n);
    }
    if prompts.is_empty() {
        bail!("{} holds no prompt", args.prompts.display());
    }
    let model = args.model.load()?;
    let hook = args
        .stores
        .control_hook(args.rule.options()?, args.search.params(), &model)?;
    let mut hook = args.reuse.apply(hook)?;
    if hook.is_none() && args.skip_base {
        bail!("--skip-base leaves nothing to generate without --toxic/--nontoxic");
    }
    let rule = hook.as_ref().map(|_| args.rule.options()).transpose()?;
    let mut out = create(&args.out)?;
    let started = Instant::now();
    let (mut sequences, mut step_ms, mut hook_ms) = (0usize, BTreeMap::new(), 0.0);
    let (mut rows_total, mut skipped_total) = (0u64, 0u64);
    for (pi, prompt) in prompts.iter().enumerate() {
        let params = args
            .sampling
            .params(args.num_samples, prompt_seed(args.sampling.seed, pi));
        let mut generator = Generator::new(&model, params)?;
        let prompt_tokens = model.tokenizer().encode(&prompt.text)?;
        let mut variants: Vec<(&str, Option<&mut dyn StepHook>)> = Vec::new();
        if !args.skip_base {
            variants.push(("base", None));
        }
        if let Some(h) = hook.as_mut() {
            variants.push((args.variant.as_str(), Some(h as &mut dyn StepHook)));
        }
        for (variant, mut h) in variants {
            let skips_before = h.as_ref().map_or((0, 0), |h| h.skip_counts());
            let reuse_before = h.as_ref().and_then(|h| h.reuse_stats()).unwrap_or_default();
            let t0 = Instant::now();
            let samples = generator
                .generate(
                    &prompt_tokens,
                    h.as_mut().map(|h| &mut **h as &mut dyn StepHook),
                )
                .with_context(|| format!("prompt {} ({variant})", pi + 1))?;
            let skips_after = h.as_ref().map_or((0, 0), |h| h.skip_counts());
            let reuse_after = h.as_ref().and_then(|h| h.reuse_stats()).unwrap_or_default();
            let batch_reused = reuse_after.reused - reuse_before.reused;
            let batch_store_searches = reuse_after.row_searches - reuse_before.row_searches;
            let (batch_rows, batch_skipped) = (
                skips_after.0 - skips_before.0,
                skips_after.1 - skips_before.1,
            );
            rows_total += batch_rows;
            skipped_total += batch_skipped;
            let batch_ms = t0.elapsed().as_secs_f64() * 1e3;
            let longest = samples
                .iter()
                .max_by_key(|s| s.timing.step_ms.len())
                .expect("at least one sample");
            let batch_hook_ms = longest.timing.total_hook_ms();
            *step_ms.entry(variant.to_string()).or_insert(0.0) += batch_ms;
            hook_ms += batch_hook_ms;
            sequences += samples.len();
            for (si, s) in samples.iter().enumerate() {
                let mut rec = json!({
                    "prompt_index": pi,
                    "variant": variant,
                    "sample": si,
                    "prompt": prompt.text,
                    "continuation": s.text,
                    "prompt_tokens": prompt_tokens.len(),
                    "token_ids": s.tokens,
                    "stop": s.stop,
                    "batch_size": samples.len(),
                    "batch_ms": batch_ms,
                    "batch_prefill_ms": longest.timing.prefill_ms,
                    "batch_hook_ms": batch_hook_ms,
                    "batch_steps": longest.timing.step_ms.len(),
                    "batch_rows_controlled": batch_rows,
                    "batch_rows_skipped": batch_skipped,
                    "batch_store_searches": batch_store_searches,
                    "batch_store_searches_reused": batch_reused,
                    "batch_reuse_audited": reuse_after.audited - reuse_before.audited,
                    "batch_reuse_recall_sum": reuse_after.recall_sum - reuse_before.recall_sum,
                    "seed": args.sampling.seed,
                });
                if variant != "base" {
                    rec["rule"] = serde_json::to_value(rule)?;
                }
                let obj = rec.as_object_mut().expect("an object");
                for (k, v) in &prompt.meta {
                    obj.entry(k.clone()).or_insert_with(|| v.clone());
                }
                serde_json::to_writer(&mut out, &rec)?;
                out.write_all(b"\n")?;
            }
        }
        if (pi + 1) % 10 == 0 || pi + 1 == prompts.len() {
            eprintln!(
                "[eval generate] {}/{} prompts, {sequences} sequences, {:.0} s",
                pi + 1,
                prompts.len(),
                started.elapsed().as_secs_f64()
            );
        }
    }
    out.flush()?;
    for (variant, ms) in &step_ms {
        let n = (prompts.len() * args.num_samples) as f64;
        eprintln!("[eval generate] {variant}: {:.1} ms per sequence", ms / n);
    }
    if let Some(ms) = step_ms
        .get(args.variant.as_str())
        .filter(|_| hook.is_some())
    {
        eprintln!(
            "[eval generate] control: {:.0}% of the controlled variant's time; {skipped_total} of {rows_total} rows not searched ({:.1}%){}",
            100.0 * hook_ms / ms.max(1e-9),
            100.0 * skipped_total as f64 / rows_total.max(1) as f64,
            ReuseArgs::summary(hook.as_ref().and_then(|h| h.reuse_stats()))
        );
    }
    Ok(())
}

/// A generated record's continuation tokens without the stop token.
fn continuation_tokens(rec: &Value) -> anyhow::Result<Vec<u32>> {
    let ids = rec["token_ids"]
        .as_array()
        .context("a record without \"token_ids\"")?;
    let mut ids: Vec<u32> = ids
        .iter()
        .map(|v| {
            v.as_u64()
                .map(|x| x as u32)
                .context("a non-integer token id")
        })
        .collect::<anyhow::Result<_>>()?;
    let eos = serde_json::to_value(StopReason::Eos)?;
    if rec["stop"] == eos {
        ids.pop();
    }
    Ok(ids)
}

fn perplexity(args: EvalPerplexityArgs) -> anyhow::Result<()> {
    let file =
        File::open(&args.input).with_context(|| format!("opening {}", args.input.display()))?;
    let model = args.model.load()?;
    let mut out = create(&args.out)?;
    let started = Instant::now();
    let mut group: Vec<Value> = Vec::new();
    let mut scored = 0usize;
    let mut flush = |group: &mut Vec<Value>, out: &mut BufWriter<File>| -> anyhow::Result<()> {
        let Some(first) = group.first() else {
            return Ok(());
        };
        let prompt = first["prompt"]
            .as_str()
            .context("a record without \"prompt\"")?;
        let prompt_tokens = model.tokenizer().encode(prompt)?;
        let conts: Vec<Vec<u32>> = group
            .iter()
            .map(continuation_tokens)
            .collect::<anyhow::Result<_>>()?;
        let refs: Vec<&[u32]> = conts.iter().map(|c| c.as_slice()).collect();
        let lps = continuation_logprobs(&model, &prompt_tokens, &refs)?;
        for (rec, lp) in group.iter().zip(&lps) {
            let nll: f64 = -lp.iter().map(|&x| f64::from(x)).sum::<f64>();
            let n = lp.len();
            let ppl = if n > 0 {
                json!((nll / n as f64).exp())
            } else {
                Value::Null
            };
            let row = json!({
                "prompt_index": rec["prompt_index"],
                "variant": rec["variant"],
                "sample": rec["sample"],
                "tokens": n,
                "nll": nll,
                "ppl": ppl,
            });
            serde_json::to_writer(&mut *out, &row)?;
            out.write_all(b"\n")?;
        }
        scored += group.len();
        group.clear();
        Ok(())
    };
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let rec: Value = serde_json::from_str(&line)
            .with_context(|| format!("{} line {}", args.input.display(), i + 1))?;
        let same = group.first().is_some_and(|g| {
            g["prompt_index"] == rec["prompt_index"] && g["variant"] == rec["variant"]
        });
        if !same {
            flush(&mut group, &mut out)?;
        }
        group.push(rec);
    }
    flush(&mut group, &mut out)?;
    out.flush()?;
    eprintln!(
        "[eval perplexity] {scored} continuations in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
