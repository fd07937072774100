//! `goodtriever serve`: the engine as a gRPC sidecar next to a generation server.
//!
//! A client engine sends, per decoding step, the key hidden state of the last position (and
//! for the dense form its logits); the server answers with the logit bias
//! (docs/architecture.md §1, sparse form) or the adjusted log-probabilities. Writes
//! (`AddExamples`, `AddTexts`) grow the stores while serving, and the engine sees new segments
//! at once.
//!
//! Around the service the server runs what operators expect of a production gRPC service: the
//! standard health service and server reflection, Prometheus metrics over plain HTTP, limits on
//! message size and rows, an admin token for writes, TLS when configured, and a graceful
//! shutdown that finishes in-flight requests (and bounds how long open streams may linger).
//!
//! The server is an adapter: it decodes protobuf, hands each Adjust step to the library's
//! transport-free step engine (`crate::steps`), encodes the answer, and maps errors to status
//! codes; transports, auth and metrics are its own.
//!
//! Modules: `service` (the RPCs), `shared` (the handlers' shared state), `adjust_step` (an Adjust request as a step of the step
//! engine: checks, decoding, encoding), `step_stream` (AdjustStream's answers), `convert`
//! (wire tensors and sparse rows), `status` (error → gRPC code), `auth` (admin token),
//! `metrics` (Prometheus + /metrics), `encoder` (text → rows for `AddTexts`), `limits`
//! (message-size errors as `RESOURCE_EXHAUSTED`), `listen` (TCP or Unix socket).

mod adjust_step;
pub mod auth;
pub mod convert;
pub mod encoder;
mod explain;
#[cfg(feature = "model")]
pub mod http;
mod limits;
pub mod listen;
#[cfg(test)]
mod merge_tests;
pub mod metrics;
pub mod service;
mod shared;
mod status;
mod step_stream;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::server::TcpIncoming;

pub use auth::AdminAuth;
pub use encoder::TextEncoder;
pub use listen::{GrpcAddr, GrpcListener, MAX_FRAME_BYTES};
pub use metrics::Metrics;
pub use shared::Limits;

use crate::datastore::MergePolicy;
use crate::detox::Detoxifier;
use crate::limits::MAX_ROWS;

/// The generated protocol types, client and server (package `goodtriever.v1`).
#[allow(clippy::all, missing_docs)]
pub mod proto {
    tonic::include_proto!("goodtriever.v1");

    /// The encoded file descriptor set of the protocol, served by gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/goodtriever_descriptor.bin"));
}

