//! Parsing what a client asks the fake API server: which resource (path), which list/watch
//! parameters (query string) and which objects (label and field selectors).

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::source::Kind;

/// How the API server names and serves one kind.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ResourceInfo {
    /// `/api/v1` or `/apis/<group>/<version>`.
    pub prefix: &'static str,
    pub api_version: &'static str,
    pub plural: &'static str,
    pub list_kind: &'static str,
    pub namespaced: bool,
}

pub(crate) fn info(kind: Kind) -> ResourceInfo {
    match kind {
        Kind::Service => ResourceInfo {
            prefix: "/api/v1",
            api_version: "v1",
            plural: "services",
            list_kind: "ServiceList",
            namespaced: true,
        },
        Kind::EndpointSlice => ResourceInfo {
            prefix: "/apis/discovery.k8s.io/v1",
            api_version: "discovery.k8s.io/v1",
            plural: "endpointslices",
            list_kind: "EndpointSliceList",
            namespaced: true,
        },
        Kind::Pod => ResourceInfo {
            prefix: "/api/v1",
            api_version: "v1",
            plural: "pods",
            list_kind: "PodList",
            namespaced: true,
        },
        Kind::Node => ResourceInfo {
            prefix: "/api/v1",
            api_version: "v1",
            plural: "nodes",
            list_kind: "NodeList",
            namespaced: false,
        },
        Kind::HttpRoute => ResourceInfo {
            prefix: "/apis/gateway.networking.k8s.io/v1",
            api_version: "gateway.networking.k8s.io/v1",
            plural: "httproutes",
            list_kind: "HTTPRouteList",
            namespaced: true,
        },
        Kind::WasmPlugin => ResourceInfo {
            prefix: "/apis/wasmesh.io/v1alpha1",
            api_version: "wasmesh.io/v1alpha1",
            plural: "wasmplugins",
            list_kind: "WasmPluginList",
            namespaced: true,
        },
        Kind::AuthorizationPolicy => ResourceInfo {
            prefix: "/apis/wasmesh.io/v1alpha1",
            api_version: "wasmesh.io/v1alpha1",
            plural: "authorizationpolicies",
            list_kind: "AuthorizationPolicyList",
            namespaced: true,
        },
    }
}

/// The collection a request addresses: a kind, in all namespaces or in one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Collection {
    pub kind: Kind,
    pub namespace: Option<String>,
}

/// Maps `/api/v1/services`, `/api/v1/namespaces/{ns}/pods`,
/// `/apis/discovery.k8s.io/v1/endpointslices`, ... to a [`Collection`]; `None` for anything else
/// (including single-object paths, which the fake does not serve).
pub(crate) fn route(path: &str) -> Option<Collection> {
    Kind::ALL.into_iter().find_map(|kind| {
        let info = info(kind);
        let rest = path.strip_prefix(info.prefix)?.strip_prefix('/')?;
        let segments: Vec<&str> = rest.split('/').collect();
        match segments.as_slice() {
            [plural] if *plural == info.plural => Some(Collection {
                kind,
                namespace: None,
            }),
            ["namespaces", ns, plural]
                if info.namespaced && *plural == info.plural && !ns.is_empty() =>
            {
                Some(Collection {
                    kind,
                    namespace: Some(percent_decode(ns)),
                })
            }
            _ => None,
        }
    })
}

/// The list/watch parameters the fake understands.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct Params {
    pub watch: bool,
    pub selector: Selector,
    pub limit: Option<usize>,
    pub continue_token: Option<String>,
    pub resource_version: Option<String>,
    pub resource_version_match: Option<String>,
    pub timeout_seconds: Option<u64>,
    pub allow_bookmarks: bool,
    pub send_initial_events: bool,
}

/// Parses the query string of a list or watch request.
pub(crate) fn parse_params(query: Option<&str>) -> Result<Params, String> {
    let mut params = Params::default();
    for pair in query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value = percent_decode(value);
        match key {
            "watch" => params.watch = value == "true" || value == "1",
            "labelSelector" => params.selector.labels = parse_label_selector(&value)?,
            "fieldSelector" => params.selector.fields = parse_field_selector(&value)?,
            "limit" => {
                let limit: usize = value
                    .parse()
                    .map_err(|_| format!("limit must be a number, got {value:?}"))?;
                params.limit = (limit > 0).then_some(limit);
            }
            "continue" => params.continue_token = Some(value).filter(|v| !v.is_empty()),
            "resourceVersion" => params.resource_version = Some(value).filter(|v| !v.is_empty()),
            "resourceVersionMatch" => {
                params.resource_version_match = Some(value).filter(|v| !v.is_empty())
            }
            "timeoutSeconds" => {
                let secs = value
                    .parse()
                    .map_err(|_| format!("timeoutSeconds must be a number, got {value:?}"))?;
                params.timeout_seconds = Some(secs);
            }
            "allowWatchBookmarks" => params.allow_bookmarks = value == "true",
            "sendInitialEvents" => params.send_initial_events = value == "true",
            // Accepted and ignored, as a real API server ignores what does not apply.
            _ => {}
        }
    }
    Ok(params)
}

