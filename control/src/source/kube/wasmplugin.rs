//! WasmPlugins from the API server: a watcher on our CRD (`wasmesh.io/v1alpha1`,
//! `wasmplugins`, see `examples/k8s/wasmplugin-crd.yaml`) read as `DynamicObject`s. Each one's
//! `spec` is deserialized into [`WasmPlugin`], checked with
//! [`default_and_validate`](crate::source::wasmplugin::default_and_validate), and its module is
//! read from control's filesystem (an absolute `file://` path: in a cluster, a ConfigMap or
//! volume mounted into control's pod).
//!
//! Unlike HTTPRoutes, a plugin that stops being usable (its spec, or its module: missing, not
//! Wasm, sha256 mismatch) keeps its last good version — with the module bytes read then — and
//! the error is logged, naming the plugin and the file. A plugin never usable is left out.
//!
//! Module files change without the object changing (a ConfigMap update, which the kubelet
//! propagates to mounted volumes a minute or so later): every [`MODULE_RECHECK`] the modules
//! of the plugins in force are looked at again (re-read only when size, mtime or inode
//! changed) and a plugin whose module changed is sent again; plugins whose current version
//! could not be used are tried again the same way, so a module that shows up after its plugin
//! is picked up without touching the object.
//!
//! When the CRD is not installed the API server answers 404; the source reports "no plugins"
//! once and keeps retrying with backoff (see `KubeSource::run`).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use futures::StreamExt;
use kube::Api;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::{WatchStreamExt, watcher};

use super::WatchStream;
use crate::source::Object;
use crate::source::wasmplugin::{self, ModuleCache, PluginError, WasmPlugin, WasmPluginSpec};

/// How often the modules of plugins in force are checked for changes.
pub const MODULE_RECHECK: Duration = Duration::from_secs(10);

/// `wasmesh.io/v1alpha1`, `wasmplugins`.
pub fn api_resource() -> ApiResource {
    let gvk = GroupVersionKind::gvk(wasmplugin::GROUP, wasmplugin::VERSION, wasmplugin::KIND);
    ApiResource::from_gvk_with_plural(&gvk, wasmplugin::PLURAL)
}

pub(super) fn api(client: kube::Client, namespace: Option<&str>) -> Api<DynamicObject> {
    let resource = api_resource();
    match namespace {
        Some(ns) => Api::namespaced_with(client, ns, &resource),
        None => Api::all_with(client, &resource),
    }
}

// Inputs are moved once, from the watcher to `Plugins::on`: boxing would cost an allocation
// per event for nothing.
#[allow(clippy::large_enum_variant)]
enum Input {
    Watch(Result<watcher::Event<DynamicObject>, watcher::Error>),
    Recheck,
}

pub(super) fn stream(
    api: Api<DynamicObject>,
    config: watcher::Config,
    recheck: Duration,
) -> WatchStream {
    let events = watcher(api, config).default_backoff().map(Input::Watch);
    let mut ticks = tokio::time::interval(recheck);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let ticks = tokio_stream::wrappers::IntervalStream::new(ticks).map(|_| Input::Recheck);
    let mut plugins = Plugins::default();
    futures::stream::select(events, ticks)
        .flat_map(move |input| futures::stream::iter(plugins.on(input)))
        .boxed()
}

type Key = (String, String);

