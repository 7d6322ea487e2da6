//! A subscriber's copy of the service table, kept by applying the `Watch` stream.

use std::collections::BTreeMap;

use crate::discovery::{Node, ServicePort, ServicePortKey, TableUpdate, table_update::Kind};

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
                    *self = fresh;
                    Ok(Applied {
                        complete: true,
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
                    *self = *pending;
                    Ok(Applied {
                        complete: true,
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