/// Decodes `%XX` escapes and `+` (form encoding, which kube's query builder uses).
pub(crate) fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A label selector term.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum LabelTerm {
    /// `key=value` or `key==value`
    Equals(String, String),
    /// `key!=value` (also matches objects without the label, as Kubernetes does)
    NotEquals(String, String),
    /// `key`
    Exists(String),
    /// `!key`
    NotExists(String),
}

/// A field selector term on `metadata.name` or `metadata.namespace`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FieldTerm {
    pub field: MetaField,
    pub value: String,
    pub equal: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MetaField {
    Name,
    Namespace,
}

/// Label and field selectors of one request; empty selects everything.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Selector {
    pub labels: Vec<LabelTerm>,
    pub fields: Vec<FieldTerm>,
}

impl Selector {
    pub fn matches(&self, meta: &ObjectMeta) -> bool {
        let empty = BTreeMap::new();
        let labels = meta.labels.as_ref().unwrap_or(&empty);
        let labels_ok = self.labels.iter().all(|term| match term {
            LabelTerm::Equals(k, v) => labels.get(k) == Some(v),
            LabelTerm::NotEquals(k, v) => labels.get(k) != Some(v),
            LabelTerm::Exists(k) => labels.contains_key(k),
            LabelTerm::NotExists(k) => !labels.contains_key(k),
        });
        let fields_ok = self.fields.iter().all(|term| {
            let actual = match term.field {
                MetaField::Name => meta.name.as_deref(),
                MetaField::Namespace => meta.namespace.as_deref(),
            };
            (actual.unwrap_or_default() == term.value) == term.equal
        });
        labels_ok && fields_ok
    }
}

/// Parses the equality-based label selector syntax: `a=b,c==d,e!=f,g,!h`. Set-based terms
/// (`in`, `notin`) are rejected with a message, like any syntax the fake does not know.
pub(crate) fn parse_label_selector(s: &str) -> Result<Vec<LabelTerm>, String> {
    s.split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|term| {
            let bad = || format!("unsupported label selector term {term:?} in {s:?}");
            let term_ok = |key: &str| !key.is_empty() && !key.contains([' ', '(', ')', '=', '!']);
            if let Some((k, v)) = term.split_once("!=") {
                let (k, v) = (k.trim(), v.trim());
                return term_ok(k)
                    .then(|| LabelTerm::NotEquals(k.into(), v.into()))
                    .ok_or_else(bad);
            }
            if let Some((k, v)) = term.split_once('=') {
                let (k, v) = (k.trim(), v.trim_start_matches('=').trim());
                return term_ok(k)
                    .then(|| LabelTerm::Equals(k.into(), v.into()))
                    .ok_or_else(bad);
            }
            if let Some(k) = term.strip_prefix('!') {
                let k = k.trim();
                return term_ok(k)
                    .then(|| LabelTerm::NotExists(k.into()))
                    .ok_or_else(bad);
            }
            term_ok(term)
                .then(|| LabelTerm::Exists(term.into()))
                .ok_or_else(bad)
        })
        .collect()
}

/// Parses `metadata.name=x,metadata.namespace!=y`; other fields are rejected (a real API
/// server supports a few more per kind).
pub(crate) fn parse_field_selector(s: &str) -> Result<Vec<FieldTerm>, String> {
    s.split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|term| {
            let (field, value, equal) = if let Some((f, v)) = term.split_once("!=") {
                (f, v, false)
            } else if let Some((f, v)) = term.split_once('=') {
                (f, v.trim_start_matches('='), true)
            } else {
                return Err(format!("field selector term {term:?} needs = or !="));
            };
            let field = match field.trim() {
                "metadata.name" => MetaField::Name,
                "metadata.namespace" => MetaField::Namespace,
                other => return Err(format!("field label not supported by the fake: {other:?}")),
            };
            Ok(FieldTerm {
                field,
                value: value.trim().to_string(),
                equal,
            })
        })
        .collect()
}
