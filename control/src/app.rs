//! Wiring: a source, the publisher and the hub, and the two things operators run — `serve`
//! and `table`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::discovery::{Hub, publisher, server};
use crate::identity::IdentityService;
use crate::model::{Cidr, Model};
use crate::source::folder::{DEFAULT_SERVICE_CIDR, FolderSource};
use crate::source::kube::KubeSource;
use crate::source::wasmplugin::DEFAULT_ROOT_NAMESPACE;
use crate::source::{EventSender, Source, SourceError};

/// Where objects come from: `kube` or `dir:PATH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceSpec {
    Kube,
    Dir(PathBuf),
}

impl FromStr for SourceSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "kube" => Ok(SourceSpec::Kube),
            _ => match s.strip_prefix("dir:") {
                Some(p) if !p.is_empty() => Ok(SourceSpec::Dir(PathBuf::from(p))),
                _ => Err(format!(
                    "unknown source {s:?}: use `kube` (in-cluster config or KUBECONFIG) or `dir:PATH` (a folder of YAML manifests)"
                )),
            },
        }
    }
}

/// Options shared by every command that reads objects.
#[derive(Debug, Clone)]
pub struct SourceOptions {
    pub spec: SourceSpec,
    /// Namespaces to watch (kube source); empty = all.
    pub namespaces: Vec<String>,
    /// Where Services without a clusterIP get one (folder source).
    pub service_cidr: Cidr,
    /// WasmPlugins in this namespace apply to every namespace (`mesh_wide`).
    pub root_namespace: String,
}

impl SourceOptions {
    pub fn new(spec: SourceSpec) -> Self {
        Self {
            spec,
            namespaces: Vec::new(),
            service_cidr: Cidr::parse(DEFAULT_SERVICE_CIDR).expect("valid default CIDR"),
            root_namespace: DEFAULT_ROOT_NAMESPACE.into(),
        }
    }

    /// An empty model for these options (the root namespace).
    pub fn model(&self) -> Model {
        Model::with_root_namespace(self.root_namespace.clone())
    }

    pub async fn build(&self) -> Result<Source, SourceError> {
        Ok(match &self.spec {
            SourceSpec::Kube => Source::Kube(
                KubeSource::from_env(self.namespaces.clone())
                    .await?
                    .with_root_namespace(self.root_namespace.clone()),
            ),
            SourceSpec::Dir(path) => {
                if !path.is_dir() {
                    return Err(SourceError::Folder {
                        path: path.display().to_string(),
                        reason: "not a directory (give the folder that holds your YAML manifests)"
                            .into(),
                    });
                }
                Source::Folder(FolderSource::new(path, self.service_cidr))
            }
        })
    }
}

/// A running source → model → hub pipeline.
#[derive(Debug)]
pub struct Running {
    pub hub: Arc<Hub>,
    pub source: JoinHandle<Result<(), SourceError>>,
    pub publisher: JoinHandle<()>,
}

impl Running {
    pub fn abort(&self) {
        self.source.abort();
        self.publisher.abort();
    }
}

/// Starts the pipeline. `removal_grace`: see [`publisher`].
pub fn start(source: Source, removal_grace: Duration) -> Running {
    start_with_model(source, Model::new(), removal_grace)
}

/// [`start`] with a model of the caller's (e.g. [`SourceOptions::model`]).
pub fn start_with_model(source: Source, model: Model, removal_grace: Duration) -> Running {
    let (tx, hub, publisher) = start_publisher_with_model(model, removal_grace);
    let source = tokio::spawn(source.run(tx));
    Running {
        hub,
        source,
        publisher,
    }
}

/// Starts the model, publisher and hub; events sent on the returned sender flow to every
/// subscriber (what a source does; tests and benches drive it directly).
pub fn start_publisher(removal_grace: Duration) -> (EventSender, Arc<Hub>, JoinHandle<()>) {
    start_publisher_with_model(Model::new(), removal_grace)
}

/// [`start_publisher`] with a model of the caller's.
pub fn start_publisher_with_model(
    model: Model,
    removal_grace: Duration,
) -> (EventSender, Arc<Hub>, JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(1024);
    let hub = Arc::new(Hub::new());
    let publisher = tokio::spawn(publisher::run(model, rx, hub.clone(), removal_grace));
    (tx, hub, publisher)
}

/// Serves discovery (and admin, if given) until `shutdown` resolves or the source fails.
pub async fn serve(
    source: Source,
    listener: TcpListener,
    admin: Option<TcpListener>,
    removal_grace: Duration,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), SourceError> {
    serve_with_identity(
        source,
        Model::new(),
        listener,
        admin,
        removal_grace,
        None,
        shutdown,
    )
    .await
}

/// [`serve`], and the identity service (control as the CA) on the same port if given;
/// `model` is the empty model to start from ([`SourceOptions::model`]).
pub async fn serve_with_identity(
    source: Source,
    model: Model,
    listener: TcpListener,
    admin: Option<TcpListener>,
    removal_grace: Duration,
    identity: Option<IdentityService>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), SourceError> {
    let running = start_with_model(source, model, removal_grace);
    let hub = running.hub.clone();
    if let Some(admin) = admin {
        tokio::spawn(crate::admin::serve_with_identity(
            admin,
            hub.clone(),
            identity.as_ref().map(|i| i.stats.clone()),
        ));
    }
    let Running {
        source, publisher, ..
    } = running;
    tokio::pin!(source);
    let result = tokio::select! {
        _ = server::serve_with_identity(listener, hub, identity, shutdown) => Ok(()),
        r = &mut source => match r {
            Ok(r) => r,
            Err(e) => Err(SourceError::Folder { path: String::new(), reason: format!("source task failed: {e}") }),
        },
    };
    source.abort();
    publisher.abort();
    result
}

/// Why `table` could not answer.
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("not synced after {0:?}: still waiting for a complete list of {1}")]
    NotSynced(Duration, String),
}

/// Reads the source into `model` (empty: [`SourceOptions::model`]) until the table is
/// complete and returns it.
pub async fn compute_table(
    source: Source,
    mut model: Model,
    timeout: Duration,
) -> Result<Model, TableError> {
    let (tx, mut rx) = mpsc::channel(1024);
    let task = tokio::spawn(source.run(tx));
    let deadline = tokio::time::Instant::now() + timeout;
    let result = loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(ev)) => {
                model.apply(ev);
                // Take what is already queued, so the answer is as complete as we know.
                if model.is_synced() && rx.is_empty() {
                    break Ok(model);
                }
            }
            Ok(None) => {
                break match task.await {
                    Ok(Err(e)) => Err(e.into()),
                    _ => Err(not_synced(timeout, &model)),
                };
            }
            Err(_) => break Err(not_synced(timeout, &model)),
        }
    };
    if !rx.is_closed() {
        rx.close();
    }
    result
}

fn not_synced(timeout: Duration, model: &Model) -> TableError {
    let kinds: Vec<String> = model.unsynced().iter().map(|k| k.to_string()).collect();
    TableError::NotSynced(timeout, kinds.join(", "))
}

/// Binds a listener, naming the address and its use in the error.
pub async fn bind(addr: SocketAddr, what: &str) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| {
        std::io::Error::new(e.kind(), format!("cannot listen on {addr} for {what}: {e}"))
    })
}