fn key_of(meta: &kube::api::ObjectMeta) -> Key {
    (
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}

/// One watcher's plugins: the last good version of each, and the module files read.
#[derive(Default)]
struct Plugins {
    last_good: BTreeMap<Key, WasmPlugin>,
    /// Plugins of the list in progress (to forget those a re-list no longer has).
    listing: BTreeSet<Key>,
    modules: ModuleCache,
    /// The error last logged per plugin, so a broken plugin is logged once, not every recheck.
    logged: BTreeMap<Key, String>,
    /// The current version of plugins that could not be used, tried again at every recheck.
    failing: BTreeMap<Key, DynamicObject>,
}

type Out = Result<watcher::Event<Object>, watcher::Error>;

impl Plugins {
    fn on(&mut self, input: Input) -> Vec<Out> {
        match input {
            Input::Recheck => self.recheck(),
            Input::Watch(Err(e)) => vec![Err(e)],
            Input::Watch(Ok(event)) => self.on_event(event),
        }
    }

    fn on_event(&mut self, event: watcher::Event<DynamicObject>) -> Vec<Out> {
        let out = match event {
            watcher::Event::Init => {
                self.listing.clear();
                watcher::Event::Init
            }
            watcher::Event::InitDone => {
                let listed = std::mem::take(&mut self.listing);
                self.last_good.retain(|k, _| listed.contains(k));
                self.logged.retain(|k, _| listed.contains(k));
                self.failing.retain(|k, _| listed.contains(k));
                let keep = self
                    .last_good
                    .values()
                    .filter_map(|p| p.module.as_ref().map(|m| m.path.clone()))
                    .collect();
                self.modules.retain(&keep);
                watcher::Event::InitDone
            }
            watcher::Event::InitApply(obj) => {
                let key = key_of(&obj.metadata);
                self.listing.insert(key.clone());
                match self.usable(obj) {
                    Some(p) => watcher::Event::InitApply(Object::WasmPlugin(p)),
                    None => return vec![],
                }
            }
            watcher::Event::Apply(obj) => {
                let key = key_of(&obj.metadata);
                let before = self.last_good.get(&key).cloned();
                match self.usable(obj) {
                    Some(p) if Some(&p) != before.as_ref() => {
                        watcher::Event::Apply(Object::WasmPlugin(p))
                    }
                    _ => return vec![],
                }
            }
            watcher::Event::Delete(obj) => {
                let key = key_of(&obj.metadata);
                self.last_good.remove(&key);
                self.logged.remove(&key);
                self.failing.remove(&key);
                watcher::Event::Delete(Object::WasmPlugin(WasmPlugin {
                    metadata: obj.metadata,
                    ..WasmPlugin::default()
                }))
            }
        };
        vec![Ok(out)]
    }

    /// The plugin with its module, remembered as the last good version; or, when it cannot be
    /// used, the last good version (logged), or nothing.
    fn usable(&mut self, obj: DynamicObject) -> Option<WasmPlugin> {
        let key = key_of(&obj.metadata);
        match read(obj.clone(), &mut self.modules) {
            Ok(p) => {
                self.failing.remove(&key);
                if self.logged.remove(&key).is_some() {
                    tracing::info!(plugin = %p.id(), "WasmPlugin usable again");
                }
                self.last_good.insert(key, p.clone());
                Some(p)
            }
            Err(e) => {
                self.failing.insert(key.clone(), obj);
                let kept = self.last_good.get(&key).cloned();
                self.log(&key, &e, kept.is_some());
                kept
            }
        }
    }

    fn log(&mut self, key: &Key, e: &PluginError, kept: bool) {
        let msg = e.to_string();
        if self.logged.get(key) == Some(&msg) {
            return;
        }
        if kept {
            tracing::error!("{msg}; keeping the last good version");
        } else {
            tracing::error!("{msg}; leaving the plugin out until it is fixed");
        }
        self.logged.insert(key.clone(), msg);
    }

    /// Tries the plugins that could not be used again, and reads the modules of the plugins in
    /// force again; those that changed are sent again.
    fn recheck(&mut self) -> Vec<Out> {
        let mut out = Vec::new();
        let failing: Vec<DynamicObject> = self.failing.values().cloned().collect();
        for obj in failing {
            let key = key_of(&obj.metadata);
            let before = self.last_good.get(&key).cloned();
            if let Some(p) = self.usable(obj)
                && Some(&p) != before.as_ref()
            {
                out.push(Ok(watcher::Event::Apply(Object::WasmPlugin(p))));
            }
        }
        let keys: Vec<Key> = self
            .last_good
            .keys()
            .filter(|k| !self.failing.contains_key(*k))
            .cloned()
            .collect();
        for key in keys {
            let Some(old) = self.last_good.get(&key) else {
                continue;
            };
            let mut p = old.clone();
            match p.load_module(None, &mut self.modules) {
                Ok(()) => {
                    if self.logged.remove(&key).is_some() {
                        tracing::info!(plugin = %p.id(), "WasmPlugin module readable again");
                    }
                    if p.module != old.module {
                        self.last_good.insert(key, p.clone());
                        out.push(Ok(watcher::Event::Apply(Object::WasmPlugin(p))));
                    }
                }
                Err(e) => self.log(&key, &e, true),
            }
        }
        out
    }
}

/// The typed, defaulted and validated plugin with its module read, or why it cannot be used.
pub fn read(mut obj: DynamicObject, modules: &mut ModuleCache) -> Result<WasmPlugin, PluginError> {
    let spec = obj
        .data
        .get_mut("spec")
        .map(serde_json::Value::take)
        .filter(|v| !v.is_null())
        .unwrap_or_else(|| serde_json::json!({}));
    let mut plugin = WasmPlugin {
        metadata: obj.metadata,
        ..WasmPlugin::default()
    };
    plugin.spec =
        serde_json::from_value::<WasmPluginSpec>(spec).map_err(|source| PluginError::Schema {
            plugin: plugin.id(),
            reason: source.to_string(),
        })?;
    wasmplugin::default_and_validate(&mut plugin).map_err(|source| PluginError::Invalid {
        plugin: plugin.id(),
        source,
    })?;
    plugin.load_module(None, modules)?;
    Ok(plugin)
}
