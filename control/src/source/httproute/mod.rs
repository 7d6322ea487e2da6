//! HTTPRoute (`gateway.networking.k8s.io/v1`) as control reads it, for GAMMA: routes whose
//! `parentRefs` name a Service rather than a Gateway.
//!
//! - [`HttpRoute`] and the spec types: our own serde structs for the parts of the spec a mesh
//!   uses — parentRefs, rules with name, matches, filters, backendRefs (with their filters),
//!   timeouts and retry (GEP-1731, experimental). Fields control does not read (status,
//!   sessionPersistence, …) are ignored; hostnames are kept but have no meaning in GAMMA.
//!   Enumerations keep values they do not know ([`FilterType::Other`], …) so that validation
//!   can say which value is wrong.
//! - [`validate::default_and_validate`]: the defaults the API server fills from the CRD schema
//!   and the checks its schema and CEL rules make, plus what wasmesh cannot honour (filter types
//!   it does not implement, regular expressions that do not compile). Both sources run it: the
//!   folder source refuses the document, the kube source skips the route with a log line.
//! - [`duration`]: Gateway API durations (GEP-2257: `10s`, `500ms`, `1h30m`).
//!
//! Turning a route into what proxies receive is the model's job (`model::routes`).

pub mod duration;
pub mod validate;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};

pub use validate::{InvalidRoute, default_and_validate};

/// The API group of the Gateway API.
pub const GROUP: &str = "gateway.networking.k8s.io";
/// The version control watches (v1beta1 is read from folders too: same schema).
pub const VERSION: &str = "v1";
pub const API_VERSION: &str = "gateway.networking.k8s.io/v1";
pub const KIND: &str = "HTTPRoute";
pub const PLURAL: &str = "httproutes";
/// apiVersions the folder source accepts for `kind: HTTPRoute`.
pub const API_VERSIONS: [&str; 2] = [API_VERSION, "gateway.networking.k8s.io/v1beta1"];

/// One HTTPRoute object.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
pub struct HttpRoute {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: HttpRouteSpec,
}

impl Serialize for HttpRoute {
    /// As the API server writes it: `apiVersion`, `kind`, `metadata`, `spec`.
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = s.serialize_struct("HTTPRoute", 4)?;
        st.serialize_field("apiVersion", API_VERSION)?;
        st.serialize_field("kind", KIND)?;
        st.serialize_field("metadata", &self.metadata)?;
        st.serialize_field("spec", &self.spec)?;
        st.end()
    }
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteSpec {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parent_refs: Vec<ParentReference>,
    /// Ignored by the mesh (GAMMA routes match on the Service, not on Host).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hostnames: Vec<String>,
    /// `None`: the CRD's default, one rule matching PathPrefix "/".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rules: Option<Vec<HttpRouteRule>>,
}

/// `spec.parentRefs[]`. The CRD defaults group to `gateway.networking.k8s.io` and kind to
/// `Gateway`: a Service parent must say `group: ""` and `kind: Service`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ParentReference {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default)]
    pub name: String,
    /// For a Service parent: the service port's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub section_name: Option<String>,
    /// For a Service parent: the service port's number (`spec.ports[].port`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<i32>,
}

/// The parentRef's group defaulted as the CRD does.
pub const DEFAULT_PARENT_GROUP: &str = GROUP;
pub const DEFAULT_PARENT_KIND: &str = "Gateway";

impl ParentReference {
    /// `group: ""` (or `core`) and `kind: Service`: a GAMMA parent.
    pub fn is_service(&self) -> bool {
        let group = self.group.as_deref().unwrap_or(DEFAULT_PARENT_GROUP);
        let kind = self.kind.as_deref().unwrap_or(DEFAULT_PARENT_KIND);
        matches!(group, "" | "core") && kind == "Service"
    }
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `None` or empty: the CRD's default, one match on PathPrefix "/".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub matches: Option<Vec<HttpRouteMatch>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<HttpRouteFilter>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backend_refs: Vec<HttpBackendRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<HttpRouteTimeouts>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<HttpRouteRetry>,
}

