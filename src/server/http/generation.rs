//! One HTTP request's generation as its handler sees it: the scheduler's events for its rows
//! turned into text updates per choice (with stop sequences and log-probabilities), and its
//! metrics when it ends.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::error::ApiError;
use super::scheduler::Ticket;
use super::text::{ChoiceText, Finish};
use crate::batch::{BatchEvent, TokenLogprob};
use crate::explain::StepExplanation;
use crate::generate::StopReason;
use crate::model::Model;
use crate::server::metrics::Metrics;

/// A token's log-probability with the token as text, for the answer's `logprobs`.
#[derive(Debug, Clone)]
pub struct TokenInfo {
    /// The token's text.
    pub token: String,
    /// Its log-probability.
    pub logprob: f32,
    /// The most likely tokens at its step, as text, with their log-probabilities.
    pub top: Vec<(String, f32)>,
    /// Where its text starts in the choice's text (bytes).
    pub offset: usize,
}

/// What changed for the client.
#[derive(Debug)]
pub enum Update {
    /// More text for choice `index` (possibly empty when only log-probabilities came).
    Text {
        /// The choice.
        index: usize,
        /// The text released.
        text: String,
        /// Log-probabilities of the tokens behind it, when asked for.
        logprobs: Vec<TokenInfo>,
        /// The explanation of the step of the token this update comes from, when asked for
        /// (the text may hold earlier tokens' held-back text too).
        explanation: Option<Box<StepExplanation>>,
    },
    /// Choice `index` ended.
    Finish {
        /// The choice.
        index: usize,
        /// Why.
        reason: Finish,
    },
    /// Every choice has ended.
    Done,
    /// The request failed.
    Failed(ApiError),
}

/// A request's running generation.
pub struct Generation {
    ticket: Ticket,
    model: Arc<Model>,
    metrics: Arc<Metrics>,
    endpoint: &'static str,
    n: usize,
    stops: Vec<String>,
    stop_tokens: Arc<[u32]>,
    /// The choices, `prompt × n + sample`.
    pub choices: Vec<ChoiceText>,
    /// Log-probabilities collected per choice when asked for.
    pub logprobs: Vec<Vec<TokenInfo>>,
    /// Explanations collected per choice when asked for and [`Generation::keep_explanations`]
    /// is set: one per generated token (the stop token included), in order.
    pub explanations: Vec<Vec<StepExplanation>>,
    /// Collect the explanations into [`Generation::explanations`] (the whole answer) instead
    /// of handing each out with its update (a stream).
    pub keep_explanations: bool,
    /// Prompt tokens over all prompts (the usage's `prompt_tokens`).
    pub prompt_tokens: usize,
    pending: VecDeque<Update>,
    started: Instant,
    first: Option<Instant>,
    last: Option<Instant>,
    decode: Duration,
    control: Duration,
    open: usize,
    ended: bool,
}

