//! The mutation, pure: a pod, what is known about its namespace, and the config in; a
//! [`Decision`] out — skip (with the reason) or inject (with the JSON Patch).
//!
//! The order of the checks is the policy:
//! 1. the control plane's and Kubernetes' own namespaces are never injected;
//! 2. an opt-out (`wasmesh.io/inject: "false"`, label or annotation) wins over everything;
//! 3. a pod that already has our sidecar (or another mesh's) is left alone — this is what makes
//!    the webhook idempotent: feeding an injected pod back in gives no patch;
//! 4. `hostNetwork` pods are skipped (the rules would land in the node's network namespace);
//! 5. the pod is injected if it opts in, or its namespace does, or (offline) nothing is known;
//! 6. every annotation is checked; one bad value means no injection and a warning.
//!
//! The patch only *adds*: `add` of a whole array or map where the pod has none, `add` at an
//! index (`/0`, `/-`) where it has one, so nothing the pod had is replaced.

use std::collections::BTreeSet;

use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, Patch, PatchOperation};
use k8s_openapi::api::core::v1::{Container, Pod, PodSpec};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::annotations::{
    self, AnnotationError, AnnotationErrors, PodChoice, Settings, Source, pod_choice,
};
use crate::config::{Config, SidecarMode, VERSION};
use crate::sidecar::{
    self, ADMIN_PORT_NAME, INIT_NAME, Names, OTHER_MESH_CONTAINERS, PROXY_NAME, PROXY_PORTS,
    TOKEN_VOLUME,
};

/// What is known about the pod's namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NamespaceInfo<'a> {
    pub name: &'a str,
    pub injection: NamespaceInjection,
}

/// Whether the namespace opted in (label `wasmesh.io/inject=enabled`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NamespaceInjection {
    /// It did (the webhook that sent the pod selects such namespaces).
    Enabled,
    /// It did not: only pods that opt in themselves are injected.
    NotEnabled,
    /// Unknown (offline `inject`): every pod not opted out is injected, like `linkerd inject`.
    Unknown,
}

/// The outcome for one pod.
#[derive(Debug)]
pub enum Decision {
    Inject(Injection),
    Skip(Skip),
}

impl Decision {
    /// Warnings for the user (`kubectl` prints them), whatever the outcome.
    pub fn warnings(&self) -> &[String] {
        match self {
            Self::Inject(i) => &i.warnings,
            Self::Skip(s) => &s.warnings,
        }
    }
}

/// The pod gets a sidecar.
#[derive(Debug)]
pub struct Injection {
    pub patch: Patch,
    pub record: Injected,
    pub warnings: Vec<String>,
}

/// The pod is left as it is.
#[derive(Debug)]
pub struct Skip {
    pub reason: SkipReason,
    pub warnings: Vec<String>,
}

/// Why a pod is not injected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SkipReason {
    #[error("namespace {0:?} is never injected (control plane or Kubernetes system namespace)")]
    ExcludedNamespace(String),
    #[error("the pod opts out ({0} wasmesh.io/inject: \"false\")")]
    OptedOut(Source),
    #[error("already injected (annotation wasmesh.io/injected is set)")]
    AlreadyInjected,
    #[error(
        "the pod already has a container named {0:?} but no wasmesh.io/injected annotation; \
         rename the container or remove it to let the injector add its own"
    )]
    NameTaken(String),
    #[error("the pod already has {0:?}, another service mesh's container; use one mesh per pod")]
    OtherMesh(String),
    #[error("the pod uses hostNetwork: interception rules would change the node's network")]
    HostNetwork,
    #[error(
        "namespace {0:?} is not opted in: label it wasmesh.io/inject=enabled, or label the pod \
         wasmesh.io/inject: \"true\""
    )]
    NotOptedIn(String),
    #[error("the pod has no spec")]
    NoSpec,
    #[error(
        "container {container:?} declares port {port}, which the proxy listens on (15000 admin, \
         15001 outbound, 15006 inbound); change the app's port"
    )]
    PortTaken { container: String, port: i32 },
    #[error("{0}")]
    InvalidAnnotation(AnnotationError),
    #[error("{0}")]
    InvalidAnnotations(AnnotationErrors),
}

impl SkipReason {
    /// A skip the user did not ask for: they get a warning saying why.
    pub fn is_problem(&self) -> bool {
        matches!(
            self,
            Self::NameTaken(_)
                | Self::OtherMesh(_)
                | Self::NoSpec
                | Self::PortTaken { .. }
                | Self::InvalidAnnotation(_)
                | Self::InvalidAnnotations(_)
        )
    }
}

