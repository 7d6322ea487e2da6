//! The publisher: source events → model → hub, one task.
//!
//! It batches events that are already queued, publishes nothing before the model is synced,
//! and holds back changes that *lose* endpoints for a short grace period. An endpoint that
//! moves between EndpointSlices arrives as two events (removed from one slice, added to
//! another) in either order; holding the loss lets the addition catch up, so a subscriber never
//! sees the endpoint — or the whole Service — transiently disappear. Additions and condition
//! changes (ready → terminating) go out at once.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use super::hub::{Hub, Publish};
use crate::model::{Model, PortKey, ServicePortEntry};
use crate::source::Event;

/// At most this many queued events are folded into one delta.
const MAX_BATCH: usize = 4096;

/// Default hold for changes that lose endpoints (kube-proxy batches for 1 s by default).
pub const DEFAULT_REMOVAL_GRACE: Duration = Duration::from_millis(200);

/// Runs until `events` closes.
pub async fn run(
    mut model: Model,
    mut events: mpsc::Receiver<Event>,
    hub: Arc<Hub>,
    grace: Duration,
) {
    let mut published: BTreeMap<PortKey, Arc<ServicePortEntry>> = BTreeMap::new();
    let mut held: BTreeMap<PortKey, Instant> = BTreeMap::new();
    let mut initialised = false;
    hub.set_mesh_config(model.mesh_config());
    loop {
        let next_hold = held.values().min().copied();
        let mut dirty_ports: BTreeSet<PortKey> = BTreeSet::new();
        // Ports whose hold just ran out: published now, whatever they lost.
        let mut released: BTreeSet<PortKey> = BTreeSet::new();
        let mut delta = crate::model::Delta::default();
        tokio::select! {
            ev = events.recv() => {
                let Some(ev) = ev else { return };
                delta.merge(model.apply(ev));
                let mut n = 1;
                while n < MAX_BATCH {
                    match events.try_recv() {
                        Ok(ev) => delta.merge(model.apply(ev)),
                        Err(_) => break,
                    }
                    n += 1;
                }
            }
            _ = sleep_until(next_hold), if next_hold.is_some() => {
                let now = Instant::now();
                let due: Vec<PortKey> = held.iter().filter(|(_, t)| **t <= now).map(|(k, _)| k.clone()).collect();
                for k in due {
                    held.remove(&k);
                    dirty_ports.insert(k.clone());
                    released.insert(k);
                }
            }
        }
        if !model.is_synced() {
            continue;
        }
        if !initialised {
            initialised = true;
            hub.init_all(
                model.entries().values(),
                model.nodes().values(),
                model.plugins().values(),
                model.policies().values(),
            );
            published = model.entries().clone();
            tracing::info!(
                service_ports = published.len(),
                endpoints = model.endpoint_count(),
                nodes = model.nodes().len(),
                wasm_plugins = model.plugins().len(),
                authorization_policies = model.policies().len(),
                "table synced; serving snapshots"
            );
            continue;
        }
        dirty_ports.extend(delta.upserts.into_keys());
        dirty_ports.extend(delta.removals);

        let mut change = Publish::default();
        let now = Instant::now();
        for key in dirty_ports {
            let current = model.entry(&key);
            let before = published.get(&key);
            let losing = matches!((before, current), (Some(b), Some(c)) if loses_endpoints(b, c));
            if losing && !grace.is_zero() && !released.contains(&key) {
                held.entry(key.clone()).or_insert(now + grace);
                continue;
            }
            held.remove(&key);
            match current {
                Some(c) => {
                    if before.map(|b| Arc::ptr_eq(b, c) || b == c) != Some(true) {
                        published.insert(key, c.clone());
                        change.upserts.push(c.clone());
                    }
                }
                None => {
                    if published.remove(&key).is_some() {
                        change.removals.push(key);
                    }
                }
            }
        }
        change.node_upserts = delta.node_upserts.into_values().collect();
        change.node_removals = delta.node_removals.into_iter().collect();
        // Plugins are never held back: a plugin change loses no endpoints.
        for p in delta.plugin_upserts.values() {
            tracing::info!(plugin = %p.id(), sha256 = %p.sha256, generation = p.generation, "WasmPlugin updated");
        }
        for id in &delta.plugin_removals {
            tracing::info!(plugin = %id, "WasmPlugin removed");
        }
        change.plugin_upserts = delta.plugin_upserts.into_values().collect();
        change.plugin_removals = delta.plugin_removals.into_iter().collect();
        // Policies neither: a policy change must reach proxies at once.
        for p in delta.policy_upserts.values() {
            tracing::info!(policy = %p.id(), "AuthorizationPolicy updated");
        }
        for id in &delta.policy_removals {
            tracing::info!(policy = %id, "AuthorizationPolicy removed");
        }
        change.policy_upserts = delta.policy_upserts.into_values().collect();
        change.policy_removals = delta.policy_removals.into_iter().collect();
        if let Some(version) = hub.publish(change) {
            tracing::debug!(version, "published delta");
        }
    }
}

async fn sleep_until(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// True when some `address:port` of `before` is missing from `after` (both sorted).
pub fn loses_endpoints(before: &ServicePortEntry, after: &ServicePortEntry) -> bool {
    let mut it = after
        .endpoints
        .iter()
        .map(|e| (e.address, e.port))
        .peekable();
    for b in before.endpoints.iter().map(|e| (e.address, e.port)) {
        while it.next_if(|a| *a < b).is_some() {}
        if it.next_if(|a| *a == b).is_none() {
            return true;
        }
    }
    false
}
