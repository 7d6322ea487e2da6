//! The labels and annotations the injector reads and writes, and the checks on their values.
//!
//! [`Settings::read`] turns a pod's annotations plus the [`Config`] defaults into the values the
//! sidecar is built from. Every value is checked here, before anything is injected: a value the
//! proxy would reject at start-up would leave a pod that never becomes ready, so an invalid
//! annotation means *no injection* and a warning naming the annotation and what is wrong
//! ([`AnnotationError`]).

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use crate::config::{Config, Resources, SidecarMode};

/// Opt in (`"true"`) or out (`"false"`); pod label or annotation. Out wins.
pub const INJECT: &str = "wasmesh.io/inject";
/// Namespace label value that opts every pod of the namespace in.
pub const NAMESPACE_ENABLED: &str = "enabled";
/// `native` or `classic`.
pub const SIDECAR_MODE: &str = "wasmesh.io/sidecar-mode";
/// UID (and GID) of the proxy; its traffic is never captured.
pub const PROXY_UID: &str = "wasmesh.io/proxy-uid";
/// Proxy CPU request.
pub const PROXY_CPU: &str = "wasmesh.io/proxy-cpu";
/// Proxy memory request.
pub const PROXY_MEMORY: &str = "wasmesh.io/proxy-memory";
/// Proxy CPU limit.
pub const PROXY_CPU_LIMIT: &str = "wasmesh.io/proxy-cpu-limit";
/// Proxy memory limit.
pub const PROXY_MEMORY_LIMIT: &str = "wasmesh.io/proxy-memory-limit";
/// The proxy's worker threads (`WASMESH_WORKERS`).
pub const PROXY_WORKERS: &str = "wasmesh.io/proxy-workers";
/// Inbound ports that reach the app directly.
pub const EXCLUDE_INBOUND_PORTS: &str = "traffic.wasmesh.io/exclude-inbound-ports";
/// Outbound ports never captured.
pub const EXCLUDE_OUTBOUND_PORTS: &str = "traffic.wasmesh.io/exclude-outbound-ports";
/// Outbound destination networks never captured.
pub const EXCLUDE_OUTBOUND_IP_RANGES: &str = "traffic.wasmesh.io/exclude-outbound-ip-ranges";
/// Outbound destination networks captured (`*` = all).
pub const INCLUDE_OUTBOUND_IP_RANGES: &str = "traffic.wasmesh.io/include-outbound-ip-ranges";
/// Inbound ports captured (`*` = all).
pub const INCLUDE_INBOUND_PORTS: &str = "traffic.wasmesh.io/include-inbound-ports";
/// `strict` or `permissive`: the sidecar's inbound mTLS mode (`WASMESH_INBOUND_MTLS`); strict
/// refuses plaintext clients. Default: the proxy's (permissive); an AuthorizationPolicy with
/// `mtls: strict` also makes a pod strict.
pub const MTLS: &str = "wasmesh.io/mtls";
/// Written by the injector: what it injected, in which mode, by which version (JSON).
pub const INJECTED: &str = "wasmesh.io/injected";

/// Every annotation the injector reads, for documentation and `--help`.
pub const READ: [&str; 14] = [
    INJECT,
    SIDECAR_MODE,
    MTLS,
    PROXY_UID,
    PROXY_CPU,
    PROXY_MEMORY,
    PROXY_CPU_LIMIT,
    PROXY_MEMORY_LIMIT,
    PROXY_WORKERS,
    EXCLUDE_INBOUND_PORTS,
    EXCLUDE_OUTBOUND_PORTS,
    EXCLUDE_OUTBOUND_IP_RANGES,
    INCLUDE_OUTBOUND_IP_RANGES,
    INCLUDE_INBOUND_PORTS,
];

/// One annotation with a value the injector cannot use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("annotation {key}: {value:?} {reason}")]
pub struct AnnotationError {
    pub key: &'static str,
    pub value: String,
    pub reason: String,
}

