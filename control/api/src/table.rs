//! A subscriber's copy of the service table, kept by applying the `Watch` stream.

use std::collections::BTreeMap;

use crate::discovery::{
    AuthorizationPolicy, Node, ServicePort, ServicePortKey, TableUpdate, WasmPlugin,
    table_update::Kind,
};

/// `(namespace, service, port name, protocol)` — the identity of a service port.
pub type PortId = (String, String, String, i32);

pub fn port_id(key: &ServicePortKey) -> PortId {
    (
        key.namespace.clone(),
        key.service.clone(),
        key.port_name.clone(),
        key.protocol,
    )
}

/// `namespace/name`: the identity of a WasmPlugin in the table and in
/// `TableUpdate.removed_wasm_plugins`.
pub fn plugin_id(plugin: &WasmPlugin) -> String {
    format!("{}/{}", plugin.namespace, plugin.name)
}

/// `namespace/name`: the identity of an AuthorizationPolicy in the table and in
/// `TableUpdate.removed_authorization_policies`.
pub fn policy_id(policy: &AuthorizationPolicy) -> String {
    format!("{}/{}", policy.namespace, policy.name)
}

/// Why an update could not be applied; the subscriber should reconnect for a fresh snapshot.
#[derive(Debug, PartialEq, Eq)]
pub enum ApplyError {
    /// A delta did not follow the version held.
    Gap { held: u64, got: u64 },
    /// A snapshot continuation arrived without a snapshot in progress.
    OrphanContinuation,
    /// A service port without a key.
    MissingKey,
    /// Unknown update kind.
    UnknownKind(i32),
}

impl std::fmt::Display for ApplyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ApplyError::Gap { held, got } => {
                write!(f, "delta version {got} does not follow held version {held}")
            }
            ApplyError::OrphanContinuation => {
                f.write_str("snapshot continuation without a snapshot in progress")
            }
            ApplyError::MissingKey => f.write_str("service port without a key"),
            ApplyError::UnknownKind(k) => write!(f, "unknown update kind {k}"),
        }
    }
}

impl std::error::Error for ApplyError {}

/// The table as a subscriber sees it.
#[derive(Debug, Default, Clone)]
pub struct Table {
    pub version: u64,
    pub ports: BTreeMap<PortId, ServicePort>,
    pub nodes: BTreeMap<String, Node>,
    /// Every WasmPlugin of the mesh by `namespace/name` (each proxy picks those that apply to
    /// it); module bytes are fetched separately with `GetModule`.
    pub wasm_plugins: BTreeMap<String, WasmPlugin>,
    /// Control's mesh-wide settings (from the last snapshot).
    pub mesh_config: Option<crate::discovery::MeshConfig>,
    /// Every AuthorizationPolicy of the mesh by `namespace/name` (each proxy applies those that
    /// select it).
    pub authorization_policies: BTreeMap<String, AuthorizationPolicy>,
    /// A snapshot being received (not yet complete).
    pending: Option<Box<Table>>,
    /// True once a complete snapshot has been applied.
    pub synced: bool,
}

/// What an applied update changed, for callers that react to changes.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// The table became consistent with this update (a complete snapshot or a delta).
    pub complete: bool,
    pub changed_ports: usize,
    pub removed_ports: usize,
    /// Some WasmPlugin was added, changed or removed (on a complete snapshot: the set differs
    /// from the one held before).
    pub plugins_changed: bool,
    /// Some AuthorizationPolicy was added, changed or removed (on a complete snapshot: the set
    /// differs from the one held before).
    pub policies_changed: bool,
}

