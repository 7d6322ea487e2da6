//! Manifests → objects: splitting multi-document YAML, recognising kinds, and the defaults the
//! API server would have filled in (so the model sees the same objects from a folder as from a
//! cluster).

use std::collections::BTreeSet;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::Value;

use crate::source::authz::{self, AuthorizationPolicy};
use crate::source::httproute::{self, HttpRoute};
use crate::source::wasmplugin::{self, WasmPlugin};
use crate::source::{Kind, Object, ObjectKey};

/// One document of a file.
#[derive(Debug, Clone, PartialEq)]
pub struct Document {
    /// 1-based, counting non-empty documents.
    pub index: usize,
    /// 1-based line where the document starts.
    pub line: usize,
    pub outcome: Outcome,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Objects control reads (more than one for a `List`).
    Objects(Vec<Object>),
    /// A kind control has no use for (Deployment, Namespace, …).
    Skipped(String),
    /// Unusable; `object` is known when the document named itself.
    Invalid {
        object: Option<ObjectKey>,
        reason: String,
    },
}

/// Splits on `---` separator lines and parses every non-empty document.
pub fn parse_file(text: &str) -> Vec<Document> {
    let mut docs = Vec::new();
    let mut start_line = 1;
    let mut current = String::new();
    let mut index = 0;
    let mut flush = |body: &str, line: usize, docs: &mut Vec<Document>| {
        if body
            .lines()
            .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'))
        {
            return;
        }
        index += 1;
        // Point at the document's first line of content, not at blank lines or comments.
        let skip = body
            .lines()
            .take_while(|l| l.trim().is_empty() || l.trim_start().starts_with('#'))
            .count();
        docs.push(Document {
            index,
            line: line + skip,
            outcome: parse_document(body),
        });
    };
    for (n, line) in text.lines().enumerate() {
        let trimmed = line.trim_end();
        if trimmed == "---" || trimmed.starts_with("--- ") || trimmed.starts_with("---#") {
            flush(&current, start_line, &mut docs);
            current.clear();
            start_line = n + 2;
        } else {
            current.push_str(line);
            current.push('\n');
        }
    }
    flush(&current, start_line, &mut docs);
    docs
}

fn parse_document(body: &str) -> Outcome {
    let value: Value = match serde_saphyr::from_str(body) {
        Ok(v) => v,
        Err(e) => {
            return Outcome::Invalid {
                object: None,
                reason: format!("not valid YAML: {}", first_line(&e.to_string())),
            };
        }
    };
    match objects_from_value(value) {
        Ok(Some(objs)) => Outcome::Objects(objs),
        Ok(None) => Outcome::Skipped(String::new()),
        Err((object, reason)) => Outcome::Invalid { object, reason },
    }
    .with_skipped_kind(body)
}

impl Outcome {
    fn with_skipped_kind(self, body: &str) -> Outcome {
        match self {
            Outcome::Skipped(_) => {
                let kind = body
                    .lines()
                    .find_map(|l| l.strip_prefix("kind:"))
                    .map(|k| k.trim().trim_matches('"').to_string())
                    .unwrap_or_default();
                Outcome::Skipped(kind)
            }
            other => other,
        }
    }
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or(s).trim().to_string()
}

type ParseError = (Option<ObjectKey>, String);

/// One manifest (parsed YAML or JSON) → the objects control reads from it, with the API
/// server's defaults and validation; `Ok(None)` for a kind control does not read. For tools
/// that hand manifests to control (the local mesh).
pub fn objects_from_manifest(value: Value) -> Result<Option<Vec<Object>>, String> {
    objects_from_value(value).map_err(|(_, reason)| reason)
}

