//! WasmPlugin (`wasmesh.io/v1alpha1`) as control reads it: which pods run which Proxy-Wasm
//! module, with what configuration, where in the filter chain. The spec is shaped like Istio's
//! `extensions.istio.io/v1alpha1` WasmPlugin.
//!
//! - [`WasmPlugin`] and the spec types: our serde structs. Enumerations are kept as strings so
//!   that validation can say which value is wrong.
//! - [`default_and_validate`]: the checks both sources make — enumerations, ports, targetRefs,
//!   `type: HTTP` only, and a module `url` control can read (`file://` or a bare path; no
//!   registries, no HTTP).
//! - [`module`]: reading the module file, its sha256, and the check against `spec.sha256`.
//!   The sources resolve the module ([`WasmPlugin::module`]) before the model sees the plugin:
//!   the model stays pure, and a plugin whose module cannot be read never reaches it.
//!
//! Turning a plugin into what proxies receive is the model's job (`model::plugins`).

pub mod module;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};

pub use module::{Module, ModuleCache, ModuleError};

pub const GROUP: &str = "wasmesh.io";
pub const VERSION: &str = "v1alpha1";
pub const API_VERSION: &str = "wasmesh.io/v1alpha1";
pub const KIND: &str = "WasmPlugin";
pub const PLURAL: &str = "wasmplugins";

/// Plugins in this namespace apply to pods of every namespace (`--root-namespace`).
pub const DEFAULT_ROOT_NAMESPACE: &str = "wasmesh-system";

/// The phases of `spec.phase`, in the contract's order.
pub const PHASES: [&str; 4] = ["UNSPECIFIED_PHASE", "AUTHN", "AUTHZ", "STATS"];
/// `spec.failStrategy` values, in the contract's order.
pub const FAIL_STRATEGIES: [&str; 2] = ["FAIL_CLOSE", "FAIL_OPEN"];
/// `spec.match[].mode` values. UNDEFINED and CLIENT_AND_SERVER both mean both sides.
pub const MODES: [&str; 4] = ["UNDEFINED", "CLIENT", "SERVER", "CLIENT_AND_SERVER"];

/// One WasmPlugin object.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
pub struct WasmPlugin {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: WasmPluginSpec,
    /// The module `spec.url` names, read by the source; `None` until it was. Never
    /// serialized: a plugin written out and read back reads its module again.
    #[serde(skip)]
    pub module: Option<Module>,
}

impl Serialize for WasmPlugin {
    /// As the API server writes it: `apiVersion`, `kind`, `metadata`, `spec`.
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = s.serialize_struct("WasmPlugin", 4)?;
        st.serialize_field("apiVersion", API_VERSION)?;
        st.serialize_field("kind", KIND)?;
        st.serialize_field("metadata", &self.metadata)?;
        st.serialize_field("spec", &self.spec)?;
        st.end()
    }
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WasmPluginSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub target_refs: Vec<PolicyTargetReference>,
    /// Istio's older single form; folded into `targetRefs` by validation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_ref: Option<PolicyTargetReference>,
    /// Where the module is: `file:///abs/path.wasm`, `file://relative.wasm` or a bare path.
    #[serde(default)]
    pub url: String,
    /// Hex sha256 of the module; when given, the bytes must match.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "sha256_string"
    )]
    pub sha256: Option<String>,
    /// The root_id passed to the module.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plugin_name: Option<String>,
    /// Any object; proxies receive it as JSON.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plugin_config: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_config: Option<VmConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fail_strategy: Option<String>,
    #[serde(default, rename = "match", skip_serializing_if = "Vec::is_empty")]
    pub match_: Vec<TrafficSelector>,
    /// HTTP (default) or NETWORK (refused: wasmesh runs HTTP filters only).
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub type_: Option<String>,
}