/// Default largest request message: room for 64 dense rows of a 49k vocabulary in f32, or an
/// AddExamples batch of ~14k rows of 576 f32 values.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 32 << 20;
/// Default rows per Adjust request.
pub const DEFAULT_MAX_ROWS: usize = 256;

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The gRPC or metrics socket could not be bound (which one and where is given).
    #[error("binding the {0} address: {1}")]
    Bind(String, #[source] std::io::Error),
    /// `Limits::max_rows` is 0 or above the engine's [`MAX_ROWS`].
    #[error("--max-rows must be between 1 and {MAX_ROWS}, got {0}")]
    MaxRows(usize),
    /// `Limits::max_message_bytes` is below 1 KiB, too small for any real step.
    #[error("--max-message-bytes must be at least 1024, got {0}")]
    MaxMessageBytes(usize),
    /// `ServeOptions::concurrent_steps` is 0, so no step could ever run.
    #[error("--concurrent-steps must be at least 1")]
    ConcurrentSteps,
    /// The text encoder (for AddTexts) runs a different model than the stores were built with.
    #[error("the model does not match the stores: {0}; serve stores built with this model")]
    ModelMismatch(String),
    /// The TLS certificate or key is not PEM, or the two do not make an identity.
    #[error("TLS: {0}")]
    Tls(String),
    /// A non-loopback TCP address without TLS and without the operator's explicit consent.
    #[error("{0} is not a loopback address and no TLS identity was given: hidden states and the admin token would cross the network in clear; pass --tls-cert and --tls-key, or --allow-plaintext on a network you trust")]
    PlaintextRemote(SocketAddr),
    /// The reflection service could not be built from the descriptor set.
    #[error("gRPC reflection: {0}")]
    Reflection(String),
    /// The gRPC transport stopped with an error while serving.
    #[error("the gRPC server failed: {0}")]
    Transport(#[source] tonic::transport::Error),
    /// The HTTP API could not start or failed.
    #[cfg(feature = "model")]
    #[error(transparent)]
    Http(#[from] http::HttpError),
}

/// TLS certificate chain and private key, PEM-encoded.
#[derive(Clone)]
pub struct TlsPem {
    /// The certificate chain, leaf first (the contents of `--tls-cert`).
    pub cert: Vec<u8>,
    /// The private key, PKCS#8, PKCS#1 or SEC1 (the contents of `--tls-key`).
    pub key: Vec<u8>,
}

impl TlsPem {
    /// The two usual mistakes (a file that is not PEM, the files swapped) named in words;
    /// rustls's own wording for them ("peer sent no certificates") points elsewhere.
    fn check(&self) -> Result<(), ServerError> {
        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::{CertificateDer, PrivateKeyDer};
        let certs = CertificateDer::pem_slice_iter(&self.cert)
            .filter(|c| c.is_ok())
            .count();
        if certs == 0 {
            return Err(ServerError::Tls(
                "--tls-cert holds no PEM certificate (\"-----BEGIN CERTIFICATE-----\")".into(),
            ));
        }
        if PrivateKeyDer::from_pem_slice(&self.key).is_err() {
            return Err(ServerError::Tls(
                "--tls-key holds no PEM private key (PKCS#8, PKCS#1 or SEC1)".into(),
            ));
        }
        Ok(())
    }
}

/// Everything a server needs besides its engine and sockets.
pub struct ServeOptions {
    /// Rows and bytes one request may carry; default [`DEFAULT_MAX_ROWS`] and
    /// [`DEFAULT_MAX_MESSAGE_BYTES`].
    pub limits: Limits,
    /// Who may write (AddExamples, AddTexts); default: writes disabled.
    pub auth: AdminAuth,
    /// Turns AddTexts' text into keys; `None` (the default) refuses AddTexts, since the server
    /// then has no model.
    pub encoder: Option<Arc<dyn TextEncoder>>,
    /// Serve over TLS with this identity; `None`: plaintext (for a sidecar on localhost or a
    /// Unix socket).
    pub tls: Option<TlsPem>,
    /// How long, after shutdown starts, open connections may take to finish before the server
    /// stops anyway.
    pub shutdown_grace: Duration,
    /// How many Adjust steps compute at once (default: one per core). Steps beyond it wait and
    /// are merged into shared engine calls. Fewer leaves cores to a generation server on the
    /// same host; the runtime needs at least one more worker thread than this to keep moving
    /// messages while every slot computes.
    pub concurrent_steps: usize,
    /// Serve plain text on an address other than loopback (or a Unix socket). Off by default:
    /// without TLS every hidden state and the admin token cross the network in clear, so the
    /// operator must say that the network is trusted.
    pub allow_plaintext_remote: bool,
    /// When small segments that appends write are merged in the background while serving
    /// (`None`: never). On by default: each AddExamples call writes a segment, and every
    /// segment costs a search of its own.
    pub merge: Option<MergePolicy>,
}

/// One step computing per core.
pub fn default_concurrent_steps() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            limits: Limits {
                max_rows: DEFAULT_MAX_ROWS,
                max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            },
            auth: AdminAuth::disabled(),
            encoder: None,
            tls: None,
            shutdown_grace: Duration::from_secs(30),
            concurrent_steps: default_concurrent_steps(),
            allow_plaintext_remote: false,
            merge: Some(MergePolicy::default()),
        }
    }
}

