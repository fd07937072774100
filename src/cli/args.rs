//! Argument groups that several subcommands flatten, so that each flag is spelled, parsed and
//! defaulted in one place: the model ([`ModelArgs`]), the control's datastores
//! ([`StoreArgs`]), the rule's knobs ([`RuleArgs`], [`SamplingRuleArgs`]), the search
//! ([`SearchArgs`]) and the sampler ([`SamplingArgs`]).
//!
//! Two temperatures meet in the commands that sample: the sampler's and the kNN softmax's.
//! Everywhere, `--knn-temperature` is the kNN's (T of the rule) and, in the commands that
//! sample (`generate`, `eval generate`), `--temperature` is the sampler's. `adjust` and `serve`
//! do not sample, so there `--temperature` stays accepted as another name for the kNN's
//! ([`RuleArgs`]); the sampling commands flatten [`SamplingRuleArgs`], which drops that alias.

use std::marker::PhantomData;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::{ArgMatches, Args, Command, FromArgMatches};
use goodtriever::datastore::{SearchMode, SearchParams};
use goodtriever::detox::{AdjustOptions, ControlHook, ControlStore, Detoxifier};
use goodtriever::generate::SamplingParams;
use goodtriever::model::{resolve_model_path, Model, WeightFormat};
use goodtriever::reuse::{ReuseParams, ReuseStats};
use goodtriever::rule::{Mode, RuleParams};
use goodtriever::store::Store;

/// How one command words `--model` and `--weights`, and which weight format it defaults to.
///
/// The words and the default stay each command's because they follow what it does with the
/// model: decoding a few rows at a time is fastest on the file's own quantised kernels
/// (`native`), batched extraction and scoring on dequantised `f32`; and `serve` has no default
/// model at all. Each command implements this on an uninhabited marker type next to its
/// arguments.
pub trait ModelFlags {
    /// The help of `--model`.
    const MODEL_HELP: &'static str;
    /// The help of `--weights`.
    const WEIGHTS_HELP: &'static str;
    /// The default of `--weights`.
    const DEFAULT_WEIGHTS: WeightFormat;
}

/// `--model PATH` and `--weights FORMAT`, worded and defaulted by `F`.
#[derive(Debug, Args)]
pub struct ModelArgs<F: ModelFlags> {
    // No doc comments on these two fields: they would replace `F`'s help. And no
    // `default_value_t`: clap keeps its rendering in one static shared by every `F`.
    #[arg(long, help = F::MODEL_HELP)]
    pub model: Option<PathBuf>,
    #[arg(long, help = F::WEIGHTS_HELP, default_value = F::DEFAULT_WEIGHTS.as_str())]
    pub weights: WeightFormat,
    #[arg(skip)]
    flags: PhantomData<F>,
}

impl<F: ModelFlags> ModelArgs<F> {
    /// `--model`, or the default model (`goodtriever model fetch`) when it was not given.
    pub fn path(&self) -> anyhow::Result<PathBuf> {
        Ok(resolve_model_path(self.model.as_deref())?)
    }

    /// Loads [`Self::path`] with `--weights`.
    pub fn load(&self) -> anyhow::Result<Model> {
        let path = self.path()?;
        Model::load(&path, self.weights)
            .with_context(|| format!("loading the model {}", path.display()))
    }
}

/// The control's datastores. Which of them a command needs depends on `--mode`
/// ([`StoreArgs::open`]); `serve` makes both required, since each request may pick its mode.
#[derive(Debug, Args)]
pub struct StoreArgs {
    /// The toxic datastore (anti-expert): a directory, or a Milvus store
    /// `milvus://HOST:PORT/COLLECTION` (`milvuss://` for TLS; see docs/usage.md for its options).
    #[arg(long, value_name = "DIR|URL")]
    pub toxic: Option<String>,
    /// The non-toxic datastore (expert): a directory or a `milvus://` address, as --toxic.
    #[arg(long, value_name = "DIR|URL")]
    pub nontoxic: Option<String>,
}

