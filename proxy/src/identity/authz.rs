//! Authorization by identity, and whether plaintext is accepted (strict or permissive mTLS).
//!
//! Policies are `AuthorizationPolicy` objects in our API group (the spec, its validation and
//! who a `from` entry admits are the contract's: [`wasmesh_api::authz`]):
//!
//! ```yaml
//! apiVersion: wasmesh.io/v1alpha1
//! kind: AuthorizationPolicy
//! metadata: {name: backend, namespace: demo}
//! spec:
//!   selector: {matchLabels: {app: backend}}   # omitted: every workload of the namespace
//!   mtls: strict                               # optional: strict refuses plaintext
//!   rules:                                     # optional; present = only what a rule allows
//!   - from: [spiffe://cluster.local/ns/demo/sa/client, ns/ops, "*"]
//!     ports: [8080]                            # omitted: every port
//! ```
//!
//! A `from` entry is a SPIFFE ID, `ns/<namespace>` (any ServiceAccount there), `ns/<ns>/sa/<sa>`
//! or `*` (any meshed identity); a rule without `from` allows everyone, plaintext clients too.
//! A workload no policy with `rules` selects allows every client.
//!
//! Policies come from two places, and those of both apply: control's discovery stream (from
//! the cluster's CRD or control's folder; [`Authorizer::set_control_policies`]) and, optionally,
//! the proxy's own `--policy-dir` ([`watch_dir`], [`Authorizer::set_local_policies`]). Every
//! policy arrives in the wire form and is compiled once by [`Policy::from_proto`], so both
//! sources mean the same. A change takes effect for the next connection (L4) or request (L7).
//!
//! [`Authorizer::authorize`] is the one decision L4 (close the connection) and L7 (answer 403)
//! use.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use serde::Deserialize;
use wasmesh_api::authz::{AuthorizationPolicySpec, Principal};
use wasmesh_api::discovery as pb;
use wasmesh_api::spiffe::SpiffeId;

/// Whether inbound plaintext is accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum MtlsMode {
    Permissive,
    Strict,
}

impl std::str::FromStr for MtlsMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "permissive" => Ok(MtlsMode::Permissive),
            "strict" => Ok(MtlsMode::Strict),
            _ => Err(format!("{s:?}: use permissive or strict")),
        }
    }
}

/// The outcome of [`Authorizer::authorize`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// No rule allows it; names the policies that apply, for the log line.
    Deny {
        policies: String,
    },
}

/// Why policy files cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: document {doc}: {reason}")]
    Parse {
        path: PathBuf,
        doc: usize,
        reason: String,
    },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Object {
    #[serde(default)]
    api_version: String,
    #[serde(default)]
    kind: String,
    #[serde(default)]
    metadata: Meta,
    /// Read as an [`AuthorizationPolicySpec`] only for our kind (other kinds in the same files
    /// have other specs).
    #[serde(default)]
    spec: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Default, Deserialize)]
struct Meta {
    #[serde(default)]
    name: String,
    #[serde(default)]
    namespace: Option<String>,
}

/// One `rules[]` entry, compiled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// None: everyone, plaintext included.
    pub from: Option<Vec<Principal>>,
    /// Empty: every port.
    pub ports: Vec<u16>,
}

/// One policy, compiled for decisions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub name: String,
    pub namespace: String,
    pub match_labels: BTreeMap<String, String>,
    pub mtls: Option<MtlsMode>,
    pub rules: Option<Vec<Rule>>,
}

