//! How `wasmesh-control table` prints the table: a kubectl-like summary, YAML or JSON.

use std::fmt::Write;

use serde::Serialize;

use crate::model::{Model, NodeEntry, PluginEntry, PolicyEntry, ServicePortEntry};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Text,
    Yaml,
    Json,
}

impl std::str::FromStr for Format {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "text" | "wide" => Ok(Format::Text),
            "yaml" => Ok(Format::Yaml),
            "json" => Ok(Format::Json),
            _ => Err(format!("unknown output {s:?}: use text, yaml or json")),
        }
    }
}

/// What is printed.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TableView<'a> {
    pub service_ports: Vec<&'a ServicePortEntry>,
    pub nodes: Vec<&'a NodeEntry>,
    /// WasmPlugins (the module's sha256 and size, never its bytes).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub wasm_plugins: Vec<&'a PluginEntry>,
    /// AuthorizationPolicies (of the namespace, with one; none with a Service: they select
    /// pods, not Services).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub authorization_policies: Vec<&'a PolicyEntry>,
}

/// Selects the entries to print: all, a namespace, or one Service. With a namespace, the
/// plugins that can apply there (its own and the mesh-wide ones); with a Service, those of
/// them that do not target other Services only.
pub fn select<'a>(
    model: &'a Model,
    namespace: Option<&str>,
    service: Option<&str>,
) -> TableView<'a> {
    TableView {
        service_ports: model
            .entries()
            .values()
            .map(|e| e.as_ref())
            .filter(|e| namespace.is_none_or(|ns| e.key.namespace == ns))
            .filter(|e| service.is_none_or(|s| e.key.service == s))
            .collect(),
        nodes: if service.is_some() {
            Vec::new()
        } else {
            model.nodes().values().map(|n| n.as_ref()).collect()
        },
        wasm_plugins: model
            .plugins()
            .values()
            .map(|p| p.as_ref())
            .filter(|p| namespace.is_none_or(|ns| p.mesh_wide || p.namespace == ns))
            .filter(|p| {
                service.is_none_or(|s| {
                    p.target_services.is_empty()
                        || (namespace.is_none_or(|ns| p.namespace == ns)
                            && p.target_services.iter().any(|t| t == s))
                })
            })
            .collect(),
        authorization_policies: if service.is_some() {
            Vec::new()
        } else {
            model
                .policies()
                .values()
                .map(|p| p.as_ref())
                .filter(|p| namespace.is_none_or(|ns| p.namespace == ns))
                .collect()
        },
    }
}

pub fn render(view: &TableView<'_>, format: Format) -> Result<String, String> {
    match format {
        Format::Json => serde_json::to_string_pretty(view)
            .map(|s| s + "\n")
            .map_err(|e| e.to_string()),
        Format::Yaml => serde_saphyr::to_string(view).map_err(|e| e.to_string()),
        Format::Text => Ok(text(view)),
    }
}