impl AnnotationError {
    fn new(key: &'static str, value: &str, reason: impl Into<String>) -> Self {
        Self {
            key,
            value: value.to_owned(),
            reason: reason.into(),
        }
    }
}

/// Every invalid annotation of a pod, so the user fixes them all in one go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnnotationErrors(pub Vec<AnnotationError>);

impl fmt::Display for AnnotationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            e.fmt(f)?;
        }
        Ok(())
    }
}

impl std::error::Error for AnnotationErrors {}

/// A pod's say on injection, from its `wasmesh.io/inject` label and annotation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PodChoice {
    /// Neither label nor annotation.
    Unset,
    /// `"true"` on the label or the annotation (and `"false"` on neither).
    OptIn,
    /// `"false"` on the label or the annotation.
    OptOut(Source),
}

/// Where a pod's choice was read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Label,
    Annotation,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Label => "label",
            Self::Annotation => "annotation",
        })
    }
}

/// Reads `wasmesh.io/inject` from the labels and annotations. `"false"` anywhere wins (so an
/// opt-out can never be overridden); values other than `"true"`/`"false"` are errors.
pub fn pod_choice(
    labels: Option<&BTreeMap<String, String>>,
    annotations: Option<&BTreeMap<String, String>>,
) -> Result<PodChoice, AnnotationError> {
    let mut choice = PodChoice::Unset;
    let mut error = None;
    for (source, map) in [(Source::Label, labels), (Source::Annotation, annotations)] {
        match map.and_then(|m| m.get(INJECT)).map(|v| v.trim()) {
            None => {}
            Some("false") => return Ok(PodChoice::OptOut(source)),
            Some("true") => choice = PodChoice::OptIn,
            Some(other) => {
                error.get_or_insert_with(|| {
                    AnnotationError::new(
                        INJECT,
                        other,
                        format!("(on the pod's {source}) is not \"true\" or \"false\""),
                    )
                });
            }
        }
    }
    match error {
        Some(e) => Err(e),
        None => Ok(choice),
    }
}

/// Which inbound ports or outbound networks are captured: all, or a list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Include {
    All,
    /// Comma-separated, normalized; may be empty (= capture none).
    List(String),
}

/// The values the sidecar is built from: annotations over config defaults, all checked.
/// Lists are normalized to `a,b,c` (no blanks) as `wasmesh-proxy init` takes them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    pub mode: SidecarMode,
    pub proxy_uid: u32,
    pub resources: Resources,
    pub exclude_inbound_ports: Option<String>,
    pub exclude_outbound_ports: Option<String>,
    pub exclude_outbound_cidrs: Option<String>,
    pub include_outbound_cidrs: Option<Include>,
    pub include_inbound_ports: Option<Include>,
    /// `strict` or `permissive`, from [`MTLS`]; None: the proxy's default.
    pub inbound_mtls: Option<String>,
    /// The proxy's worker threads: [`PROXY_WORKERS`], else [`Config::workers`] when the proxy
    /// has no CPU limit; None: the proxy's default, the CPUs its limit allows.
    pub workers: Option<u16>,
}

