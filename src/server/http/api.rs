//! The request bodies of `/v1/completions` and `/v1/chat/completions`, and their checks.
//!
//! Fields OpenAI defines and this server does not use are ignored, as OpenAI ignores unknown
//! fields; the few whose non-default values would change the answer (`echo`, `suffix`,
//! penalties, `logit_bias`, `best_of`) are refused instead of silently dropped. The control's
//! overrides sit in the extra object `"goodtriever"`, where an unknown key is a mistake (a
//! misspelt `alhpa` would otherwise run the default strength), so it is refused.

use serde::Deserialize;

use super::error::ApiError;
use crate::detox::{AdjustOptions, Detoxifier};
use crate::explain::ExplainOptions;
use crate::rule::Mode;

/// A string or a list of strings (`prompt`, `stop`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    /// One string.
    One(String),
    /// Several strings.
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

/// A completion prompt: text, texts, token ids, or lists of token ids.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    /// One text.
    Text(String),
    /// Several texts, each continued `n` times.
    Texts(Vec<String>),
    /// One prompt as token ids.
    Tokens(Vec<u32>),
    /// Several prompts as token ids.
    TokenLists(Vec<Vec<u32>>),
}

/// The control's per-request overrides (`"goodtriever": {...}`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlOverrides {
    /// Strength α; 0 switches the control off for the request.
    pub alpha: Option<f32>,
    /// `ensemble`, `toxic-only` (or `toxic_only`) or `knn-lm` (or `knn_lm`).
    pub mode: Option<String>,
    /// Neighbours per store.
    pub k: Option<usize>,
    /// Temperature of the kNN softmax over distances.
    pub temperature: Option<f32>,
    /// Base nucleus mass before the experts are combined.
    pub filter_p: Option<f32>,
    /// kNN-LM interpolation weight.
    pub lambda: Option<f32>,
    /// Strength of the per-step toxicity gate, in [0, 1] (0: the paper's rule).
    pub gate: Option<f32>,
    /// Nearest neighbours of all stores together that the gate counts.
    pub gate_neighbours: Option<usize>,
    /// Weight of each store's own next-token prior (0: off, the paper's experts).
    pub prior: Option<f32>,
    /// Skip threshold in [0, 1): rows whose base distribution gives less than this to the
    /// tokens that lean toxic are not searched (0: search every row).
    pub skip: Option<f32>,
    /// The toxic-over-non-toxic frequency ratio above which a token leans toxic (≥ 1).
    pub skip_ratio: Option<f32>,
    /// Count the skip's leaning probability inside the rule's base nucleus (`filter_p`)
    /// instead of over the whole base distribution.
    pub skip_in_nucleus: Option<bool>,
    /// Explain every generated token's step: `true` for the defaults, `false` for none, or
    /// an object of [`ExplainFields`] (kept as JSON so a bad value gets a precise message).
    pub explain: Option<serde_json::Value>,
}

/// The explain options a request may set (docs/usage.md, HTTP section).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExplainFields {
    /// Tokens listed each way (pushed down, pushed up).
    pub top: Option<usize>,
    /// Store rows listed per token.
    pub rows: Option<usize>,
    /// Bytes of source text either side of a row's token.
    pub context_bytes: Option<usize>,
}

/// `stream_options`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    /// Send a last chunk with the usage before `[DONE]`.
    #[serde(default)]
    pub include_usage: bool,
}

