//! The model: Kubernetes objects in, the service table out. Pure — no I/O, no clocks.
//!
//! [`Model::apply`] takes source [`Event`]s and returns what changed in the table as a
//! [`Delta`]; the work is proportional to the objects the event touches (a Service and its
//! slices, the Services that list a Pod, or the Services an HTTPRoute names before and after
//! a change), never to the size of the table.
//!
//! - `build`: a Service, its slices and Pods → its [`ServicePortEntry`]s (kube-proxy's rules).
//! - [`routes`]: HTTPRoutes → which ports they attach to, and their proto form.
//! - [`entry`]: the table's types and their proto form.
//! - [`plugins`]: WasmPlugins, kept apart from the service ports: every proxy gets every
//!   plugin, so a plugin change touches nothing else.
//! - [`authz`]: AuthorizationPolicies, kept apart the same way.

pub mod authz;
mod build;
pub mod entry;
pub mod plugins;
pub mod routes;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

pub use authz::PolicyEntry;
pub use build::{PodInfo, node_entry, service_entries, slice_service};
pub use entry::*;
pub use plugins::PluginEntry;
pub use routes::{ParentTarget, Route, RouteEntry};

use crate::source::{Event, Kind, Object};

type NsName = (String, String);

/// Changes to the table made by one or more events.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Delta {
    /// Service ports added or changed (their new value).
    pub upserts: BTreeMap<PortKey, Arc<ServicePortEntry>>,
    /// Service ports that no longer exist.
    pub removals: BTreeSet<PortKey>,
    pub node_upserts: BTreeMap<String, Arc<NodeEntry>>,
    pub node_removals: BTreeSet<String>,
    /// WasmPlugins added or changed, by `namespace/name`.
    pub plugin_upserts: BTreeMap<String, Arc<PluginEntry>>,
    pub plugin_removals: BTreeSet<String>,
    /// AuthorizationPolicies added or changed, by `namespace/name`.
    pub policy_upserts: BTreeMap<String, Arc<PolicyEntry>>,
    pub policy_removals: BTreeSet<String>,
}

impl Delta {
    pub fn is_empty(&self) -> bool {
        self.upserts.is_empty()
            && self.removals.is_empty()
            && self.node_upserts.is_empty()
            && self.node_removals.is_empty()
            && self.plugin_upserts.is_empty()
            && self.plugin_removals.is_empty()
            && self.policy_upserts.is_empty()
            && self.policy_removals.is_empty()
    }

    /// Folds a later delta into this one.
    pub fn merge(&mut self, later: Delta) {
        for (k, v) in later.upserts {
            self.removals.remove(&k);
            self.upserts.insert(k, v);
        }
        for k in later.removals {
            self.upserts.remove(&k);
            self.removals.insert(k);
        }
        for (k, v) in later.node_upserts {
            self.node_removals.remove(&k);
            self.node_upserts.insert(k, v);
        }
        for k in later.node_removals {
            self.node_upserts.remove(&k);
            self.node_removals.insert(k);
        }
        for (k, v) in later.plugin_upserts {
            self.plugin_removals.remove(&k);
            self.plugin_upserts.insert(k, v);
        }
        for k in later.plugin_removals {
            self.plugin_upserts.remove(&k);
            self.plugin_removals.insert(k);
        }
        for (k, v) in later.policy_upserts {
            self.policy_removals.remove(&k);
            self.policy_upserts.insert(k, v);
        }
        for k in later.policy_removals {
            self.policy_upserts.remove(&k);
            self.policy_removals.insert(k);
        }
    }
}

