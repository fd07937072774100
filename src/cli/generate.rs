//! `goodtriever generate`: sample continuations from the model, with or without the control.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;
use goodtriever::detox::{AdjustOptions, ControlHook};
use goodtriever::generate::{Generator, Sample, SamplingParams, StepHook};
use goodtriever::model::{resolve_model_path, Model, WeightFormat};
use goodtriever::rule::{Mode, RuleParams};
use serde_json::json;

use super::control_args::{control_hook, SearchArgs};

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
    #[arg(long, default_value_t = 20)]
    pub max_new_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f32,
    /// Nucleus sampling mass, in (0, 1]; 1 switches it off.
    #[arg(long, default_value_t = 0.9)]
    pub top_p: f32,
    /// Keep only the k most likely tokens; 0 switches it off.
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// A GGUF llama-family model; the default model (`goodtriever model fetch`) when omitted.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// How the weights are held: native (as in the file; our Q4_1/Q8_0 kernels, the fastest
    /// decoding for the default model), q8_0 or f32.
    #[arg(long, default_value = "native", value_parser = parse_format)]
    pub weights: WeightFormat,
    /// One JSON object per sample: prompt, continuation, token ids, timing.
    #[arg(long)]
    pub json: bool,
    /// The toxic datastore (anti-expert).
    #[arg(long)]
    pub toxic: Option<PathBuf>,
    /// The non-toxic datastore (expert).
    #[arg(long)]
    pub nontoxic: Option<PathBuf>,
    /// Strength of the control (α).
    #[arg(long, default_value_t = RuleParams::default().alpha, allow_negative_numbers = true)]
    pub alpha: f32,
    /// Temperature of the kNN softmax over squared L2 distances (not the sampling temperature).
    #[arg(long, default_value_t = RuleParams::default().temperature)]
    pub knn_temperature: f32,
    /// Neighbours retrieved from each datastore.
    #[arg(long, default_value_t = RuleParams::default().k)]
    pub k: usize,
    /// Base nucleus kept before the experts are combined, in (0, 1].
    #[arg(long, default_value_t = RuleParams::default().filter_p)]
    pub filter_p: f32,
    /// Weight of the kNN distribution in knn-lm mode.
    #[arg(long, default_value_t = RuleParams::default().lambda)]
    pub lambda: f32,
    /// ensemble (both stores), toxic-only, or knn-lm (non-toxic store only).
    #[arg(long, default_value = "ensemble", value_parser = parse_mode)]
    pub mode: Mode,
    #[command(flatten)]
    pub search: SearchArgs,
}

fn parse_format(s: &str) -> Result<WeightFormat, String> {
    s.parse()
        .map_err(|e: goodtriever::model::ModelError| e.to_string())
}

fn parse_mode(s: &str) -> Result<Mode, String> {
    s.parse()
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

fn control(args: &GenerateArgs, model: &Model) -> anyhow::Result<Option<ControlHook>> {
    let opts = AdjustOptions {
        params: RuleParams {
            alpha: args.alpha,
            temperature: args.knn_temperature,
            k: args.k,
            filter_p: args.filter_p,
            lambda: args.lambda,
        },
        mode: args.mode,
    };
    opts.params.validate()?;
    control_hook(
        args.toxic.as_deref(),
        args.nontoxic.as_deref(),
        opts,
        args.search.params(),
        model,
    )
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let prompts = read_prompts(&args)?;
    let path = resolve_model_path(args.model.as_deref())?;
    let model = Model::load(&path, args.weights)
        .with_context(|| format!("loading the model {}", path.display()))?;
    let mut hook = control(&args, &model)?;
    let params = SamplingParams {
        num_samples: args.num_samples,
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        top_p: args.top_p,
        top_k: args.top_k,
        seed: args.seed,
    };
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
        let control = if hook.is_some() {
            format!(
                ", control {:.1} ms ({:.0}%)",
                hook_ms,
                100.0 * hook_ms / step_ms.max(1e-9)
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
