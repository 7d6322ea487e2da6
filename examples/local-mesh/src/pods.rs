//! A pod, from its definition to what runs and what control sees. Pure.
//!
//! - [`agent_spec`]: the containers' commands and environments (the downward API's POD_NAME,
//!   POD_NAMESPACE, POD_IP, NODE_NAME always; the container's `env` with `value` or
//!   `valueFrom.fieldRef`; `$(VAR)` references expanded as the kubelet does), whether and how
//!   the sidecar runs, the ports whose readiness is probed, the grace period.
//! - [`pod_object`]: the Pod as the API server would show it to control: `status.podIP`,
//!   `spec.nodeName`, `serviceAccountName`, and `wasmesh.io/injected` when the sidecar runs, so
//!   its endpoints count as meshed.
//! - [`node_object`]: the Node.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::core::v1::{
    Container, Node, NodeAddress, NodeStatus, Pod, PodCondition, PodIP, PodSpec, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};

use crate::agent::{AgentSpec, ContainerSpec, RestartPolicy, SidecarSpec};
use crate::config::{MeshConfig, NODE_IP, NODE_NAME, PROXY_UID, SidecarExec, ZONE};
use crate::manifests::NsName;

/// Opt out (`"false"`) of the sidecar, as with the injector (label or annotation).
pub const INJECT: &str = "wasmesh.io/inject";
/// `strict`: the pod's sidecar refuses plaintext inbound connections (mTLS only).
pub const MTLS_MODE: &str = "wasmesh.io/mtls";
/// What the injector writes on pods with the sidecar; control reads it as "meshed".
pub const INJECTED: &str = "wasmesh.io/injected";
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// The injector's traffic annotations and the `wasmesh-proxy init` flag each becomes.
pub const TRAFFIC_ANNOTATIONS: [(&str, &str); 5] = [
    (
        "traffic.wasmesh.io/exclude-inbound-ports",
        "--exclude-inbound-ports",
    ),
    (
        "traffic.wasmesh.io/exclude-outbound-ports",
        "--exclude-outbound-ports",
    ),
    (
        "traffic.wasmesh.io/exclude-outbound-ip-ranges",
        "--exclude-outbound-cidrs",
    ),
    (
        "traffic.wasmesh.io/include-outbound-ip-ranges",
        "--include-outbound-cidrs",
    ),
    (
        "traffic.wasmesh.io/include-inbound-ports",
        "--include-inbound-ports",
    ),
];

/// Facts about a running pod that its definition does not hold.
#[derive(Debug, Clone)]
pub struct Placement<'a> {
    pub key: &'a NsName,
    pub uid: &'a str,
    pub ip: Ipv4Addr,
    pub node: &'a str,
    pub log_dir: PathBuf,
    /// `PATH` for the containers and the sidecar.
    pub path: &'a str,
}

/// Whether the pod gets the sidecar: on unless the mesh has it off or the pod opts out.
pub fn wants_sidecar(meta: &ObjectMeta, mesh_default: bool) -> bool {
    let opted_out = [&meta.annotations, &meta.labels]
        .into_iter()
        .flatten()
        .any(|m| m.get(INJECT).is_some_and(|v| v == "false"));
    mesh_default && !opted_out
}

/// The node a pod runs on: its `spec.nodeName`, else the one node.
pub fn node_of(spec: &PodSpec) -> String {
    spec.node_name
        .clone()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| NODE_NAME.to_string())
}

pub fn service_account(spec: &PodSpec) -> String {
    spec.service_account_name
        .clone()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "default".into())
}

/// The grace period: the pod's own, capped, or the mesh's default.
pub fn grace(spec: &PodSpec, cfg: &MeshConfig) -> Duration {
    match spec.termination_grace_period_seconds {
        Some(s) if s >= 0 => Duration::from_secs(s as u64).min(cfg.max_grace),
        _ => cfg.default_grace,
    }
}

/// Whether the sidecar can execute the proxy by path: every directory above it searchable by
/// others and the file executable by them.
pub fn world_executable(path: &std::path::Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &std::path::Path| std::fs::metadata(p).map(|m| m.permissions().mode()).ok();
    if mode(path).is_none_or(|m| m & 0o001 == 0) {
        return false;
    }
    path.ancestors()
        .skip(1)
        .filter(|p| !p.as_os_str().is_empty())
        .all(|p| mode(p).is_some_and(|m| m & 0o001 != 0))
}

