//! The hub: the table as subscribers see it, kept encoded, and the fan-out of deltas.
//!
//! Every service port is encoded once, when it changes. A delta is encoded once and shared by
//! every subscriber through a broadcast ring (`Bytes` clones are reference counts); a snapshot
//! is a sequence of memory copies of the encoded ports. So the work of a change grows with the
//! size of the change, not with the number of proxies.
//!
//! WasmPlugins are kept encoded the same way, and their modules by sha256 for `GetModule`: a
//! module stays while some plugin names it and is dropped with the last one.
//! AuthorizationPolicies are kept encoded too; every subscriber gets every policy.
//!
//! Each subscriber has a bounded place in the ring: one that falls more than
//! [`Hub::RING`] deltas behind is resynchronised with a fresh snapshot instead of stalling
//! the others.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use tokio::sync::{broadcast, watch};
use wasmesh_api::UpdateKind;
use wasmesh_api::wire::{
    UpdateWriter, encode_authorization_policy, encode_node, encode_service_port, encode_wasm_plugin,
};

use crate::model::{NodeEntry, PluginEntry, PolicyEntry, PortKey, ServicePortEntry};

/// One encoded delta.
#[derive(Debug)]
pub struct EncodedDelta {
    pub version: u64,
    pub bytes: Bytes,
}

#[derive(Debug, Default)]
struct State {
    version: u64,
    ports: BTreeMap<PortKey, Bytes>,
    nodes: BTreeMap<String, Bytes>,
    /// WasmPlugins by `namespace/name`: encoded, and the sha256 of their module.
    plugins: BTreeMap<String, (Bytes, String)>,
    /// Module bytes by sha256, for every module some plugin names.
    modules: HashMap<String, Bytes>,
    /// AuthorizationPolicies by `namespace/name`, encoded.
    policies: BTreeMap<String, Bytes>,
    /// The snapshot of `version`, shared by every subscriber that joins before the next change.
    snapshot: Option<Arc<Snapshot>>,
    /// Mesh-wide settings (an encoded `MeshConfig`), sent at the start of every snapshot.
    mesh: Option<Bytes>,
}

/// Counters the admin endpoint reports.
#[derive(Debug, Default)]
pub struct HubStats {
    pub subscribers: AtomicUsize,
    pub snapshots_sent: AtomicU64,
    pub deltas_published: AtomicU64,
    pub resyncs: AtomicU64,
    /// GetModule answered with a module / with NOT_FOUND.
    pub modules_sent: AtomicU64,
    pub modules_not_found: AtomicU64,
}

#[derive(Debug)]
pub struct Hub {
    state: RwLock<State>,
    deltas: broadcast::Sender<Arc<EncodedDelta>>,
    synced: watch::Sender<bool>,
    pub stats: HubStats,
}

/// A consistent copy of the table for one subscriber.
#[derive(Debug)]
pub struct Snapshot {
    pub version: u64,
    mesh: Option<Bytes>,
    ports: Vec<Bytes>,
    nodes: Vec<Bytes>,
    plugins: Vec<Bytes>,
    policies: Vec<Bytes>,
}

/// Change to one service port or node, ready to publish.
#[derive(Debug, Default)]
pub struct Publish {
    pub upserts: Vec<Arc<ServicePortEntry>>,
    pub removals: Vec<PortKey>,
    pub node_upserts: Vec<Arc<NodeEntry>>,
    pub node_removals: Vec<String>,
    pub plugin_upserts: Vec<Arc<PluginEntry>>,
    /// `namespace/name`.
    pub plugin_removals: Vec<String>,
    pub policy_upserts: Vec<Arc<PolicyEntry>>,
    /// `namespace/name`.
    pub policy_removals: Vec<String>,
}

impl Publish {
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
}

impl State {
    /// Keeps only the modules some plugin names.
    fn drop_unused_modules(&mut self) {
        let used: std::collections::HashSet<&str> =
            self.plugins.values().map(|(_, sha)| sha.as_str()).collect();
        self.modules.retain(|sha, _| used.contains(sha.as_str()));
    }
}

impl Default for Hub {
    fn default() -> Self {
        Self::new()
    }
}

impl Hub {
    /// How many deltas a subscriber may fall behind before it is resynchronised.
    pub const RING: usize = 1024;
    /// Upper bound of one snapshot message.
    pub const SNAPSHOT_PART: usize = 64 * 1024;