/// The value of the `wasmesh.io/injected` annotation: what was added, so a person (or a
/// later version's cleanup) can tell.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Injected {
    pub version: String,
    pub mode: String,
    pub init_containers: Vec<String>,
    pub containers: Vec<String>,
    pub volumes: Vec<String>,
}

/// Decides for one pod and builds the patch.
pub fn mutate(pod: &Pod, namespace: &NamespaceInfo<'_>, config: &Config) -> Decision {
    match decide(pod, namespace, config) {
        Ok(injection) => Decision::Inject(injection),
        Err(reason) => {
            let warnings = if reason.is_problem() {
                vec![format!("wasmesh: pod not injected: {reason}")]
            } else {
                Vec::new()
            };
            Decision::Skip(Skip { reason, warnings })
        }
    }
}

fn decide(
    pod: &Pod,
    namespace: &NamespaceInfo<'_>,
    config: &Config,
) -> Result<Injection, SkipReason> {
    let meta = &pod.metadata;
    if config.skips_namespace(namespace.name) {
        return Err(SkipReason::ExcludedNamespace(namespace.name.to_owned()));
    }
    let choice = pod_choice(meta.labels.as_ref(), meta.annotations.as_ref());
    if let Ok(PodChoice::OptOut(source)) = choice {
        return Err(SkipReason::OptedOut(source));
    }
    let already = meta
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(annotations::INJECTED));
    if already {
        return Err(SkipReason::AlreadyInjected);
    }
    let choice = choice.map_err(SkipReason::InvalidAnnotation)?;
    let spec = pod.spec.as_ref().ok_or(SkipReason::NoSpec)?;
    check_containers(spec)?;
    if spec.host_network == Some(true) {
        return Err(SkipReason::HostNetwork);
    }
    let opted_in = choice == PodChoice::OptIn
        || matches!(
            namespace.injection,
            NamespaceInjection::Enabled | NamespaceInjection::Unknown
        );
    if !opted_in {
        return Err(SkipReason::NotOptedIn(namespace.name.to_owned()));
    }
    let settings = Settings::read(meta.annotations.as_ref(), config)
        .map_err(SkipReason::InvalidAnnotations)?;
    let warnings = warnings(spec, &settings);
    let names = names(spec);
    let (patch, record) = build_patch(pod, spec, &settings, config, &names);
    Ok(Injection {
        patch,
        record,
        warnings,
    })
}

/// Init containers and containers (a pod being created has no ephemeral containers).
fn all_containers(spec: &PodSpec) -> impl Iterator<Item = &Container> {
    spec.init_containers
        .iter()
        .flatten()
        .chain(spec.containers.iter())
}

/// Our names free, no other mesh, none of the proxy's ports declared by the app.
fn check_containers(spec: &PodSpec) -> Result<(), SkipReason> {
    for c in all_containers(spec) {
        if c.name == PROXY_NAME || c.name == INIT_NAME {
            return Err(SkipReason::NameTaken(c.name.clone()));
        }
        if OTHER_MESH_CONTAINERS.contains(&c.name.as_str()) {
            return Err(SkipReason::OtherMesh(c.name.clone()));
        }
        for p in c.ports.iter().flatten() {
            if PROXY_PORTS.contains(&p.container_port) {
                return Err(SkipReason::PortTaken {
                    container: c.name.clone(),
                    port: p.container_port,
                });
            }
        }
    }
    Ok(())
}

/// Things that work but probably not as the user expects.
fn warnings(spec: &PodSpec, settings: &Settings) -> Vec<String> {
    let mut warnings = Vec::new();
    let uid = i64::from(settings.proxy_uid);
    let pod_uid = spec.security_context.as_ref().and_then(|s| s.run_as_user);
    for c in all_containers(spec) {
        let runs_as = c
            .security_context
            .as_ref()
            .and_then(|s| s.run_as_user)
            .or(pod_uid);
        if runs_as == Some(uid) {
            warnings.push(format!(
                "wasmesh: container {:?} runs as UID {uid}, the proxy's UID: its traffic bypasses \
                 the proxy; set wasmesh.io/proxy-uid to another UID",
                c.name
            ));
        }
    }
    let restarts = spec.restart_policy.as_deref().unwrap_or("Always");
    if settings.mode == SidecarMode::Classic && restarts != "Always" {
        warnings.push(format!(
            "wasmesh: classic sidecar in a pod with restartPolicy {restarts}: the pod completes \
             only when the app ends the proxy with POST http://127.0.0.1:15000/quitquitquit; \
             native mode needs no such call"
        ));
    }
    warnings
}

