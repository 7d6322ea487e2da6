//! What a filter step tells the proxy to do: go on ([`Verdict::Continue`], or for bodies
//! [`BodyVerdict::Data`] with the bytes to forward now), answer locally ([`LocalReply`]), or
//! reset the stream. Pauses never reach the proxy: the async step methods wait for the filter
//! to resume (a callout answered, a timer fired) and then return.

use bytes::Bytes;
use http::HeaderMap;

/// A response produced by the proxy rather than the upstream.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LocalReply {
    /// Status code.
    pub status: u16,
    /// Headers (a `content-length` matching `body` is added by the host).
    pub headers: HeaderMap,
    /// Body.
    pub body: Bytes,
    /// Why (Envoy's response code details), e.g. `wasm_fail_close` or what the filter gave.
    pub details: String,
}

impl LocalReply {
    pub(crate) fn fail_closed() -> Self {
        LocalReply {
            status: 503,
            details: "wasm_fail_close".into(),
            ..Default::default()
        }
    }

    /// Turns the reply into a response the proxy can send.
    pub fn into_response(self) -> http::Response<Bytes> {
        let mut res = http::Response::new(self.body);
        *res.status_mut() = http::StatusCode::from_u16(self.status)
            .unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
        *res.headers_mut() = self.headers;
        res
    }
}

/// Outcome of a headers or trailers step.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    /// Forward (the headers in place may have been changed).
    Continue,
    /// Don't forward: send this response downstream instead (the response callbacks of the
    /// filters have already run on it).
    LocalReply(LocalReply),
    /// Reset the stream (`proxy_close_stream`).
    Reset,
}

/// Outcome of a body step.
#[derive(Clone, Debug, PartialEq)]
pub enum BodyVerdict {
    /// Forward these bytes now (possibly none: a filter is buffering).
    Data(Bytes),
    /// Don't forward: send this response downstream instead.
    LocalReply(LocalReply),
    /// Reset the stream.
    Reset,
}
