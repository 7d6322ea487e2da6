//! Properties (`proxy_get_property` / `proxy_set_property`): Envoy's attribute paths that make
//! sense in a mesh, answered from the [`StreamInfo`] the proxy gives each stream, the headers of
//! the stream, the plugin and the node.
//!
//! Encoding as in Envoy: strings raw, integers 8-byte little-endian, booleans one byte,
//! timestamps nanoseconds since the epoch (8 bytes). A missing property is `None` (the guest
//! gets `NOT_FOUND`). Values set by a filter are readable back by the same stream (or the root
//! context, for properties set there) under the same path.

use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::HeaderValue;

use crate::config::NodeInfo;
use crate::headers::Headers;

/// What the proxy knows about a stream when it creates it.
#[derive(Clone, Debug)]
pub struct StreamInfo {
    /// Downstream peer (`source.address`, `source.port`).
    pub source: Option<SocketAddr>,
    /// Where the downstream connected (`destination.address`, `destination.port`).
    pub destination: Option<SocketAddr>,
    /// Downstream connection id (`connection.id`).
    pub connection_id: u64,
    /// Whether the downstream connection is mesh mTLS (`connection.mtls`).
    pub mtls: bool,
    /// Peer identity (`connection.uri_san_peer_certificate`, `source.principal`).
    pub peer_identity: Option<String>,
    /// `HTTP/1.0`, `HTTP/1.1` or `HTTP/2` (`request.protocol`).
    pub protocol: &'static str,
    /// Scheme when the request has none in its URI (`http` unless TLS terminated here).
    pub scheme: &'static str,
    /// The route chosen (`xds.route_name`), when known.
    pub route_name: Option<String>,
    /// The upstream Service, `name.namespace` (`xds.cluster_name`), when known.
    pub upstream_service: Option<String>,
    /// Source workload, `namespace/pod` (`source.workload`), when known.
    pub source_workload: Option<String>,
    /// Destination workload, `namespace/pod` (`destination.workload`), when known.
    pub destination_workload: Option<String>,
    /// When the request started (`request.time`).
    pub start_time: SystemTime,
}

impl Default for StreamInfo {
    fn default() -> Self {
        StreamInfo {
            source: None,
            destination: None,
            connection_id: 0,
            mtls: false,
            peer_identity: None,
            protocol: "HTTP/1.1",
            scheme: "http",
            route_name: None,
            upstream_service: None,
            source_workload: None,
            destination_workload: None,
            start_time: SystemTime::now(),
        }
    }
}

/// The request facts kept after the request headers left (for `request.*` in later phases).
/// (Shared buffers, not copies: keeping them costs no allocation.)
#[derive(Clone, Debug, Default)]
pub(crate) struct RequestFacts {
    pub(crate) method: Bytes,
    pub(crate) path: Bytes,
    pub(crate) authority: Bytes,
    pub(crate) scheme: Bytes,
    pub(crate) id: Option<HeaderValue>,
    pub(crate) useragent: Option<HeaderValue>,
    pub(crate) referer: Option<HeaderValue>,
}

impl RequestFacts {
    pub(crate) fn from_headers(h: &Headers) -> Self {
        let p = |n: &str| h.pseudo_value(n).cloned().unwrap_or_default();
        RequestFacts {
            method: p(":method"),
            path: p(":path"),
            authority: p(":authority"),
            scheme: p(":scheme"),
            id: h.map.get("x-request-id").cloned(),
            useragent: h.map.get(http::header::USER_AGENT).cloned(),
            referer: h.map.get(http::header::REFERER).cloned(),
        }
    }
}

/// What a property lookup can see.
pub(crate) struct Scope<'a> {
    pub(crate) plugin_name: &'a str,
    pub(crate) root_id: &'a str,
    pub(crate) vm_id: &'a str,
    pub(crate) node: &'a NodeInfo,
    pub(crate) info: Option<&'a StreamInfo>,
    pub(crate) request_headers: Option<&'a Headers>,
    pub(crate) request: Option<&'a RequestFacts>,
    pub(crate) response_headers: Option<&'a Headers>,
    pub(crate) response_code: Option<u16>,
    pub(crate) upstream: Option<SocketAddr>,
}

fn int(v: i64) -> Vec<u8> {
    v.to_le_bytes().to_vec()
}

fn addr(a: &SocketAddr) -> Vec<u8> {
    a.to_string().into_bytes()
}

/// Splits a serialized path (`seg\0seg\0…`; Envoy also accepts dots in the first form).
pub(crate) fn split_path(path: &[u8]) -> Vec<&[u8]> {
    let path = path.strip_suffix(b"\0").unwrap_or(path);
    if path.contains(&0) {
        path.split(|b| *b == 0).collect()
    } else {
        // "request.headers.x-foo": the first two dots separate segments; header names may not
        // contain dots, but keep the tail together for `request.headers.<name>`.
        let mut parts: Vec<&[u8]> = path.splitn(3, |b| *b == b'.').collect();
        if parts.len() == 3 && parts[1] != b"headers" {
            let rest = parts.pop().unwrap_or_default();
            parts.extend(rest.split(|b| *b == b'.'));
        }
        parts
    }
}

