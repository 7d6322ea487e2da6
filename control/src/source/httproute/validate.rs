//! The API server's defaults and validation for HTTPRoute, as the CRD's schema (defaults,
//! enums, patterns, limits) and CEL rules give them, plus what wasmesh refuses because it
//! cannot honour it: filter types it does not implement (RequestMirror, ExtensionRef, CORS,
//! ExternalAuth), filters other than header modifiers on a backendRef, and regular
//! expressions the proxy's engine (the `regex` crate) would not compile.
//!
//! Limits follow the CRD of Gateway API v1.3: at most 32 parentRefs, 16 rules, 64 matches per
//! rule and 128 in the route, 16 filters, 16 backendRefs, 16 headers or query parameters per
//! match.

use std::collections::BTreeSet;

use super::duration::{self, DurationError};
use super::*;

/// Why a route would be refused: the field (`spec.rules[0].matches[1].path.value`) and the
/// reason. The caller names the route.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct InvalidRoute {
    pub field: String,
    pub reason: String,
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> InvalidRoute {
    InvalidRoute {
        field: field.into(),
        reason: reason.into(),
    }
}

pub const MAX_PARENT_REFS: usize = 32;
pub const MAX_RULES: usize = 16;
pub const MAX_MATCHES_PER_RULE: usize = 64;
pub const MAX_MATCHES_PER_ROUTE: usize = 128;
pub const MAX_FILTERS: usize = 16;
pub const MAX_BACKEND_REFS: usize = 16;
/// Headers or query parameters per match; header names per modifier list.
pub const MAX_NAMED: usize = 16;

const METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

/// Fills the API server's defaults (and the namespaces references default to), then checks
/// the route as the API server and wasmesh would. The route's `metadata.namespace` must be
/// set (sources set it before calling this).
pub fn default_and_validate(route: &mut HttpRoute) -> Result<(), InvalidRoute> {
    let namespace = route.metadata.namespace.clone().unwrap_or_default();
    apply_defaults(&mut route.spec, &namespace);
    validate(&route.spec)
}

/// What the API server fills from the CRD schema, plus reference namespaces (the route's),
/// so a route reads the same whoever looks at it.
pub fn apply_defaults(spec: &mut HttpRouteSpec, namespace: &str) {
    for p in &mut spec.parent_refs {
        p.group.get_or_insert_with(|| DEFAULT_PARENT_GROUP.into());
        p.kind.get_or_insert_with(|| DEFAULT_PARENT_KIND.into());
        p.namespace.get_or_insert_with(|| namespace.into());
    }
    let rules = spec
        .rules
        .get_or_insert_with(|| vec![HttpRouteRule::default_rule()]);
    for rule in rules {
        let matches = rule.matches.get_or_insert_with(Vec::new);
        if matches.is_empty() {
            matches.push(HttpRouteMatch::default_match());
        }
        for m in matches {
            let path = m.path.get_or_insert_with(HttpPathMatch::default_path);
            path.type_.get_or_insert(PathMatchType::PathPrefix);
            path.value.get_or_insert_with(|| "/".into());
            for v in m.headers.iter_mut().chain(m.query_params.iter_mut()) {
                v.type_.get_or_insert(ValueMatchType::Exact);
            }
        }
        for f in &mut rule.filters {
            default_filter(f);
        }
        for b in &mut rule.backend_refs {
            b.group.get_or_insert_with(String::new);
            b.kind.get_or_insert_with(|| "Service".into());
            b.namespace.get_or_insert_with(|| namespace.into());
            b.weight.get_or_insert(DEFAULT_WEIGHT);
            for f in &mut b.filters {
                default_filter(f);
            }
        }
    }
}

fn default_filter(f: &mut HttpRouteFilter) {
    if let Some(r) = f.request_redirect.as_mut() {
        r.status_code.get_or_insert(DEFAULT_REDIRECT_STATUS);
    }
}

