//! wasmesh-proxy: the sidecar that runs in every meshed pod.
//!
//! Map of the modules, in the order a connection meets them:
//!
//! - [`intercept`] — `wasmesh-proxy init`: the nat rules that send the pod's TCP connections to
//!   the proxy (outbound → 15001, inbound → 15006), rendered by a pure function
//!   ([`intercept::render_rules`]) and installed with `iptables-restore`.
//!   See `docs/interception.md`.
//! - [`orig_dst`] — where a redirected connection was going ([`orig_dst::original_dst`]).
//! - [`outbound`] (15001) — the app's connections: [`table`] says whether the destination is a
//!   Service port and which endpoints this pod may use; [`balance`] and [`affinity`] pick one;
//!   connect failures fail over to another endpoint; [`copy`] moves the bytes.
//! - [`detect`] — on a Service port, is it HTTP? Declared (`appProtocol`, port name), opaque,
//!   or detected from the first bytes; HTTP goes to [`http`] (routes, per-request balancing,
//!   retries, timeouts), the rest stays L4.
//! - [`inbound`] (15006) — connections to the pod, handed to the app.
//! - [`identity`] — mTLS between sidecars: the SPIFFE certificate from control, TLS to meshed
//!   endpoints (outbound), detection, termination, strict/permissive and authorization
//!   (inbound).
//! - [`reject`] — optional: Services without endpoints refused in the kernel, like kube-proxy.
//! - [`discovery`] — the control stream that keeps [`table`] current; [`state`] is what the
//!   tasks share; [`admin`] (15000) serves `/ready`, `/live`, `/config`, `/metrics`
//!   ([`metrics`]: the registry, labeled families recorded on the data path);
//!   [`access_log`] writes JSON lines per request and connection, off the data path;
//!   [`otel`] records a span per HTTP request and exports them over OTLP;
//!   [`run`] wires it all together (`wasmesh-proxy run`); [`wait`] is `wasmesh-proxy wait`.

pub mod access_log;
pub mod admin;
pub mod affinity;
pub mod balance;
pub mod copy;
pub mod detect;
pub mod discovery;
pub mod filters;
pub mod http;
pub mod identity;
pub mod inbound;
pub mod intercept;
pub mod metrics;
pub mod orig_dst;
pub mod otel;
pub mod outbound;
pub mod reject;
pub mod run;
pub mod state;
pub mod table;
pub mod wait;
