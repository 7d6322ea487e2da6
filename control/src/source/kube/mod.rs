//! The Kubernetes source: `kube::runtime::watcher`s on the API server.
//!
//! One watcher per kind and scope: Services, EndpointSlices (discovery.k8s.io/v1), Pods and
//! HTTPRoutes (gateway.networking.k8s.io/v1, see [`httproute`]) in all namespaces, or one
//! watcher per configured namespace; Nodes always cluster-wide. Each
//! watcher lists, then watches from the list's resourceVersion; the kube watcher re-lists after
//! "410 Gone" and resumes after a closed watch by itself, and `.default_backoff()` spaces out
//! retries after errors. [`scope::Scope`] turns a watcher's events into source [`Event`]s
//! (a list becomes one [`Event::Replace`]) and [`scope::SyncTracker`] sends [`Event::Synced`]
//! once every scope of a kind has been listed once.
//!
//! All watchers are polled by the one task running [`KubeSource::run`]: events keep their order
//! per watcher, and a slow receiver slows the watchers instead of growing a queue.
//!
//! HTTPRoutes are optional: when the API server does not serve them (404: the Gateway API CRDs
//! are not installed) or RBAC forbids listing them before they were ever listed (403), the
//! source reports "no routes" for them once, so that the rest of the table is not held back,
//! and the watcher keeps retrying with backoff.
//!
//! WasmPlugins (`wasmesh.io/v1alpha1`, see [`wasmplugin`]) are optional the same way (the CRD
//! in `examples/k8s/wasmplugin-crd.yaml` not installed); they are watched in the watched
//! namespaces and in the root namespace (mesh-wide plugins), and their module files are read
//! from control's filesystem.
//!
//! AuthorizationPolicies (`wasmesh.io/v1alpha1`, see [`authz`]) are optional the same way (the
//! CRD in `examples/k8s/authorizationpolicy-crd.yaml` not installed), watched in the watched
//! namespaces (a policy applies to pods of its own namespace only).
//!
//! Permissions needed: list and watch on the seven kinds, see `examples/k8s/control-rbac.yaml`.

pub mod authz;
pub mod httproute;
mod scope;
#[cfg(test)]
mod tests;
pub mod wasmplugin;

use std::collections::BTreeSet;
use std::fmt::Debug;
use std::time::Duration;

use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Resource};
use serde::de::DeserializeOwned;

use super::{Event, EventSender, Kind, Object, SourceError};
use scope::{Scope, SyncTracker};

/// Where RBAC for control is described; named in errors about permissions.
const RBAC_EXAMPLE: &str = "examples/k8s/control-rbac.yaml";

/// Watches Services, EndpointSlices, Pods, Nodes, HTTPRoutes, WasmPlugins and
/// AuthorizationPolicies on a Kubernetes API server.
#[derive(Clone)]
pub struct KubeSource {
    client: kube::Client,
    /// Empty: all namespaces.
    namespaces: Vec<String>,
    page_size: Option<u32>,
    /// WasmPlugins here are mesh-wide: watched even when `namespaces` leaves it out.
    root_namespace: String,
    module_recheck: Duration,
}

impl Debug for KubeSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeSource")
            .field("namespaces", &self.namespaces)
            .field("page_size", &self.page_size)
            .field("root_namespace", &self.root_namespace)
            .finish_non_exhaustive()
    }
}

impl KubeSource {
    /// A source reading through `client`; `namespaces` limits Services, EndpointSlices, Pods
    /// and HTTPRoutes to those namespaces (empty: all namespaces). Duplicates and empty names
    /// are ignored.
    pub fn new(client: kube::Client, namespaces: Vec<String>) -> Self {
        let namespaces: BTreeSet<String> = namespaces
            .into_iter()
            .map(|ns| ns.trim().to_string())
            .filter(|ns| !ns.is_empty())
            .collect();
        KubeSource {
            client,
            namespaces: namespaces.into_iter().collect(),
            page_size: None,
            root_namespace: crate::source::wasmplugin::DEFAULT_ROOT_NAMESPACE.into(),
            module_recheck: wasmplugin::MODULE_RECHECK,
        }
    }

    /// The mesh's root namespace (default `wasmesh-system`): its WasmPlugins are watched
    /// even when control watches a list of namespaces without it.
    #[must_use]
    pub fn with_root_namespace(mut self, namespace: impl Into<String>) -> Self {
        self.root_namespace = namespace.into();
        self
    }