/// The checks, on a defaulted spec.
pub fn validate(spec: &HttpRouteSpec) -> Result<(), InvalidRoute> {
    validate_parents(&spec.parent_refs)?;
    let rules = spec.rules.as_deref().unwrap_or_default();
    if rules.is_empty() {
        return Err(invalid(
            "spec.rules",
            "must not be empty (leave it out to match every request)",
        ));
    }
    if rules.len() > MAX_RULES {
        return Err(invalid(
            "spec.rules",
            format!("{} rules; at most {MAX_RULES} are allowed", rules.len()),
        ));
    }
    let total: usize = rules
        .iter()
        .map(|r| r.matches.as_ref().map_or(1, Vec::len))
        .sum();
    if total > MAX_MATCHES_PER_ROUTE {
        return Err(invalid(
            "spec.rules",
            format!(
                "{total} matches in all; at most {MAX_MATCHES_PER_ROUTE} are allowed in a route"
            ),
        ));
    }
    let mut names = BTreeSet::new();
    for (i, rule) in rules.iter().enumerate() {
        let field = format!("spec.rules[{i}]");
        if let Some(name) = &rule.name {
            check_subdomain(&format!("{field}.name"), name)?;
            if !names.insert(name.as_str()) {
                return Err(invalid(
                    format!("{field}.name"),
                    format!(
                        "{name:?} is used by another rule; rule names must be unique within the route"
                    ),
                ));
            }
        }
        validate_rule(&field, rule)?;
    }
    Ok(())
}

fn validate_parents(parents: &[ParentReference]) -> Result<(), InvalidRoute> {
    if parents.len() > MAX_PARENT_REFS {
        return Err(invalid(
            "spec.parentRefs",
            format!(
                "{} entries; at most {MAX_PARENT_REFS} are allowed",
                parents.len()
            ),
        ));
    }
    for (i, p) in parents.iter().enumerate() {
        let field = format!("spec.parentRefs[{i}]");
        if p.name.is_empty() {
            return Err(invalid(format!("{field}.name"), "is required"));
        }
        if let Some(port) = p.port
            && !(1..=65535).contains(&port)
        {
            return Err(invalid(
                format!("{field}.port"),
                format!("{port} is not a valid port (1-65535)"),
            ));
        }
        if let Some(s) = &p.section_name {
            check_subdomain(&format!("{field}.sectionName"), s)?;
        }
        // The CRD's two CEL rules on references to the same parent.
        let same_parent = |q: &ParentReference| {
            q.group == p.group && q.kind == p.kind && q.name == p.name && q.namespace == p.namespace
        };
        let has_section =
            |q: &ParentReference| q.section_name.as_deref().is_some_and(|s| !s.is_empty());
        let has_port = |q: &ParentReference| q.port.is_some_and(|n| n != 0);
        for (j, q) in parents.iter().enumerate().skip(i + 1) {
            if !same_parent(q) {
                continue;
            }
            if has_section(p) != has_section(q) || has_port(p) != has_port(q) {
                return Err(invalid(
                    "spec.parentRefs",
                    format!(
                        "entries {i} and {j} name the same parent: sectionName or port must be specified when parentRefs includes 2 or more references to the same parent"
                    ),
                ));
            }
            if p.section_name == q.section_name && p.port == q.port {
                return Err(invalid(
                    "spec.parentRefs",
                    format!(
                        "entries {i} and {j} are the same reference: sectionName or port must be unique when parentRefs includes 2 or more references to the same parent"
                    ),
                ));
            }
        }
    }
    Ok(())
}