impl Policy {
    /// Compiles the wire form. Control validated it; an entry that still does not parse (a
    /// newer control's syntax) admits no one, so the policy can only be stricter than meant,
    /// and is logged.
    pub fn from_proto(p: &pb::AuthorizationPolicy) -> Policy {
        use pb::authorization_policy::Mtls;
        let mtls = match Mtls::try_from(p.mtls) {
            Ok(Mtls::Strict) => Some(MtlsMode::Strict),
            Ok(Mtls::Permissive) => Some(MtlsMode::Permissive),
            _ => None,
        };
        let rules = p.has_rules.then(|| {
            p.rules
                .iter()
                .map(|r| Rule {
                    from: (!r.any_client).then(|| {
                        r.from
                            .iter()
                            .filter_map(|f| match Principal::parse(f) {
                                Ok(principal) => Some(principal),
                                Err(e) => {
                                    tracing::warn!(policy = %format!("{}/{}", p.namespace, p.name), error = %e, "AuthorizationPolicy entry not understood; it admits no one");
                                    None
                                }
                            })
                            .collect()
                    }),
                    // A port outside u16 matches no destination.
                    ports: r
                        .ports
                        .iter()
                        .map(|port| u16::try_from(*port).unwrap_or(0))
                        .collect(),
                })
                .collect()
        });
        Policy {
            name: p.name.clone(),
            namespace: p.namespace.clone(),
            match_labels: p.selector.clone().into_iter().collect(),
            mtls,
            rules,
        }
    }

    fn selects(&self, me: &Workload) -> bool {
        self.namespace == me.namespace
            && self
                .match_labels
                .iter()
                .all(|(k, v)| me.labels.get(k) == Some(v))
    }
}

/// Parses every `AuthorizationPolicy` in a multi-document YAML text; other kinds are skipped.
/// A document that is not a valid policy makes the whole text an error (naming the file and
/// the document), so a broken file never silently drops a policy.
pub fn parse_policies(text: &str, path: &Path) -> Result<Vec<Policy>, PolicyError> {
    let err = |doc: usize, reason: String| PolicyError::Parse {
        path: path.to_path_buf(),
        doc,
        reason,
    };
    let docs: Vec<Object> = serde_saphyr::from_multiple(text).map_err(|e| err(1, e.to_string()))?;
    let mut out = Vec::new();
    for (i, o) in docs.into_iter().enumerate() {
        let doc = i + 1;
        if o.kind != wasmesh_api::authz::KIND {
            continue;
        }
        if o.api_version != wasmesh_api::authz::API_VERSION {
            return Err(err(
                doc,
                format!(
                    "apiVersion {:?}: use {}",
                    o.api_version,
                    wasmesh_api::authz::API_VERSION
                ),
            ));
        }
        let name = o.metadata.name;
        if name.is_empty() {
            return Err(err(doc, "AuthorizationPolicy without metadata.name".into()));
        }
        let spec: AuthorizationPolicySpec = match o.spec {
            Some(serde_json::Value::Null) | None => AuthorizationPolicySpec::default(),
            Some(v) => {
                serde_json::from_value(v).map_err(|e| err(doc, format!("{name}: spec: {e}")))?
            }
        };
        spec.validate()
            .map_err(|e| err(doc, format!("{name}: {e}")))?;
        let namespace = o.metadata.namespace.unwrap_or_else(|| "default".into());
        out.push(Policy::from_proto(&spec.to_proto(&namespace, &name)));
    }
    Ok(out)
}

/// Reads every `.yaml`/`.yml`/`.json` file in `dir` (not recursive).
pub fn load_dir(dir: &Path) -> Result<Vec<Policy>, PolicyError> {
    let read_err = |source| PolicyError::Read {
        path: dir.to_path_buf(),
        source,
    };
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(read_err)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.extension()
                .is_some_and(|e| e == "yaml" || e == "yml" || e == "json")
        })
        .collect();
    files.sort();
    let mut out = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).map_err(|source| PolicyError::Read {
            path: f.clone(),
            source,
        })?;
        out.extend(parse_policies(&text, &f)?);
    }
    Ok(out)
}

/// This proxy's workload, as policies select it.
#[derive(Debug, Clone, Default)]
pub struct Workload {
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
}

/// Every policy known, by where it came from.
#[derive(Debug, Default)]
struct Sources {
    control: Vec<Policy>,
    local: Vec<Policy>,
}

/// Policy decisions for this proxy's workload; policies can be replaced at any time.
#[derive(Debug)]
pub struct Authorizer {
    me: Workload,
    trust_domain: String,
    default_mode: MtlsMode,
    sources: Mutex<Sources>,
    /// The policies that select this workload, from both sources.
    policies: ArcSwap<Vec<Policy>>,
    /// False while control's policies are expected and have not arrived yet.
    control_received: tokio::sync::watch::Sender<bool>,
}

