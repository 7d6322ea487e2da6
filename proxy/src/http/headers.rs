//! Header work every hop does: hop-by-hop headers removed (RFC 9110 §7.6.1), the target
//! rewritten for the HTTP version spoken to the endpoint, gRPC recognised.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Uri, Version};

/// Headers that describe one connection, never forwarded (HTTP/2 forbids them outright).
static HOP_BY_HOP: [HeaderName; 8] = [
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
/// Host header. `authority` and `path_and_query` replace the request's own (a route's
/// rewrite); else the request's are kept — moved, not copied and parsed again, which every
/// request did before (docs/benchmarks.md, "Session 21"). The authority is the URI's
/// (HTTP/2, absolute-form), else the Host header's, else `default_authority()` (HTTP/1.0 may
/// come without a Host). A CONNECT keeps its authority-form target (RFC 9112 §3.2.3).
pub fn set_target(
    parts: &mut http::request::Parts,
    version: Version,
    authority: Option<&str>,
    path_and_query: Option<&str>,
    default_authority: impl FnOnce() -> String,
) -> Result<(), http::Error> {
    parts.version = version;
    if parts.method == http::Method::CONNECT && authority.is_none() && path_and_query.is_none() {
        if !parts.headers.contains_key(header::HOST) {
            let host = match parts.uri.authority() {
                Some(a) => HeaderValue::from_str(a.as_str())?,
                None => HeaderValue::from_str(&default_authority())?,
            };
            parts.headers.insert(header::HOST, host);
        }
        return Ok(());
    }
    let mut uri = std::mem::take(&mut parts.uri).into_parts();
    if let Some(pq) = path_and_query {
        uri.path_and_query = Some(PathAndQuery::try_from(pq)?);
    } else if uri
        .path_and_query
        .as_ref()
        .is_none_or(|pq| pq.as_str().is_empty())
    {
        uri.path_and_query = Some(PathAndQuery::from_static("/"));
    }
    // The authority a rewrite or the URI gives; None: the Host header says it, if any.
    let own = uri.authority.take();
    let given = match authority {
        Some(a) => Some(Authority::try_from(a)?),
        None => own,
    };
    if version == Version::HTTP_2 {
        let host = parts.headers.remove(header::HOST);
        let authority = match given {
            Some(a) => a,
            None => match host.as_ref().and_then(|h| h.to_str().ok()) {
                Some(h) => Authority::try_from(h)?,
                None => Authority::try_from(default_authority().as_str())?,
            },
        };
        uri.scheme = Some(Scheme::HTTP);
        uri.authority = Some(authority);
    } else {
        uri.scheme = None;
        match given {
            Some(a) => {
                parts
                    .headers
                    .insert(header::HOST, HeaderValue::from_str(a.as_str())?);
            }
            None if parts.headers.contains_key(header::HOST) => {}
            None => {
                let host = HeaderValue::from_str(&default_authority())?;
                parts.headers.insert(header::HOST, host);
            }
        }
    }
    parts.uri = Uri::from_parts(uri)?;
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
        let none = || unreachable!("the request names its authority");
        set_target(&mut p, Version::HTTP_2, Some("web:80"), Some("/a?b"), none).unwrap();
        assert_eq!(p.uri.to_string(), "http://web:80/a?b");
        assert!(p.headers.get(header::HOST).is_none());
        set_target(&mut p, Version::HTTP_11, Some("web:80"), Some("/c"), none).unwrap();
        assert_eq!(p.uri.to_string(), "/c");
        assert_eq!(p.headers[header::HOST], "web:80");
    }

    fn parts(uri: &str, host: Option<&str>) -> http::request::Parts {
        let mut b = Request::builder().uri(uri);
        if let Some(h) = host {
            b = b.header(header::HOST, h);
        }
        b.body(()).unwrap().into_parts().0
    }

    #[test]
    fn a_target_left_alone_keeps_the_requests_path_query_and_authority() {
        let fallback = || "svc.ns:80".to_string();
        // HTTP/1.1 to HTTP/2: the Host header becomes `:authority`.
        let mut p = parts("/a/b?x=1&y", Some("web:8080"));
        set_target(&mut p, Version::HTTP_2, None, None, fallback).unwrap();
        assert_eq!(p.uri.to_string(), "http://web:8080/a/b?x=1&y");
        assert!(p.headers.get(header::HOST).is_none());
        assert_eq!(p.version, Version::HTTP_2);
        // And back: `:authority` becomes the Host header, the target origin-form.
        set_target(&mut p, Version::HTTP_11, None, None, fallback).unwrap();
        assert_eq!(p.uri.to_string(), "/a/b?x=1&y");
        assert_eq!(p.headers[header::HOST], "web:8080");
        // HTTP/1.1 to HTTP/1.1: the Host header stays as it came.
        let mut p = parts("/", Some("Web.Example"));
        set_target(&mut p, Version::HTTP_11, None, None, fallback).unwrap();
        assert_eq!(p.uri.to_string(), "/");
        assert_eq!(p.headers[header::HOST], "Web.Example");
        // Absolute-form: its authority wins over the Host header (RFC 9112 §3.2.2).
        let mut p = parts("http://real:81/z", Some("stale"));
        set_target(&mut p, Version::HTTP_11, None, None, fallback).unwrap();
        assert_eq!(p.uri.to_string(), "/z");
        assert_eq!(p.headers[header::HOST], "real:81");
        // No authority anywhere (HTTP/1.0): the caller's default, over either version.
        let mut p = parts("/q", None);
        set_target(&mut p, Version::HTTP_11, None, None, fallback).unwrap();
        assert_eq!(p.headers[header::HOST], "svc.ns:80");
        let mut p = parts("/q", None);
        set_target(&mut p, Version::HTTP_2, None, None, fallback).unwrap();
        assert_eq!(p.uri.to_string(), "http://svc.ns:80/q");
        // A rewritten path keeps the authority; a rewritten authority keeps the path.
        let mut p = parts("/old?k=v", Some("web"));
        set_target(&mut p, Version::HTTP_11, None, Some("/new?k=v"), fallback).unwrap();
        assert_eq!(p.uri.to_string(), "/new?k=v");
        assert_eq!(p.headers[header::HOST], "web");
        set_target(&mut p, Version::HTTP_2, Some("other:90"), None, fallback).unwrap();
        assert_eq!(p.uri.to_string(), "http://other:90/new?k=v");
    }

    #[test]
    fn a_connect_keeps_its_authority_form_and_a_bad_target_is_an_error() {
        let mut p = Request::builder()
            .method(http::Method::CONNECT)
            .uri("db.example:5432")
            .body(())
            .unwrap()
            .into_parts()
            .0;
        set_target(&mut p, Version::HTTP_11, None, None, || "unused".into()).unwrap();
        assert_eq!(p.uri.to_string(), "db.example:5432");
        assert_eq!(p.headers[header::HOST], "db.example:5432");
        let mut p = parts("/", Some("a b"));
        let bad_host = set_target(&mut p, Version::HTTP_2, None, None, || "x".into());
        assert!(bad_host.is_err());
        let mut p = parts("/", Some("web"));
        let bad_path = set_target(&mut p, Version::HTTP_11, None, Some("a b"), || "x".into());
        assert!(bad_path.is_err());
    }
}
