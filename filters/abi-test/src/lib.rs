//! abi-test: a host test fixture that exercises the Proxy-Wasm calls a host offers. Each
//! request picks an operation with its `x-abi-op` header; results show up where a client or
//! backend can see them (request headers the backend echoes, response headers, bodies, local
//! replies). Used by wasmesh-wasm's tests and by the Envoy comparison, so both hosts run the
//! very same bytes.
//!
//! Config (JSON): `{"reject": bool, "tick_ms": n, "callout_upstream": "name"}`; invalid JSON
//! or `"reject": true` makes `on_configure` return false. Setting the environment variable
//! `ABI_TEST_TRAP_INIT` makes `_initialize` panic.

use std::time::Duration;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, MetricType};
use serde::Deserialize;

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default)]
    reject: bool,
    #[serde(default)]
    tick_ms: u64,
    #[serde(default)]
    callout_upstream: Option<String>,
}

proxy_wasm::main! {{
    if std::env::var("ABI_TEST_TRAP_INIT").is_ok() {
        panic!("abi-test: asked to trap in _initialize");
    }
    proxy_wasm::set_log_level(LogLevel::Trace);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
}}

#[derive(Default)]
struct Root {
    config: Config,
    queue: Option<u32>,
    metrics: Option<Metrics>,
}

#[derive(Clone, Copy)]
struct Metrics {
    requests: u32,
    inflight: u32,
    path_len: u32,
}

impl Context for Root {}

fn shared_add(key: &str, delta: u64) -> u64 {
    // CAS loop: correct across instances.
    for _ in 0..100 {
        let (value, cas) = hostcalls::get_shared_data(key).unwrap_or((None, None));
        let n = value
            .and_then(|v| String::from_utf8(v).ok())
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(0)
            + delta;
        match hostcalls::set_shared_data(key, Some(n.to_string().as_bytes()), cas) {
            Ok(()) => return n,
            Err(_) => continue,
        }
    }
    0
}

fn shared_get(key: &str) -> String {
    hostcalls::get_shared_data(key)
        .ok()
        .and_then(|(v, _)| v)
        .map(|v| String::from_utf8_lossy(&v).into_owned())
        .unwrap_or_default()
}

impl RootContext for Root {
    fn on_vm_start(&mut self, _size: usize) -> bool {
        self.get_vm_configuration().as_deref() != Some(b"reject")
    }

    fn on_configure(&mut self, _size: usize) -> bool {
        let bytes = self
            .get_plugin_configuration()
            .unwrap_or_else(|| b"{}".to_vec());
        let config: Config = match serde_json::from_slice(&bytes) {
            Ok(c) => c,
            Err(e) => {
                log::error!("abi-test: invalid configuration: {e}");
                return false;
            }
        };
        if config.reject {
            log::error!("abi-test: configured to reject its configuration");
            return false;
        }
        if config.tick_ms > 0 {
            self.set_tick_period(Duration::from_millis(config.tick_ms));
        }
        self.queue = hostcalls::register_shared_queue("abi-queue").ok();
        self.metrics = Some(Metrics {
            requests: hostcalls::define_metric(MetricType::Counter, "abi_test.requests")
                .unwrap_or(0),
            inflight: hostcalls::define_metric(MetricType::Gauge, "abi_test.inflight").unwrap_or(0),
            path_len: hostcalls::define_metric(MetricType::Histogram, "abi_test.path_length")
                .unwrap_or(0),
        });
        self.config = config;
        log::info!("abi-test: configured");
        true
    }

    fn on_tick(&mut self) {
        shared_add("abi-ticks", 1);
    }