impl Authorizer {
    /// An authorizer with no policies. It decides at once; call
    /// [`Authorizer::expect_control_policies`] when control will send policies.
    pub fn new(me: Workload, trust_domain: String, default_mode: MtlsMode) -> Arc<Self> {
        Arc::new(Self {
            me,
            trust_domain,
            default_mode,
            sources: Mutex::new(Sources::default()),
            policies: ArcSwap::from_pointee(Vec::new()),
            control_received: tokio::sync::watch::channel(true).0,
        })
    }

    /// Control will send policies: until the first table arrives, [`Authorizer::wait_ready`]
    /// waits (no decision is made on a partial set).
    pub fn expect_control_policies(&self) {
        self.control_received.send_replace(false);
    }

    /// Waits up to `max` until control's policies are in (at once if none are expected);
    /// false if they are still missing.
    pub async fn wait_ready(&self, max: Duration) -> bool {
        let mut rx = self.control_received.subscribe();
        matches!(
            tokio::time::timeout(max, rx.wait_for(|r| *r)).await,
            Ok(Ok(_))
        )
    }

    /// Replaces the policies from control (the whole set, in the wire form; those that do not
    /// select us are dropped).
    pub fn set_control_policies<'a>(
        &self,
        all: impl IntoIterator<Item = &'a pb::AuthorizationPolicy>,
    ) {
        let compiled: Vec<Policy> = all.into_iter().map(Policy::from_proto).collect();
        self.update(|s| s.control = compiled);
        self.control_received.send_replace(true);
    }

    /// Replaces the policies from the local folder (all of them; those that do not select us
    /// are dropped).
    pub fn set_local_policies(&self, all: Vec<Policy>) {
        self.update(|s| s.local = all);
    }

    fn update(&self, change: impl FnOnce(&mut Sources)) {
        let mut sources = self.sources.lock().unwrap_or_else(|e| e.into_inner());
        change(&mut sources);
        let mine: Vec<Policy> = sources
            .control
            .iter()
            .chain(&sources.local)
            .filter(|p| p.selects(&self.me))
            .cloned()
            .collect();
        self.policies.store(Arc::new(mine));
    }

    /// Strict if the flag or any policy that selects us says so.
    pub fn mode(&self) -> MtlsMode {
        self.policies
            .load()
            .iter()
            .filter_map(|p| p.mtls)
            .fold(self.default_mode, Ord::max)
    }

    /// May `peer` (None: a plaintext client) connect to our `port`?
    pub fn authorize(&self, peer: Option<&SpiffeId>, port: u16) -> Decision {
        let policies = self.policies.load();
        let mut restricting = policies.iter().filter(|p| p.rules.is_some()).peekable();
        if restricting.peek().is_none() {
            return Decision::Allow;
        }
        let mut names = Vec::new();
        for p in restricting {
            names.push(format!("{}/{}", p.namespace, p.name));
            for r in p.rules.iter().flatten() {
                if !r.ports.is_empty() && !r.ports.contains(&port) {
                    continue;
                }
                let admitted = match (&r.from, peer) {
                    (None, _) => true,
                    (Some(from), Some(id)) => from.iter().any(|f| f.admits(id, &self.trust_domain)),
                    (Some(_), None) => false,
                };
                if admitted {
                    return Decision::Allow;
                }
            }
        }
        names.sort();
        names.dedup();
        Decision::Deny {
            policies: names.join(", "),
        }
    }
}

