//! The objects the injector adds to a pod: the `wasmesh-init` container that installs the
//! interception rules, the `wasmesh-proxy` sidecar and its projected token volume.
//!
//! These follow the contract with `wasmesh-proxy` (flags, ports, UID, admin endpoints) written
//! down in `docs/injection.md`; [`crate::mutate`] decides whether and where they go.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, DownwardAPIProjection, DownwardAPIVolumeFile, EnvVar,
    EnvVarSource, ExecAction, HTTPGetAction, Lifecycle, LifecycleHandler, ObjectFieldSelector,
    Probe, ProjectedVolumeSource, ResourceRequirements, SeccompProfile, SecurityContext,
    ServiceAccountTokenProjection, Volume, VolumeMount, VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::annotations::{Include, Settings};
use crate::config::{Config, SidecarMode};

/// Name of the init container that installs the interception rules.
pub const INIT_NAME: &str = "wasmesh-init";
/// Name of the proxy container.
pub const PROXY_NAME: &str = "wasmesh-proxy";
/// Preferred name of the projected token volume (another is picked if the pod has one).
pub const TOKEN_VOLUME: &str = "wasmesh-token";
/// Where the proxy finds its token (file `token`).
pub const TOKEN_MOUNT_PATH: &str = "/var/run/secrets/wasmesh.io/serviceaccount";
/// The proxy's admin port: `/ready`, `/live`, `/quitquitquit`.
pub const ADMIN_PORT: i32 = 15000;
/// Outbound capture port.
pub const OUTBOUND_PORT: i32 = 15001;
/// Inbound capture port.
pub const INBOUND_PORT: i32 = 15006;
/// Preferred name of the admin port (another is picked if the pod has one).
pub const ADMIN_PORT_NAME: &str = "http-admin";
/// Ports the proxy listens on in the pod's network namespace: an app container declaring one
/// of them would collide with the proxy.
pub const PROXY_PORTS: [i32; 3] = [ADMIN_PORT, OUTBOUND_PORT, INBOUND_PORT];

/// Containers of other meshes: a pod carrying one is never injected (two proxies, two sets
/// of rules).
pub const OTHER_MESH_CONTAINERS: [&str; 4] =
    ["istio-proxy", "istio-init", "linkerd-proxy", "linkerd-init"];

/// The `wasmesh-proxy init` container: runs once as root with NET_ADMIN and NET_RAW only.
pub fn init_container(settings: &Settings, config: &Config) -> Container {
    let mut command: Vec<String> = [
        "wasmesh-proxy",
        "init",
        "--proxy-uid",
        &settings.proxy_uid.to_string(),
        "--inbound-port",
        &INBOUND_PORT.to_string(),
        "--outbound-port",
        &OUTBOUND_PORT.to_string(),
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    let mut flag = |name: &str, value: &Option<String>| {
        if let Some(v) = value {
            command.push(name.to_owned());
            command.push(v.clone());
        }
    };
    flag("--exclude-inbound-ports", &settings.exclude_inbound_ports);
    flag("--exclude-outbound-ports", &settings.exclude_outbound_ports);
    flag("--exclude-outbound-cidrs", &settings.exclude_outbound_cidrs);
    flag(
        "--include-outbound-cidrs",
        &settings.include_outbound_cidrs.as_ref().map(include),
    );
    flag(
        "--include-inbound-ports",
        &settings.include_inbound_ports.as_ref().map(include),
    );

    Container {
        name: INIT_NAME.to_owned(),
        image: Some(config.image.clone()),
        image_pull_policy: config.image_pull_policy.clone(),
        command: Some(command),
        resources: resources(settings),
        security_context: Some(SecurityContext {
            run_as_user: Some(0),
            run_as_group: Some(0),
            run_as_non_root: Some(false),
            privileged: Some(false),
            allow_privilege_escalation: Some(false),
            // iptables-restore takes its lock in /run.
            read_only_root_filesystem: Some(false),
            capabilities: Some(Capabilities {
                add: Some(vec!["NET_ADMIN".to_owned(), "NET_RAW".to_owned()]),
                drop: Some(vec!["ALL".to_owned()]),
            }),
            seccomp_profile: Some(runtime_default()),
            ..SecurityContext::default()
        }),
        termination_message_policy: Some("FallbackToLogsOnError".to_owned()),
        ..Container::default()
    }
}

fn include(include: &Include) -> String {
    match include {
        Include::All => "*".to_owned(),
        Include::List(list) => list.clone(),
    }
}

/// Names the proxy container uses for things that must be unique in the pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Names {
    pub token_volume: String,
    /// `None`: every candidate was taken; the port is left unnamed.
    pub admin_port: Option<String>,
}