/// Objects as control holds them, and the table computed from them.
#[derive(Debug)]
pub struct Model {
    services: HashMap<NsName, Service>,
    /// Slices by the Service they name (namespace, service-name label), then by slice name.
    slices: HashMap<NsName, build::Slices>,
    /// Slice (namespace, name) → the Service it was filed under.
    slice_owner: HashMap<NsName, String>,
    pods: build::Pods,
    /// Pod → Services whose endpoints point at it.
    pod_users: HashMap<NsName, HashSet<NsName>>,
    /// Service → the Pods its endpoints point at (to keep `pod_users` exact).
    service_pods: HashMap<NsName, HashSet<NsName>>,
    nodes: BTreeMap<String, Arc<NodeEntry>>,
    entries: BTreeMap<PortKey, Arc<ServicePortEntry>>,
    /// Service → its port keys in `entries`.
    service_keys: HashMap<NsName, Vec<PortKey>>,
    /// HTTPRoutes by (namespace, name).
    routes: HashMap<NsName, Route>,
    /// Service → the routes whose parentRefs name it (sorted: the order routes are attached).
    service_routes: HashMap<NsName, BTreeSet<NsName>>,
    /// WasmPlugins by `namespace/name`.
    plugins: BTreeMap<String, Arc<PluginEntry>>,
    /// AuthorizationPolicies by `namespace/name`.
    policies: BTreeMap<String, Arc<PolicyEntry>>,
    /// Plugins in this namespace are mesh-wide.
    root_namespace: String,
    synced: BTreeSet<Kind>,
    /// Settings for every proxy (control's flags), sent with each snapshot.
    mesh_config: Option<wasmesh_api::discovery::MeshConfig>,
}

impl Default for Model {
    fn default() -> Self {
        Model {
            services: HashMap::new(),
            slices: HashMap::new(),
            slice_owner: HashMap::new(),
            pods: Default::default(),
            pod_users: HashMap::new(),
            service_pods: HashMap::new(),
            nodes: BTreeMap::new(),
            entries: BTreeMap::new(),
            service_keys: HashMap::new(),
            routes: HashMap::new(),
            service_routes: HashMap::new(),
            plugins: BTreeMap::new(),
            policies: BTreeMap::new(),
            root_namespace: crate::source::wasmplugin::DEFAULT_ROOT_NAMESPACE.into(),
            synced: BTreeSet::new(),
            mesh_config: None,
        }
    }
}

fn ns_name(o: &Object) -> NsName {
    let m = o.meta();
    (
        m.namespace.clone().unwrap_or_default(),
        m.name.clone().unwrap_or_default(),
    )
}

impl Model {
    pub fn new() -> Self {
        Self::default()
    }

    /// A model whose WasmPlugins in `root_namespace` apply to every namespace (`mesh_wide`).
    pub fn with_root_namespace(root_namespace: impl Into<String>) -> Self {
        Model {
            root_namespace: root_namespace.into(),
            ..Self::default()
        }
    }

    /// Sets what every proxy gets as mesh-wide settings (tracing).
    pub fn with_mesh_config(mut self, cfg: Option<wasmesh_api::discovery::MeshConfig>) -> Self {
        self.mesh_config = cfg;
        self
    }

    pub fn mesh_config(&self) -> Option<&wasmesh_api::discovery::MeshConfig> {
        self.mesh_config.as_ref()
    }

    pub fn root_namespace(&self) -> &str {
        &self.root_namespace
    }

    /// Every WasmPlugin, by `namespace/name`.
    pub fn plugins(&self) -> &BTreeMap<String, Arc<PluginEntry>> {
        &self.plugins
    }

    /// Every AuthorizationPolicy, by `namespace/name`.
    pub fn policies(&self) -> &BTreeMap<String, Arc<PolicyEntry>> {
        &self.policies
    }

    /// True once every kind has been listed completely: before that, an absent endpoint means
    /// "not known yet", not "none".
    pub fn is_synced(&self) -> bool {
        Kind::ALL.iter().all(|k| self.synced.contains(k))
    }

    /// The kinds not listed completely yet.
    pub fn unsynced(&self) -> Vec<Kind> {
        Kind::ALL
            .iter()
            .copied()
            .filter(|k| !self.synced.contains(k))
            .collect()
    }

    pub fn entries(&self) -> &BTreeMap<PortKey, Arc<ServicePortEntry>> {
        &self.entries
    }

    pub fn entry(&self, key: &PortKey) -> Option<&Arc<ServicePortEntry>> {
        self.entries.get(key)
    }

    pub fn nodes(&self) -> &BTreeMap<String, Arc<NodeEntry>> {
        &self.nodes
    }

    pub fn endpoint_count(&self) -> usize {
        self.entries.values().map(|e| e.endpoints.len()).sum()
    }

