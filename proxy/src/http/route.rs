//! HTTPRoute matching (Gateway API, GAMMA): the routes control attached to a Service port,
//! compiled once per table change into a ranked list of matches, and [`Routes::pick`] which
//! finds the rule for one request.
//!
//! Precedence, as the Gateway API spec orders matches across every route attached to the
//! same parent:
//! 1. an `Exact` path before a `RegularExpression` path before a `PathPrefix` path (the spec
//!    leaves regular expressions to the implementation: we rank them after Exact, and by the
//!    length of the expression);
//! 2. the longer path value;
//! 3. a match with a method before one without;
//! 4. more header matches;
//! 5. more query parameter matches;
//! 6. the older route (`creationTimestamp`), then the route's `namespace/name` alphabetically;
//! 7. the earlier rule, then the earlier match within a route.
//!
//! Consumer routes (in another namespace than the Service's) apply only to clients in their own
//! namespace, and when any exists for this client the producer routes are ignored (GAMMA).

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Method};
use regex::Regex;
use wasmesh_api::discovery as pb;

/// How a string is compared.
#[derive(Debug, Clone)]
pub enum Matcher {
    Exact(String),
    Prefix(String),
    Regex(Regex),
}

impl Matcher {
    fn matches(&self, s: &str) -> bool {
        match self {
            Matcher::Exact(v) => s == v,
            Matcher::Prefix(p) => path_prefix_matches(p, s),
            Matcher::Regex(r) => r.is_match(s),
        }
    }

    fn rank(&self) -> (u8, usize) {
        match self {
            Matcher::Exact(v) => (3, v.len()),
            Matcher::Regex(r) => (2, r.as_str().len()),
            Matcher::Prefix(p) => (1, p.len()),
        }
    }
}

/// `PathPrefix` matches whole path elements: `/foo` matches `/foo`, `/foo/` and `/foo/bar`,
/// not `/foobar`. A trailing `/` in the prefix is ignored.
pub fn path_prefix_matches(prefix: &str, path: &str) -> bool {
    let prefix = prefix.trim_end_matches('/');
    if prefix.is_empty() {
        return true;
    }
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// Compiled `HTTPRouteMatch`.
#[derive(Debug, Clone)]
pub struct RequestMatch {
    pub path: Matcher,
    pub headers: Vec<(HeaderName, Matcher)>,
    pub query: Vec<(String, Matcher)>,
    pub method: Option<Method>,
}

impl RequestMatch {
    pub fn matches(&self, req: &RequestView<'_>) -> bool {
        if let Some(m) = &self.method
            && m != req.method
        {
            return false;
        }
        if !self.path.matches(req.path) {
            return false;
        }
        for (name, m) in &self.headers {
            // Several values of one header are matched as the comma-joined list (RFC 9110).
            let values: Vec<&str> = req
                .headers
                .get_all(name)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .collect();
            if values.is_empty() || !m.matches(&values.join(",")) {
                return false;
            }
        }
        for (name, m) in &self.query {
            // The first value of a repeated parameter is the one matched (the spec allows it).
            match query_param(req.query, name) {
                Some(v) if m.matches(&v) => {}
                _ => return false,
            }
        }
        true
    }
}

fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then(|| percent_decode(v))
    })
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What matching looks at in a request.
#[derive(Debug, Clone, Copy)]
pub struct RequestView<'a> {
    pub method: &'a Method,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
}

/// Compiled header modifier.
#[derive(Debug, Clone, Default)]
pub struct HeaderModifier {
    pub set: Vec<(HeaderName, HeaderValue)>,
    pub add: Vec<(HeaderName, HeaderValue)>,
    pub remove: Vec<HeaderName>,
}

