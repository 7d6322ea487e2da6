//! Where control's Kubernetes objects come from.
//!
//! Two sources produce the same stream of [`Event`]s: [`kube`] (watchers on a real API server)
//! and [`folder`] (a directory of YAML manifests, the embedded default). Everything after the
//! source — the model, the discovery stream, the `table` command — is the same code for both.
//!
//! The event protocol mirrors `kube::runtime::watcher`:
//! - [`Event::Replace`] carries the complete current set of one kind within a scope (all
//!   namespaces, or one namespace when control watches a list of namespaces), after a list or a
//!   re-list: objects of that kind and scope that are not in the set are gone.
//! - [`Event::Synced`] says a kind has been listed completely in every scope. Until Services and
//!   EndpointSlices are synced the model answers "not synced", never "no endpoints".
//! - [`Event::Apply`] / [`Event::Delete`] are single changes.
//!
//! [`httproute`] holds our own types for Gateway API HTTPRoutes (k8s-openapi has none), their
//! defaults and their validation, shared by both sources; [`wasmplugin`] the same for our
//! WasmPlugin resource, and the module files plugins name (read by the sources, so a plugin
//! reaches the model with its module's bytes and sha256); [`authz`] our AuthorizationPolicy
//! resource (its spec and validation are the contract's, shared with the proxy).

pub mod authz;
pub mod folder;
pub mod httproute;
pub mod kube;
pub mod wasmplugin;

use k8s_openapi::api::core::v1::{Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use tokio::sync::mpsc;

pub use authz::AuthorizationPolicy;
pub use httproute::HttpRoute;
pub use wasmplugin::WasmPlugin;

/// The kinds of object control reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Service,
    EndpointSlice,
    Pod,
    Node,
    /// `gateway.networking.k8s.io/v1` HTTPRoute (GAMMA: attached to Services).
    HttpRoute,
    /// `wasmesh.io/v1alpha1` WasmPlugin.
    WasmPlugin,
    /// `wasmesh.io/v1alpha1` AuthorizationPolicy.
    AuthorizationPolicy,
}

impl Kind {
    pub const ALL: [Kind; 7] = [
        Kind::Service,
        Kind::EndpointSlice,
        Kind::Pod,
        Kind::Node,
        Kind::HttpRoute,
        Kind::WasmPlugin,
        Kind::AuthorizationPolicy,
    ];

    /// The Kubernetes `kind`.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Pod => "Pod",
            Kind::Node => "Node",
            Kind::HttpRoute => httproute::KIND,
            Kind::WasmPlugin => wasmplugin::KIND,
            Kind::AuthorizationPolicy => authz::KIND,
        }
    }

    /// The `apiVersion` control reads the kind at.
    pub fn api_version(self) -> &'static str {
        match self {
            Kind::Service | Kind::Pod | Kind::Node => "v1",
            Kind::EndpointSlice => "discovery.k8s.io/v1",
            Kind::HttpRoute => httproute::API_VERSION,
            Kind::WasmPlugin => wasmplugin::API_VERSION,
            Kind::AuthorizationPolicy => authz::API_VERSION,
        }
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One Kubernetes object of a kind control reads.
// Objects are moved once through a channel and then taken apart by the model; boxing the
// larger variants would cost an allocation each for nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Object {
    Service(Service),
    EndpointSlice(EndpointSlice),
    Pod(Pod),
    Node(Node),
    HttpRoute(HttpRoute),
    WasmPlugin(WasmPlugin),
    AuthorizationPolicy(AuthorizationPolicy),
}

impl Object {
    pub fn kind(&self) -> Kind {
        match self {
            Object::Service(_) => Kind::Service,
            Object::EndpointSlice(_) => Kind::EndpointSlice,
            Object::Pod(_) => Kind::Pod,
            Object::Node(_) => Kind::Node,
            Object::HttpRoute(_) => Kind::HttpRoute,
            Object::WasmPlugin(_) => Kind::WasmPlugin,
            Object::AuthorizationPolicy(_) => Kind::AuthorizationPolicy,
        }
    }

    pub fn meta(&self) -> &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
        match self {
            Object::Service(o) => &o.metadata,
            Object::EndpointSlice(o) => &o.metadata,
            Object::Pod(o) => &o.metadata,
            Object::Node(o) => &o.metadata,
            Object::HttpRoute(o) => &o.metadata,
            Object::WasmPlugin(o) => &o.metadata,
            Object::AuthorizationPolicy(o) => &o.metadata,
        }
    }

    pub fn meta_mut(&mut self) -> &mut k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
        match self {
            Object::Service(o) => &mut o.metadata,
            Object::EndpointSlice(o) => &mut o.metadata,
            Object::Pod(o) => &mut o.metadata,
            Object::Node(o) => &mut o.metadata,
            Object::HttpRoute(o) => &mut o.metadata,
            Object::WasmPlugin(o) => &mut o.metadata,
            Object::AuthorizationPolicy(o) => &mut o.metadata,
        }
    }

    /// `(kind, namespace, name)`; namespace is empty for cluster-scoped kinds.
    pub fn key(&self) -> ObjectKey {
        let m = self.meta();
        ObjectKey {
            kind: self.kind(),
            namespace: m.namespace.clone().unwrap_or_default(),
            name: m.name.clone().unwrap_or_default(),
        }
    }

    /// Drops what control never reads and what makes objects large (managedFields, the
    /// last-applied annotation), so memory stays flat however objects are written.
    pub fn trim(&mut self) {
        let m = self.meta_mut();
        m.managed_fields = None;
        if let Some(a) = m.annotations.as_mut() {
            a.remove("kubectl.kubernetes.io/last-applied-configuration");
        }
    }
}

impl serde::Serialize for Object {
    /// The object's Kubernetes JSON (with `apiVersion` and `kind`).
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Object::Service(o) => serde::Serialize::serialize(o, s),
            Object::EndpointSlice(o) => serde::Serialize::serialize(o, s),
            Object::Pod(o) => serde::Serialize::serialize(o, s),
            Object::Node(o) => serde::Serialize::serialize(o, s),
            Object::HttpRoute(o) => serde::Serialize::serialize(o, s),
            Object::WasmPlugin(o) => serde::Serialize::serialize(o, s),
            Object::AuthorizationPolicy(o) => serde::Serialize::serialize(o, s),
        }
    }
}

/// The identity of an object.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{} {}", self.kind, self.name)
        } else {
            write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
        }
    }
}

/// What a source reports.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// An object was added or changed.
    Apply(Object),
    /// An object was deleted.
    Delete(Object),
    /// The complete set of one kind in one scope.
    Replace {
        kind: Kind,
        /// `None`: all namespaces (and cluster-scoped kinds); `Some(ns)`: that namespace only.
        namespace: Option<String>,
        objects: Vec<Object>,
    },
    /// Every scope of this kind has been listed once; sent once per kind per source run.
    Synced(Kind),
}

/// The channel sources write into.
pub type EventSender = mpsc::Sender<Event>;

/// Either source, behind one interface.
#[derive(Debug)]
pub enum Source {
    Kube(kube::KubeSource),
    Folder(folder::FolderSource),
}

impl Source {
    /// Runs the source until `tx` is closed (or a fatal error, which is returned).
    pub async fn run(self, tx: EventSender) -> Result<(), SourceError> {
        match self {
            Source::Kube(s) => s.run(tx).await,
            Source::Folder(s) => s.run(tx).await,
        }
    }
}

/// A source that cannot go on.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot read folder {path}: {reason}")]
    Folder { path: String, reason: String },
    #[error("cannot connect to Kubernetes: {0}")]
    Kube(String),
}
