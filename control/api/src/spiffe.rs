//! SPIFFE IDs as wasmesh uses them: `spiffe://<trust-domain>/ns/<namespace>/sa/<serviceaccount>`.
//!
//! Control puts exactly one such URI in every workload certificate; proxies read it back from a
//! peer's certificate and compare it with the identity they expect. Both sides parse and print
//! with this one type, so the two can never disagree on the format.

use std::fmt;
use std::str::FromStr;

/// A workload identity: the ServiceAccount a pod runs as, in a trust domain.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

/// Why a string is not a wasmesh SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    #[error("{0:?} is not a SPIFFE ID: it must start with spiffe://")]
    Scheme(String),
    #[error(
        "{0:?} is not a wasmesh SPIFFE ID: expected spiffe://<trust-domain>/ns/<namespace>/sa/<serviceaccount>"
    )]
    Shape(String),
    #[error("{0:?}: {1}")]
    Segment(String, &'static str),
}

impl SpiffeId {
    pub fn new(
        trust_domain: impl Into<String>,
        namespace: impl Into<String>,
        service_account: impl Into<String>,
    ) -> Self {
        Self {
            trust_domain: trust_domain.into(),
            namespace: namespace.into(),
            service_account: service_account.into(),
        }
    }

    /// The URI, as it appears in a certificate's subject alternative names.
    pub fn uri(&self) -> String {
        self.to_string()
    }

    /// The URI in pieces, for a writer that copies them without building a `String` (a
    /// span's attribute).
    pub fn uri_parts(&self) -> [&str; 6] {
        [
            "spiffe://",
            &self.trust_domain,
            "/ns/",
            &self.namespace,
            "/sa/",
            &self.service_account,
        ]
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.uri_parts().iter().try_for_each(|p| f.write_str(p))
    }
}

/// Trust domains, namespaces and ServiceAccount names are DNS-label-like: lower-case letters,
/// digits, `-` and `.`; never empty.
fn valid_segment(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;

    fn from_str(s: &str) -> Result<Self, SpiffeIdError> {
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or_else(|| SpiffeIdError::Scheme(s.to_string()))?;
        let parts: Vec<&str> = rest.split('/').collect();
        let [td, "ns", ns, "sa", sa] = parts.as_slice() else {
            return Err(SpiffeIdError::Shape(s.to_string()));
        };
        for (seg, what) in [
            (
                td,
                "the trust domain must be lower-case letters, digits, '-' or '.'",
            ),
            (
                ns,
                "the namespace must be lower-case letters, digits, '-' or '.'",
            ),
            (
                sa,
                "the ServiceAccount must be lower-case letters, digits, '-' or '.'",
            ),
        ] {
            if !valid_segment(seg) {
                return Err(SpiffeIdError::Segment(s.to_string(), what));
            }
        }
        Ok(SpiffeId::new(*td, *ns, *sa))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let id: SpiffeId = "spiffe://cluster.local/ns/demo/sa/backend".parse().unwrap();
        assert_eq!(id, SpiffeId::new("cluster.local", "demo", "backend"));
        assert_eq!(id.uri(), "spiffe://cluster.local/ns/demo/sa/backend");
    }

    #[test]
    fn refuses_what_is_not_ours() {
        for bad in [
            "https://cluster.local/ns/demo/sa/backend",
            "spiffe://cluster.local/ns/demo",
            "spiffe://cluster.local/ns/demo/sa/backend/extra",
            "spiffe://cluster.local/sa/demo/ns/backend",
            "spiffe://cluster.local/ns//sa/backend",
            "spiffe://Cluster.local/ns/demo/sa/backend",
            "spiffe://cluster.local/ns/demo/sa/back end",
        ] {
            assert!(bad.parse::<SpiffeId>().is_err(), "{bad} accepted");
        }
    }
}
