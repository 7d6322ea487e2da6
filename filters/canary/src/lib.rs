//! canary: sends a share of users — or the requests that match a header or a cookie — to the
//! canary, by setting a routing header that an HTTPRoute matches. The share is sticky per user:
//! the user is the value of a configured header (e.g. `x-user`), hashed with FNV-1a 64 so the
//! same user gets the same answer in every proxy and every Envoy. The decision is echoed in a
//! response header for debugging.
//!
//! Config (JSON, via `on_configure`; anything invalid makes it return false):
//! ```json
//! { "percentage": 10,                       // 0..=100, may be fractional
//!   "route_header": "x-canary",             // set on the request (default "x-canary")
//!   "canary_value": "canary",               // its value for the canary (default "canary")
//!   "stable_value": "stable",               // its value otherwise (default "stable")
//!   "sticky_header": "x-user",              // hash this header's value (optional)
//!   "match_headers": {"x-canary-opt-in": "yes"},  // any match → canary (optional)
//!   "match_cookie": "canary=always",        // cookie name=value → canary (optional)
//!   "decision_header": "x-canary-decision", // response header (default; "" = none)
//!   "salt": "v2" }                          // change to reshuffle users (optional)
//! ```

use std::collections::BTreeMap;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use serde::Deserialize;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    percentage: f64,
    #[serde(default = "d_route")]
    route_header: String,
    #[serde(default = "d_canary")]
    canary_value: String,
    #[serde(default = "d_stable")]
    stable_value: String,
    #[serde(default)]
    sticky_header: Option<String>,
    #[serde(default)]
    match_headers: BTreeMap<String, String>,
    #[serde(default)]
    match_cookie: Option<String>,
    #[serde(default = "d_decision")]
    decision_header: String,
    #[serde(default)]
    salt: String,
}

fn d_route() -> String {
    "x-canary".into()
}
fn d_canary() -> String {
    "canary".into()
}
fn d_stable() -> String {
    "stable".into()
}
fn d_decision() -> String {
    "x-canary-decision".into()
}

impl Config {
    fn parse(bytes: &[u8]) -> Result<Config, String> {
        let c: Config = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if !(0.0..=100.0).contains(&c.percentage) {
            return Err(format!("percentage {} is not within 0..=100", c.percentage));
        }
        if c.route_header.is_empty() {
            return Err("route_header is empty".into());
        }
        Ok(c)
    }
}

/// FNV-1a, 64 bits.
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for p in parts {
        for b in *p {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x100000001b3);
        }
    }
    h
}

/// Whether a hash value falls in the canary share (basis points, so 0.01 % steps).
fn in_share(hash: u64, percentage: f64) -> bool {
    ((hash % 10_000) as f64) < percentage * 100.0
}

fn cookie_matches(cookie_header: &str, want: &str) -> bool {
    cookie_header.split(';').any(|c| c.trim() == want)
}

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(CanaryRoot { config: None }) });
}}

struct CanaryRoot {
    config: Option<Config>,
}

impl Context for CanaryRoot {}

impl RootContext for CanaryRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        let Some(bytes) = self.get_plugin_configuration() else {
            log::error!("canary: no configuration (need at least {{\"percentage\": N}})");
            return false;
        };
        match Config::parse(&bytes) {
            Ok(c) => {
                log::info!(
                    "canary: {}% to {}={}",
                    c.percentage,
                    c.route_header,
                    c.canary_value
                );
                self.config = Some(c);
                true
            }
            Err(e) => {
                log::error!("canary: invalid configuration: {e}");
                false
            }
        }
    }

    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        let config = self.config.clone()?;
        Some(Box::new(Canary {
            config,
            decision: None,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Canary {
    config: Config,
    decision: Option<String>,
}

impl Context for Canary {}

impl Canary {
    fn decide(&self) -> (bool, &'static str) {
        let c = &self.config;
        for (name, value) in &c.match_headers {
            if self.get_http_request_header(name).as_deref() == Some(value.as_str()) {
                return (true, "header");
            }
        }
        if let (Some(want), Some(cookies)) =
            (&c.match_cookie, self.get_http_request_header("cookie"))
            && cookie_matches(&cookies, want)
        {
            return (true, "cookie");
        }
        let user = c
            .sticky_header
            .as_deref()
            .and_then(|h| self.get_http_request_header(h));
        match user {
            Some(user) => (
                in_share(
                    fnv1a(&[c.salt.as_bytes(), b"\0", user.as_bytes()]),
                    c.percentage,
                ),
                "user",
            ),
            None => {
                let now = self
                    .get_current_time()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos() as u64);
                (
                    in_share(fnv1a(&[&now.to_le_bytes()]), c.percentage),
                    "random",
                )
            }
        }
    }
}

impl HttpContext for Canary {
    fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
        let (canary, why) = self.decide();
        let c = &self.config;
        let value = if canary {
            &c.canary_value
        } else {
            &c.stable_value
        };
        self.set_http_request_header(&c.route_header, Some(value));
        self.decision = Some(format!("{value}; by={why}"));
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _n: usize, _eos: bool) -> Action {
        if let Some(d) = &self.decision
            && !self.config.decision_header.is_empty()
        {
            self.set_http_response_header(&self.config.decision_header, Some(d));
        }
        Action::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn share_is_close_to_the_percentage() {
        let n = 20_000;
        let hits = (0..n)
            .filter(|i| in_share(fnv1a(&[b"", b"\0", format!("user-{i}").as_bytes()]), 10.0))
            .count();
        let share = hits as f64 / n as f64;
        assert!((0.09..0.11).contains(&share), "{share}");
    }

    #[test]
    fn config_is_validated() {
        assert!(Config::parse(br#"{"percentage": 5}"#).is_ok());
        assert!(Config::parse(br#"{"percentage": 150}"#).is_err());
        assert!(Config::parse(br#"{"percent": 5}"#).is_err());
        assert!(Config::parse(b"not json").is_err());
    }

    #[test]
    fn cookies_match_by_pair() {
        assert!(cookie_matches("a=1; canary=always", "canary=always"));
        assert!(!cookie_matches("canary=never", "canary=always"));
    }
}