fn text(view: &TableView<'_>) -> String {
    let mut rows = vec![[
        "NAMESPACE".to_string(),
        "SERVICE".into(),
        "PORT".into(),
        "TYPE".into(),
        "VIRTUAL IPS".into(),
        "ENDPOINTS".into(),
        "READY".into(),
    ]];
    for e in &view.service_ports {
        let proto = e.key.protocol.as_str();
        let port = if e.key.port_name.is_empty() {
            format!("{}/{proto}", e.port)
        } else {
            format!("{}:{}/{proto}", e.key.port_name, e.port)
        };
        let vips = if let Some(name) = &e.external_name {
            format!("-> {name}")
        } else if e.headless {
            "None (headless)".into()
        } else {
            e.cluster_ips
                .iter()
                .chain(&e.external_ips)
                .chain(&e.load_balancer_ips)
                .map(|ip| ip.to_string())
                .collect::<Vec<_>>()
                .join(",")
        };
        let eps = if e.endpoints.is_empty() {
            "<none>".to_string()
        } else {
            let mut s = String::new();
            for (i, ep) in e.endpoints.iter().enumerate() {
                if i == 3 {
                    let _ = write!(s, " + {} more", e.endpoints.len() - 3);
                    break;
                }
                if i > 0 {
                    s.push(',');
                }
                if ep.address.is_ipv6() {
                    let _ = write!(s, "[{}]:{}", ep.address, ep.port);
                } else {
                    let _ = write!(s, "{}:{}", ep.address, ep.port);
                }
            }
            s
        };
        let ready = e.endpoints.iter().filter(|ep| ep.ready).count();
        let terminating = e.endpoints.iter().filter(|ep| ep.terminating).count();
        let ready_col = if terminating > 0 {
            format!("{ready}/{} ({terminating} terminating)", e.endpoints.len())
        } else {
            format!("{ready}/{}", e.endpoints.len())
        };
        rows.push([
            e.key.namespace.clone(),
            e.key.service.clone(),
            port,
            format!("{:?}", e.service_type),
            vips,
            eps,
            ready_col,
        ]);
    }
    let widths: Vec<usize> = (0..7)
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in &rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        let _ = writeln!(out, "{}", line.join("   ").trim_end());
    }
    let routed: Vec<&&ServicePortEntry> = view
        .service_ports
        .iter()
        .filter(|e| !e.http_routes.is_empty())
        .collect();
    if !routed.is_empty() {
        let _ = writeln!(out);
        for e in routed {
            let names: Vec<String> = e
                .http_routes
                .iter()
                .map(|r| format!("{}/{}", r.namespace, r.name))
                .collect();
            let _ = writeln!(out, "HTTPRoutes on {}: {}", e.key, names.join(", "));
        }
    }
    if !view.wasm_plugins.is_empty() {
        let _ = writeln!(out);
        for p in &view.wasm_plugins {
            let _ = write!(
                out,
                "WasmPlugin {}/{}  phase={} priority={} {}  sha256={} size={}",
                p.namespace,
                p.name,
                p.phase,
                p.priority,
                p.fail_strategy,
                &p.sha256[..p.sha256.len().min(12)],
                p.module_size
            );
            if p.mesh_wide {
                let _ = write!(out, "  mesh-wide");
            }
            if !p.selector.is_empty() {
                let labels: Vec<String> =
                    p.selector.iter().map(|(k, v)| format!("{k}={v}")).collect();
                let _ = write!(out, "  selector={}", labels.join(","));
            }
            if !p.target_services.is_empty() {
                let _ = write!(out, "  services={}", p.target_services.join(","));
            }
            let _ = writeln!(out);
        }
    }
    if !view.authorization_policies.is_empty() {
        let _ = writeln!(out);
        for p in &view.authorization_policies {
            let _ = write!(out, "AuthorizationPolicy {}/{}", p.namespace, p.name);
            let labels: Vec<String> = p
                .spec
                .selector
                .iter()
                .flat_map(|s| &s.match_labels)
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            if !labels.is_empty() {
                let _ = write!(out, "  selector={}", labels.join(","));
            }
            if let Some(m) = &p.spec.mtls {
                let _ = write!(out, "  mtls={m}");
            }
            match &p.spec.rules {
                None => {}
                Some(rules) if rules.is_empty() => {
                    let _ = write!(out, "  rules=<deny all>");
                }
                Some(rules) => {
                    let _ = write!(out, "  rules={}", rules.len());
                }
            }
            let _ = writeln!(out);
        }
    }
    if !view.nodes.is_empty() {
        let _ = writeln!(out);
        for n in &view.nodes {
            let addrs: Vec<String> = n.addresses.iter().map(|a| a.to_string()).collect();
            let _ = writeln!(
                out,
                "node {}  zone={}  addresses={}",
                n.name,
                n.zone.as_deref().unwrap_or("<none>"),
                addrs.join(",")
            );
        }
    }
    out
}
