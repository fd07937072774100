//! The OpenAI-compatible HTTP API on the tiny generated model, end to end over HTTP:
//! completions and chat completions equal to the generator's for the same seed (with the
//! control, and without it for `"alpha": 0`), SSE streaming, n > 1, stop sequences,
//! log-probabilities, OpenAI-style errors after which the server still serves, the bounded
//! queue's 429, concurrent requests batched together giving what they give alone, a client
//! that leaves mid-stream freeing its row, the API key, the metrics, and `"explain"`: each
//! token's explanation equal to the library's for the same step, streamed and not.

mod http_support;

use std::io::{BufRead, BufReader};
use std::sync::Arc;

use goodtriever::detox::{ControlHook, Detoxifier};
use goodtriever::explain::{ExplainHook, ExplainOptions};
use goodtriever::generate::{Generator, SamplingParams, StopReason};
use goodtriever::model::testing::TINY_CHAT_TEMPLATE;
use goodtriever::model::Model;
use http_support::{connect, metric, metrics, post, read_head, request, start, NAME};
use serde_json::{json, Value};

struct Fixture {
    _dir: tempfile::TempDir,
    model: Arc<Model>,
    detox: Arc<Detoxifier>,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let model = http_support::model(dir.path());
    let detox = http_support::detox(dir.path(), &model);
    Fixture {
        _dir: dir,
        model,
        detox,
    }
}

/// What `goodtriever generate` gives: texts and finish reasons of `n` samples of `prompt`.
fn generated(
    f: &Fixture,
    prompt: &str,
    n: usize,
    max: usize,
    seed: u64,
    controlled: bool,
) -> Vec<(String, &'static str)> {
    let params = SamplingParams {
        num_samples: n,
        max_new_tokens: max,
        temperature: 1.0,
        top_p: 0.9,
        top_k: 0,
        seed,
    };
    let mut g = Generator::new(&f.model, params).unwrap();
    let samples = if controlled {
        let mut hook = ControlHook::new(f.detox.clone(), *f.detox.defaults()).unwrap();
        g.generate_text(prompt, Some(&mut hook)).unwrap()
    } else {
        g.generate_text(prompt, None).unwrap()
    };
    samples
        .into_iter()
        .map(|s| {
            let reason = match s.stop {
                StopReason::Eos => "stop",
                StopReason::MaxTokens => "length",
            };
            (s.text, reason)
        })
        .collect()
}