    pub fn new() -> Self {
        let (deltas, _) = broadcast::channel(Self::RING);
        let (synced, _) = watch::channel(false);
        Self {
            state: RwLock::new(State::default()),
            deltas,
            synced,
            stats: HubStats::default(),
        }
    }

    /// Sets the mesh-wide settings every snapshot from now on starts with (a proxy gets them
    /// when it connects; control's settings are fixed for its life).
    pub fn set_mesh_config(&self, cfg: Option<&wasmesh_api::discovery::MeshConfig>) {
        let mut st = self.state.write().unwrap_or_else(|e| e.into_inner());
        st.mesh = cfg.map(|c| Bytes::from(prost::Message::encode_to_vec(c)));
        st.snapshot = None;
    }

    pub fn is_synced(&self) -> bool {
        *self.synced.borrow()
    }

    pub fn version(&self) -> u64 {
        self.read().version
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Installs the first complete table and lets subscribers in.
    pub fn init<'a>(
        &self,
        ports: impl IntoIterator<Item = &'a Arc<ServicePortEntry>>,
        nodes: impl IntoIterator<Item = &'a Arc<NodeEntry>>,
    ) {
        self.init_with_plugins(ports, nodes, [])
    }

    /// [`Hub::init`] with WasmPlugins (and their modules).
    pub fn init_with_plugins<'a>(
        &self,
        ports: impl IntoIterator<Item = &'a Arc<ServicePortEntry>>,
        nodes: impl IntoIterator<Item = &'a Arc<NodeEntry>>,
        plugins: impl IntoIterator<Item = &'a Arc<PluginEntry>>,
    ) {
        self.init_all(ports, nodes, plugins, [])
    }

    /// [`Hub::init`] with WasmPlugins (and their modules) and AuthorizationPolicies.
    pub fn init_all<'a>(
        &self,
        ports: impl IntoIterator<Item = &'a Arc<ServicePortEntry>>,
        nodes: impl IntoIterator<Item = &'a Arc<NodeEntry>>,
        plugins: impl IntoIterator<Item = &'a Arc<PluginEntry>>,
        policies: impl IntoIterator<Item = &'a Arc<PolicyEntry>>,
    ) {
        let policies: BTreeMap<String, Bytes> = policies
            .into_iter()
            .map(|p| (p.id(), encode_authorization_policy(&p.to_proto())))
            .collect();
        let mut modules = HashMap::new();
        let plugins: BTreeMap<String, (Bytes, String)> = plugins
            .into_iter()
            .map(|p| {
                modules.insert(p.sha256.clone(), p.module.clone());
                (
                    p.id(),
                    (encode_wasm_plugin(&p.to_proto()), p.sha256.clone()),
                )
            })
            .collect();
        let ports: BTreeMap<PortKey, Bytes> = ports
            .into_iter()
            .map(|e| (e.key.clone(), encode_service_port(&e.to_proto())))
            .collect();
        let nodes: BTreeMap<String, Bytes> = nodes
            .into_iter()
            .map(|n| (n.name.clone(), encode_node(&n.to_proto())))
            .collect();
        {
            let mut st = self.write();
            st.version += 1;
            st.ports = ports;
            st.nodes = nodes;
            st.plugins = plugins;
            st.modules = modules;
            st.policies = policies;
            st.snapshot = None;
        }
        self.synced.send_replace(true);
    }

    /// The bytes of the module with this sha256, if a plugin names it.
    pub fn module(&self, sha256: &str) -> Option<Bytes> {
        self.read().modules.get(sha256).cloned()
    }

    /// How many modules are held, and their total size.
    pub fn module_stats(&self) -> (usize, usize) {
        let st = self.read();
        (st.modules.len(), st.modules.values().map(Bytes::len).sum())
    }

    /// Publishes one delta; returns its version (None when there was nothing to publish).
    pub fn publish(&self, change: Publish) -> Option<u64> {
        if change.is_empty() {
            return None;
        }
        // Encode outside the lock.
        let upserts: Vec<(PortKey, Bytes)> = change
            .upserts
            .iter()
            .map(|e| (e.key.clone(), encode_service_port(&e.to_proto())))
            .collect();
        let nodes: Vec<(String, Bytes)> = change
            .node_upserts
            .iter()
            .map(|n| (n.name.clone(), encode_node(&n.to_proto())))
            .collect();
        let plugins: Vec<(String, Bytes, &PluginEntry)> = change
            .plugin_upserts
            .iter()
            .map(|p| (p.id(), encode_wasm_plugin(&p.to_proto()), p.as_ref()))
            .collect();
        let policies: Vec<(String, Bytes)> = change
            .policy_upserts
            .iter()
            .map(|p| (p.id(), encode_authorization_policy(&p.to_proto())))
            .collect();
        let size: usize = upserts.iter().map(|(_, b)| b.len() + 8).sum::<usize>()
            + nodes.iter().map(|(_, b)| b.len() + 8).sum::<usize>()
            + plugins.iter().map(|(_, b, _)| b.len() + 8).sum::<usize>()
            + policies.iter().map(|(_, b)| b.len() + 8).sum::<usize>()
            + (change.removals.len() + change.plugin_removals.len() + change.policy_removals.len())
                * 64;

        let mut st = self.write();
        let version = st.version + 1;
        let mut w = UpdateWriter::new(version, UpdateKind::Delta, size);
        for (key, bytes) in upserts {
            w.service_port(&bytes);
            st.ports.insert(key, bytes);
        }
        for key in &change.removals {
            w.removed_service_port(&key.to_proto());
            st.ports.remove(key);
        }
        for (name, bytes) in nodes {
            w.node(&bytes);
            st.nodes.insert(name, bytes);
        }
        for name in &change.node_removals {
            w.removed_node(name);
            st.nodes.remove(name);
        }
        let plugins_changed = !plugins.is_empty() || !change.plugin_removals.is_empty();
        for (id, bytes, p) in plugins {
            w.wasm_plugin(&bytes);
            st.modules
                .entry(p.sha256.clone())
                .or_insert_with(|| p.module.clone());
            st.plugins.insert(id, (bytes, p.sha256.clone()));
        }
        for id in &change.plugin_removals {
            w.removed_wasm_plugin(id);
            st.plugins.remove(id);
        }
        if plugins_changed {
            st.drop_unused_modules();
        }
        for (id, bytes) in policies {
            w.authorization_policy(&bytes);
            st.policies.insert(id, bytes);
        }
        for id in &change.policy_removals {
            w.removed_authorization_policy(id);
            st.policies.remove(id);
        }
        st.version = version;
        st.snapshot = None;
        let delta = Arc::new(EncodedDelta {
            version,
            bytes: w.finish(true),
        });
        // Sent under the lock, so a subscriber's snapshot and its first delta never overlap.
        let _ = self.deltas.send(delta);
        self.stats.deltas_published.fetch_add(1, Ordering::Relaxed);
        Some(version)
    }

    /// Waits until the table is synced, then returns a snapshot and the deltas that follow it.
    /// Subscribers that join at the same version share one snapshot; drop it once sent.
    pub async fn subscribe(&self) -> (Arc<Snapshot>, broadcast::Receiver<Arc<EncodedDelta>>) {
        let mut synced = self.synced.subscribe();
        // The sender lives as long as the hub, so this only ends when synced.
        let _ = synced.wait_for(|s| *s).await;
        self.snapshot_now()
    }

    fn snapshot_now(&self) -> (Arc<Snapshot>, broadcast::Receiver<Arc<EncodedDelta>>) {
        let rx;
        let cached = {
            let st = self.read();
            rx = self.deltas.subscribe();
            st.snapshot.clone().filter(|s| s.version == st.version)
        };
        let snap = match cached {
            Some(s) => s,
            None => {
                // Built under the write lock so the copy and the ring position agree.
                let mut st = self.write();
                let rx2 = self.deltas.subscribe();
                let snap = match &st.snapshot {
                    Some(s) if s.version == st.version => s.clone(),
                    _ => {
                        let s = Arc::new(Snapshot {
                            version: st.version,
                            mesh: st.mesh.clone(),
                            ports: st.ports.values().cloned().collect(),
                            nodes: st.nodes.values().cloned().collect(),
                            plugins: st.plugins.values().map(|(b, _)| b.clone()).collect(),
                            policies: st.policies.values().cloned().collect(),
                        });
                        st.snapshot = Some(s.clone());
                        s
                    }
                };
                drop(st);
                self.stats.snapshots_sent.fetch_add(1, Ordering::Relaxed);
                return (snap, rx2);
            }
        };
        self.stats.snapshots_sent.fetch_add(1, Ordering::Relaxed);
        (snap, rx)
    }
}

