//! The control client: one `Watch` stream, applied to the table as it arrives. When control is
//! gone the proxy keeps serving from the last table and reconnects with jittered exponential
//! backoff; a reconnect brings a fresh snapshot. WasmPlugins go to the filters task;
//! AuthorizationPolicies to the authorizer (with mTLS on), synchronously, so a table never
//! counts as received before its policies are in force.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use rand::Rng;
use wasmesh_api::discovery::discovery_client::DiscoveryClient;
use wasmesh_api::table::{PortId, Table as WireTable, port_id};
use wasmesh_api::{UpdateKind, WatchRequest};

use crate::state::{ControlState, ProxyState, Stats};

#[derive(Debug, Clone)]
pub struct DiscoveryConfig {
    /// e.g. `http://wasmesh-control.wasmesh-system.svc:15010`
    pub control: String,
    pub who: WatchRequest,
    /// Where to send the addresses to refuse, when the reject chain is on.
    pub verdicts: Option<tokio::sync::watch::Sender<crate::reject::Verdicts>>,
}

#[derive(Debug, thiserror::Error)]
enum StreamError {
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("stream failed: {0}")]
    Status(#[from] tonic::Status),
    #[error("inconsistent update: {0}")]
    Apply(#[from] wasmesh_api::table::ApplyError),
    #[error("control closed the stream")]
    Closed,
}

/// Runs forever.
pub async fn run(cfg: DiscoveryConfig, state: Arc<ProxyState>) {
    let mut failures: u32 = 0;
    loop {
        state.set_control_state(ControlState::Connecting);
        let err = follow(&cfg, &state, &mut failures).await;
        state.set_control_state(ControlState::Backoff);
        state.control_connected.store(false, Ordering::Relaxed);
        Stats::inc(&state.stats.control_reconnects);
        failures = failures.saturating_add(1);
        let base = Duration::from_millis(100) * 2u32.saturating_pow(failures.min(7));
        // Until the first table the pod's start waits on us (its containers start when the
        // sidecar is ready): keep asking every second or so, so a sidecar that came up before
        // control is ready soon after control is. Later, back off up to 10 s.
        let cap = if state.is_ready() {
            Duration::from_secs(10)
        } else {
            Duration::from_secs(1)
        };
        let base = base.min(cap);
        let jitter = rand::rng().random_range(0.5..1.5);
        let wait = base.mul_f64(jitter);
        tracing::warn!(control = %cfg.control, error = %err, retry_in = ?wait, ready = state.is_ready(), "lost control; serving from the last table");
        tokio::time::sleep(wait).await;
    }
}

async fn follow(cfg: &DiscoveryConfig, state: &ProxyState, failures: &mut u32) -> StreamError {
    let endpoint = match tonic::transport::Endpoint::from_shared(cfg.control.clone()) {
        Ok(e) => e
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10)),
        Err(e) => {
            return StreamError::Connect(format!("bad control address {:?}: {e}", cfg.control));
        }
    };
    let channel = match endpoint.connect().await {
        Ok(c) => c,
        Err(e) => return StreamError::Connect(e.to_string()),
    };
    let mut client = DiscoveryClient::new(channel).max_decoding_message_size(256 << 20);
    let mut stream = match client.watch(cfg.who.clone()).await {
        Ok(s) => s.into_inner(),
        Err(e) => return e.into(),
    };
    let mut wire = WireTable::default();
    loop {
        let update = match stream.message().await {
            Ok(Some(u)) => u,
            Ok(None) => return StreamError::Closed,
            Err(e) => return e.into(),
        };
        let changed: Option<Vec<PortId>> = (update.kind == UpdateKind::Delta as i32).then(|| {
            update
                .service_ports
                .iter()
                .filter_map(|sp| sp.key.as_ref().map(port_id))
                .chain(update.removed_service_ports.iter().map(port_id))
                .collect()
        });
        let applied = match wire.apply(update) {
            Ok(a) => a,
            Err(e) => return e.into(),
        };
        if !applied.complete {
            continue;
        }
        if applied.plugins_changed {
            state
                .wasm_plugins
                .send_replace(wire.wasm_plugins.values().cloned().collect());
        }
        if let Some(authorizer) = state.authorizer.get()
            && (applied.policies_changed || !state.control_connected.load(Ordering::Relaxed))
        {
            authorizer.set_control_policies(wire.authorization_policies.values());
            if applied.policies_changed {
                tracing::info!(
                    policies = wire.authorization_policies.len(),
                    "authorization policies from control applied"
                );
            }
        }
        if let (Some(tx), Some(v)) = (&cfg.verdicts, install(state, &wire, changed.as_deref())) {
            tx.send_replace(v);
        }
        let mesh_tracing = wire
            .mesh_config
            .as_ref()
            .map(|m| crate::otel::config::MeshTracing {
                endpoint: m.otlp_endpoint.clone(),
                protocol: m.otlp_protocol.clone(),
                sampling: m.has_trace_sampling.then_some(m.trace_sampling),
            });
        state.mesh_tracing.send_if_modified(|have| {
            let changed = *have != mesh_tracing;
            if changed {
                *have = mesh_tracing;
            }
            changed
        });
        state.set_control_state(ControlState::Connected);
        if !state.control_connected.swap(true, Ordering::Relaxed) {
            tracing::info!(control = %cfg.control, version = wire.version, service_ports = wire.ports.len(), "table received from control");
            *failures = 0;
        }
        state.set_ready();
    }
}

/// Applies a complete table from the stream (`changed`: the ports a delta named; None after a
/// snapshot): the data path uses it from now on. Returns the addresses to refuse if they
/// changed ([`crate::reject`]).
pub fn install(
    state: &ProxyState,
    wire: &WireTable,
    changed: Option<&[PortId]>,
) -> Option<crate::reject::Verdicts> {
    let verdicts = {
        let mut builder = state.builder.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = builder.apply(wire, changed) {
            state.table.store(Arc::new(t));
        }
        state
            .opaque_endpoints
            .store(Arc::new(builder.opaque_endpoints()));
        state
            .local_services
            .store(Arc::new(builder.local_services()));
        builder.take_verdicts()
    };
    state.version.store(wire.version, Ordering::Relaxed);
    state.table_updated();
    verdicts
}