/// Names that must be unique in the pod, avoiding what the pod already uses.
fn names(spec: &PodSpec) -> Names {
    let volumes: BTreeSet<&str> = spec
        .volumes
        .iter()
        .flatten()
        .map(|v| v.name.as_str())
        .collect();
    let token_volume = std::iter::once(TOKEN_VOLUME.to_owned())
        .chain((2..).map(|i| format!("{TOKEN_VOLUME}-{i}")))
        .find(|n| !volumes.contains(n.as_str()))
        .unwrap_or_else(|| TOKEN_VOLUME.to_owned());
    let ports: BTreeSet<&str> = all_containers(spec)
        .flat_map(|c| c.ports.iter().flatten())
        .filter_map(|p| p.name.as_deref())
        .collect();
    let admin_port = [ADMIN_PORT_NAME, "wasmesh-admin"]
        .into_iter()
        .find(|n| !ports.contains(n))
        .map(str::to_owned);
    Names {
        token_volume,
        admin_port,
    }
}

fn build_patch(
    pod: &Pod,
    spec: &PodSpec,
    settings: &Settings,
    config: &Config,
    names: &Names,
) -> (Patch, Injected) {
    let init = sidecar::init_container(settings, config);
    let proxy = sidecar::proxy_container(settings, config, names);
    let volume = sidecar::token_volume(&names.token_volume, config);
    let mut ops = Ops::default();

    let record = match settings.mode {
        // Native: rules, then the proxy (started and ready before the next init container),
        // then the user's init containers, whose traffic is meshed.
        SidecarMode::Native => {
            let new = [json(&init), json(&proxy)];
            match &spec.init_containers {
                None => ops.add(&["spec", "initContainers"], Value::Array(new.into())),
                Some(_) => {
                    for (i, c) in new.into_iter().enumerate() {
                        ops.add(&["spec", "initContainers", &i.to_string()], c);
                    }
                }
            }
            Injected {
                version: VERSION.to_owned(),
                mode: SidecarMode::Native.to_string(),
                init_containers: vec![INIT_NAME.to_owned(), PROXY_NAME.to_owned()],
                containers: Vec::new(),
                volumes: vec![names.token_volume.clone()],
            }
        }
        // Classic: the rules last among init containers (no proxy runs yet, so earlier init
        // containers would have their connections refused), the proxy first among containers.
        SidecarMode::Classic => {
            match &spec.init_containers {
                None => ops.add(&["spec", "initContainers"], Value::Array(vec![json(&init)])),
                Some(_) => ops.add(&["spec", "initContainers", "-"], json(&init)),
            }
            if spec.containers.is_empty() {
                ops.add(&["spec", "containers"], Value::Array(vec![json(&proxy)]));
            } else {
                ops.add(&["spec", "containers", "0"], json(&proxy));
            }
            Injected {
                version: VERSION.to_owned(),
                mode: SidecarMode::Classic.to_string(),
                init_containers: vec![INIT_NAME.to_owned()],
                containers: vec![PROXY_NAME.to_owned()],
                volumes: vec![names.token_volume.clone()],
            }
        }
    };

    match &spec.volumes {
        None => ops.add(&["spec", "volumes"], Value::Array(vec![json(&volume)])),
        Some(_) => ops.add(&["spec", "volumes", "-"], json(&volume)),
    }
    let record_text = serde_json::to_string(&record).unwrap_or_default();
    match &pod.metadata.annotations {
        None => ops.add(
            &["metadata", "annotations"],
            serde_json::json!({ annotations::INJECTED: record_text }),
        ),
        Some(_) => ops.add(
            &["metadata", "annotations", annotations::INJECTED],
            Value::String(record_text),
        ),
    }
    (Patch(ops.0), record)
}

#[derive(Default)]
struct Ops(Vec<PatchOperation>);

impl Ops {
    /// `add` at the path made of these (unescaped) tokens; `/` and `~` in a token are escaped.
    fn add(&mut self, tokens: &[&str], value: Value) {
        self.0.push(PatchOperation::Add(AddOperation {
            path: PointerBuf::from_tokens(tokens.iter().copied()),
            value,
        }));
    }
}

fn json<T: Serialize>(object: &T) -> Value {
    // k8s-openapi types serialize to JSON without fail (string keys, no custom errors).
    serde_json::to_value(object).unwrap_or(Value::Null)
}
