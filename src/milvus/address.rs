//! `milvus://HOST:PORT/COLLECTION` store addresses (docs/architecture.md §3, "Milvus").
//!
//! An address names the server, the collection and how to reach it, so that every command
//! and the Python client pass one string wherever a store directory is accepted. The token is
//! never written into the address itself (addresses end up in logs, `ps` and shell history):
//! it is read from an environment variable or a file that the address names.

use std::time::Duration;

use crate::datastore::DatastoreError;

/// The scheme of a plaintext address.
pub const SCHEME: &str = "milvus://";
/// The scheme of a TLS address (`https` to the server).
pub const SCHEME_TLS: &str = "milvuss://";
/// The environment variable a token is read from when the address names none.
pub const TOKEN_ENV: &str = "GOODTRIEVER_MILVUS_TOKEN";
/// How long one call to Milvus may take when the address does not say (`timeout_ms`).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long connecting may take when the address does not say (`connect_timeout_ms`).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A parsed Milvus store address:
/// `milvus[s]://HOST[:PORT]/COLLECTION[?token_env=VAR|token_file=PATH&ca=PATH&timeout_ms=N&connect_timeout_ms=N&database=DB]`.
#[derive(Clone, PartialEq, Eq)]
pub struct MilvusAddress {
    /// Server host name or IP address.
    pub host: String,
    /// gRPC port (19530 when the address gives none).
    pub port: u16,
    /// The collection holding the store's rows.
    pub collection: String,
    /// The Milvus database (`default` when the address gives none).
    pub database: Option<String>,
    /// TLS to the server (`milvuss://`).
    pub tls: bool,
    /// A PEM file with the CA certificate to trust for TLS (`ca=PATH`); the system roots
    /// otherwise.
    pub ca_file: Option<String>,
    /// Where the token comes from.
    pub token: TokenSource,
    /// The bound on every call (`timeout_ms`).
    pub timeout: Duration,
    /// The bound on connecting (`connect_timeout_ms`).
    pub connect_timeout: Duration,
}

/// Where a Milvus token (`user:password` or an API key) is read from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenSource {
    /// `token_env=VAR`, or [`TOKEN_ENV`] when the address names no source; no token when the
    /// variable is unset.
    Env(String),
    /// `token_file=PATH`: the file's content with surrounding whitespace removed.
    File(String),
}

impl std::fmt::Debug for MilvusAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_string())
    }
}

impl std::fmt::Display for MilvusAddress {
    /// The address without its query options: what messages and `Store::location` show.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.tls { SCHEME_TLS } else { SCHEME };
        write!(f, "{scheme}{}:{}/", self.host, self.port)?;
        if let Some(db) = &self.database {
            write!(f, "{db}.")?;
        }
        f.write_str(&self.collection)
    }
}

/// Whether `s` is a Milvus store address rather than a directory.
pub fn is_milvus_address(s: &str) -> bool {
    s.starts_with(SCHEME) || s.starts_with(SCHEME_TLS)
}

fn bad(address: &str, why: impl Into<String>) -> DatastoreError {
    DatastoreError::BadAddress {
        address: address.to_string(),
        why: why.into(),
    }
}

impl MilvusAddress {
    /// Parses an address; every problem is a [`DatastoreError::BadAddress`] that says which
    /// part is wrong.
    pub fn parse(address: &str) -> Result<Self, DatastoreError> {
        let (tls, rest) = if let Some(r) = address.strip_prefix(SCHEME_TLS) {
            (true, r)
        } else if let Some(r) = address.strip_prefix(SCHEME) {
            (false, r)
        } else {
            return Err(bad(address, "it must start with milvus:// or milvuss://"));
        };
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        let (authority, collection) = rest.split_once('/').ok_or_else(|| {
            bad(
                address,
                "it names no collection (milvus://HOST:PORT/COLLECTION)",
            )
        })?;
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) => {
                let port = p
                    .parse::<u16>()
                    .ok()
                    .filter(|&p| p != 0)
                    .ok_or_else(|| bad(address, format!("port {p:?} is not a port number")))?;
                (h, port)
            }
            _ => (authority, 19530),
        };
        if host.is_empty() {
            return Err(bad(address, "it names no host"));
        }
        if !collection_name_ok(collection) {
            return Err(bad(
                address,
                format!("collection {collection:?} is not a Milvus collection name: a letter or _ first, then letters, digits and _, at most 255 characters"),
            ));
        }
        let mut a = MilvusAddress {
            host: host.to_string(),
            port,
            collection: collection.to_string(),
            database: None,
            tls,
            ca_file: None,
            token: TokenSource::Env(TOKEN_ENV.to_string()),
            timeout: DEFAULT_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
        };
        let mut token_set = false;
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair
                .split_once('=')
                .ok_or_else(|| bad(address, format!("option {pair:?} has no value (KEY=VALUE)")))?;
            if value.is_empty() {
                return Err(bad(address, format!("option {key} is empty")));
            }
            match key {
                "token_env" | "token_file" => {
                    if token_set {
                        return Err(bad(address, "give one of token_env and token_file"));
                    }
                    token_set = true;
                    a.token = if key == "token_env" {
                        TokenSource::Env(value.to_string())
                    } else {
                        TokenSource::File(value.to_string())
                    };
                }
                "ca" => a.ca_file = Some(value.to_string()),
                "database" => a.database = Some(value.to_string()),
                "timeout_ms" | "connect_timeout_ms" => {
                    let ms = value
                        .parse::<u64>()
                        .ok()
                        .filter(|&ms| (1..=3_600_000).contains(&ms))
                        .ok_or_else(|| {
                            bad(address, format!("{key}={value} is not a number of milliseconds between 1 and 3600000"))
                        })?;
                    if key == "timeout_ms" {
                        a.timeout = Duration::from_millis(ms);
                    } else {
                        a.connect_timeout = Duration::from_millis(ms);
                    }
                }
                "token" => {
                    return Err(bad(
                        address,
                        format!("a token is never written into the address; put it in an environment variable (token_env=VAR, default {TOKEN_ENV}) or a file (token_file=PATH)"),
                    ))
                }
                other => {
                    return Err(bad(
                        address,
                        format!("unknown option {other:?} (known: token_env, token_file, ca, database, timeout_ms, connect_timeout_ms)"),
                    ))
                }
            }
        }
        if a.ca_file.is_some() && !a.tls {
            return Err(bad(address, "ca= needs TLS: use milvuss://"));
        }
        Ok(a)
    }

    /// The gRPC endpoint the client connects to.
    pub fn endpoint(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}:{}", self.host, self.port)
    }

    /// The token, read now from where the address says; `None` when the environment variable
    /// is unset. A token file that cannot be read, or is empty, is an error.
    pub fn read_token(&self) -> Result<Option<String>, DatastoreError> {
        match &self.token {
            TokenSource::Env(var) => Ok(std::env::var(var).ok().filter(|t| !t.is_empty())),
            TokenSource::File(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    DatastoreError::io("read the Milvus token file", path.as_ref(), e)
                })?;
                let token = text.trim();
                if token.is_empty() {
                    return Err(bad(
                        &self.to_string(),
                        format!("token file {path} is empty"),
                    ));
                }
                Ok(Some(token.to_string()))
            }
        }
    }
}

