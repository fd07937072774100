//! Prometheus metrics and the plain-HTTP endpoint that exposes them.
//!
//! Operators of a decoding sidecar need to see, per RPC, how many requests and errors there are
//! and where the time of a step goes: turning the wire bytes into rows (`decode`), the engine's
//! nearest-neighbour search of the stores (`search`) and its decoding rule (`rule`), writing the
//! answer (`encode`), and appends to a store (`append`).
//! Batch sizes and store sizes are exported too, so drift updates are visible. The registry is
//! private to the server (not the global default), so tests can run several servers in one
//! process.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts,
    Registry, TextEncoder,
};
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::ServerError;
use crate::steps::StepObserver;

/// The RPCs, as they are labelled in the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// One unary decoding step.
    Adjust,
    /// A stream of decoding steps; every message is counted and timed as one request.
    AdjustStream,
    /// A write of hidden states with their next tokens.
    AddExamples,
    /// A write of text, encoded by the server's model.
    AddTexts,
    /// The server's model, stores and limits.
    Info,
}

impl Method {
    const ALL: [Method; 5] = [
        Method::Adjust,
        Method::AdjustStream,
        Method::AddExamples,
        Method::AddTexts,
        Method::Info,
    ];

    /// The `method` label: the RPC's name as in the proto service.
    pub fn name(self) -> &'static str {
        match self {
            Method::Adjust => "Adjust",
            Method::AdjustStream => "AdjustStream",
            Method::AddExamples => "AddExamples",
            Method::AddTexts => "AddTexts",
            Method::Info => "Info",
        }
    }
}

/// The phases of a request whose time is recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Wire bytes to rows.
    Decode,
    /// The engine's search of the stores.
    Search,
    /// The engine's decoding rule over the neighbours found.
    Rule,
    /// The answer to wire form.
    Encode,
    /// An append to a store, durable.
    Append,
}

impl Phase {
    const ALL: [Phase; 5] = [
        Phase::Decode,
        Phase::Search,
        Phase::Rule,
        Phase::Encode,
        Phase::Append,
    ];

    fn name(self) -> &'static str {
        match self {
            Phase::Decode => "decode",
            Phase::Search => "search",
            Phase::Rule => "rule",
            Phase::Encode => "encode",
            Phase::Append => "append",
        }
    }
}

/// All metrics of one server.
///
/// The series of every method and phase are resolved once, here: a decoding step records
/// five of them, and looking a labelled series up costs a hash and a read lock each time.
pub struct Metrics {
    registry: Registry,
    requests: [IntCounter; Method::ALL.len()],
    errors: IntCounterVec,
    latency: [Histogram; Method::ALL.len()],
    phase: [Histogram; Phase::ALL.len()],
    rows: Histogram,
    merged: Histogram,
    store_rows: IntGaugeVec,
    store_segments: IntGaugeVec,
    /// Rows of stream steps that asked for reuse, and of those the ones answered from their
    /// last neighbours' successors.
    reuse_rows: IntCounter,
    reused_rows: IntCounter,
    http: HttpMetrics,
}

/// The HTTP API's series (`goodtriever_http_*`).
struct HttpMetrics {
    requests: IntCounterVec,
    tokens: IntCounter,
    ttft: Histogram,
    per_token: Histogram,
    control_share: Histogram,
    batch_rows: Histogram,
}