impl HeaderModifier {
    /// Gateway API order: set, then add, then remove.
    pub fn apply(&self, headers: &mut HeaderMap) {
        for (n, v) in &self.set {
            headers.insert(n.clone(), v.clone());
        }
        for (n, v) in &self.add {
            headers.append(n.clone(), v.clone());
        }
        for n in &self.remove {
            headers.remove(n);
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathModifier {
    Full(String),
    Prefix(String),
}

#[derive(Debug, Clone)]
pub struct Redirect {
    pub scheme: Option<String>,
    pub hostname: Option<String>,
    pub path: Option<PathModifier>,
    pub port: Option<u16>,
    pub status: u16,
}

#[derive(Debug, Clone)]
pub struct Rewrite {
    pub hostname: Option<String>,
    pub path: Option<PathModifier>,
}

/// Where a rule sends requests.
#[derive(Debug, Clone)]
pub struct Backend {
    pub namespace: String,
    pub service: String,
    /// Service port number; 0 = the port the request was sent to.
    pub port: u16,
    pub weight: u32,
    pub request_headers: Option<HeaderModifier>,
    pub response_headers: Option<HeaderModifier>,
}

#[derive(Debug, Clone)]
pub struct Retry {
    pub codes: Vec<u16>,
    pub attempts: u32,
    pub backoff: Duration,
}

/// Compiled `HTTPRouteRule`.
#[derive(Debug)]
pub struct Rule {
    /// `namespace/route/rule` (rule = its name or its index), for headers, logs and metrics
    /// (the `route` label, shared rather than copied per request).
    pub name: Arc<str>,
    pub request_headers: Option<HeaderModifier>,
    pub response_headers: Option<HeaderModifier>,
    pub redirect: Option<Redirect>,
    pub rewrite: Option<Rewrite>,
    pub backends: Vec<Backend>,
    /// None = not set (the proxy's default applies); zero = no limit.
    pub request_timeout: Option<Duration>,
    pub backend_timeout: Option<Duration>,
    pub retry: Option<Retry>,
    /// Where outbound responses routed by this rule are counted (made on first use; a rule
    /// belongs to one Service port).
    pub outcomes: OnceLock<Arc<crate::metrics::Outcomes>>,
}

impl Rule {
    /// The [`Outcomes`](crate::metrics::Outcomes) of this rule on the Service `service`.
    pub fn outcomes(&self, service: &Arc<str>) -> Arc<crate::metrics::Outcomes> {
        self.outcomes
            .get_or_init(|| {
                Arc::new(crate::metrics::Outcomes::new(
                    crate::metrics::Direction::Outbound,
                    Some(service.clone()),
                    Some(self.name.clone()),
                    None,
                ))
            })
            .clone()
    }

    /// A weighted choice among the backends; None if every weight is 0 or there are none.
    pub fn pick_backend(&self, roll: &mut impl FnMut(u64) -> u64) -> Option<&Backend> {
        let total: u64 = self.backends.iter().map(|b| u64::from(b.weight)).sum();
        if total == 0 {
            return None;
        }
        let mut r = roll(total);
        for b in &self.backends {
            let w = u64::from(b.weight);
            if r < w {
                return Some(b);
            }
            r -= w;
        }
        None
    }
}

/// One ranked match with its rule.
#[derive(Debug)]
struct Entry {
    m: RequestMatch,
    rule: Arc<Rule>,
    /// Routes in another namespace than the Service's apply only to that namespace's clients.
    consumer: bool,
}

/// The compiled routes of one Service port, for one client namespace.
#[derive(Debug, Default)]
pub struct Routes {
    entries: Vec<Entry>,
}

/// What [`Routes::pick`] found.
#[derive(Debug)]
pub enum Pick<'a> {
    /// No route attached: the Service itself, as at L4.
    Default,
    Rule(&'a Arc<Rule>),
    /// Routes are attached and none matches: 404.
    NoMatch,
}

/// Why a route from control could not be used.
#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    #[error("route {route}: invalid regular expression {pattern:?}: {source}")]
    Regex {
        route: String,
        pattern: String,
        source: regex::Error,
    },
    #[error("route {route}: invalid header {what}")]
    Header { route: String, what: String },
    #[error("route {route}: invalid method {method:?}")]
    Method { route: String, method: String },
}

impl Routes {
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Compiles the routes of a Service port in `service_ns` for a client in `client_ns`. A route
    /// that does not compile is left out (and reported); the others still work.
    pub fn compile(
        routes: &[pb::HttpRoute],
        service_ns: &str,
        client_ns: Option<&str>,
    ) -> (Routes, Vec<CompileError>) {
        let mut errors = Vec::new();
        let mut ranked: Vec<(RankKey, Entry)> = Vec::new();
        let has_consumer = routes
            .iter()
            .any(|r| r.namespace != service_ns && Some(r.namespace.as_str()) == client_ns);
        for route in routes {
            let consumer = route.namespace != service_ns;
            if consumer && Some(route.namespace.as_str()) != client_ns {
                continue;
            }
            if has_consumer && !consumer {
                continue;
            }
            match compile_route(route) {
                Ok(entries) => {
                    for (rule_idx, match_idx, m, rule) in entries {
                        let key = RankKey {
                            path: m.path.rank(),
                            method: m.method.is_some(),
                            headers: m.headers.len(),
                            query: m.query.len(),
                            created: route.created_unix,
                            name: format!("{}/{}", route.namespace, route.name),
                            rule: rule_idx,
                            m: match_idx,
                        };
                        ranked.push((key, Entry { m, rule, consumer }));
                    }
                }
                Err(e) => errors.push(e),
            }
        }
        ranked.sort_by(|(a, _), (b, _)| a.cmp(b));
        (
            Routes {
                entries: ranked.into_iter().map(|(_, e)| e).collect(),
            },
            errors,
        )
    }

    /// The rule for a request.
    pub fn pick(&self, req: &RequestView<'_>) -> Pick<'_> {
        if self.entries.is_empty() {
            return Pick::Default;
        }
        self.entries
            .iter()
            .find(|e| e.m.matches(req))
            .map_or(Pick::NoMatch, |e| Pick::Rule(&e.rule))
    }

    /// Whether any consumer route is in force (for `/config`).
    pub fn consumer(&self) -> bool {
        self.entries.iter().any(|e| e.consumer)
    }
}

/// Sort key: ascending order = highest precedence first.
#[derive(Debug, PartialEq, Eq)]
struct RankKey {
    path: (u8, usize),
    method: bool,
    headers: usize,
    query: usize,
    created: i64,
    name: String,
    rule: usize,
    m: usize,
}

impl Ord for RankKey {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.cmp_key().cmp(&other.cmp_key())
    }
}

impl PartialOrd for RankKey {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

// Higher path rank, method, headers and query sort first; older and alphabetically first routes
// first; earlier rules and matches first.
impl RankKey {
    fn cmp_key(&self) -> impl Ord + '_ {
        (
            std::cmp::Reverse(self.path),
            std::cmp::Reverse(self.method),
            std::cmp::Reverse(self.headers),
            std::cmp::Reverse(self.query),
            self.created,
            &self.name,
            self.rule,
            self.m,
        )
    }
}

type Compiled = (usize, usize, RequestMatch, Arc<Rule>);

fn compile_route(route: &pb::HttpRoute) -> Result<Vec<Compiled>, CompileError> {
    let id = format!("{}/{}", route.namespace, route.name);
    let mut out = Vec::new();
    for (ri, rule) in route.rules.iter().enumerate() {
        let rule_name = if rule.name.is_empty() {
            format!("{id}/{ri}")
        } else {
            format!("{id}/{}", rule.name)
        };
        let compiled = Arc::new(compile_rule(&id, rule_name, rule)?);
        let matches: Vec<pb::HttpRouteMatch> = if rule.matches.is_empty() {
            vec![pb::HttpRouteMatch::default()]
        } else {
            rule.matches.clone()
        };
        for (mi, m) in matches.iter().enumerate() {
            out.push((ri, mi, compile_match(&id, m)?, compiled.clone()));
        }
    }
    Ok(out)
}

fn compile_match(id: &str, m: &pb::HttpRouteMatch) -> Result<RequestMatch, CompileError> {
    let path = match &m.path {
        None => Matcher::Prefix("/".into()),
        Some(p) => string_matcher(id, p.r#type(), &p.value, true)?,
    };
    let mut headers = Vec::new();
    for h in &m.headers {
        let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| CompileError::Header {
            route: id.into(),
            what: format!("name {:?}", h.name),
        })?;
        headers.push((name, string_matcher(id, h.r#type(), &h.value, false)?));
    }
    let mut query = Vec::new();
    for q in &m.query_params {
        query.push((
            q.name.clone(),
            string_matcher(id, q.r#type(), &q.value, false)?,
        ));
    }
    let method = if m.method.is_empty() {
        None
    } else {
        Some(
            Method::from_bytes(m.method.as_bytes()).map_err(|_| CompileError::Method {
                route: id.into(),
                method: m.method.clone(),
            })?,
        )
    };
    Ok(RequestMatch {
        path,
        headers,
        query,
        method,
    })
}

fn string_matcher(
    id: &str,
    t: pb::MatchType,
    value: &str,
    is_path: bool,
) -> Result<Matcher, CompileError> {
    Ok(match t {
        pb::MatchType::Exact => Matcher::Exact(value.into()),
        pb::MatchType::PathPrefix => Matcher::Prefix(value.into()),
        pb::MatchType::Default if is_path => Matcher::Prefix(value.into()),
        pb::MatchType::Default => Matcher::Exact(value.into()),
        pb::MatchType::RegularExpression => {
            // The whole value must match, as Envoy's (RE2) full-match semantics.
            let anchored = format!("^(?:{value})$");
            Matcher::Regex(Regex::new(&anchored).map_err(|e| CompileError::Regex {
                route: id.into(),
                pattern: value.into(),
                source: e,
            })?)
        }
    })
}

fn compile_rule(id: &str, name: String, rule: &pb::HttpRouteRule) -> Result<Rule, CompileError> {
    let mut out = Rule {
        name: crate::metrics::label(&name),
        outcomes: OnceLock::new(),
        request_headers: None,
        response_headers: None,
        redirect: None,
        rewrite: None,
        backends: Vec::new(),
        // 0 ("0s") = explicitly none: kept as zero so the proxy's default does not apply.
        request_timeout: rule.request_timeout_ms.map(Duration::from_millis),
        backend_timeout: rule.backend_request_timeout_ms.and_then(nonzero_ms),
        retry: rule.retry.as_ref().map(|r| Retry {
            codes: if r.codes.is_empty() {
                vec![500, 502, 503, 504]
            } else {
                r.codes
                    .iter()
                    .filter_map(|c| u16::try_from(*c).ok())
                    .collect()
            },
            attempts: r.attempts,
            backoff: Duration::from_millis(if r.backoff_ms == 0 { 25 } else { r.backoff_ms }),
        }),
    };
    for f in &rule.filters {
        match &f.kind {
            Some(pb::http_filter::Kind::RequestHeaderModifier(m)) => {
                out.request_headers = Some(request_header_modifier(id, m)?)
            }
            Some(pb::http_filter::Kind::ResponseHeaderModifier(m)) => {
                out.response_headers = Some(header_modifier(id, m)?)
            }
            Some(pb::http_filter::Kind::RequestRedirect(r)) => {
                out.redirect = Some(Redirect {
                    scheme: opt(&r.scheme),
                    hostname: opt(&r.hostname),
                    path: r.path.as_ref().map(path_modifier),
                    port: u16::try_from(r.port).ok().filter(|p| *p != 0),
                    status: if r.status_code == 301 { 301 } else { 302 },
                })
            }
            Some(pb::http_filter::Kind::UrlRewrite(r)) => {
                out.rewrite = Some(Rewrite {
                    hostname: opt(&r.hostname),
                    path: r.path.as_ref().map(path_modifier),
                })
            }
            None => {}
        }
    }
    for b in &rule.backends {
        let mut backend = Backend {
            namespace: b.namespace.clone(),
            service: b.service.clone(),
            port: u16::try_from(b.port).unwrap_or(0),
            weight: b.weight,
            request_headers: None,
            response_headers: None,
        };
        for f in &b.filters {
            match &f.kind {
                Some(pb::http_filter::Kind::RequestHeaderModifier(m)) => {
                    backend.request_headers = Some(request_header_modifier(id, m)?)
                }
                Some(pb::http_filter::Kind::ResponseHeaderModifier(m)) => {
                    backend.response_headers = Some(header_modifier(id, m)?)
                }
                _ => {}
            }
        }
        out.backends.push(backend);
    }
    Ok(out)
}

fn nonzero_ms(ms: u64) -> Option<Duration> {
    (ms != 0).then(|| Duration::from_millis(ms))
}

fn opt(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_string())
}

fn path_modifier(p: &pb::PathModifier) -> PathModifier {
    match p.r#type() {
        pb::path_modifier::Type::ReplaceFullPath => PathModifier::Full(p.value.clone()),
        pb::path_modifier::Type::ReplacePrefixMatch => PathModifier::Prefix(p.value.clone()),
    }
}

/// A request's header modifier, without `host`: a route changes the authority with its
/// `URLRewrite` hostname, and the proxy forms the target from the request's own otherwise
/// (Envoy, too, refuses `host` in its header mutations). Left out here, once per route, the
/// request path has nothing to undo.
fn request_header_modifier(
    id: &str,
    m: &pb::HeaderModifier,
) -> Result<HeaderModifier, CompileError> {
    let mut out = header_modifier(id, m)?;
    out.set.retain(|(n, _)| n != http::header::HOST);
    out.add.retain(|(n, _)| n != http::header::HOST);
    out.remove.retain(|n| n != http::header::HOST);
    Ok(out)
}

fn header_modifier(id: &str, m: &pb::HeaderModifier) -> Result<HeaderModifier, CompileError> {
    let bad = |what: String| CompileError::Header {
        route: id.into(),
        what,
    };
    let pair = |h: &pb::HttpHeader| -> Result<(HeaderName, HeaderValue), CompileError> {
        let n = HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|_| bad(format!("name {:?}", h.name)))?;
        let v = HeaderValue::from_str(&h.value)
            .map_err(|_| bad(format!("value {:?} of {}", h.value, h.name)))?;
        Ok((n, v))
    };
    Ok(HeaderModifier {
        set: m.set.iter().map(pair).collect::<Result<_, _>>()?,
        add: m.add.iter().map(pair).collect::<Result<_, _>>()?,
        remove: m
            .remove
            .iter()
            .map(|n| HeaderName::from_bytes(n.as_bytes()).map_err(|_| bad(format!("name {n:?}"))))
            .collect::<Result<_, _>>()?,
    })
}

/// The path after a rewrite or redirect. `matched` is the PathPrefix the rule matched, for
/// `ReplacePrefixMatch`.
pub fn rewrite_path(path: &str, m: &PathModifier, matched: Option<&str>) -> String {
    match m {
        PathModifier::Full(p) => p.clone(),
        PathModifier::Prefix(replacement) => {
            let prefix = matched.unwrap_or("/").trim_end_matches('/');
            let rest = path.strip_prefix(prefix).unwrap_or(path);
            let replacement = replacement.trim_end_matches('/');
            let joined = format!("{replacement}{rest}");
            if joined.is_empty() {
                "/".into()
            } else if joined.starts_with('/') {
                joined
            } else {
                format!("/{joined}")
            }
        }
    }
}

impl Routes {
    /// The PathPrefix value of the first match of `rule` that matches `req` (for
    /// `ReplacePrefixMatch`).
    pub fn matched_prefix<'a>(
        &'a self,
        rule: &Arc<Rule>,
        req: &RequestView<'_>,
    ) -> Option<&'a str> {
        self.entries
            .iter()
            .find(|e| Arc::ptr_eq(&e.rule, rule) && e.m.matches(req))
            .and_then(|e| match &e.m.path {
                Matcher::Prefix(p) => Some(p.as_str()),
                _ => None,
            })
    }
}

#[cfg(test)]
mod tests {
    //! Precedence and matching per the Gateway API spec (HTTPRouteRule, "Matches").
    use super::*;

