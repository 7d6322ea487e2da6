//! AuthorizationPolicies from the API server: a watcher on our CRD (`wasmesh.io/v1alpha1`,
//! `authorizationpolicies`, see `examples/k8s/authorizationpolicy-crd.yaml`) read as
//! `DynamicObject`s. Each one's `spec` is deserialized into [`AuthorizationPolicySpec`] and
//! checked with [`validate`](crate::source::authz::validate).
//!
//! Like WasmPlugins (and unlike HTTPRoutes), a policy that stops being usable keeps its last
//! good version and the error is logged once, naming the policy and the field: dropping it
//! would open the ports it closes. A policy never usable is left out (it has no meaning to
//! enforce), logged the same way.
//!
//! When the CRD is not installed the API server answers 404; the source reports "no policies"
//! once and keeps retrying with backoff (see `KubeSource::run`).

use std::collections::{BTreeMap, BTreeSet};

use futures::StreamExt;
use kube::Api;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::{WatchStreamExt, watcher};

use super::WatchStream;
use crate::source::Object;
use crate::source::authz::{self, AuthorizationPolicy, AuthorizationPolicySpec, PolicyError};

/// `wasmesh.io/v1alpha1`, `authorizationpolicies`.
pub fn api_resource() -> ApiResource {
    let gvk = GroupVersionKind::gvk(authz::GROUP, authz::VERSION, authz::KIND);
    ApiResource::from_gvk_with_plural(&gvk, authz::PLURAL)
}

pub(super) fn api(client: kube::Client, namespace: Option<&str>) -> Api<DynamicObject> {
    let resource = api_resource();
    match namespace {
        Some(ns) => Api::namespaced_with(client, ns, &resource),
        None => Api::all_with(client, &resource),
    }
}

pub(super) fn stream(api: Api<DynamicObject>, config: watcher::Config) -> WatchStream {
    let mut policies = Policies::default();
    watcher(api, config)
        .default_backoff()
        .flat_map(move |item| {
            let out: Vec<Out> = match item {
                Ok(event) => policies.on_event(event).into_iter().map(Ok).collect(),
                Err(e) => vec![Err(e)],
            };
            futures::stream::iter(out)
        })
        .boxed()
}

type Key = (String, String);
type Out = Result<watcher::Event<Object>, watcher::Error>;

fn key_of(meta: &kube::api::ObjectMeta) -> Key {
    (
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}

/// One watcher's policies: the last good version of each.
#[derive(Default)]
struct Policies {
    last_good: BTreeMap<Key, AuthorizationPolicy>,
    /// Policies of the list in progress (to forget those a re-list no longer has).
    listing: BTreeSet<Key>,
    /// The error last logged per policy, so a broken policy is logged once per change.
    logged: BTreeMap<Key, String>,
}

impl Policies {
    fn on_event(&mut self, event: watcher::Event<DynamicObject>) -> Option<watcher::Event<Object>> {
        Some(match event {
            watcher::Event::Init => {
                self.listing.clear();
                watcher::Event::Init
            }
            watcher::Event::InitDone => {
                let listed = std::mem::take(&mut self.listing);
                self.last_good.retain(|k, _| listed.contains(k));
                self.logged.retain(|k, _| listed.contains(k));
                watcher::Event::InitDone
            }
            watcher::Event::InitApply(obj) => {
                self.listing.insert(key_of(&obj.metadata));
                watcher::Event::InitApply(Object::AuthorizationPolicy(self.usable(obj)?))
            }
            watcher::Event::Apply(obj) => {
                let before = self.last_good.get(&key_of(&obj.metadata)).cloned();
                let p = self.usable(obj)?;
                if Some(&p) == before.as_ref() {
                    return None;
                }
                watcher::Event::Apply(Object::AuthorizationPolicy(p))
            }
            watcher::Event::Delete(obj) => {
                let key = key_of(&obj.metadata);
                self.last_good.remove(&key);
                self.logged.remove(&key);
                watcher::Event::Delete(Object::AuthorizationPolicy(AuthorizationPolicy {
                    metadata: obj.metadata,
                    ..AuthorizationPolicy::default()
                }))
            }
        })
    }

    /// The policy, remembered as the last good version; or, when it cannot be used, the last
    /// good version (logged), or nothing.
    fn usable(&mut self, obj: DynamicObject) -> Option<AuthorizationPolicy> {
        let key = key_of(&obj.metadata);
        match read(obj) {
            Ok(p) => {
                if self.logged.remove(&key).is_some() {
                    tracing::info!(policy = %p.id(), "AuthorizationPolicy usable again");
                }
                self.last_good.insert(key, p.clone());
                Some(p)
            }
            Err(e) => {
                let kept = self.last_good.get(&key).cloned();
                let msg = e.to_string();
                if self.logged.get(&key) != Some(&msg) {
                    if kept.is_some() {
                        tracing::error!("{msg}; keeping the last good version");
                    } else {
                        tracing::error!("{msg}; leaving the policy out until it is fixed");
                    }
                    self.logged.insert(key, msg);
                }
                kept
            }
        }
    }
}

/// The typed and validated policy, or why it cannot be used.
pub fn read(mut obj: DynamicObject) -> Result<AuthorizationPolicy, PolicyError> {
    let spec = obj
        .data
        .get_mut("spec")
        .map(serde_json::Value::take)
        .filter(|v| !v.is_null())
        .unwrap_or_else(|| serde_json::json!({}));
    let mut policy = AuthorizationPolicy {
        metadata: obj.metadata,
        ..AuthorizationPolicy::default()
    };
    policy.spec = serde_json::from_value::<AuthorizationPolicySpec>(spec).map_err(|source| {
        PolicyError::Schema {
            policy: policy.id(),
            reason: source.to_string(),
        }
    })?;
    authz::validate(&policy).map_err(|source| PolicyError::Invalid {
        policy: policy.id(),
        source,
    })?;
    Ok(policy)
}