impl HttpMetrics {
    fn new() -> Self {
        let requests = IntCounterVec::new(
            Opts::new(
                "http_requests_total",
                "HTTP API requests by endpoint (completions, chat, models) and outcome (ok, invalid, unauthorized, queue_full, unavailable, cancelled, error)",
            ),
            &["endpoint", "outcome"],
        )
        .expect("valid metric");
        let tokens = IntCounter::new(
            "http_generated_tokens_total",
            "Tokens generated for HTTP API requests, over all choices",
        )
        .expect("valid metric");
        let ttft = Histogram::with_opts(
            HistogramOpts::new(
                "http_time_to_first_token_seconds",
                "From a request's arrival to its first generated token (queueing and prefill included)",
            )
            .buckets(latency_buckets()),
        )
        .expect("valid metric");
        let per_token = Histogram::with_opts(
            HistogramOpts::new(
                "http_time_per_output_token_seconds",
                "A request's mean time between generated tokens after the first",
            )
            .buckets(latency_buckets()),
        )
        .expect("valid metric");
        let control_share = Histogram::with_opts(
            HistogramOpts::new(
                "http_control_share",
                "The control's share (search and rule) of a request's decoding step time",
            )
            .buckets(prometheus::linear_buckets(0.05, 0.05, 20).expect("valid")),
        )
        .expect("valid metric");
        let batch_rows = Histogram::with_opts(
            HistogramOpts::new(
                "http_batch_rows",
                "Rows decoding together after each step of the HTTP API's batch",
            )
            .buckets(prometheus::exponential_buckets(1.0, 2.0, 11).expect("valid")),
        )
        .expect("valid metric");
        Self {
            requests,
            tokens,
            ttft,
            per_token,
            control_share,
            batch_rows,
        }
    }

    fn collectors(&self) -> Vec<Box<dyn prometheus::core::Collector>> {
        vec![
            Box::new(self.requests.clone()),
            Box::new(self.tokens.clone()),
            Box::new(self.ttft.clone()),
            Box::new(self.per_token.clone()),
            Box::new(self.control_share.clone()),
            Box::new(self.batch_rows.clone()),
        ]
    }
}

fn latency_buckets() -> Vec<f64> {
    // 10 µs … ~10 s: a sparse step is tens of µs of overhead; an append can take seconds.
    prometheus::exponential_buckets(1e-5, 2.0, 21).expect("valid bucket spec")
}