/// What the pod agent runs. Warnings are things in the pod's definition that are ignored.
pub fn agent_spec(
    meta: &ObjectMeta,
    spec: &PodSpec,
    at: &Placement<'_>,
    cfg: &MeshConfig,
) -> (AgentSpec, Vec<String>) {
    let mut warnings = Vec::new();
    let fields = Fields { meta, spec, at };
    let containers = spec
        .containers
        .iter()
        .map(|c| container_spec(c, &fields, &mut warnings))
        .collect();
    if spec.init_containers.as_ref().is_some_and(|i| !i.is_empty()) {
        warnings.push("initContainers are not run by wasmesh-local".into());
    }
    let sidecar = wants_sidecar(meta, cfg.sidecar).then(|| {
        let annotations = meta.annotations.clone().unwrap_or_default();
        let mut init_args = Vec::new();
        for (annotation, flag) in TRAFFIC_ANNOTATIONS {
            if let Some(v) = annotations.get(annotation) {
                init_args.push(flag.to_string());
                init_args.push(v.clone());
            }
        }
        let mut run_args = vec![
            "run".to_string(),
            "--control".to_string(),
            cfg.control_url(),
        ];
        if cfg.mtls {
            let token = cfg.token_file(&at.key.namespace, &service_account(spec), &at.key.name);
            run_args.push("--token-file".into());
            run_args.push(token.display().to_string());
            if let Some(mode) = annotations.get(MTLS_MODE) {
                run_args.push("--inbound-mtls".into());
                run_args.push(mode.clone());
            }
        }
        run_args.extend(cfg.proxy_args.iter().cloned());
        let labels = meta
            .labels
            .iter()
            .flatten()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut env = vec![
            ("WASMESH_POD_LABELS".to_string(), labels),
            ("PATH".to_string(), at.path.to_string()),
            ("POD_NAME".to_string(), at.key.name.clone()),
            ("POD_NAMESPACE".to_string(), at.key.namespace.clone()),
            ("POD_IP".to_string(), at.ip.to_string()),
            ("NODE_NAME".to_string(), at.node.to_string()),
            ("SERVICE_ACCOUNT".to_string(), service_account(spec)),
        ];
        if let Ok(v) = std::env::var("RUST_LOG") {
            env.push(("RUST_LOG".into(), v));
        }
        env.extend(cfg.otlp_env());
        let via_stdin = match cfg.sidecar_exec {
            SidecarExec::Path => false,
            SidecarExec::Stdin => true,
            SidecarExec::Auto => !world_executable(&cfg.binaries.proxy),
        };
        SidecarSpec {
            proxy: cfg.binaries.proxy.clone(),
            via_stdin,
            init_args,
            run_args,
            env,
            uid: PROXY_UID,
            ready_timeout_ms: 20_000,
        }
    });
    let restart_policy = match spec.restart_policy.as_deref() {
        Some("Never") => RestartPolicy::Never,
        Some("OnFailure") => RestartPolicy::OnFailure,
        _ => RestartPolicy::Always,
    };
    let mut probe_ports: Vec<u16> = spec
        .containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
        .filter_map(|p| u16::try_from(p.container_port).ok())
        .collect();
    probe_ports.sort();
    probe_ports.dedup();
    (
        AgentSpec {
            pod: at.key.clone(),
            ip: at.ip,
            log_dir: at.log_dir.clone(),
            sidecar,
            containers,
            restart_policy,
            grace_ms: grace(spec, cfg).as_millis() as u64,
            probe_ports,
        },
        warnings,
    )
}

struct Fields<'a> {
    meta: &'a ObjectMeta,
    spec: &'a PodSpec,
    at: &'a Placement<'a>,
}

impl Fields<'_> {
    /// A `fieldRef.fieldPath`, as the downward API resolves it.
    fn get(&self, path: &str) -> Option<String> {
        let map_key = |prefix: &str, map: &Option<BTreeMap<String, String>>| {
            let key = path.strip_prefix(prefix)?.strip_suffix("']")?;
            map.as_ref()?.get(key).cloned()
        };
        Some(match path {
            "metadata.name" => self.at.key.name.clone(),
            "metadata.namespace" => self.at.key.namespace.clone(),
            "metadata.uid" => self.at.uid.to_string(),
            "spec.nodeName" => self.at.node.to_string(),
            "spec.serviceAccountName" => service_account(self.spec),
            "status.podIP" | "status.podIPs" => self.at.ip.to_string(),
            "status.hostIP" | "status.hostIPs" => NODE_IP.to_string(),
            p if p.starts_with("metadata.labels['") => {
                map_key("metadata.labels['", &self.meta.labels)?
            }
            p if p.starts_with("metadata.annotations['") => {
                map_key("metadata.annotations['", &self.meta.annotations)?
            }
            _ => return None,
        })
    }
}

