//! AuthorizationPolicies in the table. Pure.
//!
//! Like WasmPlugins, policies are kept apart from the service ports and every proxy gets every
//! policy: each proxy applies those of its own namespace whose selector matches its labels.
//! Shipping all of them keeps the hub's one-encoding-for-every-subscriber fan-out (a policy
//! is a few hundred bytes), and a policy change is a delta of that policy alone.

use serde::Serialize;
use wasmesh_api::authz::AuthorizationPolicySpec;
use wasmesh_api::discovery as pb;

use crate::source::AuthorizationPolicy;

/// One AuthorizationPolicy as the table holds it: the validated spec as written. The `table`
/// command prints it; [`PolicyEntry::to_proto`] is what proxies receive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyEntry {
    pub namespace: String,
    pub name: String,
    #[serde(flatten)]
    pub spec: AuthorizationPolicySpec,
}

impl PolicyEntry {
    /// The entry for a policy the source has validated.
    pub fn new(policy: &AuthorizationPolicy) -> PolicyEntry {
        PolicyEntry {
            namespace: policy.metadata.namespace.clone().unwrap_or_default(),
            name: policy.metadata.name.clone().unwrap_or_default(),
            spec: policy.spec.clone(),
        }
    }

    /// `namespace/name`.
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The contract's `AuthorizationPolicy`.
    pub fn to_proto(&self) -> pb::AuthorizationPolicy {
        self.spec.to_proto(&self.namespace, &self.name)
    }
}