/// Milvus's rule for collection names.
fn collection_name_ok(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && name.len() <= 255
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_tls_addresses() {
        let a = MilvusAddress::parse("milvus://127.0.0.1:19530/toxic").unwrap();
        assert_eq!(
            (a.host.as_str(), a.port, a.collection.as_str()),
            ("127.0.0.1", 19530, "toxic")
        );
        assert!(!a.tls);
        assert_eq!(a.endpoint(), "http://127.0.0.1:19530");
        assert_eq!(a.token, TokenSource::Env(TOKEN_ENV.into()));
        assert_eq!(a.timeout, DEFAULT_TIMEOUT);
        assert_eq!(a.to_string(), "milvus://127.0.0.1:19530/toxic");

        let b = MilvusAddress::parse(
            "milvuss://db.example.org/nontoxic_v2?token_file=/run/tok&ca=/etc/ca.pem&timeout_ms=250&database=prod",
        )
        .unwrap();
        assert!(b.tls);
        assert_eq!(b.port, 19530);
        assert_eq!(b.endpoint(), "https://db.example.org:19530");
        assert_eq!(b.token, TokenSource::File("/run/tok".into()));
        assert_eq!(b.ca_file.as_deref(), Some("/etc/ca.pem"));
        assert_eq!(b.timeout, Duration::from_millis(250));
        assert_eq!(b.database.as_deref(), Some("prod"));
        assert_eq!(
            b.to_string(),
            "milvuss://db.example.org:19530/prod.nontoxic_v2"
        );
        assert!(is_milvus_address("milvuss://x/y") && !is_milvus_address("datastores/toxic"));
    }

    #[test]
    fn refuses_bad_addresses_naming_the_part() {
        for (addr, part) in [
            ("http://h:1/c", "milvus://"),
            ("milvus://h:1", "no collection"),
            ("milvus://:19530/c", "no host"),
            ("milvus://h:port/c", "not a port"),
            ("milvus://h:0/c", "not a port"),
            ("milvus://h/1abc", "collection"),
            ("milvus://h/a-b", "collection"),
            ("milvus://h/c?token=secret", "never written"),
            ("milvus://h/c?colour=red", "unknown option"),
            ("milvus://h/c?timeout_ms=0", "milliseconds"),
            ("milvus://h/c?timeout_ms", "no value"),
            ("milvus://h/c?token_env=A&token_file=B", "one of"),
            ("milvus://h/c?ca=/x.pem", "needs TLS"),
        ] {
            let err = MilvusAddress::parse(addr).unwrap_err();
            let msg = err.to_string();
            assert!(
                matches!(err, DatastoreError::BadAddress { .. }),
                "{addr}: {msg}"
            );
            assert!(
                msg.contains(part),
                "{addr}: {msg:?} should mention {part:?}"
            );
        }
    }

    #[test]
    fn reads_the_token_from_the_named_file_and_variable() {
        let dir = std::env::temp_dir().join(format!("gt-milvus-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("tok");
        std::fs::write(&file, "root:Milvus\n").unwrap();
        let a =
            MilvusAddress::parse(&format!("milvus://h/c?token_file={}", file.display())).unwrap();
        assert_eq!(a.read_token().unwrap().as_deref(), Some("root:Milvus"));
        std::fs::write(&file, " \n").unwrap();
        assert!(a.read_token().unwrap_err().to_string().contains("empty"));
        let missing = MilvusAddress::parse("milvus://h/c?token_file=/nonexistent/tok").unwrap();
        assert!(missing
            .read_token()
            .unwrap_err()
            .to_string()
            .contains("/nonexistent/tok"));
        let unset = MilvusAddress::parse("milvus://h/c?token_env=GT_TEST_UNSET_TOKEN_VAR").unwrap();
        assert_eq!(unset.read_token().unwrap(), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
