//! AuthorizationPolicy (`wasmesh.io/v1alpha1`): the resource's spec, its validation, its wire
//! form, and who a rule admits.
//!
//! ```yaml
//! apiVersion: wasmesh.io/v1alpha1
//! kind: AuthorizationPolicy
//! metadata: {name: backend, namespace: demo}
//! spec:
//!   selector: {matchLabels: {app: backend}}   # omitted: every pod of the namespace
//!   mtls: strict                               # optional: the selected pods refuse plaintext
//!   rules:                                     # optional; present = only what a rule allows
//!   - from: [spiffe://cluster.local/ns/demo/sa/client, ns/ops, ns/ops/sa/prober, "*"]
//!     ports: [8080]                            # omitted: every port
//! ```
//!
//! Control reads policies from a cluster (the CRD) or a folder of manifests and ships them to
//! every proxy in the discovery stream ([`AuthorizationPolicySpec::to_proto`]); a proxy also
//! reads them from its own `--policy-dir`. Both use this one spec type and this one
//! validation, so a policy means the same wherever it comes from.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::discovery as pb;
use crate::spiffe::SpiffeId;

pub const GROUP: &str = "wasmesh.io";
pub const VERSION: &str = "v1alpha1";
pub const API_VERSION: &str = "wasmesh.io/v1alpha1";
pub const KIND: &str = "AuthorizationPolicy";
pub const PLURAL: &str = "authorizationpolicies";

/// The values of `spec.mtls`.
pub const MTLS_MODES: [&str; 2] = ["permissive", "strict"];

/// `spec` of an AuthorizationPolicy. Unknown fields are refused (a misspelt `rules` must not
/// silently allow everyone).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicySpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    /// `strict` or `permissive`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls: Option<String>,
    /// Absent: the policy restricts no one. Present (even empty): the selected pods allow only
    /// what a rule of some policy allows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rules: Option<Vec<Rule>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSelector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Absent: every client, plaintext ones too. Entries: see [`Principal`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<Vec<String>>,
    /// Destination ports of the selected pods; empty = every port.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<i64>,
}

/// Why a policy cannot be used: the spec path and what is wrong there.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct InvalidPolicy {
    /// e.g. `spec.rules[0].from[1]`.
    pub field: String,
    pub reason: String,
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> InvalidPolicy {
    InvalidPolicy {
        field: field.into(),
        reason: reason.into(),
    }
}