fn answered(v: &Value, chat: bool) -> Vec<(String, String)> {
    v["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let text = if chat {
                c["message"]["content"].as_str().unwrap()
            } else {
                c["text"].as_str().unwrap()
            };
            (
                text.to_string(),
                c["finish_reason"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn same(got: Vec<(String, String)>, want: Vec<(String, &'static str)>) {
    let want: Vec<(String, String)> = want.into_iter().map(|(t, r)| (t, r.into())).collect();
    assert_eq!(got, want);
}

const PROMPT: &str = "hello the world";

#[test]
fn completions_equal_the_generator_with_and_without_the_control() {
    let f = fixture();
    let s = start(
        f.detox.clone(),
        http_support::http_options(f.model.clone(), 8, 16),
    );
    let body =
        json!({"model": NAME, "prompt": PROMPT, "max_tokens": 24, "top_p": 0.9, "seed": 7, "n": 3});
    let r = post(s.http, "/v1/completions", &body);
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["model"], NAME);
    assert!(v["id"].as_str().unwrap().starts_with("cmpl-"));
    let controlled = generated(&f, PROMPT, 3, 24, 7, true);
    same(answered(&v, false), controlled.clone());
    let prompt_tokens = f.model.tokenizer().encode(PROMPT).unwrap().len();
    assert_eq!(v["usage"]["prompt_tokens"], prompt_tokens);
    let completion = v["usage"]["completion_tokens"].as_u64().unwrap();
    assert!(completion >= 3, "{v}");
    assert_eq!(
        v["usage"]["total_tokens"].as_u64().unwrap(),
        completion + prompt_tokens as u64
    );

    let mut off = body.clone();
    off["goodtriever"] = json!({"alpha": 0});
    let v = post(s.http, "/v1/completions", &off).json();
    let bare = generated(&f, PROMPT, 3, 24, 7, false);
    same(answered(&v, false), bare.clone());
    assert_ne!(bare, controlled, "the control should change the samples");

    // A list of prompts: n choices each, indexed prompt by prompt.
    let list = json!({"model": NAME, "prompt": [PROMPT, "the cat"], "max_tokens": 24, "top_p": 0.9, "seed": 7, "n": 3});
    let v = post(s.http, "/v1/completions", &list).json();
    let mut want = controlled;
    want.extend(generated(&f, "the cat", 3, 24, 7, true));
    same(answered(&v, false), want);
    let idx: Vec<u64> = v["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["index"].as_u64().unwrap())
        .collect();
    assert_eq!(idx, (0..6).collect::<Vec<_>>());
}

#[test]
fn chat_completions_render_the_template_and_equal_the_generator() {
    let f = fixture();
    let s = start(
        f.detox.clone(),
        http_support::http_options(f.model.clone(), 8, 16),
    );
    let body = json!({
        "model": NAME, "seed": 3, "max_tokens": 20, "top_p": 0.9, "n": 2,
        "messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "hello"}],
    });
    let r = post(s.http, "/v1/chat/completions", &body);
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    let prompt = "<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n";
    assert!(TINY_CHAT_TEMPLATE.contains("im_start"));
    same(answered(&v, true), generated(&f, prompt, 2, 20, 3, true));
    assert_eq!(
        v["usage"]["prompt_tokens"],
        f.model.tokenizer().encode(prompt).unwrap().len()
    );
}

fn stream_texts(events: &[String], chat: bool, choices: usize) -> Vec<(String, String)> {
    let mut out = vec![(String::new(), String::new()); choices];
    for e in events {
        let v: Value = serde_json::from_str(e).unwrap();
        for c in v["choices"].as_array().unwrap() {
            let i = c["index"].as_u64().unwrap() as usize;
            let piece = if chat {
                c["delta"]["content"].as_str().unwrap_or("")
            } else {
                c["text"].as_str().unwrap()
            };
            out[i].0.push_str(piece);
            if let Some(r) = c["finish_reason"].as_str() {
                assert!(out[i].1.is_empty(), "two finish reasons for choice {i}");
                out[i].1 = r.to_string();
            }
        }
    }
    out
}

#[test]
fn streams_are_server_sent_events_with_the_same_text() {
    let f = fixture();
    let s = start(
        f.detox.clone(),
        http_support::http_options(f.model.clone(), 8, 16),
    );
    for chat in [false, true] {
        let (path, mut body) = if chat {
            (
                "/v1/chat/completions",
                json!({"model": NAME, "messages": [{"role": "user", "content": "hello"}]}),
            )
        } else {
            ("/v1/completions", json!({"model": NAME, "prompt": PROMPT}))
        };
        for (k, v) in [
            ("max_tokens", json!(30)),
            ("seed", json!(11)),
            ("n", json!(2)),
            ("top_p", json!(0.9)),
        ] {
            body[k] = v;
        }
        let whole = post(s.http, path, &body);
        assert_eq!(whole.status, 200, "{}", whole.body);
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
        let r = post(s.http, path, &body);
        assert_eq!(r.status, 200, "{}", r.body);
        assert!(
            r.headers.to_ascii_lowercase().contains("text/event-stream"),
            "{}",
            r.headers
        );
        let events = r.events();
        assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
        let chunks = &events[..events.len() - 1];
        let usage: Value = serde_json::from_str(chunks.last().unwrap()).unwrap();
        assert_eq!(usage["usage"], whole.json()["usage"]);
        let first: Value = serde_json::from_str(&chunks[0]).unwrap();
        if chat {
            assert_eq!(first["object"], "chat.completion.chunk");
            assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
        } else {
            assert_eq!(first["object"], "text_completion");
        }
        // Several chunks, not one.
        assert!(chunks.len() > 4, "{chunks:?}");
        assert_eq!(
            stream_texts(&chunks[..chunks.len() - 1], chat, 2),
            answered(&whole.json(), chat)
        );
    }
}

#[test]
fn stop_sequences_cut_the_text_and_logprobs_come_with_tokens() {
    let f = fixture();
    let s = start(
        f.detox.clone(),
        http_support::http_options(f.model.clone(), 8, 16),
    );
    let base = json!({"model": NAME, "prompt": PROMPT, "max_tokens": 40, "seed": 5});
    let full = post(s.http, "/v1/completions", &base).json()["choices"][0]["text"]
        .as_str()
        .unwrap()
        .to_string();
    let chars: Vec<char> = full.chars().collect();
    assert!(chars.len() > 8, "{full:?}");
    let stop: String = chars[5..7].iter().collect();
    let cut = &full[..full.find(&stop).unwrap()];
    for stream in [false, true] {
        let mut body = base.clone();
        body["stop"] = json!([stop, "\u{1F600}never"]);
        body["stream"] = json!(stream);
        let r = post(s.http, "/v1/completions", &body);
        assert_eq!(r.status, 200, "{}", r.body);
        let got = if stream {
            let ev = r.events();
            stream_texts(&ev[..ev.len() - 1], false, 1)
        } else {
            answered(&r.json(), false)
        };
        assert_eq!(got, vec![(cut.to_string(), "stop".to_string())]);
    }
    // Logprobs: one entry per token, each the chosen token's and the top 3.
    let mut body = base.clone();
    body["logprobs"] = json!(3);
    body["max_tokens"] = json!(6);
    let v = post(s.http, "/v1/completions", &body).json();
    let lp = &v["choices"][0]["logprobs"];
    let n = v["usage"]["completion_tokens"].as_u64().unwrap() as usize;
    let tokens = lp["tokens"].as_array().unwrap();
    assert!(tokens.len() == n || tokens.len() + 1 == n, "{lp}");
    for (i, top) in lp["top_logprobs"].as_array().unwrap().iter().enumerate() {
        assert_eq!(
            top.as_object().unwrap().len().min(3),
            top.as_object().unwrap().len()
        );
        let chosen = lp["token_logprobs"][i].as_f64().unwrap();
        assert!(chosen <= 0.0);
    }
    let chat = json!({"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "logprobs": true, "top_logprobs": 2});
    let v = post(s.http, "/v1/chat/completions", &chat).json();
    let content = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert!(!content.is_empty(), "{v}");
    assert_eq!(content[0]["top_logprobs"].as_array().unwrap().len(), 2);
}

fn error_of(r: &http_support::Reply) -> Value {
    let v = r.json();
    let e = &v["error"];
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    assert!(e["type"].is_string(), "{v}");
    assert!(e.get("param").is_some() && e.get("code").is_some(), "{v}");
    e.clone()
}

#[test]
fn bad_requests_get_openai_errors_and_the_server_goes_on() {
    let f = fixture();
    let s = start(
        f.detox.clone(),
        http_support::http_options(f.model.clone(), 8, 4),
    );
    let ok = json!({"model": NAME, "prompt": PROMPT, "max_tokens": 4, "seed": 1});
    let with = |k: &str, v: Value| {
        let mut b = ok.clone();
        b[k] = v;
        b
    };
    let cases: Vec<(Value, u16, &str, Option<&str>)> = vec![
        (
            with("model", json!("gpt-4")),
            404,
            "model",
            Some("model_not_found"),
        ),
        (with("max_tokens", json!(-1)), 400, "max_tokens", None),
        (
            with("max_tokens", json!(100_000)),
            400,
            "max_tokens",
            Some("context_length_exceeded"),
        ),
        (with("temperature", json!(3.0)), 400, "temperature", None),
        (with("top_p", json!(0)), 400, "top_p", None),
        (with("n", json!(0)), 400, "n", None),
        (with("n", json!(5)), 400, "n", None),
        (
            with("stop", json!(["a", "b", "c", "d", "e"])),
            400,
            "stop",
            None,
        ),
        (with("logprobs", json!(21)), 400, "logprobs", None),
        (with("echo", json!(true)), 400, "echo", None),
        (with("prompt", json!([[99999]])), 400, "prompt", None),
        (with("prompt", json!("")), 400, "prompt", None),
        (
            with("goodtriever", json!({"alpha": 1e9})),
            400,
            "goodtriever.params",
            None,
        ),
        (
            with("goodtriever", json!({"k": 0})),
            400,
            "goodtriever.params",
            None,
        ),
        (
            with("goodtriever", json!({"mode": "best"})),
            400,
            "goodtriever.mode",
            None,
        ),
        (with("goodtriever", json!({"alhpa": 1})), 400, "", None),
        (
            with("goodtriever", json!({"gate": 2})),
            400,
            "goodtriever.params",
            None,
        ),
        (
            with("goodtriever", json!({"skip": 1.5})),
            400,
            "goodtriever.params",
            None,
        ),
        (
            with("goodtriever", json!({"gate": 0.5, "mode": "toxic-only"})),
            400,
            "goodtriever.mode",
            None,
        ),
    ];
    for (body, status, param, code) in cases {
        let r = post(s.http, "/v1/completions", &body);
        assert_eq!(r.status, status, "{body}: {}", r.body);
        let e = error_of(&r);
        if !param.is_empty() {
            assert_eq!(e["param"], param, "{body}: {e}");
        }
        if let Some(c) = code {
            assert_eq!(e["code"], c, "{body}: {e}");
        }
        assert_eq!(e["type"], "invalid_request_error", "{body}: {e}");
    }
    // Malformed JSON and a body over the limit (64 KiB in the tests).
    let r = request(
        s.http,
        "POST",
        "/v1/completions",
        b"{\"model\": \"tiny\", ",
        "",
    );
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(error_of(&r)["message"].as_str().unwrap().contains("JSON"));
    let big = json!({"model": NAME, "prompt": "x".repeat(100 << 10)});
    let r = post(s.http, "/v1/completions", &big);
    assert_eq!(r.status, 413, "{}", r.body);
    assert_eq!(error_of(&r)["code"], "request_too_large");
    // Chat without messages; an unknown path.
    let r = post(
        s.http,
        "/v1/chat/completions",
        &json!({"model": NAME, "messages": []}),
    );
    assert_eq!(
        (r.status, error_of(&r)["param"].clone()),
        (400, json!("messages"))
    );
    let r = request(s.http, "GET", "/v1/engines", b"", "");
    assert_eq!(r.status, 404);
    error_of(&r);
    // Still serving, and the errors were counted.
    let r = post(s.http, "/v1/completions", &ok);
    assert_eq!(r.status, 200, "{}", r.body);
    let m = metrics(s.metrics);
    assert!(
        metric(
            &m,
            "goodtriever_http_requests_total{endpoint=\"completions\",outcome=\"invalid\"}"
        ) >= 15.0,
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "goodtriever_http_requests_total{endpoint=\"completions\",outcome=\"ok\"}"
        ),
        1.0
    );
    assert!(metric(&m, "goodtriever_http_generated_tokens_total") >= 1.0);
    assert_eq!(
        metric(&m, "goodtriever_http_time_to_first_token_seconds_count"),
        1.0
    );
    assert!(m.contains("goodtriever_http_control_share_count 1"), "{m}");
    // The variants in range are served (after the counts above, which expect one success).
    let r = post(
        s.http,
        "/v1/completions",
        &with(
            "goodtriever",
            json!({"gate": 1, "gate_neighbours": 8, "prior": 0.5, "skip": 0.05, "skip_ratio": 2, "skip_in_nucleus": true}),
        ),
    );
    assert_eq!(r.status, 200, "{}", r.body);
}

#[test]
fn models_health_and_the_api_key() {
    let f = fixture();
    let mut opts = http_support::http_options(f.model.clone(), 8, 4);
    opts.api_key = Some("sk-test".into());
    let s = start(f.detox.clone(), opts);
    assert_eq!(request(s.http, "GET", "/health", b"", "").status, 200);
    let r = request(s.http, "GET", "/v1/models", b"", "");
    assert_eq!(r.status, 401);
    assert_eq!(error_of(&r)["code"], "invalid_api_key");
    let r = request(
        s.http,
        "GET",
        "/v1/models",
        b"",
        "Authorization: Bearer nope\r\n",
    );
    assert_eq!(r.status, 401);
    let r = request(
        s.http,
        "GET",
        "/v1/models",
        b"",
        "Authorization: Bearer sk-test\r\n",
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["data"][0]["id"], NAME);
    let body = json!({"model": NAME, "prompt": PROMPT, "max_tokens": 2}).to_string();
    let r = request(s.http, "POST", "/v1/completions", body.as_bytes(), "");
    assert_eq!(r.status, 401);
    let r = request(
        s.http,
        "POST",
        "/v1/completions",
        body.as_bytes(),
        "Authorization: Bearer sk-test\r\n",
    );
    assert_eq!(r.status, 200, "{}", r.body);
}

#[test]
fn concurrent_requests_batch_together_and_give_what_they_give_alone() {
    let f = fixture();
    let s = start(
        f.detox.clone(),
        http_support::http_options(f.model.clone(), 16, 32),
    );
    let bodies: Vec<Value> = (0..6)
        .map(|i| {
            let prompt = ["hello the world", "the cat sat", "rain over the hill"][i % 3];
            let mut b = json!({
                "model": NAME, "prompt": prompt,
                "max_tokens": 16 + 4 * i, "seed": i, "n": 1 + i % 3, "top_p": 0.9,
            });
            if i % 2 == 1 {
                b["goodtriever"] = json!({"alpha": 1.5, "k": 8});
            }
            b
        })
        .collect();
    let alone: Vec<Value> = bodies
        .iter()
        .map(|b| post(s.http, "/v1/completions", b).json()["choices"].clone())
        .collect();
    for _round in 0..2 {
        let together: Vec<Value> = std::thread::scope(|sc| {
            let hs: Vec<_> = bodies
                .iter()
                .map(|b| sc.spawn(move || post(s.http, "/v1/completions", b)))
                .collect();
            hs.into_iter()
                .map(|h| h.join().unwrap().json()["choices"].clone())
                .collect()
        });
        assert_eq!(together, alone);
    }
    // Rows did decode together at some step.
    let m = metrics(s.metrics);
    let le1 = metric(&m, "goodtriever_http_batch_rows_bucket{le=\"2\"}");
    let all = metric(&m, "goodtriever_http_batch_rows_count");
    assert!(all > le1, "no step had more than 2 rows: {m}");
}

#[test]
fn a_full_queue_answers_429_and_a_client_that_leaves_frees_its_row() {
    let f = fixture();
    // One row at a time, one request waiting.
    let s = start(
        f.detox.clone(),
        http_support::http_options(f.model.clone(), 1, 1),
    );
    let long = json!({"model": NAME, "prompt": PROMPT, "max_tokens": 16000, "stream": true, "goodtriever": {"alpha": 0}});
    // The first request takes the row: its first chunk has arrived.
    let conn = connect(
        s.http,
        "POST",
        "/v1/completions",
        long.to_string().as_bytes(),
        "",
    );
    let mut reader = BufReader::new(conn);
    assert!(read_head(&mut reader).starts_with("HTTP/1.1 200"));
    let mut line = String::new();
    while !line.starts_with("data:") {
        line.clear();
        reader.read_line(&mut line).unwrap();
    }
    // More requests at once: one waits, the rest are refused at once.
    let short = json!({"model": NAME, "prompt": PROMPT, "max_tokens": 3});
    let replies: Vec<http_support::Reply> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..6)
            .map(|_| sc.spawn(|| post(s.http, "/v1/completions", &short)))
            .collect();
        // The client of the long stream leaves: its row is freed and the waiting one runs.
        std::thread::sleep(std::time::Duration::from_millis(300));
        drop(reader);
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let refused: Vec<_> = replies.iter().filter(|r| r.status == 429).collect();
    let served = replies.iter().filter(|r| r.status == 200).count();
    assert!(!refused.is_empty(), "{replies:?}");
    assert!(served >= 1, "{replies:?}");
    assert_eq!(served + refused.len(), replies.len(), "{replies:?}");
    for r in &refused {
        let e = error_of(r);
        assert_eq!(e["code"], "queue_full");
        assert_eq!(e["type"], "rate_limit_error");
    }
    let m = metrics(s.metrics);
    assert!(
        metric(
            &m,
            "goodtriever_http_requests_total{endpoint=\"completions\",outcome=\"cancelled\"}"
        ) >= 1.0,
        "{m}"
    );
    assert!(
        metric(
            &m,
            "goodtriever_http_requests_total{endpoint=\"completions\",outcome=\"queue_full\"}"
        ) >= 1.0
    );
    // The server serves on.
    assert_eq!(post(s.http, "/v1/completions", &short).status, 200);
}

#[test]
fn a_non_loopback_address_needs_tls_or_consent() {
    let f = fixture();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let http = match tokio::net::TcpListener::bind("0.0.0.0:0").await {
            Ok(l) => l,
            Err(_) => return, // no IPv4 wildcard here: nothing to check
        };
        let server = goodtriever::server::Server::from_listeners(
            f.detox.clone(),
            Default::default(),
            grpc,
            None,
        )
        .unwrap();
        let err = server
            .with_http(http, http_support::http_options(f.model.clone(), 1, 1))
            .err()
            .expect("refused");
        assert!(err.to_string().contains("not a loopback address"), "{err}");
    });
}

#[test]
fn https_with_the_servers_certificate_and_nothing_in_clear() {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, ServerName};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::rustls;

    let f = fixture();
    let c =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let tls = goodtriever::server::TlsPem {
        cert: c.cert.pem().into_bytes(),
        key: c.signing_key.serialize_pem().into_bytes(),
    };
    let serve = goodtriever::server::ServeOptions {
        tls: Some(tls.clone()),
        ..Default::default()
    };
    let s = http_support::start_with(
        f.detox.clone(),
        serve,
        http_support::http_options(f.model.clone(), 4, 4),
    );
    // Plain HTTP to the HTTPS port gets no HTTP answer.
    let mut plain = connect(s.http, "GET", "/health", b"", "");
    let mut got = Vec::new();
    let _ = std::io::Read::read_to_end(&mut plain, &mut got);
    assert!(!String::from_utf8_lossy(&got).contains("200 OK"));

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&tls.cert) {
            roots.add(cert.unwrap()).unwrap();
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let body = json!({"model": NAME, "prompt": PROMPT, "max_tokens": 3}).to_string();
        let tcp = tokio::net::TcpStream::connect(s.http).await.unwrap();
        let mut stream = connector
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap();
        let req = format!(
            "POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(req.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        let _ = stream.read_to_end(&mut raw).await;
        let text = String::from_utf8_lossy(&raw);
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert!(text.contains("\"text_completion\""), "{text}");
    });
}

