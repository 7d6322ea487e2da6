//! `wasmesh-local`: a whole mesh on one Linux machine, from a folder of Kubernetes YAML.
//!
//! `up` turns Namespaces, Pods, Deployments, Services and EndpointSlices into network
//! namespaces and processes: a "node" namespace with a bridge, one namespace per pod, control
//! on the node, and in each pod the interception rules, the sidecar and the containers'
//! commands. Nothing is added to the machine's own network namespace. The modules, in the order
//! `up` uses them:
//!
//! - [`config`]: paths, prefix, binaries, the fixed addresses (10.244.0.0/16, 10.96.0.0/12).
//! - [`manifests`]: reading the folder (again, on every change).
//! - [`workloads`]: which pods should exist (Pods, Deployment replicas, scaling).
//! - [`ipam`]: pod IPs and ClusterIPs.
//! - [`netns`]: the node and pod namespaces, veths, removal and leftovers.
//! - [`pods`]: what runs in a pod (environment, sidecar) and the Pod/Node objects control sees.
//! - [`agent`]: the pod agent, a small kubelet run inside each pod's namespace.
//! - [`controller`]: the EndpointSlices a Service's selector implies.
//! - [`dns`]: Service names in every pod's `/etc/hosts`.
//! - [`objects`]: the folder control reads; [`control`]: the control process.
//! - [`mesh`]: the loop that ties it together, and [`mesh::MeshHandle`] to run one in a test.
//! - [`state`]: the state directory (status, requests); [`cli`]: `get`, `exec`, `logs`, `down`.
//! - [`process`]: signals and commands.

pub mod agent;
pub mod cli;
pub mod config;
pub mod control;
pub mod controller;
pub mod dns;
pub mod ipam;
pub mod manifests;
pub mod mesh;
pub mod netns;
pub mod objects;
pub mod otlp;
pub mod pods;
pub mod process;
pub mod state;
pub mod workloads;

pub use config::{Binaries, MeshConfig, SidecarExec};
pub use mesh::{Command, MeshError, MeshHandle};