impl Generation {
    /// Follows `ticket`'s events; `n` choices per prompt.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        ticket: Ticket,
        model: Arc<Model>,
        metrics: Arc<Metrics>,
        endpoint: &'static str,
        n: usize,
        stops: Vec<String>,
        stop_tokens: Arc<[u32]>,
        prompt_tokens: usize,
        started: Instant,
    ) -> Self {
        let choices = ticket.ids.len() * n;
        Self {
            ticket,
            model,
            metrics,
            endpoint,
            n,
            stops,
            stop_tokens,
            choices: (0..choices).map(|_| ChoiceText::default()).collect(),
            logprobs: vec![Vec::new(); choices],
            explanations: vec![Vec::new(); choices],
            keep_explanations: false,
            prompt_tokens,
            pending: VecDeque::new(),
            started,
            first: None,
            last: None,
            decode: Duration::ZERO,
            control: Duration::ZERO,
            open: choices,
            ended: false,
        }
    }

    /// Tokens generated over all choices.
    pub fn completion_tokens(&self) -> usize {
        self.choices.iter().map(|c| c.generated).sum()
    }

    fn index(&self, id: u64, choice: usize) -> Option<usize> {
        let prompt = self.ticket.ids.iter().position(|&i| i == id)?;
        Some(prompt * self.n + choice)
    }

    fn token_text(&self, id: u32) -> String {
        self.model
            .tokenizer()
            .decode(&[id], false)
            .unwrap_or_default()
    }

    fn finish(&mut self, index: usize, reason: Finish) {
        self.open -= 1;
        self.pending.push_back(Update::Finish { index, reason });
        if self.open == 0 {
            self.pending.push_back(Update::Done);
        }
    }

    /// The next update; after `Done` or `Failed`, `Done` again.
    pub async fn next(&mut self) -> Update {
        loop {
            if let Some(u) = self.pending.pop_front() {
                match &u {
                    Update::Done => self.record("ok"),
                    Update::Failed(e) => self.record(e.outcome()),
                    _ => {}
                }
                return u;
            }
            if self.ended {
                return Update::Done;
            }
            let Some(event) = self.ticket.events.recv().await else {
                self.pending.push_back(Update::Failed(ApiError::unavailable(
                    "the decoding scheduler stopped before the request finished",
                )));
                continue;
            };
            self.on_event(event);
        }
    }

    fn on_event(&mut self, event: BatchEvent) {
        match event {
            BatchEvent::Token {
                id,
                choice,
                token,
                logprob,
                explanation,
            } => {
                let Some(index) = self.index(id, choice) else {
                    return;
                };
                let now = Instant::now();
                self.first.get_or_insert(now);
                self.last = Some(now);
                if self.choices[index].finish.is_some() {
                    return;
                }
                let stop_token = self.stop_tokens.contains(&token);
                let offset = self.choices[index].text().len();
                let text = match self.choices[index].push(
                    self.model.tokenizer(),
                    token,
                    stop_token,
                    &self.stops,
                ) {
                    Ok(t) => t,
                    Err(e) => {
                        self.pending
                            .push_back(Update::Failed(ApiError::internal(format!(
                                "decoding the generated tokens failed: {e}"
                            ))));
                        return;
                    }
                };
                let mut infos = Vec::new();
                if let (Some(TokenLogprob { logprob, top }), false) = (logprob, stop_token) {
                    let info = TokenInfo {
                        token: self.token_text(token),
                        logprob,
                        top: top
                            .into_iter()
                            .map(|(t, lp)| (self.token_text(t), lp))
                            .collect(),
                        offset,
                    };
                    self.logprobs[index].push(info.clone());
                    infos.push(info);
                }
                let explanation = match explanation {
                    Some(e) if self.keep_explanations => {
                        self.explanations[index].push(*e);
                        None
                    }
                    e => e,
                };
                if !text.is_empty() || !infos.is_empty() || explanation.is_some() {
                    self.pending.push_back(Update::Text {
                        index,
                        text,
                        logprobs: infos,
                        explanation,
                    });
                }
                if self.choices[index].finish == Some(Finish::Stop) {
                    // A stop sequence: the row need not decode further.
                    self.ticket.cancel_choice(id, choice);
                    self.finish(index, Finish::Stop);
                }
            }
            BatchEvent::Finished {
                id,
                choice,
                reason,
                decode,
                control,
            } => {
                let Some(index) = self.index(id, choice) else {
                    return;
                };
                self.decode += decode;
                self.control += control;
                if self.choices[index].finish.is_some() {
                    return;
                }
                let reason = match reason {
                    StopReason::Eos => Finish::Stop,
                    StopReason::MaxTokens => Finish::Length,
                };
                let text = self.choices[index].end(reason);
                if !text.is_empty() {
                    self.pending.push_back(Update::Text {
                        index,
                        text,
                        logprobs: Vec::new(),
                        explanation: None,
                    });
                }
                self.finish(index, reason);
            }
            BatchEvent::Failed { message, .. } => {
                self.pending
                    .push_back(Update::Failed(ApiError::internal(message)));
            }
        }
    }

    fn record(&mut self, outcome: &'static str) {
        if self.ended {
            return;
        }
        self.ended = true;
        let m = &self.metrics;
        m.http_request(self.endpoint, outcome);
        let tokens = self.completion_tokens();
        m.http_tokens(tokens);
        if let Some(first) = self.first {
            m.http_time_to_first_token(first - self.started);
            if let (Some(last), true) = (self.last, tokens > 1) {
                m.http_time_per_token((last - first) / (tokens as u32 - 1));
            }
        }
        if !self.decode.is_zero() {
            m.http_control_share(self.control.as_secs_f64() / self.decode.as_secs_f64());
        }
    }
}

impl Drop for Generation {
    fn drop(&mut self) {
        // The client left before the end (a stream it stopped reading).
        self.record("cancelled");
    }
}
