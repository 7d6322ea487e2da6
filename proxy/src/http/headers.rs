//! Header work every hop does: hop-by-hop headers removed (RFC 9110 §7.6.1), the target
//! rewritten for the HTTP version spoken to the endpoint, gRPC recognised.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Uri, Version};

/// Headers that describe one connection, never forwarded (HTTP/2 forbids them outright).
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Removes hop-by-hop headers and those the `Connection` header names. `te: trailers` is kept
/// (gRPC needs it). An upgrade keeps `Connection: upgrade` and `Upgrade`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // Most messages carry none of them: one pass over the names they do carry (compared, not
    // hashed) says so, where looking each up to remove it cost eleven hashed lookups per message
    // — four messages per proxied request (the request and its response in each sidecar).
    if !headers.keys().any(|n| HOP_BY_HOP.contains(n)) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        if !(keep_upgrade && n == header::UPGRADE) {
            headers.remove(n);
        }
    }
    let trailers = headers
        .get(header::TE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
        });
    let upgrade = headers.get(header::UPGRADE).cloned();
    for h in HOP_BY_HOP.iter() {
        headers.remove(h);
    }
    if trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    if keep_upgrade && let Some(u) = upgrade {
        headers.insert(header::UPGRADE, u);
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// Whether the request asks to switch protocols (HTTP/1.1 Upgrade, e.g. WebSocket) or is a
/// CONNECT tunnel.
pub fn is_upgrade<B>(req: &Request<B>) -> bool {
    if req.method() == http::Method::CONNECT {
        return true;
    }
    req.version() <= Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
}

pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// The request's authority: the URI's (HTTP/2, absolute-form) or the Host header.
pub fn authority(uri: &Uri, headers: &HeaderMap) -> Option<String> {
    uri.authority().map(|a| a.as_str().to_string()).or_else(|| {
        headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_string)
    })
}

/// Shapes the request target for the version spoken to the endpoint: HTTP/2 wants the
/// authority in the URI (`:authority`) and no Host header; HTTP/1.1 wants origin-form and a
/// Host header.
pub fn set_target(
    parts: &mut http::request::Parts,
    authority: Option<&str>,
    path_and_query: &str,
    version: Version,
) -> Result<(), http::Error> {
    if version == Version::HTTP_2 {
        let mut b = Uri::builder().scheme("http").path_and_query(path_and_query);
        if let Some(a) = authority {
            b = b.authority(a);
        }
        parts.uri = b.build()?;
        parts.headers.remove(header::HOST);
    } else {
        parts.uri = Uri::builder().path_and_query(path_and_query).build()?;
        if let Some(a) = authority {
            parts
                .headers
                .insert(header::HOST, HeaderValue::from_str(a)?);
        }
    }
    parts.version = version;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_go() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-private"),
        );
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert(header::TE, HeaderValue::from_static("trailers, deflate"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert("x-keep", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false);
        let mut names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        names.sort();
        assert_eq!(names, vec!["te", "x-keep"]);
        assert_eq!(h[header::TE], "trailers");
    }

    #[test]
    fn each_hop_by_hop_header_alone_goes_and_a_message_without_any_is_left_as_it_was() {
        for name in HOP_BY_HOP.iter() {
            let mut h = HeaderMap::new();
            h.insert(header::USER_AGENT, HeaderValue::from_static("curl/8"));
            h.insert(name.clone(), HeaderValue::from_static("gzip"));
            h.append("x-keep", HeaderValue::from_static("1"));
            h.append("x-keep", HeaderValue::from_static("2"));
            strip_hop_by_hop(&mut h, false);
            assert!(!h.contains_key(name), "{name} removed");
            assert_eq!(h.len(), 3, "the others kept ({name})");
        }
        let mut h = HeaderMap::new();
        h.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
        h.insert("traceparent", HeaderValue::from_static("00-ab-cd-01"));
        h.append("x-keep", HeaderValue::from_static("1"));
        h.append("x-keep", HeaderValue::from_static("2"));
        let before = h.clone();
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h, before);
    }

    #[test]
    fn upgrades_keep_their_headers() {
        let req = Request::builder()
            .header(header::CONNECTION, "Upgrade")
            .header(header::UPGRADE, "websocket")
            .body(())
            .unwrap();
        assert!(is_upgrade(&req));
        let (mut parts, ()) = req.into_parts();
        strip_hop_by_hop(&mut parts.headers, true);
        assert_eq!(parts.headers[header::UPGRADE], "websocket");
        assert_eq!(parts.headers[header::CONNECTION], "upgrade");
    }

    #[test]
    fn targets_per_version() {
        let (mut p, ()) = Request::builder()
            .uri("/a?b")
            .header(header::HOST, "web")
            .body(())
            .unwrap()
            .into_parts();
        set_target(&mut p, Some("web:80"), "/a?b", Version::HTTP_2).unwrap();
        assert_eq!(p.uri.to_string(), "http://web:80/a?b");
        assert!(p.headers.get(header::HOST).is_none());
        set_target(&mut p, Some("web:80"), "/c", Version::HTTP_11).unwrap();
        assert_eq!(p.uri.to_string(), "/c");
        assert_eq!(p.headers[header::HOST], "web:80");
    }
}
