//! HTTP callouts (`proxy_http_call`): the filter names an upstream — in wasmesh a mesh Service,
//! `name` or `name.namespace` — and the proxy sends the request through its own balancing.
//! The proxy implements [`HttpCallouts`]; the host validates the request, enforces the
//! timeout and turns failures into the responses Envoy synthesizes (504 on timeout, 503 when
//! the upstream can't be reached), so filters see the same thing in both.

use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use http::HeaderMap;

/// A callout's response as the filter sees it.
#[derive(Clone, Debug, Default)]
pub struct CalloutResponse {
    /// Status code.
    pub status: u16,
    /// Response headers.
    pub headers: HeaderMap,
    /// Whole body.
    pub body: Bytes,
    /// Trailers, if any.
    pub trailers: HeaderMap,
}

impl CalloutResponse {
    /// Envoy's synthesized response for a callout that timed out.
    pub fn timeout() -> Self {
        Self::synthesized(504, "upstream request timeout")
    }

    /// Envoy's synthesized response for an upstream that couldn't be reached.
    pub fn unreachable() -> Self {
        Self::synthesized(
            503,
            "upstream connect error or disconnect/reset before headers. reset reason: remote connection failure",
        )
    }

    fn synthesized(status: u16, body: &'static str) -> Self {
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("text/plain"),
        );
        headers.insert(
            http::header::CONTENT_LENGTH,
            http::HeaderValue::from(body.len()),
        );
        CalloutResponse {
            status,
            headers,
            body: Bytes::from_static(body.as_bytes()),
            trailers: HeaderMap::new(),
        }
    }
}

/// Why the proxy could not even start a callout (the filter gets `BAD_ARGUMENT` at once).
#[derive(Debug, thiserror::Error)]
pub enum CalloutError {
    /// No such upstream.
    #[error("unknown upstream {0:?}: name a mesh Service (`name` or `name.namespace`)")]
    UnknownUpstream(String),
    /// The request is not acceptable (missing `:method`, `:path` or `:authority`…).
    #[error("bad callout request: {0}")]
    BadRequest(String),
}

/// A callout that failed after it started.
#[derive(Debug, thiserror::Error)]
#[error("callout failed: {0}")]
pub struct CalloutFailure(pub String);

/// What the proxy provides to run callouts.
pub trait HttpCallouts: Send + Sync + 'static {
    /// Starts a request to `upstream`. The request carries `:authority` in its URI and `host`
    /// header; the host applies `timeout` itself (the future may ignore it). Called while the
    /// filter's instance is locked: return at once (do the work in the future), never block.
    fn call(
        &self,
        upstream: &str,
        request: http::Request<Bytes>,
        timeout: Duration,
    ) -> Result<BoxFuture<'static, Result<CalloutResponse, CalloutFailure>>, CalloutError>;
}

/// Builds the `http::Request` from the filter's header pairs; `:method`, `:path` and
/// `:authority` are required (as in Envoy).
pub(crate) fn build_request(
    pairs: &[(&[u8], &[u8])],
    body: &[u8],
) -> Result<http::Request<Bytes>, CalloutError> {
    let find = |n: &[u8]| pairs.iter().find(|(k, _)| *k == n).map(|(_, v)| *v);
    let missing = |n: &str| CalloutError::BadRequest(format!("missing {n}"));
    let method = find(b":method").ok_or_else(|| missing(":method"))?;
    let path = find(b":path").ok_or_else(|| missing(":path"))?;
    let authority = find(b":authority").ok_or_else(|| missing(":authority"))?;
    let scheme = find(b":scheme").unwrap_or(b"http");
    let bad = |e: &dyn std::fmt::Display| CalloutError::BadRequest(e.to_string());
    let uri = http::Uri::builder()
        .scheme(scheme)
        .authority(authority)
        .path_and_query(path)
        .build()
        .map_err(|e| bad(&e))?;
    let mut builder = http::Request::builder()
        .method(http::Method::from_bytes(method).map_err(|e| bad(&e))?)
        .uri(uri)
        .header(http::header::HOST, authority);
    for (k, v) in pairs.iter().filter(|(k, _)| !k.starts_with(b":")) {
        builder = builder.header(*k, *v);
    }
    builder
        .body(Bytes::copy_from_slice(body))
        .map_err(|e| bad(&e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pseudo_headers_are_required() {
        let ok = build_request(
            &[
                (b":method", b"GET"),
                (b":path", b"/check"),
                (b":authority", b"authz"),
                (b"x-a", b"1"),
            ],
            b"",
        )
        .unwrap();
        assert_eq!(ok.uri(), "http://authz/check");
        assert_eq!(ok.headers()["host"], "authz");
        assert_eq!(ok.headers()["x-a"], "1");
        let err = build_request(&[(b":method", b"GET"), (b":path", b"/")], b"").unwrap_err();
        assert!(err.to_string().contains(":authority"), "{err}");
    }

    #[test]
    fn synthesized_failures_match_envoy() {
        assert_eq!(CalloutResponse::timeout().status, 504);
        assert_eq!(CalloutResponse::timeout().body, "upstream request timeout");
        assert_eq!(CalloutResponse::unreachable().status, 503);
    }
}