/// The fields both endpoints share.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Common {
    /// The served model's name (GET /v1/models).
    pub model: Option<String>,
    /// Most tokens per choice.
    pub max_tokens: Option<i64>,
    /// Softmax temperature in [0, 2]; 0 is greedy.
    pub temperature: Option<f32>,
    /// Nucleus mass in (0, 1].
    pub top_p: Option<f32>,
    /// Candidates kept before the nucleus (an extension vLLM has too); 0 or -1 keeps all.
    pub top_k: Option<i64>,
    /// Stop sequences (up to 4), applied to the generated text.
    pub stop: Option<OneOrMany>,
    /// Seed of the choices' random generators, as `goodtriever generate --seed`.
    pub seed: Option<u64>,
    /// Choices per prompt.
    pub n: Option<i64>,
    /// Server-sent events instead of one JSON answer.
    #[serde(default)]
    pub stream: bool,
    /// Streaming options.
    pub stream_options: Option<StreamOptions>,
    /// The control's overrides.
    pub goodtriever: Option<ControlOverrides>,
    /// Refused when true.
    #[serde(default)]
    pub echo: bool,
    /// Refused when set.
    pub suffix: Option<String>,
    /// Refused unless 0.
    pub presence_penalty: Option<f32>,
    /// Refused unless 0.
    pub frequency_penalty: Option<f32>,
    /// Refused unless empty.
    pub logit_bias: Option<serde_json::Map<String, serde_json::Value>>,
    /// Refused unless equal to `n`.
    pub best_of: Option<i64>,
}

/// POST /v1/completions.
#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    /// What to continue.
    pub prompt: Option<Prompt>,
    /// Top log-probabilities per token (0..=20); the chosen token's always comes with them.
    pub logprobs: Option<i64>,
    /// Everything else.
    #[serde(flatten)]
    pub common: Common,
}

/// One message of a chat.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
pub struct Message {
    /// `system`, `user`, `assistant`, ...
    pub role: String,
    /// The text (a string, or a list of `{"type": "text", "text": ...}` parts).
    #[serde(deserialize_with = "content")]
    pub content: String,
}

fn content<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum C {
        Text(String),
        Parts(Vec<Part>),
        Null(()),
    }
    #[derive(Deserialize)]
    struct Part {
        #[serde(rename = "type")]
        kind: String,
        text: Option<String>,
    }
    match C::deserialize(d)? {
        C::Text(s) => Ok(s),
        C::Null(()) => Ok(String::new()),
        C::Parts(parts) => {
            let mut out = String::new();
            for p in parts {
                match (p.kind.as_str(), p.text) {
                    ("text", Some(t)) => out.push_str(&t),
                    (kind, _) => {
                        return Err(serde::de::Error::custom(format!(
                            "content part of type {kind:?}: only text parts are supported"
                        )))
                    }
                }
            }
            Ok(out)
        }
    }
}

/// POST /v1/chat/completions.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    /// The conversation so far.
    pub messages: Option<Vec<Message>>,
    /// Whether to return log-probabilities.
    #[serde(default)]
    pub logprobs: bool,
    /// Top log-probabilities per token (0..=20), with `logprobs: true`.
    pub top_logprobs: Option<i64>,
    /// The newer name of `max_tokens`.
    pub max_completion_tokens: Option<i64>,
    /// Everything else.
    #[serde(flatten)]
    pub common: Common,
}

/// Most top log-probabilities per token.
pub const MAX_TOP_LOGPROBS: i64 = 20;
/// Most choices per prompt (OpenAI's limit).
pub const MAX_N: i64 = 128;
/// Most stop sequences (OpenAI's limit).
pub const MAX_STOP: usize = 4;

/// A request's checked settings, ready to be tokenized and queued.
#[derive(Debug, Clone)]
pub struct Checked {
    /// Most tokens per choice; `None`: up to the end of the context.
    pub max_tokens: Option<usize>,
    /// Sampling temperature.
    pub temperature: f32,
    /// Nucleus mass.
    pub top_p: f32,
    /// Top-k (0: off).
    pub top_k: usize,
    /// Stop sequences.
    pub stop: Vec<String>,
    /// Seed.
    pub seed: u64,
    /// Choices per prompt.
    pub n: usize,
    /// The control's options, `None` when switched off.
    pub control: Option<AdjustOptions>,
    /// The explanation's options, `None` when not asked for.
    pub explain: Option<ExplainOptions>,
    /// Streamed?
    pub stream: bool,
    /// A usage chunk at the end of a stream?
    pub include_usage: bool,
}