fn validate_rule(field: &str, rule: &HttpRouteRule) -> Result<(), InvalidRoute> {
    let matches = rule.matches.as_deref().unwrap_or_default();
    if matches.len() > MAX_MATCHES_PER_RULE {
        return Err(invalid(
            format!("{field}.matches"),
            format!(
                "{} matches; at most {MAX_MATCHES_PER_RULE} are allowed per rule",
                matches.len()
            ),
        ));
    }
    for (i, m) in matches.iter().enumerate() {
        validate_match(&format!("{field}.matches[{i}]"), m)?;
    }
    validate_filters(&format!("{field}.filters"), &rule.filters, false)?;
    if rule.backend_refs.len() > MAX_BACKEND_REFS {
        return Err(invalid(
            format!("{field}.backendRefs"),
            format!(
                "{} entries; at most {MAX_BACKEND_REFS} are allowed",
                rule.backend_refs.len()
            ),
        ));
    }
    for (i, b) in rule.backend_refs.iter().enumerate() {
        validate_backend(&format!("{field}.backendRefs[{i}]"), b)?;
    }
    if !rule.backend_refs.is_empty()
        && rule
            .filters
            .iter()
            .any(|f| f.type_ == FilterType::RequestRedirect)
    {
        return Err(invalid(
            field,
            "RequestRedirect filter must not be used together with backendRefs",
        ));
    }
    // ReplacePrefixMatch needs exactly one match, on a path prefix (the prefix it replaces).
    let prefix_rewrite = rule
        .filters
        .iter()
        .chain(rule.backend_refs.iter().flat_map(|b| &b.filters))
        .find_map(|f| {
            let path = match f.type_ {
                FilterType::RequestRedirect => f.request_redirect.as_ref()?.path.as_ref(),
                FilterType::UrlRewrite => f.url_rewrite.as_ref()?.path.as_ref(),
                _ => None,
            }?;
            (path.type_ == PathModifierType::ReplacePrefixMatch).then_some(f.type_.as_str())
        });
    if let Some(filter) = prefix_rewrite {
        let one_prefix = matches.len() == 1
            && matches[0]
                .path
                .as_ref()
                .is_some_and(|p| p.match_type() == PathMatchType::PathPrefix);
        if !one_prefix {
            return Err(invalid(
                field,
                format!(
                    "When using {filter} filter with path.replacePrefixMatch, exactly one PathPrefix match must be specified"
                ),
            ));
        }
    }
    if let Some(t) = &rule.timeouts {
        let request = parse_duration(&format!("{field}.timeouts.request"), t.request.as_deref())?;
        let backend = parse_duration(
            &format!("{field}.timeouts.backendRequest"),
            t.backend_request.as_deref(),
        )?;
        if let (Some(request), Some(backend)) = (request, backend)
            && !request.is_zero()
            && backend > request
        {
            return Err(invalid(
                format!("{field}.timeouts"),
                "backendRequest timeout cannot be longer than request timeout",
            ));
        }
    }
    if let Some(r) = &rule.retry {
        for (i, code) in r.codes.iter().enumerate() {
            if !(400..=599).contains(code) {
                return Err(invalid(
                    format!("{field}.retry.codes[{i}]"),
                    format!("{code} is not an HTTP error status (400-599)"),
                ));
            }
        }
        if let Some(a) = r.attempts
            && a < 1
        {
            return Err(invalid(
                format!("{field}.retry.attempts"),
                format!("{a} must be at least 1"),
            ));
        }
        parse_duration(&format!("{field}.retry.backoff"), r.backoff.as_deref())?;
    }
    Ok(())
}

fn parse_duration(
    field: &str,
    text: Option<&str>,
) -> Result<Option<std::time::Duration>, InvalidRoute> {
    text.map(duration::parse)
        .transpose()
        .map_err(|e: DurationError| invalid(field, e.to_string()))
}

fn validate_match(field: &str, m: &HttpRouteMatch) -> Result<(), InvalidRoute> {
    if let Some(path) = &m.path {
        let f = format!("{field}.path");
        let value = path.value();
        if value.len() > 1024 {
            return Err(invalid(format!("{f}.value"), "longer than 1024 characters"));
        }
        match path.match_type() {
            PathMatchType::Exact | PathMatchType::PathPrefix => {
                check_path(&format!("{f}.value"), value)?
            }
            PathMatchType::RegularExpression => check_regex(&format!("{f}.value"), value)?,
            PathMatchType::Other(t) => {
                return Err(invalid(
                    format!("{f}.type"),
                    format!("{t:?} is not one of Exact, PathPrefix, RegularExpression"),
                ));
            }
        }
    }
    for (list, what) in [(&m.headers, "headers"), (&m.query_params, "queryParams")] {
        if list.len() > MAX_NAMED {
            return Err(invalid(
                format!("{field}.{what}"),
                format!("{} entries; at most {MAX_NAMED} are allowed", list.len()),
            ));
        }
        let mut seen = BTreeSet::new();
        for (i, v) in list.iter().enumerate() {
            let f = format!("{field}.{what}[{i}]");
            check_token(&format!("{f}.name"), &v.name)?;
            // The CRD lists these as a map keyed by name: the same name twice is refused
            // (header names differing only in case are allowed; the first one counts).
            if !seen.insert(v.name.as_str()) {
                return Err(invalid(
                    format!("{f}.name"),
                    format!("{:?} is matched twice", v.name),
                ));
            }
            let max = if what == "headers" { 4096 } else { 1024 };
            if v.value.len() > max {
                return Err(invalid(
                    format!("{f}.value"),
                    format!("longer than {max} characters"),
                ));
            }
            match v.match_type() {
                ValueMatchType::Exact => {}
                ValueMatchType::RegularExpression => check_regex(&format!("{f}.value"), &v.value)?,
                ValueMatchType::Other(t) => {
                    return Err(invalid(
                        format!("{f}.type"),
                        format!("{t:?} is not one of Exact, RegularExpression"),
                    ));
                }
            }
        }
    }
    if let Some(method) = &m.method
        && !METHODS.contains(&method.as_str())
    {
        return Err(invalid(
            format!("{field}.method"),
            format!("{method:?} is not one of {}", METHODS.join(", ")),
        ));
    }
    Ok(())
}