impl Snapshot {
    pub fn len(&self) -> usize {
        self.ports.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ports.is_empty()
    }

    /// The snapshot as messages of at most about `max` bytes (a single port larger than that
    /// gets a message of its own). The first is `SNAPSHOT`, the rest `SNAPSHOT_CONTINUED`, and
    /// the last one is marked complete. Parts are built as they are taken, so a subscriber
    /// holds one part at a time, not a copy of the table.
    pub fn parts(&self, max: usize) -> SnapshotParts<'_> {
        SnapshotParts {
            snapshot: self,
            max,
            next: 0,
            first: true,
            done: false,
        }
    }
}

enum Item {
    Node,
    Plugin,
    Policy,
    Port,
}

/// Iterator over the messages of a [`Snapshot`].
#[derive(Debug)]
pub struct SnapshotParts<'a> {
    snapshot: &'a Snapshot,
    max: usize,
    /// Index into nodes, then plugins, then policies, then ports.
    next: usize,
    first: bool,
    done: bool,
}

impl Iterator for SnapshotParts<'_> {
    type Item = Bytes;

    fn next(&mut self) -> Option<Bytes> {
        if self.done {
            return None;
        }
        let s = self.snapshot;
        let kind = if self.first {
            UpdateKind::Snapshot
        } else {
            UpdateKind::SnapshotContinued
        };
        self.first = false;
        let mut w = UpdateWriter::new(s.version, kind, self.max.min(1 << 20));
        if kind == UpdateKind::Snapshot
            && let Some(m) = &s.mesh
        {
            w.mesh_config(m);
        }
        let (nodes, plugins, policies) = (s.nodes.len(), s.plugins.len(), s.policies.len());
        let before_ports = nodes + plugins + policies;
        let total = before_ports + s.ports.len();
        let mut has_items = false;
        while self.next < total {
            let (item, bytes) = if self.next < nodes {
                (Item::Node, &s.nodes[self.next])
            } else if self.next < nodes + plugins {
                (Item::Plugin, &s.plugins[self.next - nodes])
            } else if self.next < before_ports {
                (Item::Policy, &s.policies[self.next - nodes - plugins])
            } else {
                (Item::Port, &s.ports[self.next - before_ports])
            };
            if has_items && w.len() + UpdateWriter::record_len(bytes.len()) > self.max {
                return Some(w.finish(false));
            }
            match item {
                Item::Node => w.node(bytes),
                Item::Plugin => w.wasm_plugin(bytes),
                Item::Policy => w.authorization_policy(bytes),
                Item::Port => w.service_port(bytes),
            }
            has_items = true;
            self.next += 1;
        }
        self.done = true;
        Some(w.finish(true))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::wasmplugin::{Module, WasmPlugin};

    fn plugin(name: &str, module: &[u8]) -> Arc<PluginEntry> {
        let mut bytes = crate::source::wasmplugin::module::WASM_MAGIC.to_vec();
        bytes.extend_from_slice(module);
        let mut p = WasmPlugin::default();
        p.metadata.namespace = Some("demo".into());
        p.metadata.name = Some(name.into());
        p.module = Some(Module::from_bytes("/m.wasm", bytes));
        Arc::new(PluginEntry::new(&p, "wasmesh-system").expect("entry"))
    }

    #[test]
    fn modules_stay_while_a_plugin_names_them() {
        let hub = Hub::new();
        let (a, b) = (plugin("a", b"shared"), plugin("b", b"shared"));
        let c = plugin("c", b"own");
        hub.init_with_plugins([], [], [&a, &b]);
        assert_eq!(hub.module_stats().0, 1, "one module for two plugins");
        assert!(hub.module(&a.sha256).is_some());

        hub.publish(Publish {
            plugin_upserts: vec![c.clone()],
            plugin_removals: vec!["demo/a".into()],
            ..Default::default()
        });
        assert!(hub.module(&a.sha256).is_some(), "b still names it");
        assert!(hub.module(&c.sha256).is_some());

        // b moves to c's module: the shared one goes.
        let b2 = plugin("b", b"own");
        hub.publish(Publish {
            plugin_upserts: vec![b2],
            ..Default::default()
        });
        assert!(hub.module(&a.sha256).is_none());
        assert_eq!(hub.module_stats(), (1, c.module.len()));

        hub.publish(Publish {
            plugin_removals: vec!["demo/b".into(), "demo/c".into()],
            ..Default::default()
        });
        assert_eq!(hub.module_stats(), (0, 0));
    }
}