/// Re-reads `dir` every `every` and applies what parses as the local policies; a broken file
/// is logged with its name and the last good policies stay in force.
pub async fn watch_dir(dir: PathBuf, authorizer: Arc<Authorizer>, every: Duration) {
    let mut last: Option<Vec<Policy>> = None;
    loop {
        let dir2 = dir.clone();
        match tokio::task::spawn_blocking(move || load_dir(&dir2)).await {
            Ok(Ok(policies)) => {
                if last.as_ref() != Some(&policies) {
                    tracing::info!(dir = %dir.display(), policies = policies.len(), "authorization policies loaded from the policy folder");
                    authorizer.set_local_policies(policies.clone());
                    last = Some(policies);
                }
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "authorization policies not reloaded; the last good ones stay")
            }
            Err(_) => {}
        }
        tokio::time::sleep(every).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICIES: &str = r#"
apiVersion: wasmesh.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: backend, namespace: demo}
spec:
  selector: {matchLabels: {app: backend}}
  rules:
  - from: [spiffe://cluster.local/ns/demo/sa/client, ns/ops/sa/prober]
    ports: [8080]
  - from: [ns/monitoring]
    ports: [9090]
---
apiVersion: v1
kind: Service
metadata: {name: ignored}
---
apiVersion: wasmesh.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: strict-ns, namespace: demo}
spec:
  mtls: strict