/// The filters wasmesh implements, in the order the error message lists them.
const SUPPORTED_FILTERS: &str =
    "RequestHeaderModifier, ResponseHeaderModifier, RequestRedirect, URLRewrite";

fn validate_filters(
    field: &str,
    filters: &[HttpRouteFilter],
    on_backend: bool,
) -> Result<(), InvalidRoute> {
    if filters.len() > MAX_FILTERS {
        return Err(invalid(
            field,
            format!(
                "{} filters; at most {MAX_FILTERS} are allowed",
                filters.len()
            ),
        ));
    }
    let mut types = BTreeSet::new();
    for (i, f) in filters.iter().enumerate() {
        let ff = format!("{field}[{i}]");
        validate_filter(&ff, f)?;
        if on_backend
            && !matches!(
                f.type_,
                FilterType::RequestHeaderModifier | FilterType::ResponseHeaderModifier
            )
        {
            return Err(invalid(
                format!("{ff}.type"),
                format!(
                    "{} on a backendRef is not supported by wasmesh: only RequestHeaderModifier and ResponseHeaderModifier are (put other filters on the rule)",
                    f.type_.as_str()
                ),
            ));
        }
        if !types.insert(f.type_.as_str()) {
            return Err(invalid(
                format!("{ff}.type"),
                format!("{} filter cannot be repeated", f.type_.as_str()),
            ));
        }
    }
    if types.contains("RequestRedirect") && types.contains("URLRewrite") {
        return Err(invalid(
            field,
            "May specify either httpRouteFilterRequestRedirect or httpRouteFilterRequestRewrite, but not both",
        ));
    }
    Ok(())
}

fn validate_filter(field: &str, f: &HttpRouteFilter) -> Result<(), InvalidRoute> {
    // Each type has its field, and only that one is set (the CRD's CEL rules).
    let fields: [(&str, FilterType, bool); 8] = [
        (
            "requestHeaderModifier",
            FilterType::RequestHeaderModifier,
            f.request_header_modifier.is_some(),
        ),
        (
            "responseHeaderModifier",
            FilterType::ResponseHeaderModifier,
            f.response_header_modifier.is_some(),
        ),
        (
            "requestRedirect",
            FilterType::RequestRedirect,
            f.request_redirect.is_some(),
        ),
        (
            "urlRewrite",
            FilterType::UrlRewrite,
            f.url_rewrite.is_some(),
        ),
        (
            "requestMirror",
            FilterType::RequestMirror,
            f.request_mirror.is_some(),
        ),
        (
            "extensionRef",
            FilterType::ExtensionRef,
            f.extension_ref.is_some(),
        ),
        ("cors", FilterType::Cors, f.cors.is_some()),
        (
            "externalAuth",
            FilterType::ExternalAuth,
            f.external_auth.is_some(),
        ),
    ];
    if let FilterType::Other(t) = &f.type_ {
        return Err(invalid(
            format!("{field}.type"),
            format!(
                "{t:?} is not a Gateway API filter type (wasmesh supports {SUPPORTED_FILTERS})"
            ),
        ));
    }
    for (name, ty, set) in &fields {
        let wanted = *ty == f.type_;
        if wanted && !set {
            return Err(invalid(
                format!("{field}.{name}"),
                format!("must be specified for {} filter.type", ty.as_str()),
            ));
        }
        if !wanted && *set {
            return Err(invalid(
                format!("{field}.{name}"),
                format!("must be nil if the filter.type is not {}", ty.as_str()),
            ));
        }
    }
    match &f.type_ {
        FilterType::RequestHeaderModifier => validate_header_modifier(
            &format!("{field}.requestHeaderModifier"),
            f.request_header_modifier.as_ref(),
        ),
        FilterType::ResponseHeaderModifier => validate_header_modifier(
            &format!("{field}.responseHeaderModifier"),
            f.response_header_modifier.as_ref(),
        ),
        FilterType::RequestRedirect => validate_redirect(
            &format!("{field}.requestRedirect"),
            f.request_redirect.as_ref(),
        ),
        FilterType::UrlRewrite => {
            let f2 = format!("{field}.urlRewrite");
            let Some(r) = &f.url_rewrite else {
                return Ok(());
            };
            if let Some(h) = &r.hostname {
                check_subdomain(&format!("{f2}.hostname"), h)?;
            }
            validate_path_modifier(&format!("{f2}.path"), r.path.as_ref())
        }
        other => Err(invalid(
            format!("{field}.type"),
            format!(
                "{} is not supported by wasmesh (it supports {SUPPORTED_FILTERS})",
                other.as_str()
            ),
        )),
    }
}

