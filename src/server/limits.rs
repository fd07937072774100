//! Oversized messages as `RESOURCE_EXHAUSTED`, with a sentence that says what to do.
//!
//! tonic refuses a request larger than the configured limit itself, before any handler runs,
//! and answers `OUT_OF_RANGE` ("decoded message length too large"). gRPC's own convention, and
//! what clients retry-classify on, is `RESOURCE_EXHAUSTED`; and the bare message does not tell
//! the caller about `--max-message-bytes` or how to send less. This tower layer rewrites that
//! one trailers-only answer; streams see the same error in their handler and map it there.
//! The same layer turns tonic-prost's `INTERNAL` for a body that is not valid protobuf into
//! `INVALID_ARGUMENT` (see `map_decode_error`).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tonic::codegen::http::{self, HeaderMap};
use tonic::Status;

use super::status::map_decode_error;

#[derive(Clone, Copy)]
pub struct ResourceExhaustedLayer {
    limit: usize,
}

impl ResourceExhaustedLayer {
    pub fn new(limit: usize) -> Self {
        Self { limit }
    }
}

impl<S> tower::Layer<S> for ResourceExhaustedLayer {
    type Service = ResourceExhausted<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ResourceExhausted {
            inner,
            limit: self.limit,
        }
    }
}

#[derive(Clone)]
pub struct ResourceExhausted<S> {
    inner: S,
    limit: usize,
}

impl<S, B, RB> tower::Service<http::Request<B>> for ResourceExhausted<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<RB>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let fut = self.inner.call(req);
        let limit = self.limit;
        Box::pin(async move {
            let mut resp = fut.await?;
            rewrite(resp.headers_mut(), limit);
            Ok(resp)
        })
    }
}

fn rewrite(headers: &mut HeaderMap, limit: usize) {
    // Cheap check first: almost every response has no grpc-status header at all.
    if !matches!(
        headers.get("grpc-status").map(|v| v.as_bytes()),
        Some(b"11") | Some(b"13")
    ) {
        return;
    }
    let Some(status) = Status::from_header_map(headers) else {
        return;
    };
    let code = status.code();
    let mapped = map_decode_error(status, limit);
    if mapped.code() == code {
        return;
    }
    headers.remove("grpc-status");
    headers.remove("grpc-message");
    headers.remove("grpc-status-details-bin");
    if mapped.add_header(headers).is_err() {
        tracing::warn!("could not encode the rewritten status");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewrites_only_the_decode_errors() {
        let mut h = HeaderMap::new();
        Status::out_of_range(
            "Error, decoded message length too large: found 5000 bytes, the limit is: 1024 bytes",
        )
        .add_header(&mut h)
        .unwrap();
        rewrite(&mut h, 1024);
        let s = Status::from_header_map(&h).unwrap();
        assert_eq!(s.code(), tonic::Code::ResourceExhausted);
        assert!(
            s.message().contains("--max-message-bytes"),
            "{}",
            s.message()
        );

        let mut other = HeaderMap::new();
        Status::out_of_range("step out of range")
            .add_header(&mut other)
            .unwrap();
        rewrite(&mut other, 1024);
        assert_eq!(
            Status::from_header_map(&other).unwrap().code(),
            tonic::Code::OutOfRange
        );

        let mut bad_body = HeaderMap::new();
        Status::internal("failed to decode Protobuf message: invalid tag value: 0")
            .add_header(&mut bad_body)
            .unwrap();
        rewrite(&mut bad_body, 1024);
        let s = Status::from_header_map(&bad_body).unwrap();
        assert_eq!(s.code(), tonic::Code::InvalidArgument, "{}", s.message());
        assert!(s.message().contains("invalid tag value"), "{}", s.message());

        let mut internal = HeaderMap::new();
        Status::internal("the write worker failed")
            .add_header(&mut internal)
            .unwrap();
        rewrite(&mut internal, 1024);
        assert_eq!(
            Status::from_header_map(&internal).unwrap().code(),
            tonic::Code::Internal
        );
    }
}