impl StoreArgs {
    /// Opens the stores given as the control's experts (toxic weight −1, non-toxic +1), after
    /// checking that `mode` gets the stores it needs.
    pub fn open(&self, mode: Mode) -> anyhow::Result<Vec<ControlStore>> {
        let (toxic, nontoxic) = (self.toxic.as_deref(), self.nontoxic.as_deref());
        match mode {
            Mode::Ensemble if toxic.is_none() || nontoxic.is_none() => {
                bail!("ensemble mode needs both --toxic and --nontoxic")
            }
            Mode::ToxicOnly if toxic.is_none() => bail!("toxic-only mode needs --toxic"),
            Mode::KnnLm if nontoxic.is_none() => bail!("knn-lm mode needs --nontoxic"),
            _ => {}
        }
        let mut stores = Vec::new();
        for (path, name, role, weight) in [
            (toxic, "toxic", "toxic", -1.0),
            (nontoxic, "nontoxic", "non-toxic", 1.0),
        ] {
            if let Some(p) = path {
                stores.push(ControlStore {
                    name: name.into(),
                    store: open_store(p, role)?,
                    weight,
                });
            }
        }
        Ok(stores)
    }

    /// The generator's per-step control for `model`, or `None` when no store was given (the
    /// base model samples alone).
    pub fn control_hook(
        &self,
        opts: AdjustOptions,
        search: SearchParams,
        model: &Model,
    ) -> anyhow::Result<Option<ControlHook>> {
        if self.toxic.is_none() && self.nontoxic.is_none() {
            return Ok(None);
        }
        let detox = self.detoxifier(opts, search, model)?;
        Ok(Some(ControlHook::new(Arc::new(detox), opts)?))
    }

    /// The engine over the stores `opts.mode` needs, checked against `model`.
    pub fn detoxifier(
        &self,
        opts: AdjustOptions,
        search: SearchParams,
        model: &Model,
    ) -> anyhow::Result<Detoxifier> {
        let stores = self.open(opts.mode)?;
        let detox = Detoxifier::new(stores, opts, search, Some(model.config().vocab_size))?;
        if let Err(why) = model.fingerprint().check_compatible(detox.fingerprint()) {
            bail!("the datastores were built with another model than this one: {why}");
        }
        Ok(detox)
    }
}

fn open_store(address: &str, role: &str) -> anyhow::Result<Arc<dyn Store>> {
    goodtriever::store_address::open_store(address)
        .with_context(|| format!("opening the {role} datastore {address}"))
}

/// The decoding rule's parameters (defaults: the paper's).
#[derive(Debug, Clone, Args)]
pub struct RuleArgs {
    /// Strength of the control (α): 0 leaves the model's distribution as it is.
    #[arg(long, default_value_t = RuleParams::default().alpha, allow_negative_numbers = true)]
    pub alpha: f32,
    /// Temperature of the kNN softmax over squared L2 distances (T > 0); not the sampling
    /// temperature. `adjust` and `serve` also accept it as `--temperature`.
    #[arg(
        long = "knn-temperature",
        alias = "temperature",
        default_value_t = RuleParams::default().temperature
    )]
    pub knn_temperature: f32,
    /// Neighbours retrieved from each datastore (1..=4096).
    #[arg(long, default_value_t = RuleParams::default().k)]
    pub k: usize,
    /// Base nucleus kept before the experts are combined, in (0, 1]; 1 keeps every token.
    #[arg(long, default_value_t = RuleParams::default().filter_p)]
    pub filter_p: f32,
    /// Weight of the kNN distribution in knn-lm mode (λ, in [0, 1]).
    #[arg(long, default_value_t = RuleParams::default().lambda)]
    pub lambda: f32,
    /// Strength of the per-step toxicity gate (γ, in [0, 1]; ensemble only): each step's α is
    /// scaled by 1 − γ + γ·g, where g is how much nearer the step's context lies to the toxic
    /// store than to the non-toxic one (the size-corrected toxic share of its nearest
    /// neighbours). 0 is the paper's rule; 1 leaves contexts nearer the non-toxic store alone.
    #[arg(long, default_value_t = RuleParams::default().gate)]
    pub gate: f32,
    /// Nearest neighbours of both stores together that the gate counts.
    #[arg(long, default_value_t = RuleParams::default().gate_neighbours)]
    pub gate_neighbours: usize,
    /// Weight ρ of each store's own next-token frequencies in its expert (0 = off; else
    /// 0.001..=1000): a store then scores a token ln(1 + p_kNN/(ρ·p_unigram)), so that what
    /// one store says more often than the other overall stops being a bias. Local stores only.
    #[arg(long, default_value_t = RuleParams::default().prior)]
    pub prior: f32,
    /// Skip the search on steps where it cannot matter (ε in [0, 1); ensemble, local stores):
    /// a step whose base distribution gives less than ε to the tokens that lean toxic (the
    /// toxic store predicts them more than --skip-ratio times as often as the non-toxic one)
    /// is not searched and not biased. 0 searches every step, as the paper does.
    #[arg(long, default_value_t = RuleParams::default().skip)]
    pub skip: f32,
    /// The toxic-over-non-toxic frequency ratio above which a token leans toxic for --skip.
    #[arg(long, default_value_t = RuleParams::default().skip_ratio)]
    pub skip_ratio: f32,
    /// Count --skip's leaning probability inside the rule's base nucleus (--filter-p,
    /// renormalised) instead of over the whole base distribution: a leaning token that the
    /// nucleus drops is no reason to search. Costs one nucleus per row.
    #[arg(long)]
    pub skip_in_nucleus: bool,
    /// How the stores are combined: ensemble (toxic + non-toxic, the paper's), toxic-only, or
    /// knn-lm (interpolate with the non-toxic store).
    #[arg(long, default_value = "ensemble", value_parser = parse_mode)]
    pub mode: Mode,
}

