//! `wasmesh-proxy run`: the sidecar. Binds the listeners, follows control, serves.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use wasmesh_api::WatchRequest;

use crate::discovery::{self, DiscoveryConfig};
use crate::identity::authz::{self, Authorizer, MtlsMode};
use crate::identity::{IdentityStore, Mesh, certify};
use crate::inbound::{self, Inbound};
use crate::outbound::{self, Outbound, OutboundConfig};
use crate::state::ProxyState;
use crate::table::Locality;

/// Everything `run` needs, parsed by main.
#[derive(Debug, Clone)]
pub struct RunConfig {
    pub control: String,
    pub admin: SocketAddr,
    pub outbound_port: u16,
    pub inbound_port: u16,
    pub pod_name: String,
    pub pod_namespace: String,
    /// Where compiled Wasm modules are cached (None: in memory only).
    pub wasm_cache_dir: Option<std::path::PathBuf>,
    /// The pod's labels (WasmPlugin selectors match them).
    pub pod_labels: std::collections::BTreeMap<String, String>,
    pub node_name: Option<String>,
    pub zone: Option<String>,
    pub outbound: OutboundConfig,
    /// On shutdown, how long open connections may take to finish.
    pub drain_timeout: Duration,
    /// Fill the `WASMESH_REJECT` chain (needs CAP_NET_ADMIN): see [`crate::reject`].
    pub reject_chain: bool,
    /// mTLS between sidecars; None = off (plaintext everywhere, as before).
    pub mtls: Option<MtlsConfig>,
    /// JSON access logs (off by default).
    pub access_log: crate::access_log::AccessLogConfig,
}

/// How this proxy gets its identity and guards its inbound side.
#[derive(Debug, Clone)]
pub struct MtlsConfig {
    /// The token that proves who we are to control.
    pub token_file: std::path::PathBuf,
    /// Certificate lifetime to ask for; None = control's default.
    pub cert_lifetime: Option<Duration>,
    /// Trust domain (for `ns/...` rules in policies; certificates carry their own).
    pub trust_domain: String,
    /// Inbound plaintext: permissive (accepted) or strict (refused); policies can make it strict.
    pub mode: MtlsMode,
    /// Folder of AuthorizationPolicy YAML, re-read every couple of seconds, in addition to the
    /// policies control sends (policies select workloads by [`RunConfig::pod_labels`]).
    pub policy_dir: Option<std::path::PathBuf>,
}

/// Why the sidecar cannot start.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        addr: SocketAddr,
        what: &'static str,
        source: std::io::Error,
    },
    #[error(transparent)]
    AccessLog(#[from] crate::access_log::AccessLogError),
}

async fn bind(addr: SocketAddr, what: &'static str) -> Result<TcpListener, RunError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| RunError::Bind { addr, what, source })
}

/// Binds `[::]:port` (dual-stack) or, without IPv6, `0.0.0.0:port`.
async fn bind_wildcard(port: u16, what: &'static str) -> Result<TcpListener, RunError> {
    match TcpListener::bind(SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port)).await {
        Ok(l) => Ok(l),
        Err(_) => {
            bind(
                SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port),
                what,
            )
            .await
        }
    }
}

/// The Wasm filters (their host starts with the first WasmPlugin that applies to this pod; a
/// host that cannot start is logged and its plugins are not loaded).
fn start_filters(
    cfg: &RunConfig,
    state: &Arc<ProxyState>,
    mesh: Option<Arc<Mesh>>,
) -> Option<Arc<crate::filters::Filters>> {
    let mut pools = crate::http::pool::Pools::new(
        crate::http::pool::Dial::Direct,
        cfg.outbound.connect_timeout,
    );
    pools.set_mesh(mesh);
    let callouts = crate::filters::callouts::MeshCallouts {
        state: state.clone(),
        pools: Arc::new(pools),
        namespace: cfg.pod_namespace.clone(),
    };
    let host_config = wasmesh_wasm::HostConfig {
        callouts: Some(Arc::new(callouts)),
        cache_dir: cfg.wasm_cache_dir.clone(),
        node: wasmesh_wasm::NodeInfo {
            id: format!("sidecar~{}.{}", cfg.pod_name, cfg.pod_namespace),
            pod: cfg.pod_name.clone(),
            namespace: cfg.pod_namespace.clone(),
            cluster: "wasmesh".into(),
        },
        ..Default::default()
    };
    Some(Arc::new(crate::filters::Filters::new(
        host_config,
        crate::filters::select::Me {
            namespace: cfg.pod_namespace.clone(),
            labels: cfg.pod_labels.clone(),
        },
    )))
}