    /// Applies one event and returns the table changes it caused.
    pub fn apply(&mut self, event: Event) -> Delta {
        let mut dirty = Dirty::default();
        match event {
            Event::Apply(obj) => self.upsert(obj, &mut dirty),
            Event::Delete(obj) => self.remove(&obj, &mut dirty),
            Event::Replace {
                kind,
                namespace,
                objects,
            } => self.replace(kind, namespace.as_deref(), objects, &mut dirty),
            Event::Synced(kind) => {
                self.synced.insert(kind);
            }
        }
        self.recompute(dirty)
    }

    fn upsert(&mut self, obj: Object, dirty: &mut Dirty) {
        let key = ns_name(&obj);
        match obj {
            Object::Service(svc) => {
                dirty.services.insert(key.clone());
                self.services.insert(key, svc);
            }
            Object::EndpointSlice(slice) => {
                let owner = slice_service(&slice).map(str::to_string);
                // A slice whose service-name label changed leaves its old Service.
                if let Some(old) = self.slice_owner.get(&key).cloned()
                    && Some(&old) != owner.as_ref()
                {
                    self.remove_slice(&key, &old, dirty);
                }
                if let Some(svc) = owner {
                    let svc_key = (key.0.clone(), svc.clone());
                    self.slices
                        .entry(svc_key.clone())
                        .or_default()
                        .insert(key.1.clone(), slice);
                    self.slice_owner.insert(key, svc);
                    dirty.services.insert(svc_key);
                }
            }
            Object::Pod(pod) => {
                let info = PodInfo::from_pod(&pod);
                if self.pods.get(&key) != Some(&info) {
                    self.pods.insert(key.clone(), info);
                    dirty.pods.insert(key);
                }
            }
            Object::Node(node) => {
                let entry = node_entry(&node);
                if self.nodes.get(&entry.name).map(|n| n.as_ref()) != Some(&entry) {
                    dirty.nodes.insert(entry.name.clone());
                    self.nodes.insert(entry.name.clone(), Arc::new(entry));
                }
            }
            Object::HttpRoute(route) => {
                let route = Route::new(&route);
                if self.routes.get(&key) != Some(&route) {
                    self.remove_route(&key, dirty);
                    for svc in route.services() {
                        self.service_routes
                            .entry(svc.clone())
                            .or_default()
                            .insert(key.clone());
                        dirty.services.insert(svc);
                    }
                    self.routes.insert(key, route);
                }
            }
            Object::WasmPlugin(plugin) => {
                let id = format!("{}/{}", key.0, key.1);
                // Sources only send plugins whose module they read.
                let Some(mut entry) = PluginEntry::new(&plugin, &self.root_namespace) else {
                    tracing::warn!(plugin = %id, "WasmPlugin without its module; ignored");
                    return;
                };
                match self.plugins.get(&id) {
                    Some(old) if old.same_except_generation(&entry) => {}
                    old => {
                        entry.generation = old.map_or(1, |o| o.generation + 1);
                        dirty.plugins.insert(id.clone());
                        self.plugins.insert(id, Arc::new(entry));
                    }
                }
            }
            Object::AuthorizationPolicy(policy) => {
                let id = format!("{}/{}", key.0, key.1);
                let entry = PolicyEntry::new(&policy);
                if self.policies.get(&id).map(|p| p.as_ref()) != Some(&entry) {
                    dirty.policies.insert(id.clone());
                    self.policies.insert(id, Arc::new(entry));
                }
            }
        }
    }

    /// Forgets a route; the Services it named are recomputed.
    fn remove_route(&mut self, key: &NsName, dirty: &mut Dirty) {
        let Some(old) = self.routes.remove(key) else {
            return;
        };
        for svc in old.services() {
            if let Some(routes) = self.service_routes.get_mut(&svc) {
                routes.remove(key);
                if routes.is_empty() {
                    self.service_routes.remove(&svc);
                }
            }
            dirty.services.insert(svc);
        }
    }

