//! HTTPRoutes in the table (GAMMA): which Service ports a route attaches to, and the route as
//! proxies receive it. Pure.
//!
//! - [`Route::new`]: a route as the model keeps it — its rules with every default filled
//!   ([`RouteEntry`], shared by all the ports it attaches to) and the Service parents its
//!   parentRefs name ([`ParentTarget`]).
//! - [`attach`]: puts a Service's routes on those of its entries they select: parentRef group
//!   `""` (or `core`) and kind `Service`; `port` set → only the service port with that number,
//!   `sectionName` set → only the service port with that name, neither → every port. Only TCP
//!   ports carry HTTP. A route in another namespace than the Service is a consumer route and
//!   is attached all the same: the proxy applies it to clients of the route's namespace only.
//! - [`RouteEntry::to_proto`]: the discovery contract's `HttpRoute` — header names
//!   lower-cased, weights, redirect status, durations (ms) and retry settings filled in, so
//!   proxies never apply a default of their own.

use std::collections::BTreeSet;
use std::sync::Arc;

use serde::Serialize;
use wasmesh_api::discovery as pb;

use super::entry::{Protocol, ServicePortEntry};
use crate::source::httproute::{
    self, FilterType, HeaderModifier, HttpBackendRef, HttpRoute, HttpRouteFilter, HttpRouteMatch,
    HttpRouteRule, HttpValueMatch, PathMatchType, PathModifier, PathModifierType, ValueMatchType,
    duration,
};

/// Retried statuses when a route's retry names none (the Gateway API's required set).
pub const DEFAULT_RETRY_CODES: [u32; 4] = [500, 502, 503, 504];
/// Retries after the first attempt when `retry.attempts` is not set.
pub const DEFAULT_RETRY_ATTEMPTS: u32 = 1;
/// Base backoff between attempts when `retry.backoff` is not set.
pub const DEFAULT_RETRY_BACKOFF_MS: u64 = 25;

/// One HTTPRoute as attached to service ports: identity, age and rules (defaults filled).
/// The `table` command prints it; [`RouteEntry::to_proto`] is what proxies receive.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteEntry {
    pub namespace: String,
    pub name: String,
    /// metadata.creationTimestamp in Unix seconds (0 when unknown, e.g. from a folder).
    #[serde(skip_serializing_if = "is_zero")]
    pub created_unix: i64,
    pub rules: Vec<HttpRouteRule>,
}

fn is_zero(n: &i64) -> bool {
    *n == 0
}

/// A Service (and optionally one of its ports) a route's parentRefs name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ParentTarget {
    pub namespace: String,
    pub service: String,
    /// `parentRefs[].port`: the service port number.
    pub port: Option<i32>,
    /// `parentRefs[].sectionName`: the service port name.
    pub section_name: Option<String>,
}

impl ParentTarget {
    /// Whether this parent selects the service port `entry`.
    pub fn selects(&self, entry: &ServicePortEntry) -> bool {
        entry.key.protocol == Protocol::Tcp
            && entry.key.namespace == self.namespace
            && entry.key.service == self.service
            && self.port.is_none_or(|p| p == i32::from(entry.port))
            && self
                .section_name
                .as_deref()
                .is_none_or(|s| s == entry.key.port_name)
    }
}

/// A route as the model holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    pub entry: Arc<RouteEntry>,
    pub parents: Vec<ParentTarget>,
}

impl Route {
    pub fn new(route: &HttpRoute) -> Route {
        let namespace = route.metadata.namespace.clone().unwrap_or_default();
        let mut spec = route.spec.clone();
        // Sources have defaulted already; doing it again (it is idempotent) keeps the model
        // right for routes from anywhere.
        httproute::validate::apply_defaults(&mut spec, &namespace);
        let mut parents: Vec<ParentTarget> = spec
            .parent_refs
            .iter()
            .filter(|p| p.is_service())
            .map(|p| ParentTarget {
                namespace: p.namespace.clone().unwrap_or_else(|| namespace.clone()),
                service: p.name.clone(),
                port: p.port,
                section_name: p.section_name.clone(),
            })
            .collect();
        parents.sort();
        parents.dedup();
        let created_unix = route
            .metadata
            .creation_timestamp
            .as_ref()
            .map_or(0, |t| t.0.as_second());
        Route {
            entry: Arc::new(RouteEntry {
                name: route.metadata.name.clone().unwrap_or_default(),
                namespace,
                created_unix,
                rules: spec.rules.unwrap_or_default(),
            }),
            parents,
        }
    }