    /// How often WasmPlugin module files are checked for changes (default 10 s).
    #[must_use]
    pub fn with_module_recheck(mut self, every: Duration) -> Self {
        self.module_recheck = every;
        self
    }

    /// A source using the in-cluster service account, or the kubeconfig named by `KUBECONFIG`
    /// (else `~/.kube/config`).
    pub async fn from_env(namespaces: Vec<String>) -> Result<Self, SourceError> {
        let client = kube::Client::try_default().await.map_err(|e| {
            SourceError::Kube(format!(
                "no usable Kubernetes configuration ({e}). Run control in a pod with a service \
                 account (RBAC: {RBAC_EXAMPLE}), or set KUBECONFIG to a kubeconfig file whose \
                 current context reaches the cluster, or read a folder of YAML instead with \
                 --source dir:PATH"
            ))
        })?;
        Ok(Self::new(client, namespaces))
    }

    /// Lists in pages of `page_size` objects (default: kube's 500, as client-go).
    #[must_use]
    pub fn with_page_size(mut self, page_size: u32) -> Self {
        self.page_size = Some(page_size);
        self
    }

    /// The namespaces watched (empty: all).
    pub fn namespaces(&self) -> &[String] {
        &self.namespaces
    }

    /// Watches until `tx` is closed. Watch errors are logged and retried with backoff, never
    /// returned: the only error is every watch stream ending, which the kube watcher never does.
    pub async fn run(self, tx: EventSender) -> Result<(), SourceError> {
        let mut scopes = self.scopes();
        let mut tracker = SyncTracker::new(&scopes);
        let streams = scopes
            .iter()
            .enumerate()
            .map(|(i, scope)| self.stream(scope).map(move |item| (i, item)));
        let mut events = futures::stream::select_all(streams);
        tracing::info!(
            namespaces = ?self.namespaces,
            watches = scopes.len(),
            "watching Services, EndpointSlices, Pods, Nodes, HTTPRoutes, WasmPlugins and AuthorizationPolicies on the Kubernetes API server"
        );
        loop {
            let next = tokio::select! {
                biased;
                () = tx.closed() => return Ok(()),
                next = events.next() => next,
            };
            let Some((index, item)) = next else {
                return Err(SourceError::Kube(
                    "every watch on the API server ended; restart control".into(),
                ));
            };
            let Some(scope) = scopes.get_mut(index) else {
                continue;
            };
            let output = match item {
                Ok(event) => scope.on_event(event),
                Err(err) => match optional_kind_unavailable(scope, &err) {
                    Some(output) => Some(output),
                    None => continue,
                },
            };
            let Some(output) = output else { continue };
            if let Event::Replace { objects, .. } = &output.event {
                tracing::debug!(scope = %scope.describe(), objects = objects.len(), "listed");
            }
            let synced = if output.first_list {
                tracker.first_list_done(scope.kind)
            } else {
                None
            };
            for event in std::iter::once(output.event).chain(synced) {
                if tx.send(event).await.is_err() {
                    return Ok(());
                }
            }
        }
    }

    /// One scope per watcher: each namespaced kind once (all namespaces) or once per
    /// namespace; Nodes once.
    fn scopes(&self) -> Vec<Scope> {
        let mut scopes = Vec::new();
        for kind in [
            Kind::Service,
            Kind::EndpointSlice,
            Kind::Pod,
            Kind::HttpRoute,
            Kind::WasmPlugin,
            Kind::AuthorizationPolicy,
        ] {
            if self.namespaces.is_empty() {
                scopes.push(Scope::new(kind, None));
            } else {
                for ns in &self.namespaces {
                    scopes.push(Scope::new(kind, Some(ns.clone())));
                }
            }
        }
        if !self.namespaces.is_empty() && !self.namespaces.contains(&self.root_namespace) {
            scopes.push(Scope::new(
                Kind::WasmPlugin,
                Some(self.root_namespace.clone()),
            ));
        }
        scopes.push(Scope::new(Kind::Node, None));
        scopes
    }

    fn watcher_config(&self) -> watcher::Config {
        let config = watcher::Config::default();
        match self.page_size {
            Some(n) => config.page_size(n),
            None => config,
        }
    }