impl Metrics {
    /// A fresh registry with every series registered (at zero), so a scrape lists them all
    /// before the first request.
    pub fn new() -> Self {
        let registry = Registry::new_custom(Some("goodtriever".into()), None)
            .expect("a constant, valid prefix");
        let requests = IntCounterVec::new(
            Opts::new("requests_total", "RPCs received, by method"),
            &["method"],
        )
        .expect("valid metric");
        let errors = IntCounterVec::new(
            Opts::new(
                "errors_total",
                "RPCs answered with an error, by method and gRPC code",
            ),
            &["method", "code"],
        )
        .expect("valid metric");
        let latency = HistogramVec::new(
            HistogramOpts::new("request_seconds", "RPC latency in the server, by method")
                .buckets(latency_buckets()),
            &["method"],
        )
        .expect("valid metric");
        let phase = HistogramVec::new(
            HistogramOpts::new(
                "phase_seconds",
                "Time per phase of a request: decode, search, rule, encode, append",
            )
            .buckets(latency_buckets()),
            &["phase"],
        )
        .expect("valid metric");
        let rows = Histogram::with_opts(
            HistogramOpts::new("batch_rows", "Rows per Adjust request or stream message")
                .buckets(prometheus::exponential_buckets(1.0, 2.0, 11).expect("valid")),
        )
        .expect("valid metric");
        let merged = Histogram::with_opts(
            HistogramOpts::new(
                "merged_requests",
                "Adjust requests or stream messages answered by one engine call (more than one when steps that waited for a core were merged)",
            )
            .buckets(prometheus::exponential_buckets(1.0, 2.0, 9).expect("valid")),
        )
        .expect("valid metric");
        let store_rows = IntGaugeVec::new(
            Opts::new("store_rows", "Live rows per datastore"),
            &["store"],
        )
        .expect("valid metric");
        let store_segments = IntGaugeVec::new(
            Opts::new("store_segments", "Live segments per datastore"),
            &["store"],
        )
        .expect("valid metric");
        let reuse_rows = IntCounter::new(
            "reuse_rows_total",
            "Rows of AdjustStream steps that asked for reuse (overrides.reuse)",
        )
        .expect("valid metric");
        let reused_rows = IntCounter::new(
            "reused_rows_total",
            "Of those, rows answered from their last step's neighbours' successors, not searched",
        )
        .expect("valid metric");
        let http = HttpMetrics::new();
        for c in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(errors.clone()),
            Box::new(latency.clone()),
            Box::new(phase.clone()),
            Box::new(rows.clone()),
            Box::new(merged.clone()),
            Box::new(store_rows.clone()),
            Box::new(store_segments.clone()),
            Box::new(reuse_rows.clone()),
            Box::new(reused_rows.clone()),
        ]
        .into_iter()
        .chain(http.collectors())
        {
            registry.register(c).expect("metric names are unique");
        }
        Self {
            registry,
            requests: Method::ALL.map(|m| requests.with_label_values(&[m.name()])),
            errors,
            latency: Method::ALL.map(|m| latency.with_label_values(&[m.name()])),
            phase: Phase::ALL.map(|p| phase.with_label_values(&[p.name()])),
            rows,
            merged,
            store_rows,
            store_segments,
            reuse_rows,
            reused_rows,
            http,
        }
    }

    /// A reusing stream step of `rows` rows answered `reused` of them from successors.
    pub fn reuse(&self, rows: usize, reused: usize) {
        self.reuse_rows.inc_by(rows as u64);
        self.reused_rows.inc_by(reused as u64);
    }

    /// An HTTP API request ended with `outcome` (`http_requests_total`).
    pub fn http_request(&self, endpoint: &str, outcome: &str) {
        self.http
            .requests
            .with_label_values(&[endpoint, outcome])
            .inc();
    }

    /// A request generated `tokens` tokens over its choices.
    pub fn http_tokens(&self, tokens: usize) {
        self.http.tokens.inc_by(tokens as u64);
    }

    /// A request's time to its first token.
    pub fn http_time_to_first_token(&self, elapsed: Duration) {
        self.http.ttft.observe(elapsed.as_secs_f64());
    }

    /// A request's mean time per token after the first.
    pub fn http_time_per_token(&self, elapsed: Duration) {
        self.http.per_token.observe(elapsed.as_secs_f64());
    }

    /// The control's share of a request's step time, in [0, 1].
    pub fn http_control_share(&self, share: f64) {
        self.http.control_share.observe(share);
    }

    /// Rows decoding together after a step of the HTTP API's batch.
    pub fn http_batch_rows(&self, rows: usize) {
        self.http.batch_rows.observe(rows as f64);
    }

    /// An RPC of `method` arrived (`requests_total`).
    pub fn request(&self, method: Method) {
        self.requests[method as usize].inc();
    }

    /// An RPC of `method` was answered after `elapsed` (`request_seconds`); with `error`, the
    /// gRPC code it failed with is counted too (`errors_total`).
    pub fn finished(&self, method: Method, elapsed: Duration, error: Option<tonic::Code>) {
        self.latency[method as usize].observe(elapsed.as_secs_f64());
        if let Some(code) = error {
            self.errors
                .with_label_values(&[method.name(), &format!("{code:?}")])
                .inc();
        }
    }

    /// One phase of a request took `elapsed` (`phase_seconds`).
    pub fn phase(&self, phase: Phase, elapsed: Duration) {
        self.phase[phase as usize].observe(elapsed.as_secs_f64());
    }

    /// One engine call of `total`, of which `search` searched the stores and the rest ran the
    /// rule.
    pub fn engine(&self, total: Duration, search: Duration) {
        self.phase(Phase::Search, search);
        self.phase(Phase::Rule, total.saturating_sub(search));
    }

    /// An Adjust request or stream message carried `rows` rows (`batch_rows`).
    pub fn rows(&self, rows: usize) {
        self.rows.observe(rows as f64);
    }

    /// One engine call answered `requests` steps.
    pub fn merged(&self, requests: usize) {
        self.merged.observe(requests as f64);
    }

    /// A store's live rows and segments after startup or a write (`store_rows`,
    /// `store_segments`), so drift updates show on a dashboard.
    pub fn store_size(&self, store: &str, rows: usize, segments: usize) {
        self.store_rows.with_label_values(&[store]).set(rows as i64);
        self.store_segments
            .with_label_values(&[store])
            .set(segments as i64);
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("encoding into a Vec cannot fail");
        String::from_utf8(buf).expect("the text format is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Serves `GET /metrics` on `listener` until `shutdown` turns true.
pub async fn serve_metrics(
    listener: TcpListener,
    metrics: std::sync::Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), ServerError> {
    let addr: SocketAddr = listener
        .local_addr()
        .map_err(|e| ServerError::Bind("metrics".into(), e))?;
    tracing::info!(%addr, "metrics endpoint listening");
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(s) => s,
                Err(err) => {
                    tracing::warn!(%err, "metrics endpoint: accept failed");
                    continue;
                }
            },
            _ = shutdown.wait_for(|s| *s) => return Ok(()),
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let metrics = metrics.clone();
                async move { Ok::<_, std::convert::Infallible>(respond(&req, &metrics)) }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Err(err) = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await
            {
                tracing::debug!(%err, "metrics connection ended with an error");
            }
        });
    }
}

