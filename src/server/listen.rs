//! Where the gRPC server listens, and how a client reaches it: a TCP address, or a Unix domain
//! socket for a sidecar on the same host.
//!
//! A Unix socket skips the TCP stack on both ends of every message, which matters for a
//! sidecar answering one small message per decoding step (docs/performance.md), and it is
//! guarded by file permissions instead of an open port. Its path follows gRPC's naming
//! (`unix:PATH` or `unix:///ABSOLUTE/PATH`), which grpcio, grpc-go and grpc C++ clients accept
//! as a target as is.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use tokio::net::{TcpListener, UnixListener};
use tonic::transport::{Channel, Endpoint, Uri};

/// The largest HTTP/2 frame our server and clients accept (HTTP/2's default is 16 KiB). A
/// dense row, 49152 `f32`s, then travels in one DATA frame instead of twelve, saving the
/// per-frame work on both ends of every dense step (docs/performance.md). Sparse messages fit
/// in 16 KiB either way.
pub const MAX_FRAME_BYTES: u32 = 1 << 20;

/// A gRPC listening address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GrpcAddr {
    /// `HOST:PORT`, e.g. `127.0.0.1:50051`; port 0 picks a free one.
    Tcp(SocketAddr),
    /// `unix:PATH`: a Unix domain socket for a client on the same host.
    Unix(PathBuf),
}

impl FromStr for GrpcAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(rest) = s.strip_prefix("unix:") {
            // `unix:///abs/path` (URI form) and `unix:path` both name a path.
            let path = rest.strip_prefix("//").unwrap_or(rest);
            if path.is_empty() {
                return Err("unix: needs a socket path, e.g. unix:/run/goodtriever.sock".into());
            }
            return Ok(GrpcAddr::Unix(PathBuf::from(path)));
        }
        s.parse()
            .map(GrpcAddr::Tcp)
            .map_err(|_| format!("{s:?} is neither HOST:PORT (e.g. 127.0.0.1:50051) nor unix:PATH"))
    }
}

impl fmt::Display for GrpcAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GrpcAddr::Tcp(a) => write!(f, "{a}"),
            GrpcAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

impl GrpcAddr {
    /// A client channel to a server listening here (what a Rust engine embedding the
    /// generated client uses; `Channel` dials lazily and reconnects).
    pub async fn connect(&self) -> Result<Channel, tonic::transport::Error> {
        match self {
            GrpcAddr::Tcp(a) => {
                Endpoint::from_shared(format!("http://{a}"))?
                    .max_frame_size(MAX_FRAME_BYTES)
                    .connect()
                    .await
            }
            GrpcAddr::Unix(path) => {
                let path = path.clone();
                // The URI is required by the API but unused: the connector dials the socket.
                Endpoint::from_static("http://localhost")
                    .max_frame_size(MAX_FRAME_BYTES)
                    .connect_with_connector(tower::service_fn(move |_: Uri| {
                        let path = path.clone();
                        async move {
                            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                                tokio::net::UnixStream::connect(path).await?,
                            ))
                        }
                    }))
                    .await
            }
        }
    }
}

/// A bound gRPC listener.
#[derive(Debug)]
pub enum GrpcListener {
    /// A TCP listener, bound by [`GrpcListener::bind`] or handed in by the caller.
    Tcp(TcpListener),
    /// The socket file is removed when the listener (or the server serving it) is dropped.
    Unix(UnixListener, SocketFile),
}

impl From<TcpListener> for GrpcListener {
    fn from(l: TcpListener) -> Self {
        GrpcListener::Tcp(l)
    }
}

impl GrpcListener {
    /// Binds `addr`. For a Unix socket a stale socket file left by a server that did not stop
    /// cleanly is removed first; a live server's socket, or a path that is not a socket, is
    /// an error instead.
    pub async fn bind(addr: &GrpcAddr) -> std::io::Result<Self> {
        match addr {
            GrpcAddr::Tcp(a) => Ok(GrpcListener::Tcp(TcpListener::bind(a).await?)),
            GrpcAddr::Unix(path) => {
                remove_stale_socket(path).await?;
                let listener = UnixListener::bind(path)?;
                Ok(GrpcListener::Unix(listener, SocketFile(path.clone())))
            }
        }
    }

    /// The address clients connect to (the actual port when bound to port 0).
    pub fn local_addr(&self) -> Option<GrpcAddr> {
        match self {
            GrpcListener::Tcp(l) => l.local_addr().ok().map(GrpcAddr::Tcp),
            GrpcListener::Unix(_, f) => Some(GrpcAddr::Unix(f.0.clone())),
        }
    }
}

/// A socket file left by a server that did not stop cleanly would make `bind` fail; one that a
/// live server still listens on, or a path that is not a socket, must not be touched.
async fn remove_stale_socket(path: &Path) -> std::io::Result<()> {
    use std::io::{Error, ErrorKind};
    use std::os::unix::fs::FileTypeExt;

    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.file_type().is_socket() {
        return Err(Error::new(
            ErrorKind::AlreadyExists,
            format!(
                "{} exists and is not a socket; choose another path",
                path.display()
            ),
        ));
    }
    match tokio::net::UnixStream::connect(path).await {
        Ok(_) => Err(Error::new(
            ErrorKind::AddrInUse,
            format!("another server is listening on {}", path.display()),
        )),
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => std::fs::remove_file(path),
        Err(e) => Err(e),
    }
}

/// A Unix socket's path; dropping it removes the file, however the server stops.
#[derive(Debug)]
pub struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        if let Err(err) = std::fs::remove_file(&self.0) {
            tracing::warn!(path = %self.0.display(), %err, "could not remove the socket file");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tcp_and_unix_addresses() {
        assert_eq!(
            "127.0.0.1:50051".parse::<GrpcAddr>().unwrap(),
            GrpcAddr::Tcp("127.0.0.1:50051".parse().unwrap())
        );
        for s in ["unix:/run/g.sock", "unix:///run/g.sock"] {
            assert_eq!(
                s.parse::<GrpcAddr>().unwrap(),
                GrpcAddr::Unix("/run/g.sock".into())
            );
        }
        assert_eq!(
            "unix:rel/g.sock".parse::<GrpcAddr>().unwrap(),
            GrpcAddr::Unix("rel/g.sock".into())
        );
        assert_eq!(
            GrpcAddr::Unix("/run/g.sock".into()).to_string(),
            "unix:/run/g.sock"
        );
        for bad in ["unix:", "localhost", "127.0.0.1", ""] {
            assert!(bad.parse::<GrpcAddr>().is_err(), "{bad:?}");
        }
    }
}
