//! Which WasmPlugins run in this sidecar, and on which requests: pure functions over the
//! plugins control streams and this pod's namespace and labels.

use std::collections::BTreeMap;

use wasmesh_api::discovery as pb;

/// The side of the pod a request is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Requests the app sends (Istio's CLIENT).
    Outbound,
    /// Requests the app receives (SERVER).
    Inbound,
}

/// Who this sidecar serves.
#[derive(Debug, Clone, Default)]
pub struct Me {
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
}

/// Whether a plugin applies to this pod at all: its namespace (or mesh-wide) and its selector.
pub fn applies(p: &pb::WasmPlugin, me: &Me) -> bool {
    (p.mesh_wide || p.namespace == me.namespace)
        && p.selector.iter().all(|(k, v)| me.labels.get(k) == Some(v))
}

/// Whether a plugin that applies to this pod runs on a request: its `match` (side and port) and
/// its `targetRefs` (the Service the request is for; `service` is `(namespace, name)`, None on
/// the inbound side when no Service is known).
pub fn runs_on(
    p: &pb::WasmPlugin,
    direction: Direction,
    port: u16,
    service: Option<(&str, &str)>,
) -> bool {
    let side_ok = p.r#match.is_empty()
        || p.r#match.iter().any(|m| {
            let side = match m.mode() {
                pb::traffic_selector::Mode::ClientAndServer => true,
                pb::traffic_selector::Mode::Client => direction == Direction::Outbound,
                pb::traffic_selector::Mode::Server => direction == Direction::Inbound,
            };
            side && (m.ports.is_empty() || m.ports.contains(&u32::from(port)))
        });
    let target_ok = p.target_services.is_empty()
        || service.is_some_and(|(ns, name)| {
            ns == p.namespace && p.target_services.iter().any(|t| t == name)
        });
    side_ok && target_ok
}

/// Reads a downward API labels file (`key="value"` per line, Go-quoted values).
pub fn parse_labels_file(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|line| {
            let (k, v) = line.split_once('=')?;
            let v = v.trim();
            let v = v
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .unwrap_or(v);
            Some((k.trim().to_string(), unquote(v)))
        })
        .filter(|(k, _)| !k.is_empty())
        .collect()
}

fn unquote(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some('n') => out.push('\n'),
                Some('t') => out.push('\t'),
                Some(other) => out.push(other),
                None => out.push('\\'),
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// `k=v,k2=v2` (the `--pod-labels` flag).
pub fn parse_labels_flag(s: &str) -> BTreeMap<String, String> {
    s.split(',')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .filter(|(k, _)| !k.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plugin(ns: &str, selector: &[(&str, &str)]) -> pb::WasmPlugin {
        pb::WasmPlugin {
            namespace: ns.into(),
            name: "p".into(),
            selector: selector
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        }
    }

    fn me(ns: &str, labels: &[(&str, &str)]) -> Me {
        Me {
            namespace: ns.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn namespace_and_selector() {
        let web = me("demo", &[("app", "web"), ("track", "stable")]);
        assert!(applies(&plugin("demo", &[]), &web));
        assert!(applies(&plugin("demo", &[("app", "web")]), &web));
        assert!(!applies(&plugin("demo", &[("app", "db")]), &web));
        assert!(!applies(&plugin("other", &[]), &web));
        let mut global = plugin("wasmesh-system", &[("app", "web")]);
        global.mesh_wide = true;
        assert!(applies(&global, &web));
    }

    #[test]
    fn sides_ports_and_targets() {
        let mut p = plugin("demo", &[]);
        assert!(runs_on(&p, Direction::Inbound, 8080, None));
        p.r#match = vec![pb::TrafficSelector {
            mode: pb::traffic_selector::Mode::Client as i32,
            ports: vec![80],
        }];
        assert!(runs_on(&p, Direction::Outbound, 80, Some(("demo", "web"))));
        assert!(!runs_on(&p, Direction::Outbound, 81, Some(("demo", "web"))));
        assert!(!runs_on(&p, Direction::Inbound, 80, None));
        p.r#match.clear();
        p.target_services = vec!["web".into()];
        assert!(runs_on(&p, Direction::Outbound, 80, Some(("demo", "web"))));
        assert!(!runs_on(&p, Direction::Outbound, 80, Some(("demo", "db"))));
        assert!(!runs_on(
            &p,
            Direction::Outbound,
            80,
            Some(("other", "web"))
        ));
        assert!(!runs_on(&p, Direction::Inbound, 80, None));
    }

    #[test]
    fn labels_from_the_downward_api_and_the_flag() {
        let file = "app=\"web\"\npod-template-hash=\"5d8f\"\nquote=\"a\\\"b\"\n";
        let l = parse_labels_file(file);
        assert_eq!(l["app"], "web");
        assert_eq!(l["pod-template-hash"], "5d8f");
        assert_eq!(l["quote"], "a\"b");
        let f = parse_labels_flag("app=web, version=v2");
        assert_eq!(f["version"], "v2");
    }
}
