//! `goodtriever adjust`: the control applied offline to hidden states (and logits) dumped by
//! another engine; the same engine the server and the generator call.

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Args;
use goodtriever::detox::{DetoxScratch, Detoxifier};
use goodtriever::npy;
use goodtriever::rule::SparseRow;

use super::args::{RuleArgs, SearchArgs, StoreArgs};

/// Adjust dumped hidden states with the toxic and non-toxic datastores.
///
/// With --logits, OUT is an .npy of normalised log-probabilities [B, V] (-inf where the
/// nucleus filter removed a token). Without, OUT is JSON Lines, one object per row:
/// {"row", "scale", "bias": [[token, bias], ...]} to add to scale·log_softmax(logits) after
/// the nucleus filter (knn-lm mode: {"row", "lambda", "log_probs": [[token, ln p], ...]}).
#[derive(Debug, Args)]
pub struct AdjustArgs {
    #[command(flatten)]
    pub stores: StoreArgs,
    /// Hidden states, .npy f32 [B, D], of the stores' key type.
    #[arg(long)]
    pub hidden: PathBuf,
    /// Raw next-token logits, .npy f32 [B, V]. Without them the answer is sparse.
    #[arg(long)]
    pub logits: Option<PathBuf>,
    /// Vocabulary size, for stores imported without one (the logits' width when given).
    #[arg(long)]
    pub vocab_size: Option<usize>,
    #[command(flatten)]
    pub rule: RuleArgs,
    #[command(flatten)]
    pub search: SearchArgs,
    /// Output: .npy with --logits, JSON Lines without.
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(args: AdjustArgs) -> anyhow::Result<()> {
    let opts = args.rule.options()?;
    let stores = args.stores.open(opts.mode)?;

    let (rows, dim, hidden) = npy::read_queries(&args.hidden)?;
    let logits = match &args.logits {
        Some(path) => {
            let (lrows, vocab, data) = npy::read_queries(path)?;
            if lrows != rows {
                bail!(
                    "{} has {lrows} rows but {} has {rows}: give one row of logits per hidden state",
                    path.display(),
                    args.hidden.display()
                );
            }
            Some((vocab, data))
        }
        None => None,
    };
    let vocab = args.vocab_size.or(logits.as_ref().map(|l| l.0));
    let detox = Detoxifier::new(stores, opts, args.search.params(), vocab)?;
    if dim != detox.dim() {
        bail!(
            "{} has rows of {dim} values but the datastores hold keys of size {}",
            args.hidden.display(),
            detox.dim()
        );
    }
    let mut scratch = DetoxScratch::default();
    match logits {
        Some((vocab, logits)) => {
            let mut out = vec![0.0f32; logits.len()];
            detox.adjust_dense(&hidden, &logits, &opts, &mut scratch, &mut out)?;
            npy::write_f32(&args.out, rows, vocab, &out)?;
        }
        None => {
            let mut out = Vec::new();
            detox.adjust_sparse(&hidden, &opts, &mut scratch, &mut out)?;
            write_sparse_jsonl(&args.out, &out)?;
        }
    }
    eprintln!(
        "adjusted {rows} rows ({} mode) -> {}",
        opts.mode,
        args.out.display()
    );
    Ok(())
}

fn write_sparse_jsonl(path: &Path, rows: &[SparseRow]) -> anyhow::Result<()> {
    let file =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut w = BufWriter::new(file);
    for (row, answer) in rows.iter().enumerate() {
        let line = match answer {
            SparseRow::Bias { scale, pairs } => serde_json::json!({
                "row": row, "scale": scale, "bias": pairs,
            }),
            SparseRow::Mixture { lambda, log_probs } => serde_json::json!({
                "row": row, "lambda": lambda, "log_probs": log_probs,
            }),
        };
        serde_json::to_writer(&mut w, &line)?;
        w.write_all(b"\n")?;
    }
    w.flush()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