fn validate_header_modifier(field: &str, m: Option<&HeaderModifier>) -> Result<(), InvalidRoute> {
    let Some(m) = m else { return Ok(()) };
    for (list, what) in [(&m.set, "set"), (&m.add, "add")] {
        if list.len() > MAX_NAMED {
            return Err(invalid(
                format!("{field}.{what}"),
                format!("at most {MAX_NAMED} headers are allowed"),
            ));
        }
        let mut seen = BTreeSet::new();
        for (i, h) in list.iter().enumerate() {
            let f = format!("{field}.{what}[{i}]");
            check_token(&format!("{f}.name"), &h.name)?;
            if !seen.insert(h.name.to_ascii_lowercase()) {
                return Err(invalid(
                    format!("{f}.name"),
                    format!("{:?} is listed twice", h.name),
                ));
            }
            if h.value.len() > 4096 {
                return Err(invalid(format!("{f}.value"), "longer than 4096 characters"));
            }
        }
    }
    if m.remove.len() > MAX_NAMED {
        return Err(invalid(
            format!("{field}.remove"),
            format!("at most {MAX_NAMED} headers are allowed"),
        ));
    }
    let mut seen = BTreeSet::new();
    for (i, name) in m.remove.iter().enumerate() {
        let f = format!("{field}.remove[{i}]");
        check_token(&f, name)?;
        if !seen.insert(name.to_ascii_lowercase()) {
            return Err(invalid(f, format!("{name:?} is listed twice")));
        }
    }
    Ok(())
}

fn validate_redirect(field: &str, r: Option<&RequestRedirect>) -> Result<(), InvalidRoute> {
    let Some(r) = r else { return Ok(()) };
    if let Some(s) = &r.scheme
        && s != "http"
        && s != "https"
    {
        return Err(invalid(
            format!("{field}.scheme"),
            format!("{s:?} is not http or https"),
        ));
    }
    if let Some(h) = &r.hostname {
        check_subdomain(&format!("{field}.hostname"), h)?;
    }
    if let Some(p) = r.port
        && !(1..=65535).contains(&p)
    {
        return Err(invalid(
            format!("{field}.port"),
            format!("{p} is not a valid port (1-65535)"),
        ));
    }
    let status = r.status_code.unwrap_or(DEFAULT_REDIRECT_STATUS);
    if status != 301 && status != 302 {
        return Err(invalid(
            format!("{field}.statusCode"),
            format!("{status} is not 301 or 302"),
        ));
    }
    validate_path_modifier(&format!("{field}.path"), r.path.as_ref())
}