fn respond(req: &Request<hyper::body::Incoming>, metrics: &Metrics) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match (req.method(), req.uri().path()) {
        (&hyper::Method::GET, "/metrics") => (
            StatusCode::OK,
            "text/plain; version=0.0.4",
            Bytes::from(metrics.render()),
        ),
        (_, "/metrics") => (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            Bytes::from_static(b"use GET\n"),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            Bytes::from_static(b"metrics are at /metrics\n"),
        ),
    };
    Response::builder()
        .status(status)
        .header(hyper::header::CONTENT_TYPE, content_type)
        .body(Full::new(body))
        .expect("a valid static response")
}

/// The step engine's phases as this server's series.
impl StepObserver for Metrics {
    fn step_rows(&self, rows: usize) {
        self.rows(rows);
    }
    fn decoded(&self, elapsed: Duration) {
        self.phase(Phase::Decode, elapsed);
    }
    fn engine(&self, total: Duration, search: Duration) {
        Metrics::engine(self, total, search);
    }
    fn merged(&self, steps: usize) {
        Metrics::merged(self, steps);
    }
    fn encoded(&self, elapsed: Duration) {
        self.phase(Phase::Encode, elapsed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_what_was_recorded() {
        let m = Metrics::new();
        m.request(Method::Adjust);
        m.finished(
            Method::Adjust,
            Duration::from_micros(50),
            Some(tonic::Code::InvalidArgument),
        );
        m.phase(Phase::Decode, Duration::from_micros(3));
        m.rows(4);
        m.store_size("toxic", 100, 2);
        let text = m.render();
        assert!(
            text.contains("goodtriever_requests_total{method=\"Adjust\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("goodtriever_errors_total{code=\"InvalidArgument\",method=\"Adjust\"} 1")
        );
        assert!(text.contains("goodtriever_phase_seconds_count{phase=\"decode\"} 1"));
        assert!(text.contains("goodtriever_store_rows{store=\"toxic\"} 100"));
        assert!(text.contains("goodtriever_batch_rows_count 1"));
    }

    #[test]
    fn each_method_and_phase_records_under_its_own_label() {
        let m = Metrics::new();
        let text = m.render();
        // Every series exists from the start, so a rate over it is defined before the first call.
        for method in Method::ALL {
            let series = format!(
                "goodtriever_requests_total{{method=\"{}\"}} 0",
                method.name()
            );
            assert!(text.contains(&series), "{series} missing:\n{text}");
        }
        for (i, method) in Method::ALL.into_iter().enumerate() {
            for _ in 0..=i {
                m.request(method);
                m.finished(method, Duration::from_micros(5), None);
            }
        }
        for (i, phase) in Phase::ALL.into_iter().enumerate() {
            for _ in 0..=i {
                m.phase(phase, Duration::from_micros(5));
            }
        }
        let text = m.render();
        for (i, method) in Method::ALL.into_iter().enumerate() {
            let n = i + 1;
            for series in [
                format!(
                    "goodtriever_requests_total{{method=\"{}\"}} {n}",
                    method.name()
                ),
                format!(
                    "goodtriever_request_seconds_count{{method=\"{}\"}} {n}",
                    method.name()
                ),
            ] {
                assert!(text.contains(&series), "{series} missing:\n{text}");
            }
        }
        for (i, phase) in Phase::ALL.into_iter().enumerate() {
            let series = format!(
                "goodtriever_phase_seconds_count{{phase=\"{}\"}} {}",
                phase.name(),
                i + 1
            );
            assert!(text.contains(&series), "{series} missing:\n{text}");
        }
    }
}