fn container_spec(c: &Container, f: &Fields<'_>, warnings: &mut Vec<String>) -> ContainerSpec {
    let at = f.at;
    let mut env: Vec<(String, String)> = vec![
        ("PATH".into(), at.path.to_string()),
        ("HOME".into(), "/root".into()),
        ("HOSTNAME".into(), at.key.name.clone()),
        ("POD_NAME".into(), at.key.name.clone()),
        ("POD_NAMESPACE".into(), at.key.namespace.clone()),
        ("POD_IP".into(), at.ip.to_string()),
        ("NODE_NAME".into(), at.node.to_string()),
    ];
    for e in c.env.iter().flatten() {
        let value = if let Some(v) = &e.value {
            Some(expand(v, &env))
        } else if let Some(from) = &e.value_from {
            match from.field_ref.as_ref().and_then(|r| f.get(&r.field_path)) {
                Some(v) => Some(v),
                None => {
                    warnings.push(format!(
                        "container {:?}: env {} comes from something wasmesh-local cannot provide (only fieldRef to the pod's name, namespace, uid, IP, node, service account, labels and annotations); left unset",
                        c.name, e.name
                    ));
                    None
                }
            }
        } else {
            Some(String::new())
        };
        if let Some(v) = value {
            env.retain(|(k, _)| k != &e.name);
            env.push((e.name.clone(), v));
        }
    }
    if c.env_from.as_ref().is_some_and(|e| !e.is_empty()) {
        warnings.push(format!("container {:?}: envFrom is ignored", c.name));
    }
    let argv = c
        .command
        .iter()
        .flatten()
        .chain(c.args.iter().flatten())
        .map(|a| expand(a, &env))
        .collect();
    ContainerSpec {
        name: c.name.clone(),
        argv,
        env,
        working_dir: c.working_dir.clone(),
    }
}