/// A server bound to its sockets, ready to run.
pub struct Server {
    engine: Arc<Detoxifier>,
    opts: ServeOptions,
    /// HTTP/2 settings and TLS, built (and so checked) before anything is served.
    transport: tonic::transport::Server,
    /// `None` when only the HTTP API is served.
    grpc: Option<GrpcListener>,
    metrics: Option<TcpListener>,
    #[cfg(feature = "model")]
    http: Option<http::HttpServer>,
}

impl Server {
    /// Binds the gRPC address and, when given, the metrics address.
    pub async fn bind(
        engine: Arc<Detoxifier>,
        opts: ServeOptions,
        addr: &GrpcAddr,
        metrics_addr: Option<SocketAddr>,
    ) -> Result<Self, ServerError> {
        let grpc = GrpcListener::bind(addr)
            .await
            .map_err(|e| ServerError::Bind(format!("gRPC ({addr})"), e))?;
        let metrics = match metrics_addr {
            Some(a) => Some(
                TcpListener::bind(a)
                    .await
                    .map_err(|e| ServerError::Bind(format!("metrics ({a})"), e))?,
            ),
            None => None,
        };
        Self::from_listeners(engine, opts, grpc, metrics)
    }

    /// A server without the gRPC service, for the HTTP API alone ([`Server::with_http`]);
    /// metrics, TLS and shutdown work as with gRPC.
    pub async fn bind_without_grpc(
        engine: Arc<Detoxifier>,
        opts: ServeOptions,
        metrics_addr: Option<SocketAddr>,
    ) -> Result<Self, ServerError> {
        let metrics = match metrics_addr {
            Some(a) => Some(
                TcpListener::bind(a)
                    .await
                    .map_err(|e| ServerError::Bind(format!("metrics ({a})"), e))?,
            ),
            None => None,
        };
        Self::from_parts(engine, opts, None, metrics)
    }

    /// Uses already bound sockets (tests bind port 0 and read the port back).
    pub fn from_listeners(
        engine: Arc<Detoxifier>,
        opts: ServeOptions,
        grpc: impl Into<GrpcListener>,
        metrics: Option<TcpListener>,
    ) -> Result<Self, ServerError> {
        Self::from_parts(engine, opts, Some(grpc.into()), metrics)
    }

    fn from_parts(
        engine: Arc<Detoxifier>,
        opts: ServeOptions,
        grpc: Option<GrpcListener>,
        metrics: Option<TcpListener>,
    ) -> Result<Self, ServerError> {
        let l = opts.limits;
        if l.max_rows == 0 || l.max_rows > MAX_ROWS {
            return Err(ServerError::MaxRows(l.max_rows));
        }
        if l.max_message_bytes < 1024 {
            return Err(ServerError::MaxMessageBytes(l.max_message_bytes));
        }
        if opts.concurrent_steps == 0 {
            return Err(ServerError::ConcurrentSteps);
        }
        if let Some(GrpcAddr::Tcp(a)) = grpc.as_ref().and_then(|g| g.local_addr()) {
            if !a.ip().is_loopback() && opts.tls.is_none() {
                if !opts.allow_plaintext_remote {
                    return Err(ServerError::PlaintextRemote(a));
                }
                tracing::warn!(addr = %a, admin_token = opts.auth.writes_enabled(), "serving plain-text gRPC on a non-loopback address (--allow-plaintext)");
            }
        }
        if let Some(enc) = &opts.encoder {
            let fp = enc.fingerprint();
            engine
                .fingerprint()
                .check_compatible(&fp)
                .map_err(ServerError::ModelMismatch)?;
        }
        let mut transport = tonic::transport::Server::builder().max_frame_size(MAX_FRAME_BYTES);
        if let Some(tls) = &opts.tls {
            tls.check()?;
            let identity = tonic::transport::Identity::from_pem(&tls.cert, &tls.key);
            transport = transport
                .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
                .map_err(|e| {
                    ServerError::Tls(format!(
                        "--tls-cert and --tls-key do not make a TLS identity (is the key the \
                         certificate's?): {}",
                        error_chain(&e)
                    ))
                })?;
        }
        Ok(Self {
            engine,
            opts,
            transport,
            grpc,
            metrics,
            #[cfg(feature = "model")]
            http: None,
        })
    }

