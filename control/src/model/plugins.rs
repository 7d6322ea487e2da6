//! WasmPlugins in the table: every plugin as proxies receive it. Pure.
//!
//! Every proxy gets every plugin and decides by its own namespace and labels which apply to it,
//! so a plugin change is a change to the plugin alone: the model keeps one [`PluginEntry`] per
//! plugin and a plugin delta carries only `wasm_plugins` / `removed_wasm_plugins`.
//!
//! [`PluginEntry::new`] fills every default (phase, fail strategy, match mode) so proxies never
//! guess; `mesh_wide` is set for plugins in control's root namespace. `generation` is a counter
//! the model keeps per plugin: 1 when first seen, one more on every change of what proxies
//! receive — the spec or the module's bytes (a new module file with an unchanged spec has the
//! same `metadata.generation` but must be loaded again).

use std::collections::BTreeMap;

use bytes::Bytes;
use serde::Serialize;
use wasmesh_api::discovery as pb;

use crate::source::wasmplugin::{FAIL_STRATEGIES, PHASES, WasmPlugin};

/// One WasmPlugin as the table holds it. The `table` command prints it (without the module's
/// bytes); [`PluginEntry::to_proto`] is what proxies receive.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PluginEntry {
    pub namespace: String,
    pub name: String,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub selector: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub target_services: Vec<String>,
    /// `spec.url` as written.
    pub url: String,
    /// The file the module was read from.
    pub module_path: String,
    pub sha256: String,
    pub module_size: u64,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub root_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plugin_config: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub vm_env: BTreeMap<String, String>,
    pub phase: String,
    pub priority: i32,
    pub fail_strategy: String,
    #[serde(rename = "match", skip_serializing_if = "Vec::is_empty")]
    pub match_: Vec<MatchEntry>,
    pub generation: i64,
    pub mesh_wide: bool,
    /// The module's bytes (served by `GetModule`, never in the stream).
    #[serde(skip)]
    pub module: Bytes,
}

/// Equal when proxies would receive the same plugin (the module compared by sha256).
impl PartialEq for PluginEntry {
    fn eq(&self, other: &Self) -> bool {
        self.same_except_generation(other) && self.generation == other.generation
    }
}

/// `spec.match[]` with the mode defaulted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MatchEntry {
    /// CLIENT, SERVER or CLIENT_AND_SERVER.
    pub mode: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u32>,
}

impl PluginEntry {
    /// The entry for a plugin the source has validated and loaded the module of; `None` when
    /// its module is not loaded (sources never send such plugins on). `generation` is left at
    /// 0 for the model to set.
    pub fn new(plugin: &WasmPlugin, root_namespace: &str) -> Option<PluginEntry> {
        let module = plugin.module.as_ref()?;
        let spec = &plugin.spec;
        let namespace = plugin.metadata.namespace.clone().unwrap_or_default();
        Some(PluginEntry {
            mesh_wide: namespace == root_namespace,
            namespace,
            name: plugin.metadata.name.clone().unwrap_or_default(),
            selector: spec
                .selector
                .as_ref()
                .map(|s| s.match_labels.clone())
                .unwrap_or_default(),
            target_services: spec.target_refs.iter().map(|t| t.name.clone()).collect(),
            url: spec.url.clone(),
            module_path: module.path.display().to_string(),
            sha256: module.sha256.clone(),
            module_size: module.bytes.len() as u64,
            root_id: spec.plugin_name.clone().unwrap_or_default(),
            plugin_config: spec.plugin_config.clone(),
            vm_env: spec
                .vm_config
                .iter()
                .flat_map(|vm| &vm.env)
                .map(|e| (e.name.clone(), e.value.clone().unwrap_or_default()))
                .collect(),
            phase: spec.phase.clone().unwrap_or_else(|| PHASES[0].into()),
            priority: spec.priority.unwrap_or(0),
            fail_strategy: spec
                .fail_strategy
                .clone()
                .unwrap_or_else(|| FAIL_STRATEGIES[0].into()),
            match_: spec
                .match_
                .iter()
                .map(|m| MatchEntry {
                    mode: match m.mode.as_deref() {
                        None | Some("UNDEFINED") => "CLIENT_AND_SERVER".into(),
                        Some(other) => other.into(),
                    },
                    ports: m.ports.iter().map(|p| p.number as u32).collect(),
                })
                .collect(),
            generation: 0,
            module: module.bytes.clone(),
        })
    }

    /// `namespace/name`.
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Whether proxies would receive the same plugin, generation aside.
    pub fn same_except_generation(&self, other: &Self) -> bool {
        self.namespace == other.namespace
            && self.name == other.name
            && self.selector == other.selector
            && self.target_services == other.target_services
            && self.url == other.url
            && self.module_path == other.module_path
            && self.sha256 == other.sha256
            && self.module_size == other.module_size
            && self.root_id == other.root_id
            && self.plugin_config == other.plugin_config
            && self.vm_env == other.vm_env
            && self.phase == other.phase
            && self.priority == other.priority
            && self.fail_strategy == other.fail_strategy
            && self.match_ == other.match_
            && self.mesh_wide == other.mesh_wide
    }

    /// The contract's `WasmPlugin`.
    pub fn to_proto(&self) -> pb::WasmPlugin {
        use pb::traffic_selector::Mode;
        use pb::wasm_plugin::{FailStrategy, Phase};
        let phase = match self.phase.as_str() {
            "AUTHN" => Phase::Authn,
            "AUTHZ" => Phase::Authz,
            "STATS" => Phase::Stats,
            _ => Phase::UnspecifiedPhase,
        };
        let fail_strategy = match self.fail_strategy.as_str() {
            "FAIL_OPEN" => FailStrategy::FailOpen,
            _ => FailStrategy::FailClose,
        };
        pb::WasmPlugin {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            selector: self.selector.clone().into_iter().collect(),
            target_services: self.target_services.clone(),
            sha256: self.sha256.clone(),
            module_size: self.module_size,
            root_id: self.root_id.clone(),
            plugin_config: self
                .plugin_config
                .as_ref()
                .map(|v| serde_json::to_vec(v).unwrap_or_default())
                .unwrap_or_default(),
            vm_env: self.vm_env.clone().into_iter().collect(),
            phase: phase as i32,
            priority: self.priority,
            fail_strategy: fail_strategy as i32,
            r#match: self
                .match_
                .iter()
                .map(|m| pb::TrafficSelector {
                    mode: match m.mode.as_str() {
                        "CLIENT" => Mode::Client,
                        "SERVER" => Mode::Server,
                        _ => Mode::ClientAndServer,
                    } as i32,
                    ports: m.ports.clone(),
                })
                .collect(),
            generation: self.generation,
            mesh_wide: self.mesh_wide,
        }
    }
}

#[cfg(test)]
mod tests;