/// What the library says of each step of `goodtriever generate` on `prompt` (one sample):
/// the explanation of every token with its chosen token, as the JSON value the server builds
/// (`serde_json::to_value`: f32 fields widened to f64, as the server's `json!` writes them).
fn library_explanations(
    f: &Fixture,
    prompt: &str,
    max: usize,
    seed: u64,
    eo: &ExplainOptions,
) -> Vec<Value> {
    let params = SamplingParams {
        num_samples: 1,
        max_new_tokens: max,
        temperature: 1.0,
        top_p: 0.9,
        top_k: 0,
        seed,
    };
    let mut g = Generator::new(&f.model, params).unwrap();
    let mut hook = ExplainHook::new(&f.detox, *f.detox.defaults()).unwrap();
    let samples = g.generate_text(prompt, Some(&mut hook)).unwrap();
    let tokens = &samples[0].tokens;
    assert_eq!(hook.traces().len(), tokens.len());
    let tok = f.model.tokenizer();
    let text = |t: u32| tok.decode(&[t], false).ok();
    hook.traces()
        .iter()
        .zip(tokens)
        .map(|(trace, &t)| {
            let e = trace.explain(&f.detox, eo, Some(t), &text).unwrap();
            serde_json::to_value(&e).unwrap()
        })
        .collect()
}