impl Settings {
    /// Reads every annotation (`annotations` may be absent) over `config`'s defaults. All
    /// errors are collected.
    pub fn read(
        annotations: Option<&BTreeMap<String, String>>,
        config: &Config,
    ) -> Result<Self, AnnotationErrors> {
        let get = |key: &str| annotations.and_then(|a| a.get(key)).map(String::as_str);
        let mut errors = Vec::new();

        let mode = match get(SIDECAR_MODE) {
            None => config.default_mode,
            Some(v) => keep(
                v.parse::<SidecarMode>().map_err(|_| {
                    AnnotationError::new(
                        SIDECAR_MODE,
                        v,
                        "is not a sidecar mode: use \"native\" or \"classic\"",
                    )
                }),
                &mut errors,
            )
            .unwrap_or(config.default_mode),
        };
        let inbound_mtls = get(MTLS).and_then(|v| keep(mtls_mode(v), &mut errors));
        let workers = get(PROXY_WORKERS).map(|v| keep(parse_workers(v), &mut errors));
        let proxy_uid = match get(PROXY_UID) {
            None => config.proxy_uid,
            Some(v) => keep(parse_uid(v), &mut errors).unwrap_or(config.proxy_uid),
        };
        let mut list = |key: &'static str, parse: fn(&'static str, &str) -> ListResult| {
            get(key).and_then(|v| keep(parse(key, v), &mut errors))
        };
        let exclude_inbound_ports = list(EXCLUDE_INBOUND_PORTS, port_list);
        let exclude_outbound_ports = list(EXCLUDE_OUTBOUND_PORTS, port_list);
        let exclude_outbound_cidrs = list(EXCLUDE_OUTBOUND_IP_RANGES, cidr_list);
        let include_outbound_cidrs = list(INCLUDE_OUTBOUND_IP_RANGES, cidr_include);
        let include_inbound_ports = list(INCLUDE_INBOUND_PORTS, port_include);

        let resources = match read_resources(&get, &config.resources) {
            Ok(r) => r,
            Err(mut e) => {
                errors.append(&mut e);
                config.resources.clone()
            }
        };

        if !errors.is_empty() {
            return Err(AnnotationErrors(errors));
        }
        let include = |v: Option<String>| {
            v.map(|v| match v.as_str() {
                "*" => Include::All,
                _ => Include::List(v),
            })
        };
        Ok(Self {
            mode,
            proxy_uid,
            // An empty exclusion list excludes nothing: leave the flag out.
            exclude_inbound_ports: exclude_inbound_ports.filter(|v| !v.is_empty()),
            exclude_outbound_ports: exclude_outbound_ports.filter(|v| !v.is_empty()),
            exclude_outbound_cidrs: exclude_outbound_cidrs.filter(|v| !v.is_empty()),
            include_outbound_cidrs: include(include_outbound_cidrs),
            include_inbound_ports: include(include_inbound_ports),
            inbound_mtls,
            // Without a CPU limit the proxy would start a worker per CPU of the node; with
            // one it sizes itself by the limit (its cgroup quota).
            workers: match workers {
                Some(explicit) => explicit,
                None if resources.cpu_limit.is_some() => None,
                None => config.workers,
            },
            resources,
        })
    }
}

/// 1 to 65535 worker threads, as `wasmesh-proxy run --workers` takes them.
fn parse_workers(value: &str) -> Result<u16, AnnotationError> {
    match value.trim().parse::<u16>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(AnnotationError::new(
            PROXY_WORKERS,
            value,
            "is not a number of worker threads (a whole number from 1 to 65535)",
        )),
    }
}

/// `strict` or `permissive`, as `wasmesh-proxy run --inbound-mtls` takes them. Anything else is
/// refused rather than guessed: a typo in a request for strict must not leave the pod open.
fn mtls_mode(value: &str) -> Result<String, AnnotationError> {
    match value.trim() {
        v @ ("strict" | "permissive") => Ok(v.to_owned()),
        _ => Err(AnnotationError::new(
            MTLS,
            value,
            "is not an mTLS mode: use \"strict\" (refuse plaintext) or \"permissive\"",
        )),
    }
}

type ListResult = Result<String, AnnotationError>;

/// The value, or `None` with the error recorded.
fn keep<T>(result: Result<T, AnnotationError>, errors: &mut Vec<AnnotationError>) -> Option<T> {
    result.map_err(|e| errors.push(e)).ok()
}

/// Kubernetes accepts UIDs 0..=2^31-1; 0 (root) cannot be the proxy, whose traffic is exempt.
fn parse_uid(value: &str) -> Result<u32, AnnotationError> {
    match value.trim().parse::<u32>() {
        Ok(0) => Err(AnnotationError::new(
            PROXY_UID,
            value,
            "is root: every root process's traffic would bypass the proxy; use another UID",
        )),
        Ok(uid) if uid <= i32::MAX as u32 => Ok(uid),
        _ => Err(AnnotationError::new(
            PROXY_UID,
            value,
            "is not a UID (a whole number from 1 to 2147483647)",
        )),
    }
}