impl AuthorizationPolicySpec {
    /// What the API server's schema would refuse, and what wasmesh cannot honour: an `mtls`
    /// other than strict/permissive, a `from` entry that names no identity, a port outside
    /// 1-65535.
    pub fn validate(&self) -> Result<(), InvalidPolicy> {
        if let Some(m) = &self.mtls
            && !MTLS_MODES.contains(&m.as_str())
        {
            return Err(invalid(
                "spec.mtls",
                format!("{m:?} is not strict or permissive"),
            ));
        }
        for (i, rule) in self.rules.iter().flatten().enumerate() {
            for (j, f) in rule.from.iter().flatten().enumerate() {
                Principal::parse(f)
                    .map_err(|e| invalid(format!("spec.rules[{i}].from[{j}]"), e))?;
            }
            for (j, p) in rule.ports.iter().enumerate() {
                if !(1..=65535).contains(p) {
                    return Err(invalid(
                        format!("spec.rules[{i}].ports[{j}]"),
                        format!("{p} is not a port (1-65535)"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The wire form proxies receive (call [`AuthorizationPolicySpec::validate`] first).
    pub fn to_proto(&self, namespace: &str, name: &str) -> pb::AuthorizationPolicy {
        use pb::authorization_policy::Mtls;
        let mtls = match self.mtls.as_deref() {
            Some("strict") => Mtls::Strict,
            Some("permissive") => Mtls::Permissive,
            _ => Mtls::Unset,
        };
        pb::AuthorizationPolicy {
            namespace: namespace.to_string(),
            name: name.to_string(),
            selector: self
                .selector
                .as_ref()
                .map(|s| s.match_labels.clone().into_iter().collect())
                .unwrap_or_default(),
            mtls: mtls as i32,
            has_rules: self.rules.is_some(),
            rules: self
                .rules
                .iter()
                .flatten()
                .map(|r| pb::AuthorizationRule {
                    from: r.from.clone().unwrap_or_default(),
                    any_client: r.from.is_none(),
                    ports: r
                        .ports
                        .iter()
                        .map(|p| u32::try_from(*p).unwrap_or(0))
                        .collect(),
                })
                .collect(),
        }
    }
}

/// Who a `from` entry admits. Only clients with a verified identity (mesh mTLS) are admitted
/// by any of these; a rule without `from` is the one way to admit plaintext clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// `spiffe://<trust-domain>/ns/<namespace>/sa/<serviceaccount>`: exactly that identity.
    Identity(SpiffeId),
    /// `ns/<namespace>`: any ServiceAccount of the namespace, in the proxy's trust domain.
    Namespace(String),
    /// `ns/<namespace>/sa/<serviceaccount>`, in the proxy's trust domain.
    NamespaceSa(String, String),
    /// `*`: any verified identity.
    AnyIdentity,
}

impl Principal {
    pub fn parse(s: &str) -> Result<Principal, String> {
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
                "{s:?} names no client: use a SPIFFE ID, ns/<namespace>, \
                 ns/<namespace>/sa/<serviceaccount> or *"
            )),
        }
    }

    /// Whether this entry admits the verified identity `id`; `trust_domain` is the proxy's
    /// (for the `ns/...` forms).
    pub fn admits(&self, id: &SpiffeId, trust_domain: &str) -> bool {
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

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Principal::Identity(id) => id.fmt(f),
            Principal::Namespace(ns) => write!(f, "ns/{ns}"),
            Principal::NamespaceSa(ns, sa) => write!(f, "ns/{ns}/sa/{sa}"),
            Principal::AnyIdentity => f.write_str("*"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn principals_parse_and_admit() {
        let id: SpiffeId = "spiffe://cluster.local/ns/demo/sa/client".parse().unwrap();
        let other_domain: SpiffeId = "spiffe://other.org/ns/demo/sa/client".parse().unwrap();
        for (entry, admits, admits_other_domain) in [
            ("spiffe://cluster.local/ns/demo/sa/client", true, false),
            ("spiffe://cluster.local/ns/demo/sa/other", false, false),
            ("ns/demo", true, false),
            ("ns/ops", false, false),
            ("ns/demo/sa/client", true, false),
            ("ns/demo/sa/x", false, false),
            ("*", true, true),
        ] {
            let p = Principal::parse(entry).unwrap();
            assert_eq!(p.to_string(), entry);
            assert_eq!(p.admits(&id, "cluster.local"), admits, "{entry}");
            assert_eq!(
                p.admits(&other_domain, "cluster.local"),
                admits_other_domain,
                "{entry} in another trust domain"
            );
        }
        for bad in ["bogus", "ns/", "ns/a/sa/", "sa/x", "spiffe://x/y", ""] {
            assert!(Principal::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn validation_names_the_field() {
        let mut s = AuthorizationPolicySpec {
            mtls: Some("Strict".into()),
            ..Default::default()
        };
        assert_eq!(
            s.validate().unwrap_err().to_string(),
            "spec.mtls: \"Strict\" is not strict or permissive"
        );
        s.mtls = Some("strict".into());
        s.rules = Some(vec![
            Rule {
                from: None,
                ports: vec![80],
            },
            Rule {
                from: Some(vec!["*".into(), "bogus".into()]),
                ports: vec![],
            },
        ]);
        let e = s.validate().unwrap_err();
        assert_eq!(e.field, "spec.rules[1].from[1]");
        assert!(e.reason.contains("\"bogus\" names no client"), "{e}");
        s.rules = Some(vec![Rule {
            from: None,
            ports: vec![8080, 70000],
        }]);
        assert_eq!(
            s.validate().unwrap_err().to_string(),
            "spec.rules[0].ports[1]: 70000 is not a port (1-65535)"
        );
    }

    #[test]
    fn specs_read_from_yaml_refuse_unknown_fields() {
        let ok: AuthorizationPolicySpec = serde_saphyr::from_str(
            "selector: {matchLabels: {app: web}}\nmtls: strict\nrules:\n- from: [ns/ops]\n  ports: [8080]\n",
        )
        .unwrap();
        ok.validate().unwrap();
        assert_eq!(ok.rules.as_ref().unwrap()[0].ports, [8080]);
        for typo in [
            "rulez: []\n",
            "rules:\n- form: [ns/ops]\n",
            "selector: {matchLabel: {app: web}}\n",
        ] {
            let e = serde_saphyr::from_str::<AuthorizationPolicySpec>(typo)
                .expect_err(typo)
                .to_string();
            assert!(e.contains("unknown field"), "{typo}: {e}");
        }
    }

    #[test]
    fn the_wire_form_keeps_absent_apart_from_empty() {
        use pb::authorization_policy::Mtls;
        let none = AuthorizationPolicySpec::default().to_proto("demo", "p");
        assert!(!none.has_rules && none.rules.is_empty());
        assert_eq!(none.mtls, Mtls::Unset as i32);
        let deny_all = AuthorizationPolicySpec {
            rules: Some(vec![]),
            mtls: Some("strict".into()),
            selector: Some(WorkloadSelector {
                match_labels: [("app".to_string(), "web".to_string())].into(),
            }),
        }
        .to_proto("demo", "p");
        assert!(deny_all.has_rules && deny_all.rules.is_empty());
        assert_eq!(deny_all.mtls, Mtls::Strict as i32);
        assert_eq!(deny_all.selector["app"], "web");
        let rules = AuthorizationPolicySpec {
            rules: Some(vec![
                Rule {
                    from: None,
                    ports: vec![80],
                },
                Rule {
                    from: Some(vec![]),
                    ports: vec![],
                },
            ]),
            ..Default::default()
        }
        .to_proto("demo", "p");
        assert!(rules.rules[0].any_client && rules.rules[0].ports == [80]);
        assert!(
            !rules.rules[1].any_client && rules.rules[1].from.is_empty(),
            "`from: []` admits no one"
        );
    }
}