impl Table {
    pub fn apply(&mut self, update: TableUpdate) -> Result<Applied, ApplyError> {
        let kind = Kind::try_from(update.kind).map_err(|_| ApplyError::UnknownKind(update.kind))?;
        match kind {
            Kind::Snapshot => {
                let mut fresh = Table {
                    version: update.version,
                    ..Default::default()
                };
                let applied = fresh.merge(update.clone())?;
                if update.complete {
                    fresh.synced = true;
                    let plugins_changed = fresh.wasm_plugins != self.wasm_plugins;
                    let policies_changed =
                        fresh.authorization_policies != self.authorization_policies;
                    *self = fresh;
                    Ok(Applied {
                        complete: true,
                        plugins_changed,
                        policies_changed,
                        ..applied
                    })
                } else {
                    self.pending = Some(Box::new(fresh));
                    Ok(Applied::default())
                }
            }
            Kind::SnapshotContinued => {
                let mut pending = self.pending.take().ok_or(ApplyError::OrphanContinuation)?;
                let complete = update.complete;
                let applied = pending.merge(update)?;
                if complete {
                    pending.synced = true;
                    let plugins_changed = pending.wasm_plugins != self.wasm_plugins;
                    let policies_changed =
                        pending.authorization_policies != self.authorization_policies;
                    *self = *pending;
                    Ok(Applied {
                        complete: true,
                        plugins_changed,
                        policies_changed,
                        ..applied
                    })
                } else {
                    self.pending = Some(pending);
                    Ok(Applied::default())
                }
            }
            Kind::Delta => {
                if self.synced && update.version != self.version + 1 {
                    return Err(ApplyError::Gap {
                        held: self.version,
                        got: update.version,
                    });
                }
                self.version = update.version;
                let applied = self.merge(update)?;
                Ok(Applied {
                    complete: true,
                    ..applied
                })
            }
            Kind::Unspecified => Err(ApplyError::UnknownKind(update.kind)),
        }
    }

    fn merge(&mut self, update: TableUpdate) -> Result<Applied, ApplyError> {
        let mut applied = Applied::default();
        for key in &update.removed_service_ports {
            if self.ports.remove(&port_id(key)).is_some() {
                applied.removed_ports += 1;
            }
        }
        for sp in update.service_ports {
            let id = port_id(sp.key.as_ref().ok_or(ApplyError::MissingKey)?);
            self.ports.insert(id, sp);
            applied.changed_ports += 1;
        }
        for name in &update.removed_nodes {
            self.nodes.remove(name);
        }
        for node in update.nodes {
            self.nodes.insert(node.name.clone(), node);
        }
        for id in &update.removed_wasm_plugins {
            if self.wasm_plugins.remove(id).is_some() {
                applied.plugins_changed = true;
            }
        }
        if let Some(m) = update.mesh_config {
            self.mesh_config = Some(m);
        }
        for plugin in update.wasm_plugins {
            let id = plugin_id(&plugin);
            if self.wasm_plugins.get(&id) != Some(&plugin) {
                applied.plugins_changed = true;
            }
            self.wasm_plugins.insert(id, plugin);
        }
        for id in &update.removed_authorization_policies {
            if self.authorization_policies.remove(id).is_some() {
                applied.policies_changed = true;
            }
        }
        for policy in update.authorization_policies {
            let id = policy_id(&policy);
            if self.authorization_policies.get(&id) != Some(&policy) {
                applied.policies_changed = true;
            }
            self.authorization_policies.insert(id, policy);
        }
        Ok(applied)
    }