/// `Ok(None)`: a kind control does not read.
fn objects_from_value(value: Value) -> Result<Option<Vec<Object>>, ParseError> {
    let Value::Object(map) = &value else {
        return Err((
            None,
            "a manifest must be a mapping with apiVersion and kind".into(),
        ));
    };
    let api_version = map.get("apiVersion").and_then(Value::as_str).unwrap_or("");
    let Some(kind_name) = map.get("kind").and_then(Value::as_str) else {
        return Err((None, "missing `kind`".into()));
    };
    let kind = match (api_version, kind_name) {
        ("v1", "Service") => Kind::Service,
        ("discovery.k8s.io/v1", "EndpointSlice") => Kind::EndpointSlice,
        ("v1", "Pod") => Kind::Pod,
        ("v1", "Node") => Kind::Node,
        (v, httproute::KIND) if httproute::API_VERSIONS.contains(&v) => Kind::HttpRoute,
        (wasmplugin::API_VERSION, wasmplugin::KIND) => Kind::WasmPlugin,
        (authz::API_VERSION, authz::KIND) => Kind::AuthorizationPolicy,
        ("v1", "List") | (_, "List") => {
            let mut out = Vec::new();
            let items = map.get("items").and_then(Value::as_array).cloned();
            for item in items.unwrap_or_default() {
                if let Some(objs) = objects_from_value(item)? {
                    out.extend(objs);
                }
            }
            return Ok(Some(out));
        }
        (_, wasmplugin::KIND | authz::KIND) if api_version.starts_with("wasmesh.io/") => {
            return Err((
                None,
                format!(
                    "{kind_name} with apiVersion `{api_version}`: control reads {} {kind_name}",
                    wasmplugin::API_VERSION
                ),
            ));
        }
        (_, "Service" | "EndpointSlice" | "Pod" | "Node" | httproute::KIND) => {
            return Err((
                None,
                format!(
                    "{kind_name} with apiVersion `{api_version}`: control reads v1 Service/Pod/Node, discovery.k8s.io/v1 EndpointSlice and gateway.networking.k8s.io/v1 (or v1beta1) HTTPRoute"
                ),
            ));
        }
        _ => return Ok(None),
    };
    let meta = map.get("metadata");
    for field in ["name", "namespace"] {
        if let Some(v) = meta.and_then(|m| m.get(field))
            && !v.is_string()
        {
            return Err((
                None,
                format!("{kind_name}: metadata.{field} must be a string, not {v} (quote it)"),
            ));
        }
    }
    let name = meta
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let namespace = match kind {
        Kind::Node => String::new(),
        _ => meta
            .and_then(|m| m.get("namespace"))
            .and_then(Value::as_str)
            .unwrap_or("default")
            .to_string(),
    };
    let key = ObjectKey {
        kind,
        namespace: namespace.clone(),
        name: name.clone(),
    };
    if name.is_empty() {
        return Err((None, format!("{kind_name} without metadata.name")));
    }
    let typed = |e: serde_json::Error| (Some(key.clone()), format!("{key}: {e}"));
    let mut obj = match kind {
        Kind::Service => Object::Service(serde_json::from_value::<Service>(value).map_err(typed)?),
        Kind::EndpointSlice => {
            Object::EndpointSlice(serde_json::from_value::<EndpointSlice>(value).map_err(typed)?)
        }
        Kind::Pod => Object::Pod(serde_json::from_value::<Pod>(value).map_err(typed)?),
        Kind::Node => Object::Node(serde_json::from_value::<Node>(value).map_err(typed)?),
        Kind::HttpRoute => {
            Object::HttpRoute(serde_json::from_value::<HttpRoute>(value).map_err(typed)?)
        }
        Kind::WasmPlugin => {
            Object::WasmPlugin(serde_json::from_value::<WasmPlugin>(value).map_err(typed)?)
        }
        Kind::AuthorizationPolicy => Object::AuthorizationPolicy(
            serde_json::from_value::<AuthorizationPolicy>(value).map_err(typed)?,
        ),
    };
    if kind != Kind::Node {
        obj.meta_mut().namespace = Some(namespace);
    }
    obj.trim();
    default_and_validate(&mut obj)
        .map_err(|reason| (Some(key.clone()), format!("{key}: {reason}")))?;
    Ok(Some(vec![obj]))
}

fn valid_port(p: i32) -> bool {
    (1..=65535).contains(&p)
}

/// The API server's defaulting and the validation it would have refused the object with.
pub fn default_and_validate(obj: &mut Object) -> Result<(), String> {
    match obj {
        Object::Service(svc) => default_service(svc),
        Object::EndpointSlice(slice) => default_slice(slice),
        Object::Pod(pod) => {
            if let Some(ip) = pod.status.as_ref().and_then(|s| s.pod_ip.as_ref())
                && ip.parse::<IpAddr>().is_err()
            {
                return Err(format!("status.podIP {ip:?} is not an IP address"));
            }
            Ok(())
        }
        Object::Node(_) => Ok(()),
        Object::HttpRoute(route) => {
            httproute::default_and_validate(route).map_err(|e| e.to_string())
        }
        Object::WasmPlugin(plugin) => {
            wasmplugin::default_and_validate(plugin).map_err(|e| e.to_string())
        }
        Object::AuthorizationPolicy(policy) => authz::validate(policy).map_err(|e| e.to_string()),
    }
}

