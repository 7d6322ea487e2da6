//! wasmesh-injector: puts the wasmesh sidecar into pods, as a Kubernetes mutating admission
//! webhook (`serve`) or offline on YAML (`inject`). How it behaves and how to run it:
//! `docs/injection.md`.
//!
//! Map, in the order a request travels:
//!
//! - [`server`]: HTTPS (rustls + hyper), routes, limits and deadlines; `run(listener, config,
//!   shutdown)` binds nothing itself.
//! - [`tls`]: the serving certificate from PEM files, reloaded when they change.
//! - [`webhook`]: AdmissionReview JSON in, AdmissionReview JSON out (base64 JSON Patch); pure.
//! - [`mutate`]: the policy (who is injected, who is skipped and why) and the JSON Patch; pure.
//! - [`annotations`]: the labels and annotations read and written, and the checks on values.
//! - [`sidecar`]: the init container, the proxy container and the token volume that are added.
//! - [`offline`]: the `inject` command: the same mutation on multi-document YAML.
//! - [`config`]: the one [`config::Config`] struct with the cluster-wide defaults.

pub mod annotations;
pub mod config;
pub mod mutate;
pub mod offline;
pub mod server;
pub mod sidecar;
pub mod tls;
pub mod webhook;
