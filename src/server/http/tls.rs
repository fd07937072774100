//! HTTPS for the HTTP API with the gRPC server's certificate and key (rustls, ring).
//!
//! Handshakes run on their own tasks, so a slow or broken client delays nobody else; a failed
//! handshake is logged and dropped.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::rustls;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use super::HttpError;
use crate::server::TlsPem;

/// How long a client may take over its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A TLS server configuration made from PEM files.
pub struct Acceptor(TlsAcceptor);

impl Acceptor {
    /// The identity in `pem`, offering HTTP/1.1 by ALPN.
    pub fn new(pem: &TlsPem) -> Result<Self, HttpError> {
        let certs = CertificateDer::pem_slice_iter(&pem.cert)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| HttpError::Tls(format!("--tls-cert: {e}")))?;
        let key = PrivateKeyDer::from_pem_slice(&pem.key)
            .map_err(|e| HttpError::Tls(format!("--tls-key: {e}")))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| HttpError::Tls(e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(|e| HttpError::Tls(format!("--tls-cert and --tls-key: {e}")))?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self(TlsAcceptor::from(Arc::new(config))))
    }

    /// Accepts on `listener` and hands out connections whose handshake succeeded.
    pub fn listen(self, listener: TcpListener) -> TlsListener {
        let local = listener.local_addr();
        let (tx, rx) = mpsc::channel(64);
        let acceptor = self.0;
        let task = tokio::spawn(async move {
            loop {
                let (tcp, peer) = match listener.accept().await {
                    Ok(c) => c,
                    Err(err) => {
                        tracing::warn!(%err, "HTTP API: accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            let _ = tx.send((stream, peer)).await;
                        }
                        Ok(Err(err)) => {
                            tracing::debug!(%err, %peer, "HTTP API: TLS handshake failed")
                        }
                        Err(_) => tracing::debug!(%peer, "HTTP API: TLS handshake timed out"),
                    }
                });
            }
        });
        TlsListener {
            rx,
            local,
            _task: AbortOnDrop(task),
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Connections that completed their TLS handshake, for `axum::serve`.
pub struct TlsListener {
    rx: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: std::io::Result<SocketAddr>,
    _task: AbortOnDrop,
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(c) => c,
            // The accept task only ends when aborted, with the listener itself.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        match &self.local {
            Ok(a) => Ok(*a),
            Err(e) => Err(std::io::Error::new(e.kind(), e.to_string())),
        }
    }
}
