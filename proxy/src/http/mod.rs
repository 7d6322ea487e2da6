//! L7: HTTP/1.1, HTTP/2 and gRPC, on the outbound and inbound paths.
//!
//! A connection [`crate::detect`] found to be HTTP is served by hyper ([`server`]); each request
//! goes through [`forward`]: the route ([`route`], Gateway API HTTPRoute attached to the
//! Service) is chosen, its filters applied, a backend picked by weight, an endpoint by the
//! per-request balancer, and the request sent on a pooled connection ([`pool`]) with the rule's
//! timeouts and retries ([`retry`]). Failures the proxy answers itself are made into responses
//! in one place ([`respond`]).

pub mod forward;
pub mod headers;
pub mod inbound;
pub mod pool;
pub mod prefixed;
pub mod respond;
pub mod retry;
pub mod route;
pub mod server;

use bytes::Bytes;
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;

/// Set by an outbound sidecar that carries an HTTP/1.1 request over HTTP/2 to a meshed
/// endpoint; the inbound sidecar removes it and speaks HTTP/1.1 to its app.
pub const ORIG_PROTO: &str = "x-wasmesh-orig-proto";

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Every body the proxy sends or forwards.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

pub fn empty() -> Body {
    http_body_util::Empty::new()
        .map_err(|never| match never {})
        .boxed_unsync()
}

pub fn full(bytes: Bytes) -> Body {
    http_body_util::Full::new(bytes)
        .map_err(|never| match never {})
        .boxed_unsync()
}

pub fn boxed<B>(body: B) -> Body
where
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed_unsync()
}