fn parse_mode(s: &str) -> Result<Mode, String> {
    s.parse()
}

impl RuleArgs {
    /// The knobs as the engine takes them, checked.
    pub fn options(&self) -> anyhow::Result<AdjustOptions> {
        let params = RuleParams {
            alpha: self.alpha,
            temperature: self.knn_temperature,
            k: self.k,
            filter_p: self.filter_p,
            lambda: self.lambda,
            gate: self.gate,
            gate_neighbours: self.gate_neighbours,
            prior: self.prior,
            skip: self.skip,
            skip_ratio: self.skip_ratio,
            skip_in_nucleus: self.skip_in_nucleus,
        };
        params.validate()?;
        Ok(AdjustOptions {
            params,
            mode: self.mode,
        })
    }
}

/// [`RuleArgs`] for the commands that also sample: the kNN temperature is only
/// `--knn-temperature`, since `--temperature` is the sampler's ([`SamplingArgs`]).
#[derive(Debug, Clone)]
pub struct SamplingRuleArgs(pub RuleArgs);

impl SamplingRuleArgs {
    /// See [`RuleArgs::options`].
    pub fn options(&self) -> anyhow::Result<AdjustOptions> {
        self.0.options()
    }

    /// `alias(None)` clears the aliases of RuleArgs' kNN temperature.
    fn without_alias(cmd: Command) -> Command {
        cmd.mut_arg("knn_temperature", |a| a.alias(None))
    }
}

impl FromArgMatches for SamplingRuleArgs {
    fn from_arg_matches(m: &ArgMatches) -> Result<Self, clap::Error> {
        RuleArgs::from_arg_matches(m).map(Self)
    }

    fn update_from_arg_matches(&mut self, m: &ArgMatches) -> Result<(), clap::Error> {
        self.0.update_from_arg_matches(m)
    }
}

impl Args for SamplingRuleArgs {
    fn augment_args(cmd: Command) -> Command {
        Self::without_alias(RuleArgs::augment_args(cmd))
    }

    fn augment_args_for_update(cmd: Command) -> Command {
        Self::without_alias(RuleArgs::augment_args_for_update(cmd))
    }
}