/// `*` or a port list.
fn port_include(key: &'static str, value: &str) -> ListResult {
    match value.trim() {
        "*" => Ok("*".to_owned()),
        _ => port_list(key, value),
    }
}

/// `*` or a CIDR list.
fn cidr_include(key: &'static str, value: &str) -> ListResult {
    match value.trim() {
        "*" => Ok("*".to_owned()),
        _ => cidr_list(key, value),
    }
}

/// Comma-separated ports and ranges (`8080`, `8000-8100`, `8000:8100`).
fn port_list(key: &'static str, value: &str) -> ListResult {
    items(value)
        .map(|item| check_port_range(item).map_err(|why| AnnotationError::new(key, value, why)))
        .collect::<Result<Vec<_>, _>>()
        .map(|v| v.join(","))
}

/// Comma-separated IPv4/IPv6 networks or addresses.
fn cidr_list(key: &'static str, value: &str) -> ListResult {
    items(value)
        .map(|item| check_cidr(item).map_err(|why| AnnotationError::new(key, value, why)))
        .collect::<Result<Vec<_>, _>>()
        .map(|v| v.join(","))
}

fn items(value: &str) -> impl Iterator<Item = &str> {
    value.split(',').map(str::trim).filter(|s| !s.is_empty())
}

fn check_port(s: &str) -> Result<u16, String> {
    match s.parse::<u32>() {
        Ok(p) if (1..=65535).contains(&p) => Ok(p as u16),
        Ok(p) => Err(format!("has port {p}, outside 1-65535")),
        Err(_) => Err(format!("has {s:?}, which is not a port")),
    }
}

fn check_port_range(item: &str) -> Result<String, String> {
    match item.split_once(['-', ':']) {
        None => check_port(item).map(|p| p.to_string()),
        Some((first, last)) => {
            let (first, last) = (check_port(first.trim())?, check_port(last.trim())?);
            if first > last {
                return Err(format!("has range {item:?}, which ends before it starts"));
            }
            Ok(format!("{first}-{last}"))
        }
    }
}

fn check_cidr(item: &str) -> Result<String, String> {
    let bad = || format!("has {item:?}, which is not an IP address or network (10.0.0.0/8)");
    let (addr, prefix) = match item.split_once('/') {
        None => (item, None),
        Some((a, p)) => (a, Some(p)),
    };
    let addr: IpAddr = addr.trim().parse().map_err(|_| bad())?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    match prefix {
        None => Ok(addr.to_string()),
        Some(p) => match p.trim().parse::<u8>() {
            Ok(p) if p <= max => Ok(format!("{addr}/{p}")),
            Ok(p) => Err(format!("has prefix /{p}, longer than {max} bits")),
            Err(_) => Err(bad()),
        },
    }
}

