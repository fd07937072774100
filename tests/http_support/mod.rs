//! Shared by the HTTP API and batch tests: the tiny generated model, stores built for it (keys
//! are the model's own hidden states of generated text, values its next tokens), the engine,
//! an in-process server with the HTTP API on a free loopback port, and a small HTTP/1.1
//! client (requests with `Connection: close`; chunked bodies, so SSE streams, decoded).

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use goodtriever::datastore::{CreateOptions, Datastore, KeyDtype, Keys, Provenance, SearchParams};
use goodtriever::detox::{AdjustOptions, Detoxifier};
use goodtriever::fingerprint::KeyType;
use goodtriever::model::testing::{write_tiny_llama, TinySpec};
use goodtriever::model::{Model, Outputs, Positions, WeightFormat};
use goodtriever::server::http::HttpOptions;
use goodtriever::server::{ServeOptions, Server};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// The served model's name in the tests.
pub const NAME: &str = "tiny";

/// The tiny model, with a context long enough that a long request outlasts the tests that need
/// one running (the tiny model decodes a token in well under a millisecond).
pub fn model(dir: &Path) -> Arc<Model> {
    let path = dir.join("tiny.gguf");
    let spec = TinySpec {
        context: 16384,
        ..TinySpec::default()
    };
    write_tiny_llama(&path, &spec).unwrap();
    Arc::new(Model::load(&path, WeightFormat::Native).unwrap())
}

/// A store of the model's last-FFN-input states over `text`, each row's value its next token.
fn store(dir: &Path, model: &Model, text: &str) -> Arc<Datastore> {
    let store = Datastore::create(
        dir,
        CreateOptions {
            fingerprint: model.fingerprint(),
            key_type: KeyType::LastFfnInput,
            dtype: KeyDtype::F32,
        },
    )
    .unwrap();
    let tokens = model.tokenizer().encode(text).unwrap();
    let mut cache = model.new_cache(1);
    let out = model
        .forward(
            &tokens,
            1,
            &mut cache,
            Outputs {
                logits: Positions::None,
                keys: Positions::All,
                key_type: KeyType::LastFfnInput,
            },
        )
        .unwrap();
    let d = model.config().hidden_size;
    let rows = tokens.len() - 1;
    store
        .append(
            Keys::F32(&out.keys[..rows * d]),
            &tokens[1..],
            Provenance::new("test").with_label("tiny"),
        )
        .unwrap();
    Arc::new(store)
}

/// Small-k defaults, so the tiny stores give the rule several neighbours of each; the whole
/// vocabulary kept (the tiny model's distribution is so peaked that the paper's base nucleus
/// would keep one token and leave the control nothing to move).
pub fn defaults() -> AdjustOptions {
    let mut o = AdjustOptions::default();
    o.params.filter_p = 1.0;
    o.params.k = 16;
    o.params.temperature = 10.0;
    o.params.alpha = 4.0;
    o
}

/// The engine over a toxic and a non-toxic store built from different texts.
pub fn detox(dir: &Path, model: &Model) -> Arc<Detoxifier> {
    let toxic = store(
        &dir.join("toxic"),
        model,
        "the rain over the hill hello world the road the stone the river bright moon rain rain the hill",
    );
    let nontoxic = store(
        &dir.join("nontoxic"),
        model,
        "hello the world cat sat on the mat quiet moon over the quiet road hello hello the cat",
    );
    Arc::new(
        Detoxifier::goodtriever(toxic, nontoxic, defaults(), SearchParams::exact(), None).unwrap(),
    )
}

/// HTTP options for the tests: the model named [`NAME`], the given queue and batch rows.
pub fn http_options(model: Arc<Model>, queue: usize, rows: usize) -> HttpOptions {
    HttpOptions {
        model,
        model_name: NAME.into(),
        api_key: None,
        queue,
        max_batch_rows: rows,
        max_body_bytes: 64 << 10,
    }
}

/// A server with gRPC and the HTTP API in this process, stopped when dropped.
pub struct Running {
    pub http: SocketAddr,
    pub metrics: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// Starts the server on a runtime thread of its own (so blocking test clients can call it).
pub fn start(detox: Arc<Detoxifier>, opts: HttpOptions) -> Running {
    start_with(detox, ServeOptions::default(), opts)
}

/// [`start`] with the server's own options (TLS, for one).
pub fn start_with(detox: Arc<Detoxifier>, serve: ServeOptions, opts: HttpOptions) -> Running {
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(3)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let metrics = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let server = Server::from_listeners(detox, serve, grpc, Some(metrics))
                .unwrap()
                .with_http(http, opts)
                .unwrap();
            addr_tx
                .send((server.http_addr().unwrap(), server.metrics_addr().unwrap()))
                .unwrap();
            server
                .run(async {
                    let _ = stop_rx.await;
                })
                .await
                .unwrap();
        });
    });
    let (http, metrics) = addr_rx.recv().unwrap();
    Running {
        http,
        metrics,
        stop: Some(stop_tx),
    }
}

/// A response: status and body (chunked bodies decoded).
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: String,
    pub body: String,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }

    /// The `data:` payloads of an SSE body, in order.
    pub fn events(&self) -> Vec<String> {
        self.body
            .lines()
            .filter_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")))
            .map(str::to_string)
            .collect()
    }
}

/// Sends one request with `body` (raw bytes) and reads the whole response.
pub fn request(addr: SocketAddr, method: &str, path: &str, body: &[u8], extra: &str) -> Reply {
    let mut s = connect(addr, method, path, body, extra);
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    parse(&raw)
}

/// Opens a connection and sends the request, for tests that read the answer themselves.
pub fn connect(addr: SocketAddr, method: &str, path: &str, body: &[u8], extra: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n{extra}\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    s
}

/// Reads the status line and headers of a response on `s`, leaving the body unread.
pub fn read_head(s: &mut BufReader<TcpStream>) -> String {
    let mut head = String::new();
    loop {
        let mut line = String::new();
        s.read_line(&mut line).unwrap();
        if line == "\r\n" || line.is_empty() {
            return head;
        }
        head.push_str(&line);
    }
}

fn parse(raw: &[u8]) -> Reply {
    let text = String::from_utf8_lossy(raw).into_owned();
    let (head, rest) = text.split_once("\r\n\r\n").expect("a complete response");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let body = if chunked {
        dechunk(rest)
    } else {
        rest.to_string()
    };
    Reply {
        status,
        headers: head.to_string(),
        body,
    }
}

fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    while let Some((size, after)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&after[..n]);
        rest = &after[n..];
        rest = rest.strip_prefix("\r\n").unwrap_or(rest);
    }
    out
}

/// POSTs the JSON `body` to `path`.
pub fn post(addr: SocketAddr, path: &str, body: &Value) -> Reply {
    request(addr, "POST", path, body.to_string().as_bytes(), "")
}

/// The metrics endpoint's text.
pub fn metrics(addr: SocketAddr) -> String {
    request(addr, "GET", "/metrics", b"", "").body
}

/// The value of a metric line that starts with `prefix` (labels included), 0 when absent.
pub fn metric(text: &str, prefix: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}
