//! `goodtriever generate`: sample continuations from the model, with or without the control.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;
use goodtriever::generate::{Generator, Sample};
use goodtriever::hook::StepHook;
use goodtriever::model::WeightFormat;
use serde_json::json;

use super::args::{
    ModelArgs, ModelFlags, ReuseArgs, SamplingArgs, SamplingRuleArgs, SearchArgs, StoreArgs,
};

/// Sample continuations of prompts; with --toxic/--nontoxic datastores, every step is steered
/// by the Goodtriever rule.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// A prompt (repeatable).
    #[arg(long)]
    pub prompt: Vec<String>,
    /// JSON Lines of prompts: a string per line, or objects with "prompt" (a string, or an
    /// object with "text", as in RealToxicityPrompts) or "text".
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// Continuations per prompt, decoded as one batch.
    #[arg(long, default_value_t = 1)]
    pub num_samples: usize,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub model: ModelArgs<GenerateModel>,
    /// One JSON object per sample: prompt, continuation, token ids, timing.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub stores: StoreArgs,
    #[command(flatten)]
    pub rule: SamplingRuleArgs,
    #[command(flatten)]
    pub search: SearchArgs,
    #[command(flatten)]
    pub reuse: ReuseArgs,
}

/// `generate` decodes a few rows at a time: the file's own kernels are the fastest.
#[derive(Debug)]
pub enum GenerateModel {}

impl ModelFlags for GenerateModel {
    const MODEL_HELP: &'static str =
        "A GGUF llama-family model; the default model (`goodtriever model fetch`) when omitted";
    const WEIGHTS_HELP: &'static str = "How the weights are held: native (as in the file; our \
        Q4_1/Q8_0 kernels, the fastest decoding for the default model), q8_0 or f32";
    const DEFAULT_WEIGHTS: WeightFormat = WeightFormat::Native;
}

fn read_prompts(args: &GenerateArgs) -> anyhow::Result<Vec<String>> {
    let mut prompts = args.prompt.clone();
    if let Some(path) = &args.prompts {
        let file =
            std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        for (i, line) in BufReader::new(file).lines().enumerate() {
            let line = line.with_context(|| format!("reading {}", path.display()))?;
            if line.trim().is_empty() {
                continue;
            }
            let where_ = || format!("{} line {}", path.display(), i + 1);
            let v: serde_json::Value = serde_json::from_str(&line).with_context(where_)?;
            let text = match &v {
                serde_json::Value::String(s) => Some(s.as_str()),
                serde_json::Value::Object(o) => match o.get("prompt").or_else(|| o.get("text")) {
                    Some(serde_json::Value::String(s)) => Some(s.as_str()),
                    Some(serde_json::Value::Object(p)) => p.get("text").and_then(|t| t.as_str()),
                    _ => None,
                },
                _ => None,
            };
            match text {
                Some(t) => prompts.push(t.to_string()),
                None => bail!(
                    "{}: expected a string or an object with \"prompt\" or \"text\"",
                    where_()
                ),
            }
        }
    }
    if prompts.is_empty() {
        bail!("no prompt: give --prompt TEXT or --prompts FILE.jsonl");
    }
    Ok(prompts)
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let prompts = read_prompts(&args)?;
    let model = args.model.load()?;
    let hook = args
        .stores
        .control_hook(args.rule.options()?, args.search.params(), &model)?;
    let mut hook = args.reuse.apply(hook)?;
    let params = args.sampling.params(args.num_samples, args.sampling.seed);
    let mut generator = Generator::new(&model, params)?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let (mut steps, mut step_ms, mut hook_ms, mut prefill_ms) = (0usize, 0.0, 0.0, 0.0);
    for (pi, prompt) in prompts.iter().enumerate() {
        let h = hook.as_mut().map(|h| h as &mut dyn StepHook);
        let samples = generator
            .generate_text(prompt, h)
            .with_context(|| format!("generating for prompt {}", pi + 1))?;
        // Samples share one batch: count each step's time once.
        if let Some(longest) = samples.iter().max_by_key(|s| s.timing.step_ms.len()) {
            steps += longest.timing.step_ms.len();
            step_ms += longest.timing.total_step_ms();
            hook_ms += longest.timing.total_hook_ms();
            prefill_ms += longest.timing.prefill_ms;
        }
        for (si, s) in samples.iter().enumerate() {
            if args.json {
                writeln!(out, "{}", record(pi, prompt, si, s))?;
            } else {
                if si == 0 {
                    writeln!(out, "=== {prompt}")?;
                }
                writeln!(out, "[{si}] {}", s.text)?;
            }
        }
    }
    if steps > 0 {
        let control = if let Some(h) = &hook {
            let (rows, skipped) = h.skip_counts();
            let skips = if skipped > 0 {
                format!(
                    ", {skipped} of {rows} rows not searched ({:.0}%)",
                    100.0 * skipped as f64 / rows.max(1) as f64
                )
            } else {
                String::new()
            };
            format!(
                ", control {:.1} ms ({:.0}%){skips}{}",
                hook_ms,
                100.0 * hook_ms / step_ms.max(1e-9),
                ReuseArgs::summary(h.reuse_stats())
            )
        } else {
            String::new()
        };
        eprintln!(
            "{} prompt(s) × {} sample(s): prefill {:.1} ms, {} decoding steps in {:.1} ms ({:.1} ms/step){}",
            prompts.len(),
            args.num_samples,
            prefill_ms,
            steps,
            step_ms,
            step_ms / steps as f64,
            control
        );
    }
    Ok(())
}

fn record(prompt_index: usize, prompt: &str, sample: usize, s: &Sample) -> serde_json::Value {
    json!({
        "prompt_index": prompt_index,
        "prompt": prompt,
        "sample": sample,
        "continuation": s.text,
        "token_ids": s.tokens,
        "stop": s.stop,
        "timing": {
            "prefill_ms": s.timing.prefill_ms,
            "step_ms": s.timing.step_ms,
            "hook_ms": s.timing.hook_ms,
            "total_step_ms": s.timing.total_step_ms(),
            "total_hook_ms": s.timing.total_hook_ms(),
        },
    })
}