    fn remove(&mut self, obj: &Object, dirty: &mut Dirty) {
        let key = ns_name(obj);
        match obj.kind() {
            Kind::Service => {
                if self.services.remove(&key).is_some() {
                    dirty.services.insert(key);
                }
            }
            Kind::EndpointSlice => {
                if let Some(owner) = self.slice_owner.get(&key).cloned() {
                    self.remove_slice(&key, &owner, dirty);
                }
            }
            Kind::Pod => {
                if self.pods.remove(&key).is_some() {
                    dirty.pods.insert(key);
                }
            }
            Kind::Node => {
                if self.nodes.remove(&key.1).is_some() {
                    dirty.nodes.insert(key.1);
                }
            }
            Kind::HttpRoute => self.remove_route(&key, dirty),
            Kind::WasmPlugin => {
                let id = format!("{}/{}", key.0, key.1);
                if self.plugins.remove(&id).is_some() {
                    dirty.plugins.insert(id);
                }
            }
            Kind::AuthorizationPolicy => {
                let id = format!("{}/{}", key.0, key.1);
                if self.policies.remove(&id).is_some() {
                    dirty.policies.insert(id);
                }
            }
        }
    }

    fn remove_slice(&mut self, slice: &NsName, owner: &str, dirty: &mut Dirty) {
        self.slice_owner.remove(slice);
        let svc_key = (slice.0.clone(), owner.to_string());
        if let Some(slices) = self.slices.get_mut(&svc_key) {
            slices.remove(&slice.1);
            if slices.is_empty() {
                self.slices.remove(&svc_key);
            }
        }
        dirty.services.insert(svc_key);
    }