impl Common {
    /// Checks the shared fields with OpenAI's limits; `served` is the served model's name.
    pub fn check(
        self,
        served: &str,
        max_tokens: Option<i64>,
        default_seed: u64,
        detox: &Detoxifier,
    ) -> Result<Checked, ApiError> {
        match self.model.as_deref() {
            None | Some("") => {
                return Err(ApiError::invalid(
                    Some("model"),
                    format!("you must provide a model parameter (this server serves `{served}`)"),
                ))
            }
            Some(m) if m != served => return Err(ApiError::model_not_found(m, served)),
            Some(_) => {}
        }
        let max_tokens = match max_tokens.or(self.max_tokens) {
            None => None,
            Some(m) if m < 1 => {
                return Err(ApiError::invalid(
                    Some("max_tokens"),
                    format!("max_tokens must be at least 1, got {m}"),
                ))
            }
            Some(m) => Some(m as usize),
        };
        let temperature = self.temperature.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(ApiError::invalid(
                Some("temperature"),
                format!("temperature must be between 0 and 2, got {temperature}"),
            ));
        }
        let top_p = self.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(ApiError::invalid(
                Some("top_p"),
                format!("top_p must be in (0, 1], got {top_p}"),
            ));
        }
        let top_k = match self.top_k {
            None | Some(-1) => 0,
            Some(k) if k >= 0 => k as usize,
            Some(k) => {
                return Err(ApiError::invalid(
                    Some("top_k"),
                    format!("top_k must be -1 (off), 0 (off) or positive, got {k}"),
                ))
            }
        };
        let n = self.n.unwrap_or(1);
        if !(1..=MAX_N).contains(&n) {
            return Err(ApiError::invalid(
                Some("n"),
                format!("n must be between 1 and {MAX_N}, got {n}"),
            ));
        }
        let stop: Vec<String> = self.stop.map(OneOrMany::into_vec).unwrap_or_default();
        if stop.len() > MAX_STOP {
            return Err(ApiError::invalid(
                Some("stop"),
                format!("at most {MAX_STOP} stop sequences, got {}", stop.len()),
            ));
        }
        if stop.iter().any(String::is_empty) {
            return Err(ApiError::invalid(
                Some("stop"),
                "a stop sequence must not be empty",
            ));
        }
        if self.echo {
            return Err(ApiError::invalid(Some("echo"), "echo is not supported"));
        }
        if self.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
            return Err(ApiError::invalid(Some("suffix"), "suffix is not supported"));
        }
        for (name, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if v.is_some_and(|v| v != 0.0) {
                return Err(ApiError::invalid(
                    Some(name),
                    format!("{name} is not supported (only 0)"),
                ));
            }
        }
        if self.logit_bias.as_ref().is_some_and(|m| !m.is_empty()) {
            return Err(ApiError::invalid(
                Some("logit_bias"),
                "logit_bias is not supported",
            ));
        }
        if self.best_of.is_some_and(|b| b != n) {
            return Err(ApiError::invalid(
                Some("best_of"),
                "best_of other than n is not supported",
            ));
        }
        let control = control_options(detox, self.goodtriever.as_ref())?;
        let explain = explain_options(self.goodtriever.as_ref(), control.is_some())?;
        Ok(Checked {
            max_tokens,
            temperature,
            top_p,
            top_k,
            stop,
            seed: self.seed.unwrap_or(default_seed),
            n: n as usize,
            control,
            explain,
            stream: self.stream,
            include_usage: self.stream_options.is_some_and(|o| o.include_usage),
        })
    }
}

