//! `goodtriever explain`: generate with the control and show, for every generated token, the
//! tokens the control pushed down and up the most and the store rows behind them, with their
//! source text (docs/architecture.md §2, "Explaining a step").

use std::io::Write;

use anyhow::{bail, Context};
use clap::Args;
use goodtriever::explain::{ExplainHook, ExplainOptions, StepExplanation, TokenMove};
use goodtriever::generate::Generator;
use goodtriever::model::Model;
use serde_json::json;

use super::args::{ModelArgs, SamplingArgs, SamplingRuleArgs, SearchArgs, StoreArgs};
use super::generate::GenerateModel;

/// Generate a continuation with the control and explain every token: which tokens the
/// toxic and non-toxic stores pushed down and up, and which of their rows (segment, row,
/// distance, weight, the text it was built from) did it.
#[derive(Debug, Args)]
pub struct ExplainArgs {
    /// The prompt to continue.
    #[arg(long)]
    pub prompt: String,
    /// Tokens listed per step in each direction (pushed down, pushed up).
    #[arg(long, default_value_t = 3)]
    pub top: usize,
    /// Store rows listed per token, heaviest first.
    #[arg(long, default_value_t = 2)]
    pub rows: usize,
    /// Bytes of source text shown either side of a row's token.
    #[arg(long, default_value_t = 60)]
    pub context: usize,
    /// One JSON object: the prompt, the continuation and every step's explanation.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub model: ModelArgs<GenerateModel>,
    #[command(flatten)]
    pub stores: StoreArgs,
    #[command(flatten)]
    pub rule: SamplingRuleArgs,
    #[command(flatten)]
    pub search: SearchArgs,
}

pub fn run(args: ExplainArgs) -> anyhow::Result<()> {
    let options = ExplainOptions {
        top: args.top,
        rows: args.rows,
        context_bytes: args.context,
    };
    options.validate()?;
    if args.stores.toxic.is_none() && args.stores.nontoxic.is_none() {
        bail!("explain shows what the control did: give --toxic and --nontoxic (or the store --mode needs)");
    }
    let model = args.model.load()?;
    let opts = args.rule.options()?;
    let detox = args.stores.detoxifier(opts, args.search.params(), &model)?;
    let mut hook = ExplainHook::new(&detox, opts)?;
    let mut generator = Generator::new(&model, args.sampling.params(1, args.sampling.seed))?;
    let sample = generator
        .generate_text(&args.prompt, Some(&mut hook))
        .context("generating")?
        .into_iter()
        .next()
        .context("the generator returned no sample")?;
    let text = |t: u32| token_text(&model, t);
    let steps: Vec<StepExplanation> = hook
        .traces()
        .iter()
        .zip(&sample.tokens)
        .enumerate()
        .map(|(i, (trace, &tok))| {
            trace
                .explain(&detox, &options, Some(tok), &text)
                .with_context(|| format!("explaining step {}", i + 1))
        })
        .collect::<anyhow::Result<_>>()?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    if args.json {
        let v = json!({
            "prompt": args.prompt,
            "continuation": sample.text,
            "token_ids": sample.tokens,
            "mode": opts.mode,
            "params": opts.params,
            "steps": steps,
        });
        writeln!(out, "{}", serde_json::to_string(&v)?)?;
        return Ok(());
    }
    writeln!(out, "prompt        {}", quoted(&args.prompt))?;
    writeln!(out, "continuation  {}", quoted(&sample.text))?;
    for (i, step) in steps.iter().enumerate() {
        writeln!(out)?;
        if let Some(c) = &step.chosen {
            writeln!(out, "step {:>3}  chose {}", i + 1, movement(c))?;
        }
        for (label, list) in [("down", &step.pushed_down), ("up", &step.pushed_up)] {
            for m in list {
                writeln!(out, "  {label:<4} {}", movement(m))?;
                for r in &m.rows {
                    let place = match (r.segment, r.row_in_segment) {
                        (Some(s), Some(row)) => format!("segment {s} row {row}"),
                        _ => format!("row {}", r.id),
                    };
                    let src = match &r.source {
                        Some(s) => format!(
                            "{}[{}]{}",
                            printable(&s.before),
                            printable(&s.token),
                            printable(&s.after)
                        ),
                        None => "(no source text: the segment records none)".into(),
                    };
                    writeln!(
                        out,
                        "         {:<8} {place:<22} d={:<10.3} w={:<8.5} {src}",
                        r.store, r.distance, r.weight
                    )?;
                }
            }
        }
    }
    Ok(())
}

fn token_text(model: &Model, t: u32) -> Option<String> {
    model.tokenizer().decode(&[t], false).ok()
}

fn movement(m: &TokenMove) -> String {
    let experts: Vec<String> = m
        .experts
        .iter()
        .map(|e| format!("{} p={:.3} ({} rows)", e.store, e.probability, e.neighbours))
        .collect();
    format!(
        "{:<14} {:>8.3} -> {:>8.3} ({:+.3})  {}",
        quoted(m.text.as_deref().unwrap_or("?")),
        m.base_log_prob,
        m.controlled_log_prob,
        m.change,
        experts.join(", ")
    )
}

fn quoted(s: &str) -> String {
    format!("{s:?}")
}

/// Source text on one line: control characters (newlines, escapes) shown escaped.
fn printable(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}
