//! Shared by the server tests: tiny datastores made with the datastore API, an in-process
//! server on a free loopback port, and a client for it.

#![allow(dead_code)]

use std::path::Path;
use std::sync::Arc;

use goodtriever::datastore::{CreateOptions, Datastore, KeyDtype, Keys, Provenance, SearchParams};
use goodtriever::detox::{AdjustOptions, Detoxifier};
use goodtriever::fingerprint::{KeyType, ModelFingerprint};
use goodtriever::server::proto::goodtriever_client::GoodtrieverClient;
use goodtriever::server::{GrpcAddr, ServeOptions, Server};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::transport::Channel;

pub const DIM: usize = 16;
pub const VOCAB: usize = 200;

pub fn fingerprint() -> ModelFingerprint {
    ModelFingerprint {
        model_id: "tiny-test".into(),
        architecture: Some("llama".into()),
        hidden_size: DIM,
        vocab_size: Some(VOCAB),
        tokenizer_digest: None,
        weight_digest: None,
    }
}

/// A small deterministic generator (xorshift), so tests need no extra crates and are stable.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    /// Uniform in [-1, 1).
    pub fn f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    pub fn below(&mut self, n: u32) -> u32 {
        (self.next_u64() % n as u64) as u32
    }
    pub fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.f32() * scale).collect()
    }
}

/// Creates a store in `dir` with `rows` keys around a few cluster centres; each cluster
/// prefers a band of token ids, so neighbours carry meaningful values.
pub fn make_store(dir: &Path, rows: usize, seed: u64) -> Arc<Datastore> {
    let store = Datastore::create(
        dir,
        CreateOptions {
            fingerprint: fingerprint(),
            key_type: KeyType::LastFfnInput,
            dtype: KeyDtype::F32,
        },
    )
    .unwrap();
    let mut rng = Rng::new(seed);
    let centres: Vec<Vec<f32>> = (0..4).map(|_| rng.vec(DIM, 3.0)).collect();
    let mut keys = Vec::with_capacity(rows * DIM);
    let mut values = Vec::with_capacity(rows);
    for i in 0..rows {
        let c = &centres[i % centres.len()];
        keys.extend(c.iter().map(|x| x + rng.f32() * 0.5));
        values.push(((i % centres.len()) as u32 * 40 + rng.below(30)) % VOCAB as u32);
    }
    store
        .append(
            Keys::F32(&keys),
            &values,
            Provenance::new("test").with_label("seed"),
        )
        .unwrap();
    Arc::new(store)
}

pub fn engine(dir: &Path, defaults: AdjustOptions) -> Arc<Detoxifier> {
    let toxic = make_store(&dir.join("toxic"), 300, 1);
    let nontoxic = make_store(&dir.join("nontoxic"), 300, 2);
    Arc::new(
        Detoxifier::goodtriever(toxic, nontoxic, defaults, SearchParams::exact(), None).unwrap(),
    )
}

/// Small-k defaults so that the tiny stores exercise the patch minimum.
pub fn defaults() -> AdjustOptions {
    let mut o = AdjustOptions::default();
    o.params.k = 32;
    o.params.temperature = 10.0;
    o
}

/// A server running in this process until the handle is dropped or `stop` is called.
pub struct Running {
    pub addr: std::net::SocketAddr,
    pub metrics_addr: std::net::SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Running {
    pub async fn client(&self) -> GoodtrieverClient<Channel> {
        GoodtrieverClient::new(self.channel().await)
            .max_decoding_message_size(256 << 20)
            .max_encoding_message_size(256 << 20)
    }

    pub async fn channel(&self) -> Channel {
        GrpcAddr::Tcp(self.addr).connect().await.unwrap()
    }

    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.unwrap();
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

pub async fn start(engine: Arc<Detoxifier>, opts: ServeOptions) -> Running {
    let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let metrics = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = Server::from_listeners(engine, opts, grpc, Some(metrics)).unwrap();
    let addr = server.grpc_addr().unwrap();
    let metrics_addr = server.metrics_addr().unwrap();
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        server
            .run(async {
                let _ = rx.await;
            })
            .await
            .unwrap();
    });
    Running {
        addr,
        metrics_addr,
        stop: Some(tx),
        task: Some(task),
    }
}

pub fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

pub fn bytes_f32(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// The gRPC address from the `listening grpc=ADDR ...` line that a spawned `goodtriever serve`
/// prints on stdout once it accepts connections.
pub fn read_listening_addr(child: &mut std::process::Child) -> String {
    use std::io::{BufRead, BufReader};
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout piped"))
        .read_line(&mut line)
        .unwrap();
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("grpc="))
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_string()
}

/// The whole HTTP/1.1 response (head and body) to `GET path` on `addr`.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.unwrap();
    buf
}