    /// The service port with this identity, if any.
    pub fn get(
        &self,
        namespace: &str,
        service: &str,
        port_name: &str,
        protocol: i32,
    ) -> Option<&ServicePort> {
        self.ports.get(&(
            namespace.to_string(),
            service.to_string(),
            port_name.to_string(),
            protocol,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plugin(name: &str, sha: &str) -> WasmPlugin {
        WasmPlugin {
            namespace: "demo".into(),
            name: name.into(),
            sha256: sha.into(),
            ..Default::default()
        }
    }

    fn update(version: u64, kind: Kind, complete: bool) -> TableUpdate {
        TableUpdate {
            version,
            kind: kind as i32,
            complete,
            ..Default::default()
        }
    }

    #[test]
    fn plugins_kept_through_snapshots_and_deltas() {
        let mut t = Table::default();
        let mut snap = update(1, Kind::Snapshot, false);
        snap.wasm_plugins = vec![plugin("a", "1")];
        assert_eq!(t.apply(snap).unwrap(), Applied::default());
        let mut rest = update(1, Kind::SnapshotContinued, true);
        rest.wasm_plugins = vec![plugin("b", "2")];
        let applied = t.apply(rest).unwrap();
        assert!(applied.complete && applied.plugins_changed, "{applied:?}");
        assert_eq!(
            t.wasm_plugins.keys().collect::<Vec<_>>(),
            ["demo/a", "demo/b"]
        );

        // A delta without plugins leaves them alone.
        let applied = t.apply(update(2, Kind::Delta, true)).unwrap();
        assert!(!applied.plugins_changed);
        assert_eq!(t.wasm_plugins.len(), 2);

        // Changed and removed.
        let mut d = update(3, Kind::Delta, true);
        d.wasm_plugins = vec![plugin("a", "3")];
        d.removed_wasm_plugins = vec!["demo/b".into()];
        assert!(t.apply(d).unwrap().plugins_changed);
        assert_eq!(t.wasm_plugins.len(), 1);
        assert_eq!(t.wasm_plugins["demo/a"].sha256, "3");

        // The same plugin again is no change; removing an unknown one neither.
        let mut d = update(4, Kind::Delta, true);
        d.wasm_plugins = vec![plugin("a", "3")];
        d.removed_wasm_plugins = vec!["demo/zz".into()];
        assert!(!t.apply(d).unwrap().plugins_changed);

        // A fresh snapshot replaces the set; an identical one changes nothing.
        let mut snap = update(9, Kind::Snapshot, true);
        snap.wasm_plugins = vec![plugin("a", "3")];
        assert!(!t.apply(snap.clone()).unwrap().plugins_changed);
        snap.wasm_plugins.clear();
        assert!(t.apply(snap).unwrap().plugins_changed);
        assert!(t.wasm_plugins.is_empty());
    }

    fn policy(name: &str, port: u32) -> AuthorizationPolicy {
        AuthorizationPolicy {
            namespace: "demo".into(),
            name: name.into(),
            has_rules: true,
            rules: vec![crate::discovery::AuthorizationRule {
                from: vec!["*".into()],
                any_client: false,
                ports: vec![port],
            }],
            ..Default::default()
        }
    }

    #[test]
    fn policies_kept_through_snapshots_and_deltas() {
        let mut t = Table::default();
        let mut snap = update(1, Kind::Snapshot, true);
        snap.authorization_policies = vec![policy("a", 80), policy("b", 81)];
        let applied = t.apply(snap.clone()).unwrap();
        assert!(applied.policies_changed && !applied.plugins_changed);
        assert_eq!(
            t.authorization_policies.keys().collect::<Vec<_>>(),
            ["demo/a", "demo/b"]
        );
        assert!(
            !t.apply(update(2, Kind::Delta, true))
                .unwrap()
                .policies_changed
        );

        let mut d = update(3, Kind::Delta, true);
        d.authorization_policies = vec![policy("a", 90)];
        d.removed_authorization_policies = vec!["demo/b".into()];
        assert!(t.apply(d).unwrap().policies_changed);
        assert_eq!(t.authorization_policies["demo/a"].rules[0].ports, [90]);
        assert_eq!(t.authorization_policies.len(), 1);

        let mut d = update(4, Kind::Delta, true);
        d.authorization_policies = vec![policy("a", 90)];
        d.removed_authorization_policies = vec!["demo/zz".into()];
        assert!(!t.apply(d).unwrap().policies_changed, "nothing changed");

        snap.version = 9;
        assert!(
            t.apply(snap).unwrap().policies_changed,
            "a new snapshot's set"
        );
        assert_eq!(t.authorization_policies.len(), 2);
    }
}