/// The `wasmesh-proxy run` container. Native mode makes it a restartable init container;
/// classic mode holds the next container until the proxy is ready.
pub fn proxy_container(settings: &Settings, config: &Config, names: &Names) -> Container {
    let uid = i64::from(settings.proxy_uid);
    let ready = http_probe("/ready");
    let mut container = Container {
        name: PROXY_NAME.to_owned(),
        image: Some(config.image.clone()),
        image_pull_policy: config.image_pull_policy.clone(),
        command: Some(vec![
            "wasmesh-proxy".to_owned(),
            "run".to_owned(),
            "--control".to_owned(),
            config.control_address.clone(),
        ]),
        ports: Some(vec![ContainerPort {
            name: names.admin_port.clone(),
            container_port: ADMIN_PORT,
            protocol: Some("TCP".to_owned()),
            ..ContainerPort::default()
        }]),
        env: Some(
            vec![
                field_env("POD_NAME", "metadata.name"),
                field_env("POD_NAMESPACE", "metadata.namespace"),
                field_env("POD_IP", "status.podIP"),
                field_env("NODE_NAME", "spec.nodeName"),
                field_env("SERVICE_ACCOUNT", "spec.serviceAccountName"),
                EnvVar {
                    name: "WASMESH_POD_LABELS_FILE".to_owned(),
                    value: Some(format!("{TOKEN_MOUNT_PATH}/labels")),
                    ..EnvVar::default()
                },
                // mTLS: the projected token proves the pod's ServiceAccount to control (without a
                // CA in control the proxy runs without mTLS).
                EnvVar {
                    name: "WASMESH_TOKEN_FILE".to_owned(),
                    value: Some(format!("{TOKEN_MOUNT_PATH}/token")),
                    ..EnvVar::default()
                },
            ]
            .into_iter()
            // `wasmesh.io/mtls`: the inbound mTLS mode; absent, the proxy's default (permissive).
            .chain(settings.inbound_mtls.as_ref().map(|mode| EnvVar {
                name: "WASMESH_INBOUND_MTLS".to_owned(),
                value: Some(mode.clone()),
                ..EnvVar::default()
            }))
            // `wasmesh.io/proxy-workers`, or the injector's default for a proxy without a CPU
            // limit; absent, the proxy sizes itself by its limit.
            .chain(settings.workers.map(|n| EnvVar {
                name: "WASMESH_WORKERS".to_owned(),
                value: Some(n.to_string()),
                ..EnvVar::default()
            }))
            .collect(),
        ),
        resources: resources(settings),
        // Up to 2 minutes to get the first table from control before the kubelet restarts it.
        startup_probe: Some(Probe {
            period_seconds: Some(1),
            failure_threshold: Some(120),
            ..ready.clone()
        }),
        readiness_probe: Some(Probe {
            period_seconds: Some(5),
            failure_threshold: Some(3),
            ..ready
        }),
        liveness_probe: Some(Probe {
            period_seconds: Some(10),
            failure_threshold: Some(3),
            ..http_probe("/live")
        }),
        security_context: Some(SecurityContext {
            run_as_user: Some(uid),
            run_as_group: Some(uid),
            run_as_non_root: Some(true),
            privileged: Some(false),
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                add: None,
                drop: Some(vec!["ALL".to_owned()]),
            }),
            seccomp_profile: Some(runtime_default()),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(vec![VolumeMount {
            name: names.token_volume.clone(),
            mount_path: TOKEN_MOUNT_PATH.to_owned(),
            read_only: Some(true),
            ..VolumeMount::default()
        }]),
        termination_message_policy: Some("FallbackToLogsOnError".to_owned()),
        ..Container::default()
    };
    match settings.mode {
        SidecarMode::Native => container.restart_policy = Some("Always".to_owned()),
        SidecarMode::Classic => {
            // The kubelet starts containers in order and runs each postStart hook to completion
            // before starting the next one: the app starts once the proxy is ready.
            container.lifecycle = Some(Lifecycle {
                post_start: Some(LifecycleHandler {
                    exec: Some(ExecAction {
                        command: Some(vec![
                            "wasmesh-proxy".to_owned(),
                            "wait".to_owned(),
                            "--timeout-seconds".to_owned(),
                            config.hold_timeout_seconds.to_string(),
                        ]),
                    }),
                    ..LifecycleHandler::default()
                }),
                ..Lifecycle::default()
            });
        }
    }
    container
}

