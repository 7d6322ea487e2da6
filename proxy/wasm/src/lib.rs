//! wasmesh-wasm: the Proxy-Wasm host (ABI 0.2.1 and 0.2.0) on wasmtime, for HTTP filters.
//!
//! Map of the modules, from the proxy's side inwards:
//!
//! - [`host`] — [`WasmHost`]: one per proxy; the engine, the linker, the epoch ticker that
//!   enforces callback deadlines, the module cache, metrics, shared data.
//! - [`config`] — [`HostConfig`], [`PluginConfig`] (a `WasmPlugin`), [`FailStrategy`], [`Phase`].
//! - [`plugin`] — [`Plugin`]: a loaded module + configuration and its pool of instances;
//!   faults, instance replacement, timers and callout delivery.
//! - [`chain`] — [`FilterChain`] / [`ChainStream`]: plugins in order, one stream per request.
//! - [`stream`] — [`HttpStream`]: one request through one plugin, Envoy's pause/resume and
//!   buffering semantics, fail strategy; [`action`] is what each step returns.
//! - [`instance`] — one wasmtime instance: the guarded call (deadline, memory cap, [`Fault`]).
//! - [`context`] — per-instance state: root and stream contexts, deferred actions, mailboxes.
//! - [`abi`] — ABI constants, the `env.proxy_*` host functions and the WASI shims;
//!   [`memory`] checks every guest pointer; [`headers`] is the header-map view and wire format;
//!   [`properties`] answers attribute paths; [`metrics`], [`shared`] and [`callouts`] are what
//!   filters share with the proxy.
//! - [`module`] — validation, compilation, the on-disk cache of precompiled modules.
//! - [`body`] — [`body::FilteredBody`]: an `http_body::Body` through a chain's body steps.
//! - `idle` — [`worker_idle`]: stream endings (`on_done`/`on_log`/`on_delete`) run when the
//!   worker thread goes idle, after the response went out.
//!
//! Usage sketch (the L7 path):
//!
//! ```no_run
//! # async fn demo(wasm: Vec<u8>, req: http::Request<()>) -> Result<(), Box<dyn std::error::Error>> {
//! use wasmesh_wasm::{FilterChain, HostConfig, PluginConfig, StreamInfo, Verdict, WasmHost};
//! let host = WasmHost::new(HostConfig::default())?;
//! let plugin = host.load(PluginConfig::new("canary", wasm).with_config(r#"{"percentage":10}"#))?;
//! let chain = FilterChain::new(vec![plugin]);
//! let mut stream = chain.new_stream(StreamInfo::default());
//! let (mut parts, ()) = req.into_parts();
//! match stream.on_request_headers(&mut parts, true).await {
//!     Verdict::Continue => { /* route on parts (filters may have set headers), forward */ }
//!     Verdict::LocalReply(reply) => { let _response = reply.into_response(); }
//!     Verdict::Reset => { /* drop the connection */ }
//! }
//! # Ok(()) }
//! ```

mod abi;
pub mod action;
pub mod body;
pub mod callouts;
pub mod chain;
pub mod config;
mod context;
mod headers;
pub mod host;
mod idle;
pub mod instance;
mod memory;
pub mod metrics;
mod module;
pub mod plugin;
pub mod properties;
mod shared;
pub mod stream;

pub use abi::{AbiVersion, Direction};
pub use action::{BodyVerdict, LocalReply, Verdict};
pub use callouts::{CalloutError, CalloutFailure, CalloutResponse, HttpCallouts};
pub use chain::{ChainStream, FilterChain};
pub use config::{FailStrategy, HostConfig, ModuleSource, NodeInfo, Phase, PluginConfig};
pub use host::{HostError, WasmHost};
pub use idle::worker_idle;
pub use instance::Fault;
pub use metrics::{DefinedMetric, HostEvent, MetricKind, Metrics, Sample};
pub use module::sha256_hex;
pub use plugin::{LoadError, Plugin};
pub use properties::StreamInfo;
pub use stream::HttpStream;
