//! The admin token that guards write RPCs.
//!
//! Adding rows changes what every client's generations are steered by, so writes are off unless
//! the operator configured a token, and then each write must carry it as gRPC metadata
//! `authorization: Bearer <token>`. Reads (Adjust, Info) stay open: they are the hot path and
//! reveal nothing beyond what the client sends. The comparison takes the same time wherever the
//! tokens differ, so the token cannot be guessed byte by byte from response times.

use tonic::metadata::MetadataMap;
use tonic::Status;

/// The metadata key clients put the token under.
pub const METADATA_KEY: &str = "authorization";

/// Write permission for a server.
#[derive(Clone)]
pub struct AdminAuth {
    token: Option<String>,
}

impl std::fmt::Debug for AdminAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the token itself.
        f.debug_struct("AdminAuth")
            .field("writes_enabled", &self.token.is_some())
            .finish()
    }
}

/// Why an admin token was refused as configuration.
#[derive(Debug, thiserror::Error)]
#[error("the admin token is empty or contains whitespace or control characters; use a non-empty printable token without spaces")]
pub struct BadToken;

impl AdminAuth {
    /// Writes disabled.
    pub fn disabled() -> Self {
        Self { token: None }
    }

    /// Writes allowed with `token` (surrounding whitespace, e.g. a file's newline, is trimmed).
    pub fn with_token(token: &str) -> Result<Self, BadToken> {
        let token = token.trim();
        if token.is_empty() || token.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(BadToken);
        }
        Ok(Self {
            token: Some(token.to_string()),
        })
    }

    /// Whether a token is configured; `Info` reports it, so a client knows before it tries a
    /// write.
    pub fn writes_enabled(&self) -> bool {
        self.token.is_some()
    }

    /// Checks a write request's metadata.
    pub fn check(&self, metadata: &MetadataMap) -> Result<(), Status> {
        let Some(expected) = &self.token else {
            return Err(Status::permission_denied(
                "writes are disabled on this server: restart it with --admin-token-file (or GOODTRIEVER_ADMIN_TOKEN) to enable AddExamples and AddTexts",
            ));
        };
        let Some(value) = metadata.get(METADATA_KEY) else {
            return Err(Status::unauthenticated(
                "missing admin token: send metadata 'authorization: Bearer <token>' with write requests",
            ));
        };
        let presented = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        match presented {
            Some(p) if constant_time_eq(p.as_bytes(), expected.as_bytes()) => Ok(()),
            Some(_) => Err(Status::unauthenticated(
                "invalid admin token: the token in 'authorization: Bearer <token>' does not match the server's",
            )),
            None => Err(Status::unauthenticated(
                "malformed authorization metadata: expected 'Bearer <token>'",
            )),
        }
    }
}

/// Equality that takes the same time wherever the two differ (tokens and API keys).
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    fn md(value: Option<&str>) -> MetadataMap {
        let mut m = MetadataMap::new();
        if let Some(v) = value {
            m.insert(METADATA_KEY, v.parse().unwrap());
        }
        m
    }

    #[test]
    fn gates_writes() {
        let off = AdminAuth::disabled();
        assert_eq!(
            off.check(&md(Some("Bearer x"))).unwrap_err().code(),
            Code::PermissionDenied
        );
        let on = AdminAuth::with_token("s3cret\n").unwrap();
        assert!(on.check(&md(Some("Bearer s3cret"))).is_ok());
        assert_eq!(
            on.check(&md(None)).unwrap_err().code(),
            Code::Unauthenticated
        );
        assert_eq!(
            on.check(&md(Some("Bearer s3cre7"))).unwrap_err().code(),
            Code::Unauthenticated
        );
        assert_eq!(
            on.check(&md(Some("s3cret"))).unwrap_err().code(),
            Code::Unauthenticated
        );
        assert!(AdminAuth::with_token("  ").is_err());
        assert!(AdminAuth::with_token("a b").is_err());
        assert!(!format!("{on:?}").contains("s3cret"));
    }
}