/// Equal JSON, numbers to f32 rounding: the same row's logits from a batch of several rows
/// and from the generator's batch of one differ in the last bits of the matrix products (the
/// tokens, row ids, stores and order must be equal exactly).
fn same_json(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) if x.is_u64() || y.is_u64() => x == y,
        (Value::Number(x), Value::Number(y)) => {
            let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
            x == y || (x - y).abs() <= 1e-5 * x.abs().max(y.abs()).max(1.0)
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same_json(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| same_json(v, w)))
        }
        _ => a == b,
    }
}

#[test]
fn explain_gives_each_token_the_librarys_explanation_of_its_step() {
    let f = fixture();
    let s = start(
        f.detox.clone(),
        http_support::http_options(f.model.clone(), 8, 16),
    );
    let eo = ExplainOptions {
        top: 4,
        rows: 2,
        context_bytes: 40,
    };
    // Two prompts in one request: the second's row is the second of the engine call's run,
    // so its trace must take the call's second row of neighbours.
    let plain = json!({"model": NAME, "prompt": ["the cat", PROMPT], "max_tokens": 10, "top_p": 0.9, "seed": 7});
    let mut body = plain.clone();
    body["goodtriever"] = json!({"explain": {"top": 4, "rows": 2, "context_bytes": 40}});
    let r = post(s.http, "/v1/completions", &body);
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    // Explaining changes nothing of what is sampled.
    let bare = post(s.http, "/v1/completions", &plain).json();
    assert_eq!(answered(&v, false), answered(&bare, false));
    assert!(bare["choices"][0].get("goodtriever").is_none(), "{bare}");
    let mut listed_rows = 0;
    for (i, prompt) in ["the cat", PROMPT].into_iter().enumerate() {
        let got = v["choices"][i]["goodtriever"]["explanations"]
            .as_array()
            .unwrap_or_else(|| panic!("{v}"));
        let want = library_explanations(&f, prompt, 10, 7, &eo);
        assert_eq!(got.len(), want.len(), "choice {i}");
        for (step, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(same_json(g, w), "choice {i} step {step}:\n{g}\n{w}");
        }
        for e in got {
            assert!(e["pushed_down"].as_array().unwrap().len() <= 4);
            assert!(e["chosen"]["token"].is_u64(), "{e}");
            for m in e["pushed_down"]
                .as_array()
                .unwrap()
                .iter()
                .chain(e["pushed_up"].as_array().unwrap())
            {
                let rows = m["rows"].as_array().unwrap();
                assert!(rows.len() <= 2);
                listed_rows += rows.len();
            }
        }
    }
    // The comparison above is about rows the stores really returned, not empty lists.
    assert!(listed_rows > 0, "{v}");
    let tokens: u64 = v["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["goodtriever"]["explanations"].as_array().unwrap().len() as u64)
        .sum();
    assert_eq!(tokens, v["usage"]["completion_tokens"].as_u64().unwrap());

    // Streamed: every chunk that carries a token carries its step's explanation, in order.
    let mut one = body.clone();
    one["prompt"] = json!(PROMPT);
    one["stream"] = json!(true);
    let r = post(s.http, "/v1/completions", &one);
    assert_eq!(r.status, 200, "{}", r.body);
    let events = r.events();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks = &events[..events.len() - 1];
    let streamed: Vec<Value> = chunks
        .iter()
        .filter_map(|c| {
            let v: Value = serde_json::from_str(c).unwrap();
            v["choices"][0]["goodtriever"].get("explanation").cloned()
        })
        .collect();
    let want = library_explanations(&f, PROMPT, 10, 7, &eo);
    assert_eq!(streamed.len(), want.len());
    for (g, w) in streamed.iter().zip(&want) {
        assert!(same_json(g, w), "\n{g}\n{w}");
    }
    assert_eq!(
        stream_texts(chunks, false, 1),
        answered(&v, false)[1..].to_vec()
    );

    // Chat, with the defaults (`true`).
    let chat = json!({"model": NAME, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 6, "seed": 2, "goodtriever": {"explain": true}});
    let r = post(s.http, "/v1/chat/completions", &chat);
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    let got = v["choices"][0]["goodtriever"]["explanations"]
        .as_array()
        .unwrap();
    assert_eq!(
        got.len() as u64,
        v["usage"]["completion_tokens"].as_u64().unwrap()
    );
    let d = ExplainOptions::default();
    assert!(got
        .iter()
        .all(|e| e["pushed_up"].as_array().unwrap().len() <= d.top));
}

#[test]
fn bad_explain_options_and_explain_without_the_control_are_400() {
    let f = fixture();
    let s = start(
        f.detox.clone(),
        http_support::http_options(f.model.clone(), 8, 4),
    );
    let ok = json!({"model": NAME, "prompt": PROMPT, "max_tokens": 4, "seed": 1});
    let cases: Vec<(Value, &str)> = vec![
        (json!({"explain": {"top": 0}}), "top is 0"),
        (json!({"explain": {"rows": 100000}}), "rows is 100000"),
        (
            json!({"explain": {"context_bytes": 1000000}}),
            "context is 1000000 bytes",
        ),
        (json!({"explain": {"tpo": 3}}), "unknown field `tpo`"),
        (json!({"explain": 3}), "must be true, false or an object"),
        (json!({"explain": {"top": -1}}), "goodtriever.explain"),
        (json!({"explain": true, "alpha": 0}), "alpha is 0"),
        (json!({"explain": {"top": 2}, "alpha": 0.0}), "alpha is 0"),
    ];
    for stream in [false, true] {
        for (gt, says) in &cases {
            let mut body = ok.clone();
            body["goodtriever"] = gt.clone();
            body["stream"] = json!(stream);
            let r = post(s.http, "/v1/completions", &body);
            assert_eq!(r.status, 400, "{gt}: {}", r.body);
            let e = error_of(&r);
            assert_eq!(e["type"], "invalid_request_error", "{e}");
            assert_eq!(e["param"], "goodtriever.explain", "{e}");
            assert!(e["message"].as_str().unwrap().contains(says), "{gt}: {e}");
        }
    }
    // `false` is no explanation, and the server still serves.
    let mut body = ok.clone();
    body["goodtriever"] = json!({"explain": false});
    let r = post(s.http, "/v1/completions", &body);
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.json()["choices"][0].get("goodtriever").is_none());
}