/// The four resource annotations over the defaults, with Kubernetes' own rule checked here:
/// a request above its limit gets the pod rejected. A limit below the *default* request
/// lowers the request to the limit (what Kubernetes does when only a limit is given).
fn read_resources<'a>(
    get: &impl Fn(&str) -> Option<&'a str>,
    defaults: &Resources,
) -> Result<Resources, Vec<AnnotationError>> {
    let mut errors = Vec::new();
    let mut read = |key: &'static str, default: &Option<String>| -> (Option<String>, bool) {
        match get(key) {
            None => (default.clone(), false),
            Some(v) => match Quantity::parse(v) {
                Some(_) => (Some(v.trim().to_owned()), true),
                None => {
                    errors.push(AnnotationError::new(
                        key,
                        v,
                        "is not a Kubernetes quantity (e.g. 100m, 0.5, 64Mi, 1Gi)",
                    ));
                    (default.clone(), false)
                }
            },
        }
    };
    let (mut cpu_request, cpu_set) = read(PROXY_CPU, &defaults.cpu_request);
    let (mut memory_request, memory_set) = read(PROXY_MEMORY, &defaults.memory_request);
    let (cpu_limit, _) = read(PROXY_CPU_LIMIT, &defaults.cpu_limit);
    let (memory_limit, _) = read(PROXY_MEMORY_LIMIT, &defaults.memory_limit);
    if !errors.is_empty() {
        return Err(errors);
    }
    let mut fit = |request: &mut Option<String>,
                   explicit: bool,
                   limit: &Option<String>,
                   key: &'static str,
                   limit_key: &'static str| {
        let (Some(r), Some(l)) = (request.as_deref(), limit.as_deref()) else {
            return;
        };
        let (Some(rq), Some(lq)) = (Quantity::parse(r), Quantity::parse(l)) else {
            return;
        };
        if rq.0 <= lq.0 {
            return;
        }
        if explicit {
            errors.push(AnnotationError::new(
                key,
                r,
                format!("is above the limit {l:?} ({limit_key}); Kubernetes rejects such a pod"),
            ));
        } else {
            *request = Some(l.to_owned());
        }
    };
    fit(
        &mut cpu_request,
        cpu_set,
        &cpu_limit,
        PROXY_CPU,
        PROXY_CPU_LIMIT,
    );
    fit(
        &mut memory_request,
        memory_set,
        &memory_limit,
        PROXY_MEMORY,
        PROXY_MEMORY_LIMIT,
    );
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(Resources {
        cpu_request,
        memory_request,
        cpu_limit,
        memory_limit,
    })
}

/// A Kubernetes resource quantity, reduced to its value in base units for comparisons.
/// Grammar (apimachinery `resource.Quantity`): number, then a binary (`Ki`…`Ei`), decimal
/// (`n u m "" k M G T P E`) or exponent (`e3`) suffix. Negative quantities are refused: a
/// resource amount cannot be negative.
#[derive(Clone, Copy, Debug, PartialEq, PartialOrd)]
pub struct Quantity(pub f64);

impl Quantity {
    pub fn parse(s: &str) -> Option<Self> {
        let s = s.trim();
        let s = s.strip_prefix('+').unwrap_or(s);
        let digits_end = s
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(s.len());
        let (number, suffix) = s.split_at(digits_end);
        if number.is_empty() || number == "." || number.matches('.').count() > 1 {
            return None;
        }
        let value: f64 = number.parse().ok()?;
        let scale = match suffix {
            "" => 1.0,
            "n" => 1e-9,
            "u" => 1e-6,
            "m" => 1e-3,
            "k" => 1e3,
            "M" => 1e6,
            "G" => 1e9,
            "T" => 1e12,
            "P" => 1e15,
            "E" => 1e18,
            "Ki" => 1024f64,
            "Mi" => 1024f64.powi(2),
            "Gi" => 1024f64.powi(3),
            "Ti" => 1024f64.powi(4),
            "Pi" => 1024f64.powi(5),
            "Ei" => 1024f64.powi(6),
            exp => {
                let e = exp.strip_prefix(['e', 'E'])?;
                let digits = e.strip_prefix(['+', '-']).unwrap_or(e);
                if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                    return None;
                }
                10f64.powi(e.parse::<i32>().ok()?)
            }
        };
        Some(Self(value * scale))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn opt_out_wins_over_opt_in() {
        let yes = map(&[(INJECT, "true")]);
        let no = map(&[(INJECT, "false")]);
        assert_eq!(pod_choice(None, None), Ok(PodChoice::Unset));
        assert_eq!(pod_choice(Some(&yes), None), Ok(PodChoice::OptIn));
        assert_eq!(pod_choice(None, Some(&yes)), Ok(PodChoice::OptIn));
        assert_eq!(
            pod_choice(Some(&yes), Some(&no)),
            Ok(PodChoice::OptOut(Source::Annotation))
        );
        assert_eq!(
            pod_choice(Some(&no), Some(&yes)),
            Ok(PodChoice::OptOut(Source::Label))
        );
        // An opt-out is honoured even next to a value we do not understand.
        let odd = map(&[(INJECT, "enabled")]);
        assert_eq!(
            pod_choice(Some(&odd), Some(&no)),
            Ok(PodChoice::OptOut(Source::Annotation))
        );
        let err = pod_choice(None, Some(&odd)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "annotation wasmesh.io/inject: \"enabled\" (on the pod's annotation) is not \"true\" or \"false\""
        );
    }