    /// `(namespace, name)` of every Service a parentRef names.
    pub fn services(&self) -> BTreeSet<(String, String)> {
        self.parents
            .iter()
            .map(|p| (p.namespace.clone(), p.service.clone()))
            .collect()
    }
}

/// Attaches `routes` (those naming the entries' Service, in a stable order) to the entries
/// they select.
pub fn attach<'a>(entries: &mut [ServicePortEntry], routes: impl IntoIterator<Item = &'a Route>) {
    let routes: Vec<&Route> = routes.into_iter().collect();
    for entry in entries {
        entry.http_routes = routes
            .iter()
            .filter(|r| r.parents.iter().any(|p| p.selects(entry)))
            .map(|r| Arc::clone(&r.entry))
            .collect();
    }
}

impl RouteEntry {
    pub fn to_proto(&self) -> pb::HttpRoute {
        pb::HttpRoute {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            created_unix: self.created_unix,
            rules: self
                .rules
                .iter()
                .map(|r| rule_to_proto(r, &self.namespace))
                .collect(),
        }
    }
}

fn rule_to_proto(rule: &HttpRouteRule, namespace: &str) -> pb::HttpRouteRule {
    let default_match = [HttpRouteMatch::default_match()];
    let matches = match rule.matches.as_deref() {
        Some(m) if !m.is_empty() => m,
        _ => &default_match[..],
    };
    let timeout = |t: Option<&str>| {
        t.and_then(|t| duration::parse(t).ok())
            .map(duration::millis)
    };
    let timeouts = rule.timeouts.as_ref();
    pb::HttpRouteRule {
        name: rule.name.clone().unwrap_or_default(),
        matches: matches.iter().map(match_to_proto).collect(),
        filters: rule.filters.iter().filter_map(filter_to_proto).collect(),
        backends: rule
            .backend_refs
            .iter()
            .map(|b| backend_to_proto(b, namespace))
            .collect(),
        request_timeout_ms: timeout(timeouts.and_then(|t| t.request.as_deref())),
        backend_request_timeout_ms: timeout(timeouts.and_then(|t| t.backend_request.as_deref())),
        retry: rule.retry.as_ref().map(|r| pb::HttpRetry {
            codes: if r.codes.is_empty() {
                DEFAULT_RETRY_CODES.to_vec()
            } else {
                r.codes
                    .iter()
                    .filter_map(|c| u32::try_from(*c).ok())
                    .collect()
            },
            attempts: r
                .attempts
                .and_then(|a| u32::try_from(a).ok())
                .unwrap_or(DEFAULT_RETRY_ATTEMPTS),
            backoff_ms: r
                .backoff
                .as_deref()
                .and_then(|b| duration::parse(b).ok())
                .map_or(DEFAULT_RETRY_BACKOFF_MS, duration::millis),
        }),
    }
}

fn match_to_proto(m: &HttpRouteMatch) -> pb::HttpRouteMatch {
    let path = m
        .path
        .clone()
        .unwrap_or_else(httproute::HttpPathMatch::default_path);
    let path_type = match path.match_type() {
        PathMatchType::PathPrefix => pb::MatchType::PathPrefix,
        PathMatchType::RegularExpression => pb::MatchType::RegularExpression,
        // Exact, and values validation refuses (never seen here): the strictest reading.
        PathMatchType::Exact | PathMatchType::Other(_) => pb::MatchType::Exact,
    };
    // Header names are case-insensitive: the first of equivalent names counts (Gateway API).
    let mut seen = BTreeSet::new();
    let headers = m
        .headers
        .iter()
        .map(|h| (h.name.to_ascii_lowercase(), h))
        .filter(|(name, _)| seen.insert(name.clone()))
        .map(|(name, h)| named_match(name, h))
        .collect();
    let mut seen = BTreeSet::new();
    let query_params = m
        .query_params
        .iter()
        .filter(|q| seen.insert(q.name.clone()))
        .map(|q| named_match(q.name.clone(), q))
        .collect();
    pb::HttpRouteMatch {
        path: Some(pb::StringMatch {
            r#type: path_type as i32,
            value: path.value().to_string(),
        }),
        headers,
        query_params,
        method: m.method.clone().unwrap_or_default(),
    }
}

