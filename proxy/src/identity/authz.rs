//! Authorization by identity, and whether plaintext is accepted (strict or permissive mTLS).
//!
//! Policies are `AuthorizationPolicy` objects in our API group, the same YAML in a cluster (CRD)
//! and in a folder:
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
//! A workload no policy with `rules` selects allows every client. [`Authorizer::authorize`] is
//! the one decision both L4 (close the connection) and L7 (answer 403) use.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use serde::Deserialize;
use wasmesh_api::spiffe::SpiffeId;

/// Whether inbound plaintext is accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
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
    /// Read as a [`Spec`] only for our kind (other kinds in the same files have other specs).
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

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Spec {
    #[serde(default)]
    selector: Option<Selector>,
    #[serde(default)]
    mtls: Option<MtlsMode>,
    #[serde(default)]
    rules: Option<Vec<RuleSpec>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Selector {
    #[serde(default)]
    match_labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleSpec {
    #[serde(default)]
    from: Option<Vec<String>>,
    #[serde(default)]
    ports: Vec<u16>,
}

/// Who a rule admits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    Identity(SpiffeId),
    Namespace(String),
    NamespaceSa(String, String),
    AnyIdentity,
}

impl Principal {
    fn parse(s: &str) -> Result<Principal, String> {
        if s == "*" {
            return Ok(Principal::AnyIdentity);
        }
        if s.starts_with("spiffe://") {
            return s
                .parse()
                .map(Principal::Identity)
                .map_err(|e| format!("{e}"));
        }
        let parts: Vec<&str> = s.split('/').collect();
        match parts.as_slice() {
            ["ns", ns] if !ns.is_empty() => Ok(Principal::Namespace(ns.to_string())),
            ["ns", ns, "sa", sa] if !ns.is_empty() && !sa.is_empty() => {
                Ok(Principal::NamespaceSa(ns.to_string(), sa.to_string()))
            }
            _ => Err(format!(
                "{s:?} in `from`: use a SPIFFE ID, ns/<namespace>, ns/<namespace>/sa/<serviceaccount> or *"
            )),
        }
    }

    fn admits(&self, id: &SpiffeId, trust_domain: &str) -> bool {
        match self {
            Principal::Identity(want) => want == id,
            Principal::Namespace(ns) => id.trust_domain == trust_domain && id.namespace == *ns,
            Principal::NamespaceSa(ns, sa) => {
                id.trust_domain == trust_domain && id.namespace == *ns && id.service_account == *sa
            }
            Principal::AnyIdentity => true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// None: everyone, plaintext included.
    pub from: Option<Vec<Principal>>,
    /// Empty: every port.
    pub ports: Vec<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub name: String,
    pub namespace: String,
    pub match_labels: BTreeMap<String, String>,
    pub mtls: Option<MtlsMode>,
    pub rules: Option<Vec<Rule>>,
}

impl Policy {
    fn selects(&self, me: &Workload) -> bool {
        self.namespace == me.namespace
            && self
                .match_labels
                .iter()
                .all(|(k, v)| me.labels.get(k) == Some(v))
    }
}

/// Parses every `AuthorizationPolicy` in a multi-document YAML text; other kinds are skipped.
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
        if o.kind != "AuthorizationPolicy" {
            continue;
        }
        if o.api_version != "wasmesh.io/v1alpha1" {
            return Err(err(
                doc,
                format!("apiVersion {:?}: use wasmesh.io/v1alpha1", o.api_version),
            ));
        }
        let spec: Spec = match o.spec {
            Some(v) => serde_json::from_value(v)
                .map_err(|e| err(doc, format!("{}: spec: {e}", o.metadata.name)))?,
            None => Spec::default(),
        };
        let rules = spec
            .rules
            .map(|rules| {
                rules
                    .into_iter()
                    .map(|r| {
                        Ok(Rule {
                            from: r
                                .from
                                .map(|f| f.iter().map(|s| Principal::parse(s)).collect())
                                .transpose()?,
                            ports: r.ports,
                        })
                    })
                    .collect::<Result<Vec<_>, String>>()
            })
            .transpose()
            .map_err(|e| err(doc, format!("{}: {e}", o.metadata.name)))?;
        out.push(Policy {
            name: o.metadata.name,
            namespace: o.metadata.namespace.unwrap_or_else(|| "default".into()),
            match_labels: spec.selector.map(|s| s.match_labels).unwrap_or_default(),
            mtls: spec.mtls,
            rules,
        });
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

/// Policy decisions for this proxy's workload; policies can be replaced at any time.
#[derive(Debug)]
pub struct Authorizer {
    me: Workload,
    trust_domain: String,
    default_mode: MtlsMode,
    /// The policies that select this workload.
    policies: ArcSwap<Vec<Policy>>,
}

impl Authorizer {
    pub fn new(me: Workload, trust_domain: String, default_mode: MtlsMode) -> Arc<Self> {
        Arc::new(Self {
            me,
            trust_domain,
            default_mode,
            policies: ArcSwap::from_pointee(Vec::new()),
        })
    }

    /// Replaces the policies (all of them; those that do not select us are dropped).
    pub fn set_policies(&self, all: Vec<Policy>) {
        let mine: Vec<Policy> = all.into_iter().filter(|p| p.selects(&self.me)).collect();
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
        Decision::Deny {
            policies: names.join(", "),
        }
    }
}

/// Re-reads `dir` every `every` and applies what parses; a broken file is logged with its name
/// and the last good policies stay in force.
pub async fn watch_dir(dir: PathBuf, authorizer: Arc<Authorizer>, every: std::time::Duration) {
    let mut last: Option<Vec<Policy>> = None;
    loop {
        let dir2 = dir.clone();
        match tokio::task::spawn_blocking(move || load_dir(&dir2)).await {
            Ok(Ok(policies)) => {
                if last.as_ref() != Some(&policies) {
                    tracing::info!(dir = %dir.display(), policies = policies.len(), "authorization policies loaded");
                    authorizer.set_policies(policies.clone());
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
        a.set_policies(parse_policies(POLICIES, Path::new("p.yaml")).unwrap());
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
        elsewhere.set_policies(parse_policies(POLICIES, Path::new("p.yaml")).unwrap());
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
}
