//! header-route: sets, removes and rewrites request and response headers, and picks a route
//! by rules — the first rule whose match holds sets its headers (e.g. `x-tenant: acme` →
//! `x-route: acme-backend`, which an HTTPRoute matches). Request changes happen before
//! routing, so they steer it.
//!
//! Config (JSON, via `on_configure`; anything invalid makes it return false):
//! ```json
//! { "request":  { "set": {"x-env": "prod"}, "remove": ["x-debug"],
//!                 "rewrite": [{"header": ":path", "prefix": "/v1/", "to": "/v2/"},
//!                             {"header": "x-a", "find": "old", "to": "new"}] },
//!   "response": { "set": {"x-served-by": "wasmesh"}, "remove": ["server"] },
//!   "routes": [ {"match": {"header": "x-tenant", "exact": "acme"}, "set": {"x-route": "acme"}},
//!               {"match": {"header": ":path", "prefix": "/beta"}, "set": {"x-route": "beta"}},
//!               {"match": {"header": "x-vip", "present": true}, "set": {"x-route": "vip"}} ],
//!   "default_route": {"x-route": "default"},
//!   "route_header_echo": "x-route-decision" }
//! ```
//! Order: request `remove`, `rewrite`, `set`, then the routes (matched on the result).

use std::collections::BTreeMap;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use serde::Deserialize;

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Edits {
    #[serde(default)]
    set: BTreeMap<String, String>,
    #[serde(default)]
    remove: Vec<String>,
    #[serde(default)]
    rewrite: Vec<Rewrite>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Rewrite {
    header: String,
    #[serde(default)]
    prefix: Option<String>,
    #[serde(default)]
    find: Option<String>,
    to: String,
}

impl Rewrite {
    fn apply(&self, value: &str) -> Option<String> {
        match (&self.prefix, &self.find) {
            (Some(p), _) => value
                .strip_prefix(p.as_str())
                .map(|rest| format!("{}{rest}", self.to)),
            (None, Some(f)) if value.contains(f.as_str()) => {
                Some(value.replace(f.as_str(), &self.to))
            }
            _ => None,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Match {
    header: String,
    #[serde(default)]
    exact: Option<String>,
    #[serde(default)]
    prefix: Option<String>,
    #[serde(default)]
    present: Option<bool>,
}

impl Match {
    fn holds(&self, value: Option<&str>) -> bool {
        match (value, &self.exact, &self.prefix, self.present) {
            (Some(v), Some(e), _, _) => v == e,
            (Some(v), None, Some(p), _) => v.starts_with(p.as_str()),
            (v, None, None, Some(present)) => v.is_some() == present,
            _ => false,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Route {
    #[serde(rename = "match")]
    when: Match,
    set: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default)]
    request: Edits,
    #[serde(default)]
    response: Edits,
    #[serde(default)]
    routes: Vec<Route>,
    #[serde(default)]
    default_route: BTreeMap<String, String>,
    #[serde(default)]
    route_header_echo: Option<String>,
}

impl Config {
    fn parse(bytes: &[u8]) -> Result<Config, String> {
        let c: Config = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        for r in c.request.rewrite.iter().chain(&c.response.rewrite) {
            if r.prefix.is_some() == r.find.is_some() {
                return Err(format!(
                    "rewrite of {}: give exactly one of prefix or find",
                    r.header
                ));
            }
        }
        for r in &c.routes {
            let kinds = [
                r.when.exact.is_some(),
                r.when.prefix.is_some(),
                r.when.present.is_some(),
            ];
            if kinds.iter().filter(|k| **k).count() != 1 {
                return Err(format!(
                    "route on {}: give exactly one of exact, prefix or present",
                    r.when.header
                ));
            }
        }
        Ok(c)
    }
}

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root { config: None }) });
}}

struct Root {
    config: Option<std::rc::Rc<Config>>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let bytes = self
            .get_plugin_configuration()
            .unwrap_or_else(|| b"{}".to_vec());
        match Config::parse(&bytes) {
            Ok(c) => {
                self.config = Some(std::rc::Rc::new(c));
                true
            }
            Err(e) => {
                log::error!("header-route: invalid configuration: {e}");
                false
            }
        }
    }

    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(HeaderRoute {
            config: self.config.clone()?,
            decision: None,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct HeaderRoute {
    config: std::rc::Rc<Config>,
    decision: Option<String>,
}

impl Context for HeaderRoute {}

impl HeaderRoute {
    fn edit(
        &self,
        edits: &Edits,
        get: impl Fn(&Self, &str) -> Option<String>,
        set: impl Fn(&Self, &str, Option<&str>),
    ) {
        for name in &edits.remove {
            set(self, name, None);
        }
        for r in &edits.rewrite {
            if let Some(new) = get(self, &r.header).and_then(|v| r.apply(&v)) {
                set(self, &r.header, Some(&new));
            }
        }
        for (k, v) in &edits.set {
            set(self, k, Some(v));
        }
    }
}

impl HttpContext for HeaderRoute {
    fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
        let config = self.config.clone();
        self.edit(
            &config.request,
            |s, k| s.get_http_request_header(k),
            |s, k, v| s.set_http_request_header(k, v),
        );
        let chosen = config.routes.iter().enumerate().find(|(_, r)| {
            r.when
                .holds(self.get_http_request_header(&r.when.header).as_deref())
        });
        let (set, name) = match chosen {
            Some((i, r)) => (&r.set, format!("rule-{i}")),
            None => (&config.default_route, "default".to_string()),
        };
        for (k, v) in set {
            self.set_http_request_header(k, Some(v));
        }
        self.decision = Some(name);
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _n: usize, _eos: bool) -> Action {
        let config = self.config.clone();
        self.edit(
            &config.response,
            |s, k| s.get_http_response_header(k),
            |s, k, v| s.set_http_response_header(k, v),
        );
        if let (Some(h), Some(d)) = (&config.route_header_echo, &self.decision) {
            self.set_http_response_header(h, Some(d));
        }
        Action::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewrites_and_matches() {
        let r = Rewrite {
            header: ":path".into(),
            prefix: Some("/v1/".into()),
            find: None,
            to: "/v2/".into(),
        };
        assert_eq!(r.apply("/v1/x").as_deref(), Some("/v2/x"));
        assert_eq!(r.apply("/v3/x"), None);
        let m = Match {
            header: "x".into(),
            exact: None,
            prefix: None,
            present: Some(false),
        };
        assert!(m.holds(None));
        assert!(!m.holds(Some("a")));
    }

    #[test]
    fn config_is_validated() {
        assert!(Config::parse(b"{}").is_ok());
        assert!(Config::parse(br#"{"routes":[{"match":{"header":"x"},"set":{}}]}"#).is_err());
        assert!(Config::parse(br#"{"request":{"rewrite":[{"header":"x","to":"y"}]}}"#).is_err());
        assert!(Config::parse(br#"{"unknown":1}"#).is_err());
    }
}