/// A sha256 of digits only (or digits and one `e`) reads as a number in YAML: say so.
fn sha256_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    match Option::<serde_json::Value>::deserialize(d)? {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(serde::de::Error::custom(format!(
            "spec.sha256 must be a string of 64 hex digits, not {other} (quote it in YAML)"
        ))),
    }
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadSelector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyTargetReference {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmConfig {
    #[serde(default)]
    pub env: Vec<EnvVar>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EnvVar {
    #[serde(default)]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// INLINE (default; `value`) or HOST (refused: the proxy's environment is not the
    /// plugin's business).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_from: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TrafficSelector {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortSelector>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct PortSelector {
    #[serde(default)]
    pub number: i64,
}

/// Why a plugin is refused (the spec; a module that cannot be read is a [`ModuleError`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct InvalidPlugin {
    /// The spec path, e.g. `spec.match[0].mode`.
    pub field: String,
    pub reason: String,
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> InvalidPlugin {
    InvalidPlugin {
        field: field.into(),
        reason: reason.into(),
    }
}

/// Where a module `url` points: the path as written (relative or absolute). Registries and
/// HTTP are refused with a message saying what to do instead.
pub fn module_path(url: &str) -> Result<PathBuf, InvalidPlugin> {
    let url = url.trim();
    if url.is_empty() {
        return Err(invalid(
            "spec.url",
            "missing: give the module file as file:///path/to/plugin.wasm",
        ));
    }
    let path = match url.split_once("://") {
        Some((scheme, rest)) => match scheme.to_ascii_lowercase().as_str() {
            "file" => rest,
            "oci" | "docker" => {
                return Err(invalid(
                    "spec.url",
                    format!(
                        "{url:?}: control does not pull OCI images; put the .wasm file where \
                         control can read it (in a cluster: mount it into control's pod from a \
                         ConfigMap or volume) and give file:///path/to/plugin.wasm"
                    ),
                ));
            }
            "http" | "https" => {
                return Err(invalid(
                    "spec.url",
                    format!(
                        "{url:?}: control does not download modules over HTTP; put the .wasm \
                         file where control can read it and give file:///path/to/plugin.wasm"
                    ),
                ));
            }
            other => {
                return Err(invalid(
                    "spec.url",
                    format!(
                        "{url:?}: scheme {other:?} is not supported; give file:///path/to/plugin.wasm \
                         or a bare path"
                    ),
                ));
            }
        },
        None => url,
    };
    if path.is_empty() {
        return Err(invalid("spec.url", format!("{url:?} names no file")));
    }
    Ok(PathBuf::from(path))
}

/// The module path, resolved: relative paths against `base` (the manifest's folder). Without
/// a base (the kube source) a relative path is refused.
pub fn resolve_module_path(url: &str, base: Option<&Path>) -> Result<PathBuf, InvalidPlugin> {
    let path = module_path(url)?;
    if path.is_absolute() {
        return Ok(path);
    }
    match base {
        Some(base) => Ok(base.join(path)),
        None => Err(invalid(
            "spec.url",
            format!(
                "{url:?} is a relative path: from the API server give an absolute path where \
                 the module is mounted in control's pod (file:///modules/plugin.wasm)"
            ),
        )),
    }
}

/// The `type`, `phase`, `failStrategy`, `match` and `targetRefs` the API server's schema would
/// accept and wasmesh can honour; fills in the defaults (HTTP, UNSPECIFIED_PHASE, FAIL_CLOSE,
/// CLIENT_AND_SERVER) and folds `targetRef` into `targetRefs`.
pub fn default_and_validate(plugin: &mut WasmPlugin) -> Result<(), InvalidPlugin> {
    let namespace = plugin.metadata.namespace.clone().unwrap_or_default();
    let spec = &mut plugin.spec;
    let ty = spec.type_.get_or_insert_with(|| "HTTP".into());
    match ty.as_str() {
        "HTTP" | "UNSPECIFIED_PLUGIN_TYPE" => *ty = "HTTP".into(),
        "NETWORK" => {
            return Err(invalid(
                "spec.type",
                "NETWORK plugins are not supported: wasmesh runs HTTP filters only (type: HTTP)",
            ));
        }
        other => return Err(invalid("spec.type", format!("{other:?} is not HTTP"))),
    }
    module_path(&spec.url)?;
    if let Some(sha) = spec.sha256.as_mut() {
        let lower = sha.trim().to_ascii_lowercase();
        if lower.len() != 64 || !lower.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(invalid(
                "spec.sha256",
                format!("{sha:?} is not a sha256 (64 hex digits)"),
            ));
        }
        *sha = lower;
    }
    let phase = spec
        .phase
        .get_or_insert_with(|| PHASES[0].into())
        .to_string();
    if !PHASES.contains(&phase.as_str()) {
        return Err(invalid(
            "spec.phase",
            format!("{phase:?} is not one of {}", PHASES.join(", ")),
        ));
    }
    let fail = spec
        .fail_strategy
        .get_or_insert_with(|| FAIL_STRATEGIES[0].into())
        .to_string();
    if !FAIL_STRATEGIES.contains(&fail.as_str()) {
        return Err(invalid(
            "spec.failStrategy",
            format!("{fail:?} is not FAIL_CLOSE or FAIL_OPEN"),
        ));
    }
    if let Some(cfg) = &spec.plugin_config
        && !cfg.is_object()
    {
        return Err(invalid(
            "spec.pluginConfig",
            format!("must be an object (a mapping), not {cfg}"),
        ));
    }
    if let Some(vm) = &spec.vm_config {
        let mut seen = std::collections::BTreeSet::new();
        for (i, env) in vm.env.iter().enumerate() {
            let field = format!("spec.vmConfig.env[{i}]");
            if env.name.is_empty() {
                return Err(invalid(format!("{field}.name"), "missing"));
            }
            if !seen.insert(env.name.as_str()) {
                return Err(invalid(
                    format!("{field}.name"),
                    format!("{:?} is given twice", env.name),
                ));
            }
            match env.value_from.as_deref() {
                None | Some("INLINE") => {}
                Some("HOST") => {
                    return Err(invalid(
                        format!("{field}.valueFrom"),
                        "HOST is not supported: give the value inline (value: …)",
                    ));
                }
                Some(other) => {
                    return Err(invalid(
                        format!("{field}.valueFrom"),
                        format!("{other:?} is not INLINE"),
                    ));
                }
            }
        }
    }
    for (i, m) in spec.match_.iter_mut().enumerate() {
        let mode = m.mode.get_or_insert_with(|| "CLIENT_AND_SERVER".into());
        if mode == "UNDEFINED" {
            *mode = "CLIENT_AND_SERVER".into();
        }
        if !MODES.contains(&mode.as_str()) {
            return Err(invalid(
                format!("spec.match[{i}].mode"),
                format!("{mode:?} is not one of {}", MODES.join(", ")),
            ));
        }
        for (j, p) in m.ports.iter().enumerate() {
            if !(1..=65535).contains(&p.number) {
                return Err(invalid(
                    format!("spec.match[{i}].ports[{j}].number"),
                    format!("{} is not a port (1-65535)", p.number),
                ));
            }
        }
    }
    if let Some(one) = spec.target_ref.take() {
        spec.target_refs.insert(0, one);
    }
    for (i, t) in spec.target_refs.iter().enumerate() {
        let field = format!("spec.targetRefs[{i}]");
        let group = t.group.as_deref().unwrap_or("");
        if !matches!(group, "" | "core") || t.kind != "Service" {
            return Err(invalid(
                field,
                format!(
                    "group {group:?} kind {:?}: wasmesh attaches plugins to Services only \
                     (group: \"\", kind: Service); use selector for pods",
                    t.kind
                ),
            ));
        }
        if t.name.is_empty() {
            return Err(invalid(format!("{field}.name"), "missing"));
        }
        if let Some(ns) = &t.namespace
            && ns != &namespace
        {
            return Err(invalid(
                format!("{field}.namespace"),
                format!("{ns:?}: a plugin targets Services of its own namespace ({namespace:?})"),
            ));
        }
    }
    Ok(())
}

/// Why a plugin was not used: its spec, or its module.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("WasmPlugin {plugin}: spec does not match the WasmPlugin schema: {reason}")]
    Schema { plugin: String, reason: String },
    #[error("WasmPlugin {plugin}: {source}")]
    Invalid {
        plugin: String,
        source: InvalidPlugin,
    },
    #[error("WasmPlugin {plugin}: {source}")]
    Module { plugin: String, source: ModuleError },
}

