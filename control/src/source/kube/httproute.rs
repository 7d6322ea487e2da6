//! HTTPRoutes from the API server. k8s-openapi has no Gateway API types, so the watcher reads
//! `DynamicObject`s of `gateway.networking.k8s.io/v1` `httproutes` and each one's `spec` is
//! deserialized into [`HttpRoute`] and checked with
//! [`default_and_validate`](crate::source::httproute::default_and_validate). A route that
//! fails is logged with its name and left out — as if it did not exist — and never stops the
//! watch: one bad route must not take the others away.
//!
//! When the Gateway API CRDs are not installed the API server answers 404; the source then
//! reports "no routes" once (so the table is not held back) and the watcher keeps retrying
//! with backoff, picking routes up once the CRD appears (see `KubeSource::run`).

use futures::{StreamExt, TryStreamExt};
use kube::Api;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::{WatchStreamExt, watcher};

use super::WatchStream;
use crate::source::Object;
use crate::source::httproute::{self, HttpRoute, HttpRouteSpec, InvalidRoute};

/// Why a route from the API server was left out.
#[derive(Debug, thiserror::Error)]
pub enum SkippedRoute {
    #[error("HTTPRoute {route}: spec does not match the Gateway API schema: {source}")]
    Schema {
        route: String,
        source: serde_json::Error,
    },
    #[error("HTTPRoute {route}: {source}")]
    Invalid { route: String, source: InvalidRoute },
}

/// `gateway.networking.k8s.io/v1`, `httproutes`.
pub fn api_resource() -> ApiResource {
    let gvk = GroupVersionKind::gvk(httproute::GROUP, httproute::VERSION, httproute::KIND);
    ApiResource::from_gvk_with_plural(&gvk, httproute::PLURAL)
}

pub(super) fn api(client: kube::Client, namespace: Option<&str>) -> Api<DynamicObject> {
    let resource = api_resource();
    match namespace {
        Some(ns) => Api::namespaced_with(client, ns, &resource),
        None => Api::all_with(client, &resource),
    }
}

pub(super) fn stream(api: Api<DynamicObject>, config: watcher::Config) -> WatchStream {
    watcher(api, config)
        .default_backoff()
        .try_filter_map(|event| futures::future::ready(Ok(route_event(event))))
        .boxed()
}

/// What one route object from the API server is to control.
#[derive(Debug)]
pub enum Reading {
    Usable(HttpRoute),
    /// Left out; `identity` is the route's metadata alone (enough to delete it).
    Skipped {
        identity: HttpRoute,
        why: SkippedRoute,
    },
}

/// A watcher event on routes as source objects. A route left out of a list is simply absent;
/// one that changes into something unusable is reported deleted, so its last version does not
/// linger.
fn route_event(event: watcher::Event<DynamicObject>) -> Option<watcher::Event<Object>> {
    Some(match event {
        watcher::Event::Init => watcher::Event::Init,
        watcher::Event::InitDone => watcher::Event::InitDone,
        watcher::Event::InitApply(obj) => match read(obj) {
            Reading::Usable(r) => watcher::Event::InitApply(Object::HttpRoute(r)),
            Reading::Skipped { why, .. } => {
                warn_skipped(&why);
                return None;
            }
        },
        watcher::Event::Apply(obj) => match read(obj) {
            Reading::Usable(r) => watcher::Event::Apply(Object::HttpRoute(r)),
            Reading::Skipped { identity, why } => {
                warn_skipped(&why);
                watcher::Event::Delete(Object::HttpRoute(identity))
            }
        },
        // Only the identity matters for a deletion.
        watcher::Event::Delete(obj) => watcher::Event::Delete(Object::HttpRoute(match read(obj) {
            Reading::Usable(r) => r,
            Reading::Skipped { identity, .. } => identity,
        })),
    })
}

fn warn_skipped(why: &SkippedRoute) {
    tracing::warn!("{why}; leaving the route out until it is fixed");
}

/// The typed, defaulted and validated route, or why it is left out.
pub fn read(mut obj: DynamicObject) -> Reading {
    let spec = obj
        .data
        .get_mut("spec")
        .map(serde_json::Value::take)
        .filter(|v| !v.is_null())
        .unwrap_or_else(|| serde_json::json!({}));
    let name = format!(
        "{}/{}",
        obj.metadata.namespace.as_deref().unwrap_or_default(),
        obj.metadata.name.as_deref().unwrap_or_default()
    );
    let identity = HttpRoute {
        metadata: obj.metadata,
        spec: HttpRouteSpec::default(),
    };
    let spec: HttpRouteSpec = match serde_json::from_value(spec) {
        Ok(spec) => spec,
        Err(source) => {
            return Reading::Skipped {
                identity,
                why: SkippedRoute::Schema {
                    route: name,
                    source,
                },
            };
        }
    };
    let mut route = HttpRoute {
        metadata: identity.metadata.clone(),
        spec,
    };
    match httproute::default_and_validate(&mut route) {
        Ok(()) => Reading::Usable(route),
        Err(source) => Reading::Skipped {
            identity,
            why: SkippedRoute::Invalid {
                route: name,
                source,
            },
        },
    }
}