fn named_match(name: String, v: &HttpValueMatch) -> pb::NamedMatch {
    let t = match v.match_type() {
        ValueMatchType::RegularExpression => pb::MatchType::RegularExpression,
        ValueMatchType::Exact | ValueMatchType::Other(_) => pb::MatchType::Exact,
    };
    pb::NamedMatch {
        r#type: t as i32,
        name,
        value: v.value.clone(),
    }
}

/// The filters wasmesh implements; others are refused by validation and never reach here.
fn filter_to_proto(f: &HttpRouteFilter) -> Option<pb::HttpFilter> {
    use pb::http_filter::Kind;
    let kind = match f.type_ {
        FilterType::RequestHeaderModifier => {
            Kind::RequestHeaderModifier(header_modifier(f.request_header_modifier.as_ref()?))
        }
        FilterType::ResponseHeaderModifier => {
            Kind::ResponseHeaderModifier(header_modifier(f.response_header_modifier.as_ref()?))
        }
        FilterType::RequestRedirect => {
            let r = f.request_redirect.as_ref()?;
            Kind::RequestRedirect(pb::RequestRedirect {
                scheme: r.scheme.clone().unwrap_or_default(),
                hostname: r.hostname.clone().unwrap_or_default(),
                path: r.path.as_ref().and_then(path_modifier),
                port: r.port.and_then(|p| u32::try_from(p).ok()).unwrap_or(0),
                status_code: r
                    .status_code
                    .and_then(|s| u32::try_from(s).ok())
                    .unwrap_or(httproute::DEFAULT_REDIRECT_STATUS as u32),
            })
        }
        FilterType::UrlRewrite => {
            let r = f.url_rewrite.as_ref()?;
            Kind::UrlRewrite(pb::UrlRewrite {
                hostname: r.hostname.clone().unwrap_or_default(),
                path: r.path.as_ref().and_then(path_modifier),
            })
        }
        _ => return None,
    };
    Some(pb::HttpFilter { kind: Some(kind) })
}

fn header_modifier(m: &HeaderModifier) -> pb::HeaderModifier {
    let headers = |list: &[httproute::HttpHeader]| {
        list.iter()
            .map(|h| pb::HttpHeader {
                name: h.name.to_ascii_lowercase(),
                value: h.value.clone(),
            })
            .collect()
    };
    pb::HeaderModifier {
        set: headers(&m.set),
        add: headers(&m.add),
        remove: m.remove.iter().map(|n| n.to_ascii_lowercase()).collect(),
    }
}

fn path_modifier(p: &PathModifier) -> Option<pb::PathModifier> {
    let (t, value) = match p.type_ {
        PathModifierType::ReplaceFullPath => (
            pb::path_modifier::Type::ReplaceFullPath,
            p.replace_full_path.clone()?,
        ),
        PathModifierType::ReplacePrefixMatch => (
            pb::path_modifier::Type::ReplacePrefixMatch,
            p.replace_prefix_match.clone()?,
        ),
        PathModifierType::Other(_) => return None,
    };
    Some(pb::PathModifier {
        r#type: t as i32,
        value,
    })
}

/// A backendRef. One that is not a core Service (another group or kind) cannot be resolved by
/// the mesh: it is sent with an empty `service`, which names no Service, so the proxy answers
/// its share of requests with 500 as the Gateway API requires for invalid backends.
fn backend_to_proto(b: &HttpBackendRef, namespace: &str) -> pb::HttpBackendRef {
    pb::HttpBackendRef {
        namespace: b.namespace.clone().unwrap_or_else(|| namespace.to_string()),
        service: if b.is_service() {
            b.name.clone()
        } else {
            String::new()
        },
        port: b.port.and_then(|p| u32::try_from(p).ok()).unwrap_or(0),
        weight: u32::try_from(b.weight()).unwrap_or(0),
        filters: b
            .filters
            .iter()
            .filter(|f| {
                matches!(
                    f.type_,
                    FilterType::RequestHeaderModifier | FilterType::ResponseHeaderModifier
                )
            })
            .filter_map(filter_to_proto)
            .collect(),
    }
}

#[cfg(test)]
mod tests;
