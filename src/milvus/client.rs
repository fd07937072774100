//! The connection to Milvus and the one way every call is made: on this module's own small
//! tokio runtime, waited for with a bound (docs/architecture.md §8, "A new store backend").
//!
//! The SDK is async; the [`crate::store::Store`] trait is blocking and is called from the
//! engine's rayon pool and, for inline steps, from the server's tokio workers. A blocking
//! `block_on` is not allowed on a runtime thread, so a call is spawned onto a dedicated
//! runtime and the caller waits on a plain channel with a deadline: it works from any thread,
//! and no caller waits longer than the address's `timeout_ms` (plus a small grace for the
//! answer to cross the channel).

use std::future::Future;
use std::sync::OnceLock;
use std::time::Duration;

use milvus::v2::error::Error as SdkError;
use milvus::v2::prelude::{
    ClientV2, ConnectConfig, HasCollectionRequest, LoadCollectionRequest, RetryConfig,
    TelemetryConfig,
};
use tokio::runtime::Runtime;

use super::address::MilvusAddress;
use crate::datastore::DatastoreError;

/// Threads of the shared client runtime: calls are I/O-bound, two keep one slow answer
/// from delaying another's decoding.
const RUNTIME_THREADS: usize = 2;
/// Added to a call's own deadline before the caller gives up on the channel.
const GRACE: Duration = Duration::from_millis(200);

fn runtime() -> &'static Runtime {
    static RT: OnceLock<Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(RUNTIME_THREADS)
            .thread_name("goodtriever-milvus")
            .enable_all()
            .build()
            .expect("the Milvus client runtime starts")
    })
}

/// A connected client and the address it serves, for messages.
#[derive(Clone)]
pub struct Conn {
    /// The SDK client (cheap to clone: it shares one channel).
    pub client: ClientV2,
    /// The address, with its timeouts.
    pub addr: MilvusAddress,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Conn({})", self.addr)
    }
}

impl Conn {
    /// Connects, waiting at most the address's `connect_timeout_ms` for the server to answer.
    /// An unreachable server is [`DatastoreError::Unavailable`] naming the address.
    pub fn connect(addr: &MilvusAddress) -> Result<Self, DatastoreError> {
        let mut config = ConnectConfig::new()
            .uri(addr.endpoint())
            .connect_timeout(addr.connect_timeout)
            .rpc_timeout(addr.timeout)
            // The SDK retries a failed call up to 75 times by default; a decoding step must
            // fail fast instead and be retried by its client, so one retry at most, inside
            // the call's own deadline.
            .retry(
                RetryConfig::new()
                    .max_attempts(2)
                    .max_retry_timeout(addr.timeout),
            )
            .telemetry(TelemetryConfig::new().enabled(false));
        if addr.tls {
            config = config.secure(true);
            if let Some(ca) = &addr.ca_file {
                config = config.ca_certificate(ca.clone());
            }
        }
        if let Some(token) = addr.read_token()? {
            config = config.token(token);
        }
        if let Some(db) = &addr.database {
            config = config.database(db.clone());
        }
        let location = addr.to_string();
        let wait = addr.connect_timeout;
        let client = run(&location, wait, async move { ClientV2::new(&config).await })?;
        Ok(Conn {
            client,
            addr: addr.clone(),
        })
    }

    /// The address without options, for messages.
    pub fn location(&self) -> String {
        self.addr.to_string()
    }

    /// Runs one call with the address's timeout.
    pub fn call<T, F>(&self, make: impl FnOnce(ClientV2) -> F) -> Result<T, DatastoreError>
    where
        T: Send + 'static,
        F: Future<Output = Result<T, SdkError>> + Send + 'static,
    {
        self.call_within(self.addr.timeout, make)
    }

    /// Runs one call with its own bound (index builds and loads take longer than a search).
    pub fn call_within<T, F>(
        &self,
        limit: Duration,
        make: impl FnOnce(ClientV2) -> F,
    ) -> Result<T, DatastoreError>
    where
        T: Send + 'static,
        F: Future<Output = Result<T, SdkError>> + Send + 'static,
    {
        run(&self.location(), limit, make(self.client.clone()))
    }

    /// Whether `collection` exists.
    pub fn has_collection(&self, collection: String) -> Result<bool, DatastoreError> {
        self.call(move |c| async move {
            c.has_collection(
                HasCollectionRequest::builder()
                    .collection_name(collection)
                    .build()?,
            )
            .await
            .map(|r| r.exists())
        })
    }

    /// Loads `collection` into the query nodes, waiting at most `limit` (a no-op when it is
    /// loaded; after a server restart it is not).
    pub fn load_collection(
        &self,
        collection: String,
        limit: Duration,
    ) -> Result<(), DatastoreError> {
        self.call_within(limit, move |c| async move {
            c.load_collection(
                LoadCollectionRequest::builder()
                    .collection_name(collection)
                    .sync(true)
                    .timeout_ms(limit.as_millis() as i64)
                    .build()?,
            )
            .await
        })
    }
}

/// Spawns `fut` on the client runtime and waits at most `limit` (+ grace) for it.
fn run<T, F>(location: &str, limit: Duration, fut: F) -> Result<T, DatastoreError>
where
    T: Send + 'static,
    F: Future<Output = Result<T, SdkError>> + Send + 'static,
{
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    runtime().spawn(async move {
        let answer = tokio::time::timeout(limit, fut).await;
        let _ = tx.send(answer);
    });
    let timed_out = || DatastoreError::TimedOut {
        location: location.to_string(),
        after: limit,
    };
    match rx.recv_timeout(limit + GRACE) {
        Ok(Ok(Ok(v))) => Ok(v),
        Ok(Ok(Err(e))) => Err(map_error(location, limit, e)),
        Ok(Err(_elapsed)) => Err(timed_out()),
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Err(timed_out()),
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => Err(DatastoreError::Unavailable {
            location: location.to_string(),
            reason: "the client task ended without an answer".into(),
        }),
    }
}

/// Transport and server failures mean the store cannot serve now (`UNAVAILABLE`, which a
/// client retries); a missed deadline is `TimedOut`; a request the SDK refused or an answer
/// it could not decode is [`DatastoreError::Backend`].
fn map_error(location: &str, limit: Duration, e: SdkError) -> DatastoreError {
    let root = match e {
        SdkError::RetryExhausted { source, .. } => *source,
        other => other,
    };
    match root {
        SdkError::Timeout(_) => DatastoreError::TimedOut {
            location: location.to_string(),
            after: limit,
        },
        SdkError::Grpc(_) | SdkError::Server(_) | SdkError::Cancelled(_) => {
            DatastoreError::Unavailable {
                location: location.to_string(),
                reason: root.to_string(),
            }
        }
        other => DatastoreError::Backend {
            location: location.to_string(),
            detail: other.to_string(),
        },
    }
}