    /// Serves the OpenAI-compatible HTTP API too, with the same bind rules as gRPC: a
    /// non-loopback address needs TLS (the server's identity, served as HTTPS) or
    /// `allow_plaintext_remote`.
    #[cfg(feature = "model")]
    pub fn with_http(
        mut self,
        listener: TcpListener,
        opts: http::HttpOptions,
    ) -> Result<Self, ServerError> {
        let addr = listener
            .local_addr()
            .map_err(|e| ServerError::Bind("HTTP".into(), e))?;
        if !addr.ip().is_loopback() && self.opts.tls.is_none() {
            if !self.opts.allow_plaintext_remote {
                return Err(ServerError::PlaintextRemote(addr));
            }
            tracing::warn!(%addr, api_key = opts.api_key.is_some(), "serving plain-text HTTP on a non-loopback address (--allow-plaintext)");
        }
        let fp = opts.model.fingerprint();
        self.engine
            .fingerprint()
            .check_compatible(&fp)
            .map_err(ServerError::ModelMismatch)?;
        self.http = Some(http::HttpServer::new(
            listener,
            opts,
            self.opts.tls.as_ref(),
        )?);
        Ok(self)
    }

    /// The HTTP API's address, when it is served.
    #[cfg(feature = "model")]
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http.as_ref().and_then(|h| h.local_addr())
    }

    /// The TCP address, when listening on TCP.
    pub fn grpc_addr(&self) -> Option<SocketAddr> {
        match self.grpc.as_ref()?.local_addr()? {
            GrpcAddr::Tcp(a) => Some(a),
            GrpcAddr::Unix(_) => None,
        }
    }

    /// Where clients connect: a TCP address or `unix:PATH`; `None` without gRPC.
    pub fn grpc_endpoint(&self) -> Option<GrpcAddr> {
        self.grpc.as_ref()?.local_addr()
    }

    /// The bound metrics address (useful with port 0), when metrics are served.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().and_then(|m| m.local_addr().ok())
    }

    /// Serves until `shutdown` completes, then stops accepting, lets in-flight requests finish
    /// (open streams end after their current step) and returns.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), ServerError> {
        use proto::goodtriever_server::GoodtrieverServer;

        let (stop_tx, stop_rx) = watch::channel(false);
        let metrics = Arc::new(Metrics::new());
        let limits = self.opts.limits;
        #[cfg(feature = "model")]
        let http_task = self
            .http
            .map(|h| tokio::spawn(h.run(self.engine.clone(), metrics.clone(), stop_rx.clone())));
        let shared = Arc::new(
            shared::Shared::new(
                self.engine,
                metrics.clone(),
                limits,
                self.opts.auth,
                self.opts.encoder,
                stop_rx.clone(),
                self.opts.concurrent_steps,
            )
            .with_merge_policy(self.opts.merge),
        );
        let svc = GoodtrieverServer::new(service::Service::new(shared))
            .max_decoding_message_size(limits.max_message_bytes);

        let (health, health_svc) = tonic_health::server::health_reporter();
        health
            .set_serving::<GoodtrieverServer<service::Service>>()
            .await;
        health
            .set_service_status("", tonic_health::ServingStatus::Serving)
            .await;
        // Both reflection versions: grpc.reflection.v1, and v1alpha, the only one that the
        // official Python client (grpcio-reflection), older grpcurl, Evans and Postman speak.
        let reflection_builder = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        };
        let reflection = reflection_builder()
            .build_v1()
            .map_err(|e| ServerError::Reflection(e.to_string()))?;
        let reflection_v1alpha = reflection_builder()
            .build_v1alpha()
            .map_err(|e| ServerError::Reflection(e.to_string()))?;

        let metrics_task = self
            .metrics
            .map(|l| tokio::spawn(metrics::serve_metrics(l, metrics.clone(), stop_rx.clone())));

        let addr = self
            .grpc
            .as_ref()
            .and_then(|g| g.local_addr())
            .map(|a| a.to_string());
        if addr.is_some() {
            tracing::info!(addr, tls = self.opts.tls.is_some(), "gRPC server listening");
        }
        let mut stopped = stop_rx.clone();
        let health_on_stop = health.clone();
        let signal = async move {
            let _ = stopped.wait_for(|s| *s).await;
            health_on_stop
                .set_service_status("", tonic_health::ServingStatus::NotServing)
                .await;
            health_on_stop
                .set_not_serving::<GoodtrieverServer<service::Service>>()
                .await;
        };
        let router = self
            .transport
            .layer(limits::ResourceExhaustedLayer::new(
                limits.max_message_bytes,
            ))
            .add_service(health_svc)
            .add_service(reflection)
            .add_service(reflection_v1alpha)
            .add_service(svc);
        type Serving = Pin<Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>>;
        // `_socket_file` removes a Unix socket's file however `run` returns.
        let (server, _socket_file): (Serving, _) = match self.grpc {
            // Without gRPC (the HTTP API alone) the "server" is the wait for the stop signal.
            None => (
                Box::pin(async move {
                    signal.await;
                    Ok(())
                }),
                None,
            ),
            // Nagle's algorithm would hold each small answer back until the client's ACK;
            // `serve_with_incoming` does not apply tonic's own `tcp_nodelay`.
            Some(GrpcListener::Tcp(l)) => (
                Box::pin(router.serve_with_incoming_shutdown(
                    TcpIncoming::from(l).with_nodelay(Some(true)),
                    signal,
                )),
                None,
            ),
            Some(GrpcListener::Unix(l, file)) => (
                Box::pin(router.serve_with_incoming_shutdown(UnixListenerStream::new(l), signal)),
                Some(file),
            ),
        };
        tokio::pin!(server);

        let grace = self.opts.shutdown_grace;
        let result = tokio::select! {
            r = &mut server => r,
            _ = shutdown => {
                tracing::info!("shutting down: finishing in-flight requests");
                let _ = stop_tx.send(true);
                match tokio::time::timeout(grace, &mut server).await {
                    Ok(r) => r,
                    Err(_) => {
                        tracing::warn!(?grace, "connections still open after the grace period; stopping anyway");
                        Ok(())
                    }
                }
            }
        };
        let _ = stop_tx.send(true);
        #[cfg(feature = "model")]
        if let Some(t) = http_task {
            // In-flight HTTP requests finish within the same grace period.
            match tokio::time::timeout(grace, t).await {
                Ok(Ok(Err(e))) => tracing::error!(error = %e, "the HTTP API failed"),
                Ok(_) => {}
                Err(_) => tracing::warn!(
                    ?grace,
                    "HTTP requests still open after the grace period; stopping anyway"
                ),
            }
        }
        if let Some(t) = metrics_task {
            let _ = t.await;
        }
        tracing::info!("server stopped");
        result.map_err(ServerError::Transport)
    }
}

/// The causes under tonic's error, whose own text ("transport error") says nothing to act on.
fn error_chain(e: &tonic::transport::Error) -> String {
    let mut causes = Vec::new();
    let mut next = std::error::Error::source(e);
    while let Some(cause) = next {
        causes.push(cause.to_string());
        next = cause.source();
    }
    if causes.is_empty() {
        e.to_string()
    } else {
        causes.join(": ")
    }
}