/// The projected ServiceAccount token the proxy shows control, with control's audience.
pub fn token_volume(name: &str, config: &Config) -> Volume {
    Volume {
        name: name.to_owned(),
        projected: Some(ProjectedVolumeSource {
            sources: Some(vec![
                VolumeProjection {
                    service_account_token: Some(ServiceAccountTokenProjection {
                        audience: Some(config.token_audience.clone()),
                        expiration_seconds: Some(config.token_expiration_seconds),
                        path: "token".to_owned(),
                    }),
                    ..VolumeProjection::default()
                },
                // The pod's labels, kept current by the kubelet: WasmPlugin selectors match them.
                VolumeProjection {
                    downward_api: Some(DownwardAPIProjection {
                        items: Some(vec![DownwardAPIVolumeFile {
                            path: "labels".to_owned(),
                            field_ref: Some(ObjectFieldSelector {
                                field_path: "metadata.labels".to_owned(),
                                ..ObjectFieldSelector::default()
                            }),
                            ..DownwardAPIVolumeFile::default()
                        }]),
                    }),
                    ..VolumeProjection::default()
                },
            ]),
            default_mode: None,
        }),
        ..Volume::default()
    }
}

fn http_probe(path: &str) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: IntOrString::Int(ADMIN_PORT),
            scheme: Some("HTTP".to_owned()),
            ..HTTPGetAction::default()
        }),
        timeout_seconds: Some(1),
        ..Probe::default()
    }
}

fn field_env(name: &str, field_path: &str) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value: None,
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                api_version: Some("v1".to_owned()),
                field_path: field_path.to_owned(),
            }),
            ..EnvVarSource::default()
        }),
    }
}

fn runtime_default() -> SeccompProfile {
    SeccompProfile {
        type_: "RuntimeDefault".to_owned(),
        localhost_profile: None,
    }
}

fn resources(settings: &Settings) -> Option<ResourceRequirements> {
    let r = &settings.resources;
    let map = |cpu: &Option<String>, memory: &Option<String>| {
        let m: BTreeMap<String, Quantity> = [("cpu", cpu), ("memory", memory)]
            .into_iter()
            .filter_map(|(k, v)| v.as_ref().map(|v| (k.to_owned(), Quantity(v.clone()))))
            .collect();
        (!m.is_empty()).then_some(m)
    };
    let requests = map(&r.cpu_request, &r.memory_request);
    let limits = map(&r.cpu_limit, &r.memory_limit);
    (requests.is_some() || limits.is_some()).then(|| ResourceRequirements {
        requests,
        limits,
        ..ResourceRequirements::default()
    })
}
