//! The one place where the proxy's own failures become HTTP responses. Each carries
//! `x-wasmesh-error` naming the cause, so a user can tell a 503 from the proxy from a 503 from
//! the app. A gRPC request gets a gRPC answer instead (HTTP 200, `grpc-status` and
//! `grpc-message`, trailers-only), since gRPC clients read the status from there.

use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Response, StatusCode};

use super::Body;

pub const ERROR_HEADER: &str = "x-wasmesh-error";

/// Every value of `x-wasmesh-error` a sidecar sends ([`HttpError::cause`]).
pub const CAUSES: [&str; 11] = [
    "no-route",
    "no-service",
    "backend-not-found",
    "no-backend",
    "no-endpoints",
    "connect-failed",
    "upstream-failed",
    "timeout",
    "bad-request",
    "filter-reset",
    "forbidden",
];

/// The cause an `x-wasmesh-error` value names, if it is one of [`CAUSES`] (anything else, e.g.
/// an app sending the header itself, is not one).
pub fn known_cause(v: &HeaderValue) -> Option<&'static str> {
    CAUSES
        .iter()
        .copied()
        .find(|c| v.as_bytes() == c.as_bytes())
}

/// Why the proxy answered a request itself.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("no route matches the request")]
    NoRoute,
    #[error("the destination is not a Service port any more")]
    NoService,
    #[error("backend {0} does not exist")]
    BackendNotFound(String),
    #[error("the matching rule has no backend")]
    NoBackend,
    #[error("no usable endpoint for {0}")]
    NoEndpoints(String),
    #[error("no endpoint of {service} accepted a connection ({tried} tried): {last}")]
    ConnectFailed {
        service: String,
        tried: usize,
        last: String,
    },
    #[error("the endpoint failed the request: {0}")]
    Upstream(String),
    #[error("no response within {0:?}")]
    Timeout(Duration),
    #[error("malformed request: {0}")]
    BadRequest(String),
    #[error("a Wasm filter reset the request")]
    FilterReset,
    /// Inbound: no authorization policy of the destination allows this client on this port.
    #[error("no authorization policy allows {client} on port {port}")]
    Forbidden { client: String, port: u16 },
}

impl HttpError {
    pub fn status(&self) -> StatusCode {
        match self {
            HttpError::NoRoute => StatusCode::NOT_FOUND,
            HttpError::NoService | HttpError::NoEndpoints(_) | HttpError::ConnectFailed { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            HttpError::BackendNotFound(_) | HttpError::NoBackend => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
            HttpError::Upstream(_) | HttpError::FilterReset => StatusCode::BAD_GATEWAY,
            HttpError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            HttpError::BadRequest(_) => StatusCode::BAD_REQUEST,
            HttpError::Forbidden { .. } => StatusCode::FORBIDDEN,
        }
    }

    /// The value of `x-wasmesh-error`.
    pub fn cause(&self) -> &'static str {
        match self {
            HttpError::NoRoute => "no-route",
            HttpError::NoService => "no-service",
            HttpError::BackendNotFound(_) => "backend-not-found",
            HttpError::NoBackend => "no-backend",
            HttpError::NoEndpoints(_) => "no-endpoints",
            HttpError::ConnectFailed { .. } => "connect-failed",
            HttpError::Upstream(_) => "upstream-failed",
            HttpError::Timeout(_) => "timeout",
            HttpError::BadRequest(_) => "bad-request",
            HttpError::FilterReset => "filter-reset",
            HttpError::Forbidden { .. } => "forbidden",
        }
    }

    /// gRPC status code (grpc/doc/statuscodes.md and the HTTP mapping gRPC uses).
    fn grpc_status(&self) -> u8 {
        match self {
            HttpError::NoRoute => 12,       // UNIMPLEMENTED
            HttpError::Timeout(_) => 4,     // DEADLINE_EXCEEDED
            HttpError::BadRequest(_) => 13, // INTERNAL
            HttpError::BackendNotFound(_) | HttpError::NoBackend => 13,
            HttpError::Forbidden { .. } => 7, // PERMISSION_DENIED
            _ => 14,                          // UNAVAILABLE
        }
    }

    /// The response for this error; `grpc` when the request was gRPC.
    pub fn into_response(self, grpc: bool) -> Response<Body> {
        let cause = HeaderValue::from_static(self.cause());
        let text = self.to_string();
        let mut resp = if grpc {
            let mut r = Response::new(super::empty());
            r.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
            r.headers_mut().insert(
                "grpc-status",
                HeaderValue::from(u16::from(self.grpc_status())),
            );
            if let Ok(v) = HeaderValue::from_str(&percent_encode(&text)) {
                r.headers_mut().insert("grpc-message", v);
            }
            r
        } else {
            let mut r = Response::new(super::full(Bytes::from(format!("{text}\n"))));
            *r.status_mut() = self.status();
            r.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            r
        };
        resp.headers_mut().insert(ERROR_HEADER, cause);
        resp
    }
}

/// gRPC's `grpc-message` encoding: printable ASCII except `%` as is, the rest %XX.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_and_causes() {
        let cases = [
            (HttpError::NoRoute, 404, "no-route"),
            (HttpError::NoEndpoints("a".into()), 503, "no-endpoints"),
            (
                HttpError::ConnectFailed {
                    service: "a".into(),
                    tried: 3,
                    last: "refused".into(),
                },
                503,
                "connect-failed",
            ),
            (HttpError::Timeout(Duration::from_secs(1)), 504, "timeout"),
            (HttpError::BadRequest("x".into()), 400, "bad-request"),
            (
                HttpError::Forbidden {
                    client: "spiffe://cluster.local/ns/a/sa/b".into(),
                    port: 8080,
                },
                403,
                "forbidden",
            ),
        ];
        for (e, status, cause) in cases {
            let r = e.into_response(false);
            assert_eq!(r.status().as_u16(), status);
            assert_eq!(r.headers()[ERROR_HEADER], cause);
            assert_eq!(known_cause(&r.headers()[ERROR_HEADER]), Some(cause));
        }
        assert_eq!(known_cause(&HeaderValue::from_static("made-up")), None);
    }

    #[test]
    fn grpc_requests_get_grpc_status() {
        let r = HttpError::Timeout(Duration::from_secs(1)).into_response(true);
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()["grpc-status"], "4");
        assert_eq!(r.headers()[ERROR_HEADER], "timeout");
        assert!(
            r.headers()["grpc-message"]
                .to_str()
                .unwrap()
                .contains("no response")
        );
        let r = HttpError::Forbidden {
            client: "(plaintext, no identity)".into(),
            port: 50051,
        }
        .into_response(true);
        assert_eq!(r.headers()["grpc-status"], "7", "PERMISSION_DENIED");
        assert_eq!(r.headers()[ERROR_HEADER], "forbidden");
    }
}