impl WasmPlugin {
    /// `namespace/name`.
    pub fn id(&self) -> String {
        format!(
            "{}/{}",
            self.metadata.namespace.as_deref().unwrap_or_default(),
            self.metadata.name.as_deref().unwrap_or_default()
        )
    }

    /// Makes a relative module path absolute against `base` (the manifest's folder), for tools
    /// that hand the plugin to control from another folder (the local mesh): control then
    /// reads the module where the user put it.
    pub fn absolutize_module_url(&mut self, base: &Path) -> Result<(), InvalidPlugin> {
        let path = module_path(&self.spec.url)?;
        if path.is_relative() {
            let abs = std::path::absolute(base.join(&path)).map_err(|e| {
                invalid(
                    "spec.url",
                    format!("cannot make {} absolute: {e}", path.display()),
                )
            })?;
            self.spec.url = format!("file://{}", abs.display());
        }
        Ok(())
    }

    /// Reads the module `spec.url` names (relative paths against `base`, the manifest's
    /// folder; `None`: only absolute paths) through `cache`, checks it against `spec.sha256`
    /// and keeps it in [`WasmPlugin::module`].
    pub fn load_module(
        &mut self,
        base: Option<&Path>,
        cache: &mut ModuleCache,
    ) -> Result<(), PluginError> {
        let path =
            resolve_module_path(&self.spec.url, base).map_err(|source| PluginError::Invalid {
                plugin: self.id(),
                source,
            })?;
        let module = cache
            .read(&path, self.spec.sha256.as_deref())
            .map_err(|source| PluginError::Module {
                plugin: self.id(),
                source,
            })?;
        self.module = Some(module);
        Ok(())
    }
}