/// Keeps the tracer in line with the pod's `OTEL_*` variables and control's mesh-wide
/// settings: started, replaced or stopped whenever what they say together changes.
async fn follow_tracing(workload: crate::otel::config::Workload, state: Arc<ProxyState>) {
    let mut rx = state.mesh_tracing.subscribe();
    loop {
        let mesh = rx.borrow_and_update().clone();
        let (want, warnings) =
            crate::otel::config::resolve(&|k| std::env::var(k).ok(), mesh.as_ref(), &workload);
        for w in warnings {
            tracing::warn!("tracing: {w}");
        }
        let have = state.tracer.load().as_ref().map(|t| t.config.clone());
        if want != have {
            match want {
                None => {
                    state.tracer.store(None);
                    if have.is_some() {
                        tracing::info!("tracing: off");
                    }
                }
                Some(c) => {
                    let (endpoint, protocol, sampler) = (c.endpoint.clone(), c.protocol, c.sampler);
                    match crate::otel::export::start(c, state.trace_stats.clone()) {
                        Ok(t) => {
                            tracing::info!(%endpoint, %protocol, ?sampler, "tracing: exporting spans");
                            state.tracer.store(Some(t));
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "tracing: off");
                            state.tracer.store(None);
                        }
                    }
                }
            }
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// Runs until `shutdown` resolves.
pub async fn run(
    cfg: RunConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), RunError> {
    let me = Locality {
        node: cfg.node_name.clone(),
        zone: cfg.zone.clone(),
        namespace: Some(cfg.pod_namespace.clone()).filter(|n| !n.is_empty()),
    };
    let state =
        ProxyState::with_access_log(me, crate::access_log::AccessLog::start(&cfg.access_log)?);
    if !cfg.pod_name.is_empty() {
        // Inbound metrics name the Service that selects this pod.
        state
            .builder
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .set_pod(format!("{}/{}", cfg.pod_namespace, cfg.pod_name));
    }

    // REDIRECT sends locally generated connections to the loopback address of their family.
    let out_v4 = bind(
        SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), cfg.outbound_port),
        "outbound",
    )
    .await?;
    let out_v6 = TcpListener::bind(SocketAddr::new(
        IpAddr::V6(Ipv6Addr::LOCALHOST),
        cfg.outbound_port,
    ))
    .await
    .ok();
    let inb = bind_wildcard(cfg.inbound_port, "inbound").await?;
    let admin = bind(cfg.admin, "admin").await?;

    let mut own = vec![out_v4.local_addr().map_err(|source| RunError::Bind {
        addr: cfg.admin,
        what: "outbound",
        source,
    })?];
    if let Some(l) = &out_v6
        && let Ok(a) = l.local_addr()
    {
        own.push(a);
    }
    let mut tasks = tokio::task::JoinSet::new();
    let mesh = cfg.mtls.as_ref().map(|m| {
        let mesh = Arc::new(Mesh {
            store: IdentityStore::new(),
            authorizer: Authorizer::new(
                authz::Workload {
                    namespace: cfg.pod_namespace.clone(),
                    labels: cfg.pod_labels.clone(),
                },
                m.trust_domain.clone(),
                m.mode,
            ),
            stats: state.mesh_stats.clone(),
        });
        // Control's policies arrive with the table (discovery hands them over); inbound
        // connections wait for them rather than pass on a partial set.
        mesh.authorizer.expect_control_policies();
        let _ = state.authorizer.set(mesh.authorizer.clone());
        tasks.spawn(certify::run(
            certify::IdentityConfig {
                control: cfg.control.clone(),
                token_file: m.token_file.clone(),
                lifetime: m.cert_lifetime,
                pod_name: cfg.pod_name.clone(),
                pod_namespace: cfg.pod_namespace.clone(),
            },
            mesh.store.clone(),
            mesh.stats.clone(),
        ));
        if let Some(dir) = &m.policy_dir {
            tasks.spawn(authz::watch_dir(
                dir.clone(),
                mesh.authorizer.clone(),
                Duration::from_secs(2),
            ));
        }
        mesh
    });
    tasks.spawn(follow_tracing(
        crate::otel::config::Workload {
            pod_name: cfg.pod_name.clone(),
            namespace: cfg.pod_namespace.clone(),
            labels: cfg.pod_labels.clone(),
        },
        state.clone(),
    ));
    let filters = start_filters(&cfg, &state, mesh.clone());
    if let Some(f) = &filters {
        let _ = state.filters.set(f.clone());
        tasks.spawn(crate::filters::follow(
            f.clone(),
            state.wasm_plugins.subscribe(),
            cfg.control.clone(),
        ));
    }
    let outbound = Arc::new(
        Outbound::new(state.clone(), cfg.outbound.clone(), own)
            .with_mesh(mesh.clone())
            .with_filters(filters.clone()),
    );
    let inbound = Arc::new(Inbound {
        state: state.clone(),
        own_ports: vec![cfg.inbound_port, cfg.outbound_port, cfg.admin.port()],
        connect_timeout: Duration::from_secs(5),
        copy: cfg.outbound.copy,
        mesh,
        detect_timeout: cfg.outbound.detect_timeout,
        opaque_ports: crate::detect::DEFAULT_OPAQUE_PORTS.to_vec(),
        pools: crate::http::pool::Pools::new(
            crate::http::pool::Dial::LocalApp,
            Duration::from_secs(5),
        ),
        filters,
    });

    let who = WatchRequest {
        pod_name: cfg.pod_name.clone(),
        pod_namespace: cfg.pod_namespace.clone(),
        node_name: cfg.node_name.clone().unwrap_or_default(),
        zone: cfg.zone.clone().unwrap_or_default(),
        proxy_version: env!("CARGO_PKG_VERSION").to_string(),
    };
    tracing::info!(
        control = %cfg.control, pod = %cfg.pod_name, namespace = %cfg.pod_namespace,
        outbound = cfg.outbound_port, inbound = cfg.inbound_port, admin = %cfg.admin,
        balancer = ?cfg.outbound.balancer, mtls = cfg.mtls.is_some(),
        access_log = ?cfg.access_log.target, "wasmesh-proxy running"
    );
    let verdicts = cfg.reject_chain.then(|| {
        let (tx, rx) = tokio::sync::watch::channel(crate::reject::Verdicts::new());
        tasks.spawn(crate::reject::run(rx));
        tx
    });
    tasks.spawn(discovery::run(
        DiscoveryConfig {
            control: cfg.control.clone(),
            who,
            verdicts,
        },
        state.clone(),
    ));
    tasks.spawn(crate::admin::serve(admin, state.clone()));
    let mut accepting = tokio::task::JoinSet::new();
    accepting.spawn(outbound::serve(out_v4, outbound.clone()));
    if let Some(l) = out_v6 {
        accepting.spawn(outbound::serve(l, outbound));
    }
    accepting.spawn(inbound::serve(inb, inbound));
    tokio::select! {
        () = shutdown => {}
        () = state.quit.notified() => {}
    }
    // Stop accepting, fail /ready (admin keeps answering), let open connections finish.
    accepting.abort_all();
    let open = state.open_connections();
    tracing::info!(open, drain_timeout = ?cfg.drain_timeout, "wasmesh-proxy stopping: draining connections");
    let left = state.drain(cfg.drain_timeout).await;
    if left > 0 {
        tracing::warn!(left, "drain timeout: closing the remaining connections");
    }
    tasks.abort_all();
    Ok(())
}