    #[test]
    fn defaults_come_from_config() {
        let config = Config::default();
        let s = Settings::read(None, &config).unwrap();
        assert_eq!(s.mode, SidecarMode::Native);
        assert_eq!(s.proxy_uid, 1337);
        assert_eq!(s.resources, config.resources);
        assert_eq!(s.exclude_inbound_ports, None);
        assert_eq!(s.include_outbound_cidrs, None);
        assert_eq!(s.inbound_mtls, None, "the proxy's default");
    }

    #[test]
    fn workers_are_two_without_a_cpu_limit_the_limits_with_one_or_what_the_annotation_says() {
        let config = Config::default();
        let read = |pairs: &[(&str, &str)], config: &Config| {
            Settings::read(Some(&map(pairs)), config).map(|s| s.workers)
        };
        assert_eq!(read(&[], &config), Ok(Some(2)));
        assert_eq!(read(&[(PROXY_CPU_LIMIT, "1500m")], &config), Ok(None));
        assert_eq!(
            read(&[(PROXY_CPU_LIMIT, "1"), (PROXY_WORKERS, " 4 ")], &config),
            Ok(Some(4))
        );
        // `--proxy-workers 0`: no default, the proxy's own (a worker per CPU).
        let unset = Config {
            workers: None,
            ..Config::default()
        };
        assert_eq!(read(&[], &unset), Ok(None));
        assert_eq!(read(&[(PROXY_WORKERS, "3")], &unset), Ok(Some(3)));
        for bad in ["0", "-1", "two", "65536", "1.5", ""] {
            let errs = read(&[(PROXY_WORKERS, bad)], &config).unwrap_err();
            assert_eq!(
                errs.to_string(),
                format!(
                    "annotation wasmesh.io/proxy-workers: {bad:?} is not a number of worker \
                     threads (a whole number from 1 to 65535)"
                ),
            );
        }
    }

    #[test]
    fn the_mtls_mode_is_strict_or_permissive() {
        for (value, want) in [("strict", "strict"), (" permissive ", "permissive")] {
            let s = Settings::read(Some(&map(&[(MTLS, value)])), &Config::default()).unwrap();
            assert_eq!(s.inbound_mtls.as_deref(), Some(want), "{value:?}");
        }
        for bad in ["Strict", "STRICT", "strcit", "true", ""] {
            let errs = Settings::read(Some(&map(&[(MTLS, bad)])), &Config::default()).unwrap_err();
            assert_eq!(
                errs.to_string(),
                format!(
                    "annotation wasmesh.io/mtls: {bad:?} is not an mTLS mode: use \"strict\" (refuse plaintext) or \"permissive\""
                )
            );
        }
    }

    #[test]
    fn lists_are_checked_and_normalized() {
        let a = map(&[
            (EXCLUDE_INBOUND_PORTS, " 8080, 9000:9100 ,"),
            (EXCLUDE_OUTBOUND_PORTS, ""),
            (
                EXCLUDE_OUTBOUND_IP_RANGES,
                "169.254.169.254, 10.0.0.0/8,fd00::/8",
            ),
            (INCLUDE_OUTBOUND_IP_RANGES, "*"),
            (INCLUDE_INBOUND_PORTS, ""),
        ]);
        let s = Settings::read(Some(&a), &Config::default()).unwrap();
        assert_eq!(s.exclude_inbound_ports.as_deref(), Some("8080,9000-9100"));
        assert_eq!(s.exclude_outbound_ports, None);
        assert_eq!(
            s.exclude_outbound_cidrs.as_deref(),
            Some("169.254.169.254,10.0.0.0/8,fd00::/8")
        );
        assert_eq!(s.include_outbound_cidrs, Some(Include::All));
        assert_eq!(s.include_inbound_ports, Some(Include::List(String::new())));
    }