    /// A complete list of one kind (in one namespace, or everywhere): what is not in it is gone.
    fn replace(
        &mut self,
        kind: Kind,
        namespace: Option<&str>,
        objects: Vec<Object>,
        dirty: &mut Dirty,
    ) {
        let in_scope = |ns: &str| namespace.is_none_or(|want| want == ns);
        let listed: HashSet<NsName> = objects.iter().map(ns_name).collect();
        let known: Vec<NsName> = match kind {
            Kind::Service => self.services.keys().cloned().collect(),
            Kind::EndpointSlice => self.slice_owner.keys().cloned().collect(),
            Kind::Pod => self.pods.keys().cloned().collect(),
            Kind::Node => self
                .nodes
                .keys()
                .map(|n| (String::new(), n.clone()))
                .collect(),
            Kind::HttpRoute => self.routes.keys().cloned().collect(),
            Kind::WasmPlugin => self
                .plugins
                .values()
                .map(|p| (p.namespace.clone(), p.name.clone()))
                .collect(),
            Kind::AuthorizationPolicy => self
                .policies
                .values()
                .map(|p| (p.namespace.clone(), p.name.clone()))
                .collect(),
        };
        let stale: Vec<NsName> = known
            .into_iter()
            .filter(|k| in_scope(&k.0) && !listed.contains(k))
            .collect();
        for (ns, name) in stale {
            let mut meta = k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                name: Some(name),
                ..Default::default()
            };
            if !ns.is_empty() {
                meta.namespace = Some(ns);
            }
            self.remove(&placeholder(kind, meta), dirty);
        }
        for obj in objects {
            // Unchanged objects make nothing dirty: Pods, Nodes and routes compare what the
            // model keeps of them, and Services and slices compare whole.
            let unchanged = match &obj {
                Object::Service(s) => self.services.get(&ns_name(&obj)) == Some(s),
                Object::EndpointSlice(s) => {
                    let key = ns_name(&obj);
                    self.slice_owner.get(&key).is_some_and(|owner| {
                        self.slices
                            .get(&(key.0.clone(), owner.clone()))
                            .and_then(|m| m.get(&key.1))
                            == Some(s)
                    })
                }
                _ => false,
            };
            if !unchanged {
                self.upsert(obj, dirty);
            }
        }
    }

    fn recompute(&mut self, dirty: Dirty) -> Delta {
        let mut delta = Delta::default();
        let mut services = dirty.services;
        for pod in &dirty.pods {
            if let Some(users) = self.pod_users.get(pod) {
                services.extend(users.iter().cloned());
            }
        }
        for svc_key in services {
            let new_entries = match self.services.get(&svc_key) {
                Some(svc) => {
                    let empty = build::Slices::new();
                    let slices = self.slices.get(&svc_key).unwrap_or(&empty);
                    let mut entries = service_entries(svc, slices, &self.pods);
                    let named_by = self.service_routes.get(&svc_key).into_iter().flatten();
                    routes::attach(&mut entries, named_by.filter_map(|r| self.routes.get(r)));
                    entries
                }
                None => Vec::new(),
            };
            self.reindex_pods(&svc_key, &new_entries);
            let old_keys = self.service_keys.remove(&svc_key).unwrap_or_default();
            let new_keys: Vec<PortKey> = new_entries.iter().map(|e| e.key.clone()).collect();
            for old in old_keys {
                if !new_keys.contains(&old) {
                    self.entries.remove(&old);
                    delta.removals.insert(old);
                }
            }
            for entry in new_entries {
                if self.entries.get(&entry.key).map(|e| e.as_ref()) != Some(&entry) {
                    let entry = Arc::new(entry);
                    self.entries.insert(entry.key.clone(), entry.clone());
                    delta.upserts.insert(entry.key.clone(), entry);
                }
            }
            if !new_keys.is_empty() {
                self.service_keys.insert(svc_key, new_keys);
            }
        }
        for id in dirty.plugins {
            match self.plugins.get(&id) {
                Some(p) => {
                    delta.plugin_upserts.insert(id, p.clone());
                }
                None => {
                    delta.plugin_removals.insert(id);
                }
            }
        }
        for id in dirty.policies {
            match self.policies.get(&id) {
                Some(p) => {
                    delta.policy_upserts.insert(id, p.clone());
                }
                None => {
                    delta.policy_removals.insert(id);
                }
            }
        }
        for name in dirty.nodes {
            match self.nodes.get(&name) {
                Some(n) => {
                    delta.node_upserts.insert(name, n.clone());
                }
                None => {
                    delta.node_removals.insert(name);
                }
            }
        }
        delta
    }

    fn reindex_pods(&mut self, svc_key: &NsName, entries: &[ServicePortEntry]) {
        let new: HashSet<NsName> = build::referenced_pods(entries).collect();
        let old = self.service_pods.remove(svc_key).unwrap_or_default();
        for pod in old.difference(&new) {
            if let Some(users) = self.pod_users.get_mut(pod) {
                users.remove(svc_key);
                if users.is_empty() {
                    self.pod_users.remove(pod);
                }
            }
        }
        for pod in new.difference(&old) {
            self.pod_users
                .entry(pod.clone())
                .or_default()
                .insert(svc_key.clone());
        }
        if !new.is_empty() {
            self.service_pods.insert(svc_key.clone(), new);
        }
    }
}

/// An object of `kind` with only its metadata, to remove by identity.
fn placeholder(
    kind: Kind,
    metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> Object {
    match kind {
        Kind::Service => Object::Service(Service {
            metadata,
            ..Default::default()
        }),
        Kind::EndpointSlice => Object::EndpointSlice(EndpointSlice {
            metadata,
            address_type: String::new(),
            endpoints: Vec::new(),
            ports: None,
        }),
        Kind::Pod => Object::Pod(k8s_openapi::api::core::v1::Pod {
            metadata,
            ..Default::default()
        }),
        Kind::Node => Object::Node(k8s_openapi::api::core::v1::Node {
            metadata,
            ..Default::default()
        }),
        Kind::HttpRoute => Object::HttpRoute(crate::source::HttpRoute {
            metadata,
            ..Default::default()
        }),
        Kind::WasmPlugin => Object::WasmPlugin(crate::source::WasmPlugin {
            metadata,
            ..Default::default()
        }),
        Kind::AuthorizationPolicy => {
            Object::AuthorizationPolicy(crate::source::AuthorizationPolicy {
                metadata,
                ..Default::default()
            })
        }
    }
}

#[derive(Debug, Default)]
struct Dirty {
    services: HashSet<NsName>,
    pods: HashSet<NsName>,
    nodes: BTreeSet<String>,
    plugins: BTreeSet<String>,
    policies: BTreeSet<String>,
}