/// Looks a property up.
pub(crate) fn resolve(scope: &Scope<'_>, path: &[&[u8]]) -> Option<Vec<u8>> {
    let s = |v: &str| Some(v.as_bytes().to_vec());
    match path {
        [b"plugin_name"] => s(scope.plugin_name),
        [b"plugin_root_id"] => s(scope.root_id),
        [b"plugin_vm_id"] => s(scope.vm_id),
        [b"node", b"id"] | [b"xds", b"node", b"id"] => s(&scope.node.id),
        [b"node", b"metadata", b"NAME"] | [b"node", b"metadata", b"POD_NAME"] => s(&scope.node.pod),
        [b"node", b"metadata", b"NAMESPACE"] => s(&scope.node.namespace),
        [b"node", b"metadata", b"CLUSTER_ID"] => s(&scope.node.cluster),
        [b"xds", b"route_name"] => scope.info?.route_name.as_deref().and_then(s),
        [b"xds", b"cluster_name"] => scope.info?.upstream_service.as_deref().and_then(s),
        [b"source", b"address"] => scope.info?.source.as_ref().map(addr),
        [b"source", b"port"] => scope.info?.source.map(|a| int(a.port().into())),
        [b"source", b"workload"] => scope.info?.source_workload.as_deref().and_then(s),
        [b"source", b"principal"] | [b"connection", b"uri_san_peer_certificate"] => {
            scope.info?.peer_identity.as_deref().and_then(s)
        }
        [b"destination", b"address"] => scope.info?.destination.as_ref().map(addr),
        [b"destination", b"port"] => scope.info?.destination.map(|a| int(a.port().into())),
        [b"destination", b"workload"] => scope.info?.destination_workload.as_deref().and_then(s),
        [b"connection", b"id"] => scope.info.map(|i| int(i.connection_id as i64)),
        [b"connection", b"mtls"] => scope.info.map(|i| vec![u8::from(i.mtls)]),
        [b"upstream", b"address"] => scope.upstream.as_ref().map(addr),
        [b"upstream", b"port"] => scope.upstream.map(|a| int(a.port().into())),
        [b"request", b"protocol"] => scope.info.and_then(|i| s(i.protocol)),
        [b"request", b"time"] => scope.info.map(|i| {
            let ns = i
                .start_time
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as i64);
            int(ns)
        }),
        [b"request", b"headers", name] => match scope.request_headers {
            Some(h) => h.get_joined(name),
            None => None,
        },
        [b"request", field] => request_field(scope, field),
        [b"response", b"code"] => scope.response_code.map(|c| int(c.into())),
        [b"response", b"code_details"] => scope.response_code.and_then(|_| s("via_upstream")),
        [b"response", b"headers", name] => scope.response_headers?.get_joined(name),
        _ => None,
    }
}

fn request_field(scope: &Scope<'_>, field: &[u8]) -> Option<Vec<u8>> {
    // Live headers first (the filter may just have changed them), then the facts kept.
    let facts;
    let r = match (scope.request_headers, scope.request) {
        (Some(h), _) => {
            facts = RequestFacts::from_headers(h);
            &facts
        }
        (None, Some(r)) => r,
        (None, None) => return None,
    };
    let path = &r.path[..];
    let (url_path, query) = match path.iter().position(|b| *b == b'?') {
        Some(i) => (&path[..i], Some(&path[i + 1..])),
        None => (path, None),
    };
    match field {
        b"path" => Some(path.to_vec()),
        b"url_path" => Some(url_path.to_vec()),
        b"query" => query.map(<[u8]>::to_vec),
        b"host" => Some(r.authority.to_vec()),
        b"scheme" => Some(r.scheme.to_vec()),
        b"method" => Some(r.method.to_vec()),
        b"id" => r.id.as_ref().map(|v| v.as_bytes().to_vec()),
        b"useragent" => r.useragent.as_ref().map(|v| v.as_bytes().to_vec()),
        b"referer" => r.referer.as_ref().map(|v| v.as_bytes().to_vec()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scope<'a>(info: &'a StreamInfo, node: &'a NodeInfo, req: Option<&'a Headers>) -> Scope<'a> {
        Scope {
            plugin_name: "p",
            root_id: "r",
            vm_id: "v",
            node,
            info: Some(info),
            request_headers: req,
            request: None,
            response_headers: None,
            response_code: Some(404),
            upstream: None,
        }
    }

    #[test]
    fn envoy_attribute_values_and_encodings() {
        let info = StreamInfo {
            source: Some("127.0.0.1:59442".parse().unwrap()),
            ..Default::default()
        };
        let node = NodeInfo::default();
        let (mut parts, ()) = http::Request::builder()
            .uri("/props/a?q=1&r=2")
            .header("host", "example.test")
            .body(())
            .unwrap()
            .into_parts();
        let h = Headers::from_request(&mut parts, "http");
        let sc = scope(&info, &node, Some(&h));
        let get = |p: &[&[u8]]| resolve(&sc, p);
        assert_eq!(get(&[b"request", b"path"]).unwrap(), b"/props/a?q=1&r=2");
        assert_eq!(get(&[b"request", b"url_path"]).unwrap(), b"/props/a");
        assert_eq!(get(&[b"request", b"query"]).unwrap(), b"q=1&r=2");
        assert_eq!(get(&[b"request", b"host"]).unwrap(), b"example.test");
        assert_eq!(get(&[b"source", b"address"]).unwrap(), b"127.0.0.1:59442");
        assert_eq!(get(&[b"source", b"port"]).unwrap(), 59442i64.to_le_bytes());
        assert_eq!(get(&[b"response", b"code"]).unwrap(), 404i64.to_le_bytes());
        assert_eq!(get(&[b"plugin_root_id"]).unwrap(), b"r");
        assert_eq!(get(&[b"no", b"such"]), None);
        assert_eq!(get(&[b"request", b"referer"]), None);
    }

    #[test]
    fn paths_split_on_nul_or_dots() {
        assert_eq!(split_path(b"request\0path"), vec![&b"request"[..], b"path"]);
        assert_eq!(
            split_path(b"request.headers.x-a"),
            vec![&b"request"[..], b"headers", b"x-a"]
        );
        assert_eq!(
            split_path(b"xds.node.id"),
            vec![&b"xds"[..], b"node", b"id"]
        );
    }
}