fn validate_path_modifier(field: &str, p: Option<&PathModifier>) -> Result<(), InvalidRoute> {
    let Some(p) = p else { return Ok(()) };
    let (full, prefix) = (
        p.replace_full_path.is_some(),
        p.replace_prefix_match.is_some(),
    );
    match &p.type_ {
        PathModifierType::ReplaceFullPath if !full => Err(invalid(
            format!("{field}.replaceFullPath"),
            "must be specified when type is set to 'ReplaceFullPath'",
        )),
        PathModifierType::ReplacePrefixMatch if !prefix => Err(invalid(
            format!("{field}.replacePrefixMatch"),
            "must be specified when type is set to 'ReplacePrefixMatch'",
        )),
        PathModifierType::ReplaceFullPath if prefix => Err(invalid(
            format!("{field}.type"),
            "type must be 'ReplacePrefixMatch' when replacePrefixMatch is set",
        )),
        PathModifierType::ReplacePrefixMatch if full => Err(invalid(
            format!("{field}.type"),
            "type must be 'ReplaceFullPath' when replaceFullPath is set",
        )),
        PathModifierType::Other(t) => Err(invalid(
            format!("{field}.type"),
            format!("{t:?} is not ReplaceFullPath or ReplacePrefixMatch"),
        )),
        _ => {
            let value = p
                .replace_full_path
                .as_deref()
                .or(p.replace_prefix_match.as_deref())
                .unwrap_or("");
            if value.len() > 1024 {
                return Err(invalid(field, "longer than 1024 characters"));
            }
            Ok(())
        }
    }
}

fn validate_backend(field: &str, b: &HttpBackendRef) -> Result<(), InvalidRoute> {
    if b.name.is_empty() {
        return Err(invalid(format!("{field}.name"), "is required"));
    }
    if let Some(ns) = &b.namespace {
        check_subdomain(&format!("{field}.namespace"), ns)?;
    }
    match b.port {
        Some(p) if !(1..=65535).contains(&p) => {
            return Err(invalid(
                format!("{field}.port"),
                format!("{p} is not a valid port (1-65535)"),
            ));
        }
        None if b.is_service() => {
            return Err(invalid(
                format!("{field}.port"),
                "Must have port for Service reference",
            ));
        }
        _ => {}
    }
    let weight = b.weight();
    if !(0..=MAX_WEIGHT).contains(&weight) {
        return Err(invalid(
            format!("{field}.weight"),
            format!("{weight} is not between 0 and {MAX_WEIGHT}"),
        ));
    }
    validate_filters(&format!("{field}.filters"), &b.filters, true)
}

/// Exact and PathPrefix values: an absolute, normalised path (the CRD's CEL rules).
fn check_path(field: &str, value: &str) -> Result<(), InvalidRoute> {
    let fail = |why: &str| Err(invalid(field, format!("{value:?} {why}")));
    if !value.starts_with('/') {
        return fail("must be an absolute path and start with '/'");
    }
    for bad in ["//", "/./", "/../", "%2f", "%2F", "#"] {
        if value.contains(bad) {
            return fail(&format!("must not contain '{bad}'"));
        }
    }
    for bad in ["/..", "/."] {
        if value.ends_with(bad) {
            return fail(&format!("must not end with '{bad}'"));
        }
    }
    let bytes = value.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        if c == b'%' {
            let hex = bytes.get(i + 1..i + 3);
            if !hex.is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit)) {
                return fail("has a '%' not followed by two hex digits");
            }
            i += 3;
            continue;
        }
        if !(c.is_ascii_alphanumeric() || b"-/._~!$&'()*+,;=:@".contains(&c)) {
            return fail(&format!(
                "must not contain {:?} (only URL path characters are allowed)",
                c as char
            ));
        }
        i += 1;
    }
    Ok(())
}

/// A regular expression the proxy can compile (the `regex` crate's syntax).
fn check_regex(field: &str, value: &str) -> Result<(), InvalidRoute> {
    regex::Regex::new(value).map(drop).map_err(|e| {
        // The crate's message ends with a line "error: <what>".
        let text = e.to_string();
        let last = text.lines().last().unwrap_or_default().trim();
        let why = last.strip_prefix("error: ").unwrap_or(last);
        invalid(
            field,
            format!("{value:?} is not a valid regular expression: {why}"),
        )
    })
}

/// An HTTP header name (RFC 7230 token), as the CRD's pattern has it.
fn check_token(field: &str, name: &str) -> Result<(), InvalidRoute> {
    let ok = !name.is_empty()
        && name.len() <= 256
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c));
    if ok {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!("{name:?} is not a valid HTTP header name"),
        ))
    }
}

/// A lower-case DNS subdomain: rule names, section names, hostnames, namespaces.
fn check_subdomain(field: &str, s: &str) -> Result<(), InvalidRoute> {
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if !s.is_empty() && s.len() <= 253 && s.split('.').all(label_ok) {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!("{s:?} is not a valid name (lower-case letters, digits, '-' and '.')"),
        ))
    }
}