    fn stream(&self, scope: &Scope) -> WatchStream {
        let client = self.client.clone();
        let config = self.watcher_config();
        let ns = scope.namespace.as_deref();
        match scope.kind {
            Kind::Service => watch(namespaced::<Service>(client, ns), config, Object::Service),
            Kind::EndpointSlice => watch(
                namespaced::<EndpointSlice>(client, ns),
                config,
                Object::EndpointSlice,
            ),
            Kind::Pod => watch(namespaced::<Pod>(client, ns), config, Object::Pod),
            Kind::Node => watch(Api::<Node>::all(client), config, Object::Node),
            Kind::HttpRoute => httproute::stream(httproute::api(client, ns), config),
            Kind::WasmPlugin => {
                wasmplugin::stream(wasmplugin::api(client, ns), config, self.module_recheck)
            }
            Kind::AuthorizationPolicy => authz::stream(authz::api(client, ns), config),
        }
    }
}

/// A watch error, logged; for HTTPRoutes, WasmPlugins and AuthorizationPolicies that cannot be
/// listed at all (404: the CRD is not installed; 403 before any list succeeded: RBAC not
/// updated), an empty list as well, once, so that the kind counts as synced and the rest of the
/// table goes out.
fn optional_kind_unavailable(scope: &mut Scope, err: &watcher::Error) -> Option<scope::Output> {
    let code = status_code(err);
    let unavailable = matches!(
        scope.kind,
        Kind::HttpRoute | Kind::WasmPlugin | Kind::AuthorizationPolicy
    ) && (code == Some(404) || (code == Some(403) && !scope.listed_once()));
    if !unavailable {
        warn_watch_error(scope, err);
        return None;
    }
    let output = scope.on_unavailable();
    match (&output, code) {
        (Some(_), Some(404)) => tracing::warn!(
            kind = %scope.kind,
            namespace = scope.namespace.as_deref().unwrap_or("(all)"),
            "the API server does not serve {} ({}): no {}s until it does; checking again with \
             backoff",
            scope.describe(),
            match scope.kind {
                Kind::WasmPlugin => "is examples/k8s/wasmplugin-crd.yaml applied?",
                Kind::AuthorizationPolicy =>
                    "is examples/k8s/authorizationpolicy-crd.yaml applied?",
                _ => "are the Gateway API CRDs installed?",
            },
            scope.kind,
        ),
        (None, Some(404)) => tracing::debug!(scope = %scope.describe(), "still not served"),
        _ => warn_watch_error(scope, err),
    }
    output
}

type WatchStream = BoxStream<'static, Result<watcher::Event<Object>, watcher::Error>>;

fn namespaced<K>(client: kube::Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = NamespaceResourceScope>,
    K::DynamicType: Default,
{
    match namespace {
        Some(ns) => Api::namespaced(client, ns),
        None => Api::all(client),
    }
}

fn watch<K>(api: Api<K>, config: watcher::Config, wrap: fn(K) -> Object) -> WatchStream
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    watcher(api, config)
        .default_backoff()
        .map_ok(move |event| into_object_event(event, wrap))
        .boxed()
}

fn into_object_event<K>(event: watcher::Event<K>, wrap: fn(K) -> Object) -> watcher::Event<Object> {
    match event {
        watcher::Event::Apply(o) => watcher::Event::Apply(wrap(o)),
        watcher::Event::Delete(o) => watcher::Event::Delete(wrap(o)),
        watcher::Event::Init => watcher::Event::Init,
        watcher::Event::InitApply(o) => watcher::Event::InitApply(wrap(o)),
        watcher::Event::InitDone => watcher::Event::InitDone,
    }
}

fn warn_watch_error(scope: &Scope, err: &watcher::Error) {
    tracing::warn!(
        kind = %scope.kind,
        namespace = scope.namespace.as_deref().unwrap_or("(all)"),
        error = %err,
        "watching {} failed; retrying with backoff{}",
        scope.describe(),
        hint(err),
    );
}

/// What an operator can do about a watch error, if anything.
fn hint(err: &watcher::Error) -> String {
    match status_code(err) {
        Some(401) => "; the API server rejected control's credentials (token expired or wrong \
                      cluster?)"
            .into(),
        Some(403) => format!(
            "; control's service account may not list/watch this kind: apply {RBAC_EXAMPLE}"
        ),
        Some(410) => "; the watch fell behind the API server's history, listing again".into(),
        _ => String::new(),
    }
}

fn status_code(err: &watcher::Error) -> Option<u16> {
    match err {
        watcher::Error::InitialListFailed(e)
        | watcher::Error::WatchStartFailed(e)
        | watcher::Error::WatchFailed(e) => match e {
            kube::Error::Api(status) => Some(status.code),
            _ => None,
        },
        watcher::Error::WatchError(status) => Some(status.code),
        watcher::Error::NoResourceVersion => None,
    }
}