    fn on_queue_ready(&mut self, queue_id: u32) {
        while let Ok(Some(item)) = hostcalls::dequeue_shared_queue(queue_id) {
            let _ = hostcalls::set_shared_data("abi-queue-last", Some(&item), None);
        }
    }

    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Stream {
            op: String::new(),
            config: self.config.clone(),
            queue: self.queue,
            metrics: self.metrics,
            body_calls: 0,
            body_last_size: 0,
            response_body_calls: 0,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Stream {
    op: String,
    config: Config,
    queue: Option<u32>,
    metrics: Option<Metrics>,
    body_calls: u32,
    body_last_size: usize,
    response_body_calls: u32,
}

impl Context for Stream {
    fn on_http_call_response(
        &mut self,
        _token: u32,
        _n_headers: usize,
        body_size: usize,
        _n_trailers: usize,
    ) {
        let status = self
            .get_http_call_response_header(":status")
            .unwrap_or_default();
        let body = self
            .get_http_call_response_body(0, body_size)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        let echo = self
            .get_http_call_response_header("x-callout-echo")
            .unwrap_or_default();
        if status == "403" {
            self.send_http_response(
                403,
                vec![("x-abi-callout", "denied")],
                Some(b"denied by callout"),
            );
            return;
        }
        self.set_http_request_header("x-abi-callout-status", Some(&status));
        self.set_http_request_header("x-abi-callout-body-len", Some(&body.len().to_string()));
        self.set_http_request_header("x-abi-callout-echo", Some(&echo));
        self.resume_http_request();
    }
}

/// Host calls the SDK has no wrapper for: answered statuses (and a size) as header values.
fn raw_calls() -> Vec<(&'static str, String)> {
    #[link(wasm_import_module = "env")]
    unsafe extern "C" {
        fn proxy_get_log_level(level: *mut u32) -> u32;
        fn proxy_get_header_map_size(map: u32, size: *mut usize) -> u32;
        fn proxy_get_buffer_status(buffer: u32, len: *mut usize, flags: *mut u32) -> u32;
    }
    let (mut level, mut size, mut len, mut flags) = (0u32, 0usize, 0usize, 0u32);
    let (s1, s2, s3) = unsafe {
        (
            proxy_get_log_level(&mut level),
            proxy_get_header_map_size(0, &mut size),
            // The plugin configuration is not readable from a stream callback in Envoy.
            proxy_get_buffer_status(0, &mut len, &mut flags),
        )
    };
    vec![
        ("x-abi-raw-log-level-status", s1.to_string()),
        ("x-abi-raw-map-size", format!("{s2}/{}", size > 40)),
        ("x-abi-raw-buffer-status", s3.to_string()),
    ]
}

fn oob_log() {
    #[link(wasm_import_module = "env")]
    unsafe extern "C" {
        fn proxy_log(level: u32, ptr: *const u8, len: usize) -> u32;
    }
    // A pointer far outside linear memory: the host must refuse it, not read it.
    unsafe {
        proxy_log(2, 0x7fff_fff0 as *const u8, 4096);
    }
}

impl HttpContext for Stream {
    fn on_http_request_headers(&mut self, _n: usize, eos: bool) -> Action {
        self.op = self.get_http_request_header("x-abi-op").unwrap_or_default();
        self.set_http_request_header("x-abi-eos", Some(if eos { "true" } else { "false" }));
        if let Some(m) = self.metrics {
            let _ = hostcalls::increment_metric(m.requests, 1);
            let _ = hostcalls::increment_metric(m.inflight, 1);
            let path = self.get_http_request_header(":path").unwrap_or_default();
            let _ = hostcalls::record_metric(m.path_len, path.len() as u64);
        }
        match self.op.as_str() {
            "headers" => {
                let seen = format!(
                    "{} {} {} {}",
                    self.get_http_request_header(":method").unwrap_or_default(),
                    self.get_http_request_header(":path").unwrap_or_default(),
                    self.get_http_request_header(":authority")
                        .unwrap_or_default(),
                    self.get_http_request_header(":scheme").unwrap_or_default(),
                );
                self.set_http_request_header("x-abi-seen", Some(&seen));
                self.add_http_request_header("x-abi-added", "1");
                self.add_http_request_header("x-abi-added", "2");
                self.set_http_request_header("x-abi-replace", Some("replaced"));
                self.set_http_request_header("x-abi-remove", None);
                let dup = self.get_http_request_header("x-dup").unwrap_or_default();
                self.set_http_request_header("x-abi-dup-first", Some(&dup));
                self.set_http_request_header("X-Abi-Mixed-Case", Some("lowered"));
            }
            "pairs" => {
                let mut pairs = self.get_http_request_headers();
                // Count what the client sent; Envoy adds these two before filters run.
                let n = pairs
                    .iter()
                    .filter(|(k, _)| k != "x-request-id" && k != "x-forwarded-proto")
                    .count();
                pairs.retain(|(k, _)| k != "x-abi-remove");
                pairs.push(("x-abi-pairs".into(), n.to_string()));
                let refs: Vec<(&str, &str)> = pairs
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect();
                self.set_http_request_headers(refs);
            }
            "path-rewrite" => {
                let path = self.get_http_request_header(":path").unwrap_or_default();
                self.set_http_request_header(":path", Some(&format!("/rewritten{path}")));
            }
            "local-reply" => {
                self.send_http_response(
                    403,
                    vec![("x-abi-reply", "1")],
                    Some(b"denied by abi-test"),
                );
                return Action::Pause;
            }
            "local-reply-continue" => {
                // Returning Continue after a local reply must not forward the request.
                self.send_http_response(401, vec![], Some(b"no"));
                self.send_http_response(402, vec![], Some(b"second reply is ignored"));
                return Action::Continue;
            }
            "properties" => {
                let props: &[(&str, &[&str])] = &[
                    ("path", &["request", "path"]),
                    ("url-path", &["request", "url_path"]),
                    ("host", &["request", "host"]),
                    ("method", &["request", "method"]),
                    ("scheme", &["request", "scheme"]),
                    ("protocol", &["request", "protocol"]),
                    ("query", &["request", "query"]),
                    ("header", &["request", "headers", "x-prop"]),
                    ("plugin-name", &["plugin_name"]),
                    ("root-id", &["plugin_root_id"]),
                    ("missing", &["no", "such", "property"]),
                ];
                for (name, path) in props {
                    let v = self
                        .get_property(path.to_vec())
                        .map(|v| String::from_utf8_lossy(&v).into_owned())
                        .unwrap_or_else(|| "<none>".into());
                    self.set_http_request_header(&format!("x-abi-prop-{name}"), Some(&v));
                }
                let port = self
                    .get_property(vec!["destination", "port"])
                    .filter(|v| v.len() == 8)
                    .map(|v| u64::from_le_bytes(v.try_into().unwrap_or([0; 8])).to_string())
                    .unwrap_or_else(|| "<none>".into());
                self.set_http_request_header(
                    "x-abi-prop-destination-port-ok",
                    Some(if port != "<none>" && port != "0" {
                        "yes"
                    } else {
                        "no"
                    }),
                );
                let source = self
                    .get_property(vec!["source", "address"])
                    .map(|v| String::from_utf8_lossy(&v).contains(':'));
                self.set_http_request_header(
                    "x-abi-prop-source-has-port",
                    Some(if source == Some(true) { "yes" } else { "no" }),
                );
                self.set_property(vec!["wasmesh_abi_test"], Some(b"set-value"));
            }
            "body-upper" => self.set_http_request_header("content-length", None),
            "callout" => {
                let upstream = self
                    .config
                    .callout_upstream
                    .clone()
                    .unwrap_or_else(|| "authz".into());
                let who = self
                    .get_http_request_header("x-callout-want")
                    .unwrap_or_else(|| "200".into());
                let timeout_ms = self
                    .get_http_request_header("x-callout-timeout-ms")
                    .and_then(|t| t.parse().ok())
                    .unwrap_or(5000);
                let r = self.dispatch_http_call(
                    &upstream,
                    vec![
                        (":method", "GET"),
                        (":path", &format!("/callout/{who}")),
                        (":authority", "authz"),
                        ("x-callout-echo", "ping"),
                    ],
                    None,
                    vec![],
                    Duration::from_millis(timeout_ms),
                );
                match r {
                    Ok(_) => return Action::Pause,
                    Err(s) => {
                        self.set_http_request_header("x-abi-callout-error", Some(&format!("{s:?}")))
                    }
                }
            }
            "callout-bad-upstream" => {
                let r = self.dispatch_http_call(
                    "no-such-upstream",
                    vec![(":method", "GET"), (":path", "/"), (":authority", "x")],
                    None,
                    vec![],
                    Duration::from_secs(1),
                );
                self.set_http_request_header(
                    "x-abi-callout-error",
                    Some(&format!("{:?}", r.err())),
                );
            }
            "metrics" => {
                if let Some(m) = self.metrics {
                    let n = hostcalls::get_metric(m.requests).unwrap_or(0);
                    self.set_http_request_header(
                        "x-abi-counter-positive",
                        Some(if n > 0 { "yes" } else { "no" }),
                    );
                }
            }
            "shared" => {
                let n = shared_add("abi-count", 1);
                self.set_http_request_header("x-abi-shared", Some(&n.to_string()));
            }
            "queue" => {
                let q = hostcalls::resolve_shared_queue("", "abi-queue")
                    .ok()
                    .flatten()
                    .or(self.queue);
                let item = self
                    .get_http_request_header("x-abi-item")
                    .unwrap_or_default();
                let ok =
                    q.map(|q| hostcalls::enqueue_shared_queue(q, Some(item.as_bytes())).is_ok());
                self.set_http_request_header(
                    "x-abi-enqueued",
                    Some(if ok == Some(true) { "yes" } else { "no" }),
                );
                self.set_http_request_header(
                    "x-abi-queue-last",
                    Some(&shared_get("abi-queue-last")),
                );
            }
            "ticks" => {
                self.set_http_request_header("x-abi-ticks", Some(&shared_get("abi-ticks")));
            }
            "log" => {
                log::trace!("abi-test trace");
                log::debug!("abi-test debug");
                log::info!("abi-test info");
                log::warn!("abi-test warn");
                log::error!("abi-test error");
                println!("abi-test stdout");
            }
            "time" => {
                let now = self.get_current_time();
                let ok = now
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs() > 1_600_000_000)
                    .unwrap_or(false);
                let mono = std::time::Instant::now();
                let _ = mono.elapsed();
                self.set_http_request_header("x-abi-time-ok", Some(if ok { "yes" } else { "no" }));
            }
            "env" => {
                let v = std::env::var("ABI_ENV").unwrap_or_else(|_| "<unset>".into());
                self.set_http_request_header("x-abi-env", Some(&v));
            }
            "foreign" => {
                let r = hostcalls::call_foreign_function("clear_route_cache", None);
                self.set_http_request_header(
                    "x-abi-foreign",
                    Some(if r.is_ok() { "ok" } else { "err" }),
                );
            }
            "close" => {
                self.reset_http_request();
                return Action::Pause;
            }
            "panic" => panic!("abi-test: asked to panic"),
            "loop" => {
                let mut x: u64 = 0;
                loop {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
            }
            "grow" => {
                let mut hog: Vec<Vec<u8>> = Vec::new();
                loop {
                    // Reserve without touching: the cap, not the deadline, must stop this.
                    let mut v = Vec::<u8>::with_capacity(8 << 20);
                    v.push(1);
                    hog.push(v);
                    std::hint::black_box(&hog);
                }
            }
            "oob" => oob_log(),
            "raw" => {
                for (k, v) in raw_calls() {
                    self.set_http_request_header(k, Some(&v));
                }
            }
            "grpc" => {
                let r = self.dispatch_grpc_call(
                    "authz",
                    "svc",
                    "Method",
                    vec![],
                    None,
                    Duration::from_secs(1),
                );
                self.set_http_request_header("x-abi-grpc", Some(&format!("{:?}", r.err())));
            }
            _ => {}
        }
        Action::Continue
    }

    fn on_http_request_body(&mut self, body_size: usize, eos: bool) -> Action {
        self.body_calls += 1;
        self.body_last_size = body_size;
        if self.op == "body-upper" {
            if !eos {
                return Action::Pause;
            }
            if let Some(body) = self.get_http_request_body(0, body_size) {
                let upper = String::from_utf8_lossy(&body).to_uppercase();
                self.set_http_request_body(0, body_size, upper.as_bytes());
            }
        }
        Action::Continue
    }

    fn on_http_request_trailers(&mut self, _n: usize) -> Action {
        self.add_http_request_trailer("x-abi-request-trailer", "1");
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _n: usize, _eos: bool) -> Action {
        self.set_http_response_header("x-abi-response", Some(&self.op));
        if self.op == "body-count" || self.op == "body-upper" {
            self.set_http_response_header("x-abi-body-calls", Some(&self.body_calls.to_string()));
            self.set_http_response_header(
                "x-abi-body-size",
                Some(&self.body_last_size.to_string()),
            );
        }
        if self.op == "properties" {
            let code = self
                .get_property(vec!["response", "code"])
                .filter(|v| v.len() == 8)
                .map(|v| u64::from_le_bytes(v.try_into().unwrap_or([0; 8])).to_string())
                .unwrap_or_else(|| "<none>".into());
            self.set_http_response_header("x-abi-prop-response-code", Some(&code));
            let set = self
                .get_property(vec!["wasmesh_abi_test"])
                .map(|v| String::from_utf8_lossy(&v).into_owned())
                .unwrap_or_else(|| "<none>".into());
            self.set_http_response_header("x-abi-prop-set", Some(&set));
            let path = self
                .get_property(vec!["request", "path"])
                .map(|v| String::from_utf8_lossy(&v).into_owned())
                .unwrap_or_else(|| "<none>".into());
            self.set_http_response_header("x-abi-prop-request-path-later", Some(&path));
        }
        if self.op == "response-body-upper" {
            self.set_http_response_header("content-length", None);
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, eos: bool) -> Action {
        self.response_body_calls += 1;
        if self.op == "response-body-upper" {
            if !eos {
                return Action::Pause;
            }
            if let Some(body) = self.get_http_response_body(0, body_size) {
                let upper = String::from_utf8_lossy(&body).to_uppercase();
                self.set_http_response_body(0, body_size, upper.as_bytes());
            }
        }
        Action::Continue
    }

    fn on_log(&mut self) {
        if let Some(m) = self.metrics {
            let _ = hostcalls::increment_metric(m.inflight, -1);
        }
    }
}