impl HttpRouteRule {
    /// The rule the CRD puts in a route without rules.
    pub fn default_rule() -> HttpRouteRule {
        HttpRouteRule {
            matches: Some(vec![HttpRouteMatch::default_match()]),
            ..HttpRouteRule::default()
        }
    }
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteMatch {
    /// `None`: the CRD's default, PathPrefix "/".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<HttpPathMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<HttpValueMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub query_params: Vec<HttpValueMatch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
}

impl HttpRouteMatch {
    /// PathPrefix "/": what a rule without matches matches.
    pub fn default_match() -> HttpRouteMatch {
        HttpRouteMatch {
            path: Some(HttpPathMatch::default_path()),
            ..HttpRouteMatch::default()
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct HttpPathMatch {
    /// Default PathPrefix.
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub type_: Option<PathMatchType>,
    /// Default "/".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

impl HttpPathMatch {
    pub fn default_path() -> HttpPathMatch {
        HttpPathMatch {
            type_: Some(PathMatchType::PathPrefix),
            value: Some("/".into()),
        }
    }

    pub fn match_type(&self) -> PathMatchType {
        self.type_.clone().unwrap_or(PathMatchType::PathPrefix)
    }

    pub fn value(&self) -> &str {
        self.value.as_deref().unwrap_or("/")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PathMatchType {
    Exact,
    PathPrefix,
    RegularExpression,
    /// A value the CRD does not define (refused by validation).
    #[serde(untagged)]
    Other(String),
}

/// A header or query parameter match.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct HttpValueMatch {
    /// Default Exact.
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub type_: Option<ValueMatchType>,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub value: String,
}

impl HttpValueMatch {
    pub fn match_type(&self) -> ValueMatchType {
        self.type_.clone().unwrap_or(ValueMatchType::Exact)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ValueMatchType {
    Exact,
    RegularExpression,
    #[serde(untagged)]
    Other(String),
}

/// `filters[]`: a type and the field of that type.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteFilter {
    #[serde(rename = "type")]
    pub type_: FilterType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_header_modifier: Option<HeaderModifier>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_header_modifier: Option<HeaderModifier>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_redirect: Option<RequestRedirect>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_rewrite: Option<UrlRewrite>,
    /// Filters wasmesh does not implement: kept only to check type/field agreement.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_mirror: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extension_ref: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cors: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_auth: Option<serde_json::Value>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FilterType {
    RequestHeaderModifier,
    ResponseHeaderModifier,
    RequestRedirect,
    #[serde(rename = "URLRewrite")]
    UrlRewrite,
    RequestMirror,
    ExtensionRef,
    #[serde(rename = "CORS")]
    Cors,
    ExternalAuth,
    #[serde(untagged)]
    Other(String),
}

impl FilterType {
    pub fn as_str(&self) -> &str {
        match self {
            FilterType::RequestHeaderModifier => "RequestHeaderModifier",
            FilterType::ResponseHeaderModifier => "ResponseHeaderModifier",
            FilterType::RequestRedirect => "RequestRedirect",
            FilterType::UrlRewrite => "URLRewrite",
            FilterType::RequestMirror => "RequestMirror",
            FilterType::ExtensionRef => "ExtensionRef",
            FilterType::Cors => "CORS",
            FilterType::ExternalAuth => "ExternalAuth",
            FilterType::Other(s) => s,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct HeaderModifier {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub set: Vec<HttpHeader>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub add: Vec<HttpHeader>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct HttpHeader {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub value: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestRedirect {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathModifier>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<i32>,
    /// Default 302.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_code: Option<i32>,
}

/// Redirect status the CRD defaults to.
pub const DEFAULT_REDIRECT_STATUS: i32 = 302;

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UrlRewrite {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathModifier>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PathModifier {
    #[serde(rename = "type")]
    pub type_: PathModifierType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replace_full_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replace_prefix_match: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PathModifierType {
    ReplaceFullPath,
    ReplacePrefixMatch,
    #[serde(untagged)]
    Other(String),
}

/// `backendRefs[]`. The CRD defaults group to "" and kind to Service, weight to 1.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpBackendRef {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default)]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<i32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<HttpRouteFilter>,
}

/// A backendRef's weight when it has none.
pub const DEFAULT_WEIGHT: i32 = 1;
pub const MAX_WEIGHT: i32 = 1_000_000;

impl HttpBackendRef {
    /// Group "" (or `core`) and kind Service, after the CRD's defaults.
    pub fn is_service(&self) -> bool {
        matches!(self.group.as_deref().unwrap_or(""), "" | "core")
            && self.kind.as_deref().unwrap_or("Service") == "Service"
    }

    pub fn weight(&self) -> i32 {
        self.weight.unwrap_or(DEFAULT_WEIGHT)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteTimeouts {
    /// A Gateway API duration ([`duration::parse`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend_request: Option<String>,
}

/// `rules[].retry` (GEP-1731).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct HttpRouteRetry {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub codes: Vec<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempts: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<String>,
}

#[cfg(test)]
mod tests;