/// The server's defaults with the request's overrides, checked as the gRPC service checks
/// them (`Detoxifier::check_options`). `None` when α is 0.
pub fn control_options(
    detox: &Detoxifier,
    o: Option<&ControlOverrides>,
) -> Result<Option<AdjustOptions>, ApiError> {
    let mut opts = *detox.defaults();
    let param = |p: &str| Some(format!("goodtriever.{p}"));
    if let Some(o) = o {
        if let Some(a) = o.alpha {
            opts.params.alpha = a;
        }
        if let Some(t) = o.temperature {
            opts.params.temperature = t;
        }
        if let Some(k) = o.k {
            opts.params.k = k;
        }
        if let Some(p) = o.filter_p {
            opts.params.filter_p = p;
        }
        if let Some(l) = o.lambda {
            opts.params.lambda = l;
        }
        if let Some(g) = o.gate {
            opts.params.gate = g;
        }
        if let Some(m) = o.gate_neighbours {
            opts.params.gate_neighbours = m;
        }
        if let Some(r) = o.prior {
            opts.params.prior = r;
        }
        if let Some(e) = o.skip {
            opts.params.skip = e;
        }
        if let Some(r) = o.skip_ratio {
            opts.params.skip_ratio = r;
        }
        if let Some(n) = o.skip_in_nucleus {
            opts.params.skip_in_nucleus = n;
        }
        if let Some(m) = &o.mode {
            opts.mode = match m.as_str() {
                "ensemble" => Mode::Ensemble,
                "toxic-only" | "toxic_only" => Mode::ToxicOnly,
                "knn-lm" | "knn_lm" => Mode::KnnLm,
                other => {
                    return Err(ApiError {
                        param: param("mode"),
                        ..ApiError::invalid(
                            None,
                            format!("goodtriever.mode: unknown value {other:?}; use ensemble, toxic-only or knn-lm"),
                        )
                    })
                }
            };
        }
    }
    opts.params.validate().map_err(|e| ApiError {
        param: param("params"),
        ..ApiError::invalid(None, format!("goodtriever: {e}"))
    })?;
    detox.check_options(&opts).map_err(|e| ApiError {
        param: param("mode"),
        ..ApiError::invalid(None, format!("goodtriever: {e}"))
    })?;
    Ok((opts.params.alpha != 0.0).then_some(opts))
}

/// The explain options asked for, over [`ExplainOptions::default`] and checked with
/// [`ExplainOptions::validate`]; refused when the control is off (`controlled` false: α = 0),
/// since a step without it has nothing to explain.
pub fn explain_options(
    o: Option<&ControlOverrides>,
    controlled: bool,
) -> Result<Option<ExplainOptions>, ApiError> {
    let invalid = |message: String| ApiError {
        param: Some("goodtriever.explain".into()),
        ..ApiError::invalid(None, message)
    };
    let d = ExplainOptions::default();
    let opts = match o.and_then(|o| o.explain.as_ref()) {
        None | Some(serde_json::Value::Null) | Some(serde_json::Value::Bool(false)) => {
            return Ok(None)
        }
        Some(serde_json::Value::Bool(true)) => d,
        Some(v @ serde_json::Value::Object(_)) => {
            let f = ExplainFields::deserialize(v)
                .map_err(|e| invalid(format!("goodtriever.explain: {e}")))?;
            ExplainOptions {
                top: f.top.unwrap_or(d.top),
                rows: f.rows.unwrap_or(d.rows),
                context_bytes: f.context_bytes.unwrap_or(d.context_bytes),
            }
        }
        Some(other) => {
            return Err(invalid(format!(
                "goodtriever.explain must be true, false or an object of top, rows and context_bytes, got {other}"
            )))
        }
    };
    if !controlled {
        return Err(invalid(
            "goodtriever.explain needs the control, but alpha is 0: a step without the control has nothing to explain".into(),
        ));
    }
    opts.validate()
        .map_err(|e| invalid(format!("goodtriever.{e}")))?;
    Ok(Some(opts))
}

/// Top log-probabilities asked for: `None`, or the count checked against the limit.
pub fn check_top_logprobs(param: &str, v: Option<i64>) -> Result<Option<usize>, ApiError> {
    match v {
        None => Ok(None),
        Some(k) if (0..=MAX_TOP_LOGPROBS).contains(&k) => Ok(Some(k as usize)),
        Some(k) => Err(ApiError::invalid(
            Some(param),
            format!("{param} must be between 0 and {MAX_TOP_LOGPROBS}, got {k}"),
        )),
    }
}