/// The kubelet's `$(VAR)` expansion: known variables are replaced, `$$` is a literal `$`,
/// anything else stays as written.
pub fn expand(s: &str, env: &[(String, String)]) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(inner) = after.strip_prefix('(')
            && let Some(end) = inner.find(')')
            && let Some((_, v)) = env.iter().rev().find(|(k, _)| k == &inner[..end])
        {
            out.push_str(v);
            rest = &inner[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// The Pod as control sees it.
pub fn pod_object(
    meta: &ObjectMeta,
    spec: &PodSpec,
    at: &Placement<'_>,
    sidecar: bool,
    ready: bool,
    deletion: Option<Time>,
    created: Time,
) -> Pod {
    let mut annotations = meta.annotations.clone().unwrap_or_default();
    if sidecar {
        annotations.insert(
            INJECTED.into(),
            format!(
                r#"{{"version":"{}","by":"wasmesh-local"}}"#,
                env!("CARGO_PKG_VERSION")
            ),
        );
    }
    let mut spec = spec.clone();
    spec.node_name = Some(at.node.to_string());
    spec.service_account_name = Some(service_account(&spec));
    Pod {
        metadata: ObjectMeta {
            name: Some(at.key.name.clone()),
            namespace: Some(at.key.namespace.clone()),
            uid: Some(at.uid.to_string()),
            labels: meta.labels.clone(),
            annotations: Some(annotations),
            creation_timestamp: Some(created),
            deletion_timestamp: deletion,
            ..Default::default()
        },
        spec: Some(spec),
        status: Some(PodStatus {
            phase: Some("Running".into()),
            pod_ip: Some(at.ip.to_string()),
            pod_ips: Some(vec![PodIP {
                ip: at.ip.to_string(),
            }]),
            host_ip: Some(NODE_IP.to_string()),
            conditions: Some(vec![PodCondition {
                type_: "Ready".into(),
                status: if ready { "True" } else { "False" }.into(),
                ..Default::default()
            }]),
            ..Default::default()
        }),
    }
}

/// A Node in zone [`ZONE`].
pub fn node_object(name: &str) -> Node {
    Node {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            labels: Some(BTreeMap::from([
                (ZONE_LABEL.to_string(), ZONE.to_string()),
                ("kubernetes.io/hostname".to_string(), name.to_string()),
            ])),
            ..Default::default()
        },
        status: Some(NodeStatus {
            addresses: Some(vec![NodeAddress {
                type_: "InternalIP".into(),
                address: NODE_IP.to_string(),
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Binaries;
    use crate::manifests::{Manifest, Outcome, parse_text};

    fn pod(yaml: &str) -> Pod {
        match parse_text(yaml).remove(0).outcome {
            Outcome::Objects(mut o) => match o.remove(0) {
                Manifest::Pod(_, p) => *p,
                other => panic!("{other:?}"),
            },
            other => panic!("{other:?}"),
        }
    }

    fn cfg() -> MeshConfig {
        MeshConfig::new("/m", "/s", Binaries::next_to("/t/wasmesh-local"))
    }

    #[test]
    fn containers_get_the_downward_api_and_their_env_expanded() {
        let p = pod(r#"
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: demo, labels: {app: web}, annotations: {traffic.wasmesh.io/exclude-inbound-ports: "9000"}}
spec:
  serviceAccountName: web-sa
  terminationGracePeriodSeconds: 60
  containers:
  - name: app
    command: [wasmesh-demo, backend]
    args: ["--listen", "$(POD_IP):$(PORT)", "$$(POD_IP)", "$(NOPE)"]
    env:
    - {name: PORT, value: "8080"}
    - {name: URL, value: "http://$(POD_NAME):$(PORT)/"}
    - name: APP
      valueFrom: {fieldRef: {fieldPath: "metadata.labels['app']"}}
    - name: SA
      valueFrom: {fieldRef: {fieldPath: spec.serviceAccountName}}
    - name: SECRET
      valueFrom: {secretKeyRef: {name: s, key: k}}
    ports: [{name: http, containerPort: 8080}, {containerPort: 53, protocol: UDP}]
"#);
        let key = NsName::new("demo", "web");
        let at = Placement {
            key: &key,
            uid: "u-1",
            ip: Ipv4Addr::new(10, 244, 0, 9),
            node: NODE_NAME,
            log_dir: PathBuf::from("/s/logs/demo/web"),
            path: "/t:/usr/bin",
        };
        let meta = p.metadata.clone();
        let spec = p.spec.clone().expect("spec");
        let (a, warnings) = agent_spec(&meta, &spec, &at, &cfg());
        let c = &a.containers[0];
        assert_eq!(
            c.argv,
            [
                "wasmesh-demo",
                "backend",
                "--listen",
                "10.244.0.9:8080",
                "$(POD_IP)",
                "$(NOPE)"
            ]
        );
        let env: BTreeMap<_, _> = c.env.iter().cloned().collect();
        for (k, v) in [
            ("POD_NAME", "web"),
            ("POD_NAMESPACE", "demo"),
            ("POD_IP", "10.244.0.9"),
            ("NODE_NAME", "local-node"),
            ("URL", "http://web:8080/"),
            ("APP", "web"),
            ("SA", "web-sa"),
            ("PATH", "/t:/usr/bin"),
        ] {
            assert_eq!(env.get(k).map(String::as_str), Some(v), "{k}");
        }
        assert!(!env.contains_key("SECRET"));
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains("SECRET"));
        assert_eq!(a.probe_ports, vec![8080]);
        assert_eq!(a.grace_ms, 10_000, "capped");
        let sc = a.sidecar.expect("sidecar");
        assert_eq!(sc.init_args, ["--exclude-inbound-ports", "9000"]);
        assert_eq!(
            sc.run_args,
            [
                "run",
                "--control",
                "http://10.244.0.1:15010",
                "--token-file",
                "/s/tokens/demo/web-sa/web.token"
            ]
        );
        assert_eq!(sc.uid, 1337);
        let senv: BTreeMap<_, _> = sc.env.iter().cloned().collect();
        assert_eq!(
            senv.get("SERVICE_ACCOUNT").map(String::as_str),
            Some("web-sa")
        );
        assert_eq!(senv.get("POD_IP").map(String::as_str), Some("10.244.0.9"));
        assert_eq!(
            senv.get("WASMESH_POD_LABELS").map(String::as_str),
            Some("app=web")
        );
    }

    #[test]
    fn opting_out_of_the_sidecar() {
        let mut meta = ObjectMeta::default();
        assert!(wants_sidecar(&meta, true));
        assert!(!wants_sidecar(&meta, false));
        meta.annotations = Some(BTreeMap::from([(INJECT.to_string(), "false".to_string())]));
        assert!(!wants_sidecar(&meta, true));
    }

    #[test]
    fn expansion() {
        let env = vec![("A".to_string(), "1".to_string())];
        assert_eq!(expand("$(A)-$(B)-$$(A)-$", &env), "1-$(B)-$(A)-$");
        assert_eq!(expand("$(A", &env), "$(A");
    }

    #[test]
    fn world_executable_paths() {
        assert!(world_executable(std::path::Path::new("/bin/sh")));
        assert!(!world_executable(std::path::Path::new("/nonexistent/x")));
    }
}