    #[test]
    fn every_bad_value_is_reported_with_its_annotation() {
        let a = map(&[
            (SIDECAR_MODE, "sidecar"),
            (PROXY_UID, "0"),
            (EXCLUDE_INBOUND_PORTS, "80,http"),
            (EXCLUDE_OUTBOUND_PORTS, "70000,*"),
            (EXCLUDE_OUTBOUND_IP_RANGES, "10.0.0.0/33"),
            (INCLUDE_INBOUND_PORTS, "90-80"),
            (PROXY_CPU, "lots"),
        ]);
        let errs = Settings::read(Some(&a), &Config::default()).unwrap_err().0;
        let text: Vec<String> = errs.iter().map(ToString::to_string).collect();
        assert_eq!(
            text,
            [
                "annotation wasmesh.io/sidecar-mode: \"sidecar\" is not a sidecar mode: use \"native\" or \"classic\"",
                "annotation wasmesh.io/proxy-uid: \"0\" is root: every root process's traffic would bypass the proxy; use another UID",
                "annotation traffic.wasmesh.io/exclude-inbound-ports: \"80,http\" has \"http\", which is not a port",
                "annotation traffic.wasmesh.io/exclude-outbound-ports: \"70000,*\" has port 70000, outside 1-65535",
                "annotation traffic.wasmesh.io/exclude-outbound-ip-ranges: \"10.0.0.0/33\" has prefix /33, longer than 32 bits",
                "annotation traffic.wasmesh.io/include-inbound-ports: \"90-80\" has range \"90-80\", which ends before it starts",
                "annotation wasmesh.io/proxy-cpu: \"lots\" is not a Kubernetes quantity (e.g. 100m, 0.5, 64Mi, 1Gi)",
            ]
        );
    }

    #[test]
    fn quantities() {
        for (s, v) in [
            ("100m", 0.1),
            ("0.5", 0.5),
            ("2", 2.0),
            ("64Mi", 64.0 * 1024.0 * 1024.0),
            ("1G", 1e9),
            ("1e3", 1e3),
            ("+1k", 1e3),
            (".5", 0.5),
            ("5.", 5.0),
        ] {
            assert_eq!(Quantity::parse(s), Some(Quantity(v)), "{s}");
        }
        for s in ["", "m", "-1", "1.2.3", "1x", "1e", "1Mib", "abc", "1 Mi"] {
            assert_eq!(Quantity::parse(s), None, "{s}");
        }
    }

    #[test]
    fn request_above_limit() {
        let config = Config::default(); // requests 100m / 64Mi
        // A limit below the default request lowers the request.
        let a = map(&[(PROXY_CPU_LIMIT, "50m")]);
        let s = Settings::read(Some(&a), &config).unwrap();
        assert_eq!(s.resources.cpu_request.as_deref(), Some("50m"));
        assert_eq!(s.resources.cpu_limit.as_deref(), Some("50m"));
        // An explicit request above its limit is the user's mistake: say so.
        let a = map(&[(PROXY_MEMORY, "1Gi"), (PROXY_MEMORY_LIMIT, "512Mi")]);
        let errs = Settings::read(Some(&a), &config).unwrap_err();
        assert_eq!(
            errs.to_string(),
            "annotation wasmesh.io/proxy-memory: \"1Gi\" is above the limit \"512Mi\" (wasmesh.io/proxy-memory-limit); Kubernetes rejects such a pod"
        );
    }
}
