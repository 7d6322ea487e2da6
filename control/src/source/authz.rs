//! AuthorizationPolicy (`wasmesh.io/v1alpha1`) as control reads it: which client identities
//! may reach which ports of the pods a policy selects, and whether those pods refuse plaintext.
//!
//! The spec type and its validation are the contract's ([`wasmesh_api::authz`]), shared with
//! the proxy's own `--policy-dir`, so a policy means the same from a cluster, a folder given to
//! control, or a folder given to a proxy. Here: the object around the spec (metadata, how it is
//! written out) and the errors both sources report. Turning a policy into what proxies
//! receive is the model's job (`model::authz`).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};

pub use wasmesh_api::authz::{
    API_VERSION, AuthorizationPolicySpec, GROUP, InvalidPolicy, KIND, MTLS_MODES, PLURAL, VERSION,
};

/// One AuthorizationPolicy object.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
pub struct AuthorizationPolicy {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: AuthorizationPolicySpec,
}

impl Serialize for AuthorizationPolicy {
    /// As the API server writes it: `apiVersion`, `kind`, `metadata`, `spec`.
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = s.serialize_struct("AuthorizationPolicy", 4)?;
        st.serialize_field("apiVersion", API_VERSION)?;
        st.serialize_field("kind", KIND)?;
        st.serialize_field("metadata", &self.metadata)?;
        st.serialize_field("spec", &self.spec)?;
        st.end()
    }
}

impl AuthorizationPolicy {
    /// `namespace/name`.
    pub fn id(&self) -> String {
        format!(
            "{}/{}",
            self.metadata.namespace.as_deref().unwrap_or_default(),
            self.metadata.name.as_deref().unwrap_or_default()
        )
    }
}

/// What the API server's schema would refuse and what wasmesh cannot honour (see
/// [`AuthorizationPolicySpec::validate`]).
pub fn validate(policy: &AuthorizationPolicy) -> Result<(), InvalidPolicy> {
    policy.spec.validate()
}

/// Why a policy from the API server was not used.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error(
        "AuthorizationPolicy {policy}: spec does not match the AuthorizationPolicy schema: {reason}"
    )]
    Schema { policy: String, reason: String },
    #[error("AuthorizationPolicy {policy}: {source}")]
    Invalid {
        policy: String,
        source: InvalidPolicy,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_out_and_read_back_it_is_the_same_policy() {
        let p: AuthorizationPolicy = serde_json::from_value(serde_json::json!({
            "apiVersion": API_VERSION,
            "kind": KIND,
            "metadata": {"name": "web", "namespace": "demo"},
            "spec": {
                "selector": {"matchLabels": {"app": "web"}},
                "mtls": "strict",
                "rules": [{"from": ["ns/ops"], "ports": [8080]}, {}],
            },
        }))
        .expect("policy");
        validate(&p).expect("valid");
        assert_eq!(p.id(), "demo/web");
        let json = serde_json::to_value(&p).expect("serialize");
        assert_eq!(json["apiVersion"], API_VERSION);
        assert_eq!(json["kind"], KIND);
        let back: AuthorizationPolicy = serde_json::from_value(json).expect("read back");
        assert_eq!(back, p);
    }

    /// `examples/k8s/authorizationpolicy-crd.yaml` serves our group, version and plural, and
    /// its schema has exactly the spec's fields, with the mtls values control accepts.
    #[test]
    fn the_example_crd_matches_what_control_reads() {
        let crd: serde_json::Value = serde_saphyr::from_str(include_str!(
            "../../../examples/k8s/authorizationpolicy-crd.yaml"
        ))
        .expect("CRD YAML");
        let spec = &crd["spec"];
        assert_eq!(crd["metadata"]["name"], format!("{PLURAL}.{GROUP}"));
        assert_eq!(spec["group"], GROUP);
        assert_eq!(spec["names"]["kind"], KIND);
        assert_eq!(spec["names"]["plural"], PLURAL);
        let version = &spec["versions"][0];
        assert_eq!(version["name"], VERSION);
        let props = &version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"];
        let keys = |v: &serde_json::Value| -> Vec<String> {
            let mut k: Vec<String> = v.as_object().expect("properties").keys().cloned().collect();
            k.sort();
            k
        };
        assert_eq!(keys(props), ["mtls", "rules", "selector"]);
        assert_eq!(
            keys(&props["rules"]["items"]["properties"]),
            ["from", "ports"]
        );
        let modes: Vec<&str> = props["mtls"]["enum"]
            .as_array()
            .expect("enum")
            .iter()
            .map(|m| m.as_str().expect("string"))
            .collect();
        assert_eq!(modes, MTLS_MODES);
    }
}
