//! The answers in OpenAI's formats: one JSON object (`text_completion`, `chat.completion`) or
//! server-sent events of chunks (`text_completion` chunks, `chat.completion.chunk`) ending with
//! `data: [DONE]`.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use tokio_stream::wrappers::ReceiverStream;

use super::api::Checked;
use super::generation::{Generation, TokenInfo, Update};
use super::AppState;
use crate::explain::StepExplanation;

/// Which endpoint answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `/v1/completions`.
    Completion,
    /// `/v1/chat/completions`.
    Chat,
}

fn response_id(kind: Kind) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let prefix = match kind {
        Kind::Completion => "cmpl",
        Kind::Chat => "chatcmpl",
    };
    format!("{prefix}-{:x}{n:08x}", super::now_secs())
}

fn usage(g: &Generation) -> Value {
    let completion = g.completion_tokens();
    json!({
        "prompt_tokens": g.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": g.prompt_tokens + completion,
    })
}

/// Completions' `logprobs` object for some tokens.
fn completion_logprobs(infos: &[TokenInfo]) -> Value {
    json!({
        "tokens": infos.iter().map(|i| i.token.clone()).collect::<Vec<_>>(),
        "token_logprobs": infos.iter().map(|i| i.logprob).collect::<Vec<_>>(),
        "top_logprobs": infos.iter().map(|i| {
            i.top.iter().map(|(t, lp)| (t.clone(), json!(lp))).collect::<serde_json::Map<_, _>>()
        }).collect::<Vec<_>>(),
        "text_offset": infos.iter().map(|i| i.offset).collect::<Vec<_>>(),
    })
}

/// Chat's `logprobs` object for some tokens.
fn chat_logprobs(infos: &[TokenInfo]) -> Value {
    let entry = |t: &str, lp: f32| json!({"token": t, "logprob": lp, "bytes": t.as_bytes()});
    json!({
        "content": infos.iter().map(|i| {
            let mut e = entry(&i.token, i.logprob);
            e["top_logprobs"] = Value::Array(i.top.iter().map(|(t, lp)| entry(t, *lp)).collect());
            e
        }).collect::<Vec<_>>(),
    })
}

/// The whole answer: JSON when not streaming, else an SSE stream.
pub async fn answer(st: &AppState, kind: Kind, checked: Checked, g: Generation) -> Response {
    if checked.stream {
        stream(st, kind, checked, g).into_response()
    } else {
        let explain = checked.explain.is_some();
        whole(st, kind, explain, g).await
    }
}

/// The choice's `goodtriever` extension: its explanations, one per generated token.
fn explanations(list: &[StepExplanation]) -> Value {
    json!({ "explanations": list })
}

async fn whole(st: &AppState, kind: Kind, explain: bool, mut g: Generation) -> Response {
    g.keep_explanations = explain;
    let mut finish: Vec<Option<&'static str>> = vec![None; g.choices.len()];
    loop {
        match g.next().await {
            Update::Text { .. } => {}
            Update::Finish { index, reason } => finish[index] = Some(reason.as_str()),
            Update::Done => break,
            Update::Failed(e) => return e.into_response(),
        }
    }
    let want_logprobs = g.logprobs.iter().any(|l| !l.is_empty());
    let choices: Vec<Value> = g
        .choices
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let lp = want_logprobs.then(|| &g.logprobs[i]);
            let mut choice = match kind {
                Kind::Completion => json!({
                    "index": i,
                    "text": c.text(),
                    "logprobs": lp.map(|l| completion_logprobs(l)),
                    "finish_reason": finish[i],
                }),
                Kind::Chat => json!({
                    "index": i,
                    "message": {"role": "assistant", "content": c.text()},
                    "logprobs": lp.map(|l| chat_logprobs(l)),
                    "finish_reason": finish[i],
                }),
            };
            if explain {
                choice["goodtriever"] = explanations(&g.explanations[i]);
            }
            choice
        })
        .collect();
    let body = json!({
        "id": response_id(kind),
        "object": match kind { Kind::Completion => "text_completion", Kind::Chat => "chat.completion" },
        "created": super::now_secs(),
        "model": st.name,
        "choices": choices,
        "usage": usage(&g),
    });
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn stream(st: &AppState, kind: Kind, checked: Checked, mut g: Generation) -> impl IntoResponse {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Event, Infallible>>(64);
    let id = response_id(kind);
    let model = st.name.clone();
    let created = super::now_secs();
    let object = match kind {
        Kind::Completion => "text_completion",
        Kind::Chat => "chat.completion.chunk",
    };
    let chunk = move |choices: Value| json!({"id": id, "object": object, "created": created, "model": model, "choices": choices});
    tokio::spawn(async move {
        let send = |v: Value| {
            let tx = tx.clone();
            async move {
                tx.send(Ok(Event::default().data(v.to_string())))
                    .await
                    .is_ok()
            }
        };
        if kind == Kind::Chat {
            // The first chunk of each choice carries the role, as OpenAI's do.
            let opening: Vec<Value> = (0..g.choices.len())
                .map(|i| json!({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}))
                .collect();
            if !send(chunk(Value::Array(opening))).await {
                return;
            }
        }
        loop {
            let choice = match g.next().await {
                Update::Text {
                    index,
                    text,
                    logprobs,
                    explanation,
                } => {
                    let lp = (!logprobs.is_empty()).then_some(&logprobs);
                    let mut choice = match kind {
                        Kind::Completion => {
                            json!({"index": index, "text": text, "logprobs": lp.map(|l| completion_logprobs(l)), "finish_reason": null})
                        }
                        Kind::Chat => {
                            json!({"index": index, "delta": {"content": text}, "logprobs": lp.map(|l| chat_logprobs(l)), "finish_reason": null})
                        }
                    };
                    if let Some(e) = explanation {
                        choice["goodtriever"] = json!({ "explanation": e });
                    }
                    choice
                }
                Update::Finish { index, reason } => match kind {
                    Kind::Completion => {
                        json!({"index": index, "text": "", "logprobs": null, "finish_reason": reason.as_str()})
                    }
                    Kind::Chat => {
                        json!({"index": index, "delta": {}, "logprobs": null, "finish_reason": reason.as_str()})
                    }
                },
                Update::Done => break,
                Update::Failed(e) => {
                    // Headers are gone: the error goes in the stream, in OpenAI's shape.
                    let _ = tx.send(Ok(Event::default().data(e.body()))).await;
                    return;
                }
            };
            if !send(chunk(Value::Array(vec![choice]))).await {
                // The client left: dropping `g` frees its rows.
                return;
            }
        }
        if checked.include_usage {
            let mut last = chunk(Value::Array(Vec::new()));
            last["usage"] = usage(&g);
            if !send(last).await {
                return;
            }
        }
        let _ = tx.send(Ok(Event::default().data("[DONE]"))).await;
    });
    Sse::new(ReceiverStream::new(rx)).keep_alive(KeepAlive::default())
}