fn default_service(svc: &mut Service) -> Result<(), String> {
    let spec = svc.spec.get_or_insert_with(Default::default);
    let ty = spec.type_.get_or_insert_with(|| "ClusterIP".into()).clone();
    if !matches!(
        ty.as_str(),
        "ClusterIP" | "NodePort" | "LoadBalancer" | "ExternalName"
    ) {
        return Err(format!(
            "spec.type {ty:?} is not one of ClusterIP, NodePort, LoadBalancer, ExternalName"
        ));
    }
    if ty == "ExternalName" {
        if spec.external_name.as_deref().unwrap_or("").is_empty() {
            return Err("type ExternalName needs spec.externalName".into());
        }
    } else {
        spec.internal_traffic_policy
            .get_or_insert_with(|| "Cluster".into());
    }
    if matches!(ty.as_str(), "NodePort" | "LoadBalancer") {
        spec.external_traffic_policy
            .get_or_insert_with(|| "Cluster".into());
    }
    for (field, value) in [
        ("internalTrafficPolicy", &spec.internal_traffic_policy),
        ("externalTrafficPolicy", &spec.external_traffic_policy),
    ] {
        if let Some(v) = value
            && v != "Cluster"
            && v != "Local"
        {
            return Err(format!("spec.{field} {v:?} is not Cluster or Local"));
        }
    }
    let ports = spec.ports.get_or_insert_with(Vec::new);
    if ports.is_empty() && ty != "ExternalName" && spec.cluster_ip.as_deref() != Some("None") {
        return Err(
            "spec.ports is empty (only headless and ExternalName Services may omit ports)".into(),
        );
    }
    let mut names = BTreeSet::new();
    let many = ports.len() > 1;
    for (i, p) in ports.iter_mut().enumerate() {
        let proto = p.protocol.get_or_insert_with(|| "TCP".into());
        if !matches!(proto.as_str(), "TCP" | "UDP" | "SCTP") {
            return Err(format!(
                "spec.ports[{i}].protocol {proto:?} is not TCP, UDP or SCTP"
            ));
        }
        if !valid_port(p.port) {
            return Err(format!(
                "spec.ports[{i}].port {} is not a valid port (1-65535)",
                p.port
            ));
        }
        if p.target_port.is_none() {
            p.target_port =
                Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(p.port));
        }
        let name = p.name.clone().unwrap_or_default();
        if many && name.is_empty() {
            return Err(format!(
                "spec.ports[{i}] needs a name: a Service with several ports must name each"
            ));
        }
        if !names.insert((name.clone(), proto.clone())) {
            return Err(format!("spec.ports[{i}]: port name {name:?} is used twice"));
        }
        if let Some(np) = p.node_port
            && np != 0
            && !valid_port(np)
        {
            return Err(format!("spec.ports[{i}].nodePort {np} is not a valid port"));
        }
    }
    let affinity = spec
        .session_affinity
        .get_or_insert_with(|| "None".into())
        .clone();
    match affinity.as_str() {
        "None" => {}
        "ClientIP" => {
            let cfg = spec
                .session_affinity_config
                .get_or_insert_with(Default::default);
            let cip = cfg.client_ip.get_or_insert_with(Default::default);
            let t = *cip.timeout_seconds.get_or_insert(10800);
            if !(1..=86400).contains(&t) {
                return Err(format!(
                    "sessionAffinityConfig.clientIP.timeoutSeconds {t} must be between 1 and 86400"
                ));
            }
        }
        other => {
            return Err(format!(
                "spec.sessionAffinity {other:?} is not None or ClientIP"
            ));
        }
    }
    for ip in spec
        .cluster_ips
        .iter()
        .flatten()
        .chain(spec.cluster_ip.iter())
    {
        if ip != "None" && !ip.is_empty() && ip.parse::<IpAddr>().is_err() {
            return Err(format!("clusterIP {ip:?} is not an IP address or \"None\""));
        }
    }
    for ip in spec.external_ips.iter().flatten() {
        if ip.parse::<IpAddr>().is_err() {
            return Err(format!("externalIPs entry {ip:?} is not an IP address"));
        }
    }
    if let (Some(ip), None) = (&spec.cluster_ip, &spec.cluster_ips) {
        spec.cluster_ips = Some(vec![ip.clone()]);
    }
    Ok(())
}

fn default_slice(slice: &mut EndpointSlice) -> Result<(), String> {
    let v6 = match slice.address_type.as_str() {
        "IPv4" => Some(false),
        "IPv6" => Some(true),
        "FQDN" => None,
        other => return Err(format!("addressType {other:?} is not IPv4, IPv6 or FQDN")),
    };
    for (i, p) in slice.ports.iter_mut().flatten().enumerate() {
        p.name.get_or_insert_with(String::new);
        let proto = p.protocol.get_or_insert_with(|| "TCP".into());
        if !matches!(proto.as_str(), "TCP" | "UDP" | "SCTP") {
            return Err(format!(
                "ports[{i}].protocol {proto:?} is not TCP, UDP or SCTP"
            ));
        }
        if let Some(n) = p.port
            && !valid_port(n)
        {
            return Err(format!("ports[{i}].port {n} is not a valid port (1-65535)"));
        }
    }
    for (i, ep) in slice.endpoints.iter().enumerate() {
        if ep.addresses.is_empty() {
            return Err(format!("endpoints[{i}].addresses is empty"));
        }
        if let Some(v6) = v6 {
            for a in &ep.addresses {
                match a.parse::<IpAddr>() {
                    Ok(ip) if ip.is_ipv6() == v6 => {}
                    _ => {
                        return Err(format!(
                            "endpoints[{i}] address {a:?} is not an {} address",
                            slice.address_type
                        ));
                    }
                }
            }
        }
    }
    Ok(())
}