/// The sampler's knobs, shared by `generate` and `eval generate` (the number of samples per
/// prompt is each command's own: its default differs).
#[derive(Debug, Clone, Args)]
pub struct SamplingArgs {
    /// New tokens per continuation (the paper's evaluation: 20).
    #[arg(long, default_value_t = 20)]
    pub max_new_tokens: usize,
    /// Sampling temperature; 0 is greedy (the kNN softmax's is --knn-temperature).
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f32,
    /// Nucleus sampling mass, in (0, 1]; 1 switches it off (the paper: 0.9). Under the control
    /// it applies after the rule, whose own nucleus is --filter-p.
    #[arg(long, default_value_t = 0.9)]
    pub top_p: f32,
    /// Keep only the k most likely tokens; 0 switches it off.
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl SamplingArgs {
    /// The generator's parameters for `num_samples` rows seeded with `seed`.
    pub fn params(&self, num_samples: usize, seed: u64) -> SamplingParams {
        SamplingParams {
            num_samples,
            max_new_tokens: self.max_new_tokens,
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            seed,
        }
    }
}

/// How the control searches its datastores. (`datastore search` has its own flags: it can
/// also force HNSW, which the control never needs.)
#[derive(Debug, Clone, Args)]
pub struct SearchArgs {
    /// Exact flat scan instead of the HNSW indexes (slower on large stores; the ground truth).
    #[arg(long)]
    pub exact: bool,
    /// HNSW search breadth (raised to at least k). Larger: better recall, slower.
    #[arg(long)]
    pub ef: Option<usize>,
}

impl SearchArgs {
    /// The flags as the datastore takes them.
    pub fn params(&self) -> SearchParams {
        SearchParams {
            mode: if self.exact {
                SearchMode::Exact
            } else {
                SearchMode::Auto
            },
            ef: self.ef,
        }
    }
}

/// Reusing each sequence's neighbours from one step to the next (docs/architecture.md §1.6),
/// for the commands that generate sequences themselves.
#[derive(Debug, Clone, Args)]
pub struct ReuseArgs {
    /// Reuse a step's neighbours at the next: after a sequence emits a token, the rows that
    /// follow its neighbours which predicted that token (one position on in their source
    /// documents) answer the step instead of a search, when at least this share of k of them
    /// per store lies within --reuse-radius of the last full search (in (0, 1]; 0 = off,
    /// every step is searched).
    #[arg(long, default_value_t = 0.0)]
    pub reuse: f32,
    /// A reused neighbour must lie within this many times the k-th distance of the row's last
    /// full search (in (0, 4]).
    #[arg(long, default_value_t = ReuseParams::default().radius)]
    pub reuse_radius: f32,
    /// Also search the rows answered by reuse, and report how many of the nearest rows the
    /// reused ones are (recall); the reused neighbours are still the ones used.
    #[arg(long)]
    pub reuse_audit: bool,
}

impl ReuseArgs {
    /// The flags as the engine takes them: `None` when reuse is off; checked.
    pub fn params(&self) -> anyhow::Result<Option<ReuseParams>> {
        if self.reuse == 0.0 {
            if self.reuse_audit {
                bail!("--reuse-audit needs --reuse");
            }
            return Ok(None);
        }
        let p = ReuseParams {
            min: self.reuse,
            radius: self.reuse_radius,
            audit: self.reuse_audit,
        };
        p.validate()?;
        Ok(Some(p))
    }

    /// `hook` reusing neighbours as the flags say.
    pub fn apply(&self, hook: Option<ControlHook>) -> anyhow::Result<Option<ControlHook>> {
        match (self.params()?, hook) {
            (Some(p), Some(h)) => Ok(Some(h.with_reuse(p)?)),
            (Some(_), None) => bail!("--reuse needs the control's stores (--toxic/--nontoxic)"),
            (None, h) => Ok(h),
        }
    }

    /// What reuse did, in words for the summary line (empty when off).
    pub fn summary(stats: Option<ReuseStats>) -> String {
        let Some(s) = stats else {
            return String::new();
        };
        let mut line = format!(
            ", {} of {} store searches reused ({:.0}%)",
            s.reused,
            s.row_searches,
            100.0 * s.saved()
        );
        if s.audited > 0 {
            line.push_str(&format!(
                ", recall {:.3} (in top k {:.3}) over {} audited",
                s.recall(),
                s.in_top_k(),
                s.audited
            ));
        }
        line
    }
}