    fn m(path: (pb::MatchType, &str)) -> pb::HttpRouteMatch {
        pb::HttpRouteMatch {
            path: Some(pb::StringMatch {
                r#type: path.0 as i32,
                value: path.1.into(),
            }),
            ..Default::default()
        }
    }

    fn with_headers(mut x: pb::HttpRouteMatch, n: usize) -> pb::HttpRouteMatch {
        for i in 0..n {
            x.headers.push(pb::NamedMatch {
                r#type: pb::MatchType::Exact as i32,
                name: format!("h{i}"),
                value: "1".into(),
            });
        }
        x
    }

    fn rule(name: &str, matches: Vec<pb::HttpRouteMatch>) -> pb::HttpRouteRule {
        pb::HttpRouteRule {
            name: name.into(),
            matches,
            backends: vec![pb::HttpBackendRef {
                namespace: "default".into(),
                service: "web".into(),
                weight: 1,
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn route(ns: &str, name: &str, created: i64, rules: Vec<pb::HttpRouteRule>) -> pb::HttpRoute {
        pb::HttpRoute {
            namespace: ns.into(),
            name: name.into(),
            created_unix: created,
            rules,
        }
    }

    fn pick(routes: &Routes, method: &str, uri: &str, headers: &[(&str, &str)]) -> String {
        let method = Method::from_bytes(method.as_bytes()).unwrap();
        let uri: http::Uri = uri.parse().unwrap();
        let mut h = HeaderMap::new();
        for (k, v) in headers {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        let view = RequestView {
            method: &method,
            path: uri.path(),
            query: uri.query(),
            headers: &h,
        };
        match routes.pick(&view) {
            Pick::Default => "default".into(),
            Pick::NoMatch => "404".into(),
            Pick::Rule(r) => r.name.rsplit('/').next().unwrap().to_string(),
        }
    }

    use pb::MatchType::{Exact, PathPrefix, RegularExpression};

    #[test]
    fn precedence_across_rules_and_routes() {
        let routes = vec![
            route(
                "default",
                "a",
                10,
                vec![
                    rule("prefix-root", vec![m((PathPrefix, "/"))]),
                    rule("prefix-api", vec![m((PathPrefix, "/api"))]),
                    rule("prefix-api-v1", vec![m((PathPrefix, "/api/v1"))]),
                    rule("exact", vec![m((Exact, "/api/v1"))]),
                    rule("regex", vec![m((RegularExpression, "/api/v[0-9]+/items"))]),
                    rule("headers2", vec![with_headers(m((PathPrefix, "/api")), 2)]),
                    rule("headers1", vec![with_headers(m((PathPrefix, "/api")), 1)]),
                ],
            ),
            // Same match in an older route: it wins the tie.
            route(
                "default",
                "b",
                5,
                vec![rule("older", vec![m((PathPrefix, "/tie"))])],
            ),
            route(
                "default",
                "c",
                7,
                vec![rule("newer", vec![m((PathPrefix, "/tie"))])],
            ),
        ];
        let (r, errors) = Routes::compile(&routes, "default", Some("default"));
        assert!(errors.is_empty());
        let cases = [
            ("GET", "/", vec![], "prefix-root"),
            ("GET", "/api", vec![], "prefix-api"),
            ("GET", "/apix", vec![], "prefix-root"),
            ("GET", "/api/v1", vec![], "exact"),
            ("GET", "/api/v1/", vec![], "prefix-api-v1"),
            ("GET", "/api/v2/items", vec![], "regex"),
            ("GET", "/api/v2/items/x", vec![], "prefix-api"),
            ("GET", "/api/x", vec![("h0", "1")], "headers1"),
            ("GET", "/api/x", vec![("h0", "1"), ("h1", "1")], "headers2"),
            ("GET", "/tie/1", vec![], "older"),
        ];
        for (method, uri, headers, want) in cases {
            assert_eq!(
                pick(&r, method, uri, &headers),
                want,
                "{method} {uri} {headers:?}"
            );
        }
    }

    #[test]
    fn method_query_and_header_regex() {
        let mut by_method = m((PathPrefix, "/"));
        by_method.method = "POST".into();
        let mut by_query = m((PathPrefix, "/"));
        by_query.query_params.push(pb::NamedMatch {
            r#type: Exact as i32,
            name: "tenant".into(),
            value: "a b".into(),
        });
        let mut by_regex_header = m((PathPrefix, "/"));
        by_regex_header.headers.push(pb::NamedMatch {
            r#type: RegularExpression as i32,
            name: "user-agent".into(),
            value: ".*mobile.*".into(),
        });
        let routes = vec![route(
            "default",
            "r",
            1,
            vec![
                rule("method", vec![by_method]),
                rule("query", vec![by_query]),
                rule("ua", vec![by_regex_header]),
            ],
        )];
        let (r, _) = Routes::compile(&routes, "default", None);
        assert_eq!(pick(&r, "POST", "/x", &[]), "method");
        assert_eq!(pick(&r, "GET", "/x?tenant=a%20b", &[]), "query");
        assert_eq!(pick(&r, "GET", "/x?other=1&tenant=a+b", &[]), "query");
        assert_eq!(pick(&r, "GET", "/x?tenant=b", &[]), "404");
        assert_eq!(
            pick(&r, "GET", "/x", &[("user-agent", "my mobile app")]),
            "ua"
        );
        assert_eq!(pick(&r, "GET", "/x", &[("user-agent", "desktop")]), "404");
    }

    #[test]
    fn consumer_routes_apply_only_in_their_namespace_and_win_there() {
        let routes = vec![
            route("default", "producer", 1, vec![rule("producer", vec![])]),
            route("team-a", "consumer", 2, vec![rule("consumer", vec![])]),
        ];
        let (in_a, _) = Routes::compile(&routes, "default", Some("team-a"));
        assert_eq!(pick(&in_a, "GET", "/", &[]), "consumer");
        let (in_b, _) = Routes::compile(&routes, "default", Some("team-b"));
        assert_eq!(pick(&in_b, "GET", "/", &[]), "producer");
        let (none, _) = Routes::compile(&[], "default", Some("team-b"));
        assert_eq!(pick(&none, "GET", "/", &[]), "default");
    }

    #[test]
    fn a_bad_route_is_left_out_and_reported() {
        let routes = vec![
            route(
                "default",
                "bad",
                1,
                vec![rule("bad", vec![m((RegularExpression, "(("))])],
            ),
            route(
                "default",
                "good",
                2,
                vec![rule("good", vec![m((PathPrefix, "/"))])],
            ),
        ];
        let (r, errors) = Routes::compile(&routes, "default", None);
        assert_eq!(errors.len(), 1);
        assert!(
            errors[0].to_string().contains("default/bad"),
            "{}",
            errors[0]
        );
        assert_eq!(pick(&r, "GET", "/", &[]), "good");
    }

    #[test]
    fn weights_and_paths() {
        let rule = Rule {
            name: "r".into(),
            request_headers: None,
            response_headers: None,
            redirect: None,
            rewrite: None,
            backends: ["a", "b", "z"]
                .iter()
                .zip([3, 1, 0])
                .map(|(s, w)| Backend {
                    namespace: "default".into(),
                    service: (*s).into(),
                    port: 0,
                    weight: w,
                    request_headers: None,
                    response_headers: None,
                })
                .collect(),
            request_timeout: None,
            backend_timeout: None,
            retry: None,
            outcomes: OnceLock::new(),
        };
        let picks: Vec<String> = (0..4)
            .map(|r| {
                let mut roll = |_n: u64| r;
                rule.pick_backend(&mut roll).unwrap().service.clone()
            })
            .collect();
        assert_eq!(picks, vec!["a", "a", "a", "b"]);

        assert!(path_prefix_matches("/", "/anything"));
        assert!(path_prefix_matches("/foo/", "/foo"));
        assert!(!path_prefix_matches("/foo", "/foobar"));
        let p = PathModifier::Prefix("/new".into());
        assert_eq!(rewrite_path("/old/x", &p, Some("/old")), "/new/x");
        assert_eq!(rewrite_path("/old", &p, Some("/old")), "/new");
        let root = PathModifier::Prefix("/".into());
        assert_eq!(rewrite_path("/old/x", &root, Some("/old")), "/x");
        assert_eq!(rewrite_path("/old", &root, Some("/old")), "/");
    }
}