"#;

    fn id(s: &str) -> SpiffeId {
        s.parse().unwrap()
    }

    fn authorizer(labels: &[(&str, &str)]) -> Arc<Authorizer> {
        let me = Workload {
            namespace: "demo".into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        let a = Authorizer::new(me, "cluster.local".into(), MtlsMode::Permissive);
        a.set_local_policies(parse_policies(POLICIES, Path::new("p.yaml")).unwrap());
        a
    }

    #[test]
    fn rules_allow_identities_per_port() {
        let a = authorizer(&[("app", "backend")]);
        let client = id("spiffe://cluster.local/ns/demo/sa/client");
        assert_eq!(a.authorize(Some(&client), 8080), Decision::Allow);
        assert!(matches!(
            a.authorize(Some(&client), 9090),
            Decision::Deny { .. }
        ));
        assert_eq!(
            a.authorize(
                Some(&id("spiffe://cluster.local/ns/monitoring/sa/prom")),
                9090
            ),
            Decision::Allow
        );
        assert_eq!(
            a.authorize(Some(&id("spiffe://cluster.local/ns/ops/sa/prober")), 8080),
            Decision::Allow
        );
        let other = a.authorize(Some(&id("spiffe://cluster.local/ns/demo/sa/other")), 8080);
        assert_eq!(
            other,
            Decision::Deny {
                policies: "demo/backend".into()
            }
        );
        assert!(
            matches!(a.authorize(None, 8080), Decision::Deny { .. }),
            "plaintext has no identity"
        );
        assert!(
            matches!(
                a.authorize(
                    Some(&id("spiffe://other.domain/ns/monitoring/sa/prom")),
                    9090
                ),
                Decision::Deny { .. }
            ),
            "ns/ matches our trust domain only"
        );
    }

    #[test]
    fn workloads_not_selected_allow_everyone_and_mode_follows_policies() {
        let a = authorizer(&[("app", "frontend")]);
        assert_eq!(a.authorize(None, 8080), Decision::Allow);
        assert_eq!(
            a.mode(),
            MtlsMode::Strict,
            "the namespace-wide policy is strict"
        );
        let elsewhere = Authorizer::new(
            Workload {
                namespace: "prod".into(),
                labels: BTreeMap::new(),
            },
            "cluster.local".into(),
            MtlsMode::Permissive,
        );
        elsewhere.set_local_policies(parse_policies(POLICIES, Path::new("p.yaml")).unwrap());
        assert_eq!(elsewhere.mode(), MtlsMode::Permissive);
    }

    #[test]
    fn bad_policies_name_the_file_and_document() {
        let bad = "apiVersion: wasmesh.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: x}\nspec:\n  rules:\n  - from: [bogus]\n";
        let e = parse_policies(bad, Path::new("policies/x.yaml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("policies/x.yaml") && e.contains("bogus"), "{e}");
        let typo = "apiVersion: wasmesh.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: x}\nspec:\n  rulez: []\n";
        assert!(parse_policies(typo, Path::new("x.yaml")).is_err());
    }

    fn control_policy(name: &str, from: &[&str], ports: &[u32]) -> pb::AuthorizationPolicy {
        pb::AuthorizationPolicy {
            namespace: "demo".into(),
            name: name.into(),
            selector: [("app".to_string(), "backend".to_string())].into(),
            has_rules: true,
            rules: vec![pb::AuthorizationRule {
                from: from.iter().map(|f| f.to_string()).collect(),
                any_client: false,
                ports: ports.to_vec(),
            }],
            ..Default::default()
        }
    }

    #[test]
    fn control_and_local_policies_both_apply_and_changes_take_effect() {
        let a = Authorizer::new(
            Workload {
                namespace: "demo".into(),
                labels: [("app".to_string(), "backend".to_string())].into(),
            },
            "cluster.local".into(),
            MtlsMode::Permissive,
        );
        let client = id("spiffe://cluster.local/ns/demo/sa/client");
        let prober = id("spiffe://cluster.local/ns/ops/sa/prober");
        assert_eq!(a.authorize(Some(&client), 8080), Decision::Allow);

        a.set_control_policies(&[control_policy("web", &["ns/demo/sa/client"], &[8080])]);
        assert_eq!(a.authorize(Some(&client), 8080), Decision::Allow);
        assert_eq!(
            a.authorize(Some(&prober), 8080),
            Decision::Deny {
                policies: "demo/web".into()
            }
        );
        // The local folder adds an allowance; decisions consider both.
        a.set_local_policies(
            parse_policies(
                "apiVersion: wasmesh.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: probes, namespace: demo}\nspec:\n  rules: [{from: [ns/ops], ports: [8080]}]\n",
                Path::new("local.yaml"),
            )
            .unwrap(),
        );
        assert_eq!(a.authorize(Some(&prober), 8080), Decision::Allow);
        assert_eq!(
            a.authorize(Some(&prober), 9090),
            Decision::Deny {
                policies: "demo/probes, demo/web".into()
            }
        );
        // Control changes its policy: the next decision follows it; control's set does not
        // touch the local one.
        a.set_control_policies(&[control_policy("web", &["ns/other"], &[8080])]);
        assert!(matches!(
            a.authorize(Some(&client), 8080),
            Decision::Deny { .. }
        ));
        assert_eq!(a.authorize(Some(&prober), 8080), Decision::Allow);
        // Removed from both: everyone again.
        a.set_control_policies(&[]);
        a.set_local_policies(Vec::new());
        assert_eq!(a.authorize(Some(&client), 8080), Decision::Allow);
        assert_eq!(a.authorize(None, 8080), Decision::Allow);
    }

    #[test]
    fn wire_policies_compile_like_folder_ones() {
        let from_yaml = parse_policies(POLICIES, Path::new("p.yaml")).unwrap();
        let spec: AuthorizationPolicySpec = serde_saphyr::from_str(
            "selector: {matchLabels: {app: backend}}\nrules:\n- from: [spiffe://cluster.local/ns/demo/sa/client, ns/ops/sa/prober]\n  ports: [8080]\n- from: [ns/monitoring]\n  ports: [9090]\n",
        )
        .unwrap();
        assert_eq!(
            Policy::from_proto(&spec.to_proto("demo", "backend")),
            from_yaml[0]
        );
        // `rules: []` denies everything; a rule without `from` admits plaintext too; strict.
        let mut p = control_policy("deny-all", &[], &[]);
        p.rules.clear();
        p.mtls = pb::authorization_policy::Mtls::Strict as i32;
        let compiled = Policy::from_proto(&p);
        assert_eq!(compiled.rules, Some(vec![]));
        assert_eq!(compiled.mtls, Some(MtlsMode::Strict));
        let mut open = control_policy("open", &[], &[80]);
        open.rules[0].any_client = true;
        assert_eq!(Policy::from_proto(&open).rules.unwrap()[0].from, None);
    }

    #[tokio::test]
    async fn decisions_wait_for_controls_policies_when_they_are_expected() {
        let a = authorizer(&[("app", "backend")]);
        assert!(a.wait_ready(Duration::ZERO).await, "nothing expected");
        a.expect_control_policies();
        assert!(!a.wait_ready(Duration::from_millis(20)).await);
        let waiter = {
            let a = a.clone();
            tokio::spawn(async move { a.wait_ready(Duration::from_secs(30)).await })
        };
        a.set_control_policies(&[]);
        assert!(waiter.await.unwrap(), "released by the first table");
    }
}
