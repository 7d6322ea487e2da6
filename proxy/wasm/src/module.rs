//! Modules: validation, compilation and the cache. A module is identified by the sha256 of its
//! bytes; it is compiled once per host and kept in memory, and — with a cache directory — its
//! precompiled form is stored as `<sha256>-<engine>.cwasm` so the next start skips compilation.
//! Validation happens before anything runs: the bytes must be WebAssembly, declare a Proxy-Wasm
//! ABI we host, export memory and an allocator, and import only what the host provides.

use std::path::PathBuf;
use std::sync::Arc;

use wasmtime::{ExternType, InstancePre, Module};

use crate::abi::AbiVersion;
use crate::context::HostState;
use crate::host::HostInner;
use crate::plugin::LoadError;

/// A module ready to instantiate.
pub(crate) struct CompiledModule {
    pub(crate) sha256: String,
    pub(crate) abi: AbiVersion,
    pub(crate) pre: InstancePre<HostState>,
}

/// Lowercase hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, bytes);
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

fn cache_path(host: &HostInner, sha: &str) -> Option<PathBuf> {
    let dir = host.config.cache_dir.as_ref()?;
    Some(dir.join(format!("{sha}-{}.cwasm", host.engine_key)))
}

/// A module known by sha256 only: from memory, or from the on-disk cache.
pub(crate) fn cached(
    host: &HostInner,
    plugin: &str,
    sha: &str,
) -> Result<Arc<CompiledModule>, LoadError> {
    if let Some(m) = host
        .modules
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(sha)
    {
        return Ok(m.clone());
    }
    let module = load_precompiled(host, sha).ok_or_else(|| LoadError::NotCached {
        plugin: plugin.to_string(),
        sha256: sha.to_string(),
    })?;
    finish(host, plugin, sha.to_string(), module)
}

/// Compiles `wasm` (or finds it compiled), checking `expected` sha256 when given.
pub(crate) fn compile(
    host: &HostInner,
    plugin: &str,
    wasm: &[u8],
    expected: Option<&str>,
) -> Result<Arc<CompiledModule>, LoadError> {
    let sha = sha256_hex(wasm);
    if let Some(want) = expected
        && !want.eq_ignore_ascii_case(&sha)
    {
        return Err(LoadError::Sha256Mismatch {
            plugin: plugin.to_string(),
            expected: want.to_string(),
            actual: sha,
        });
    }
    if let Some(m) = host
        .modules
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&sha)
    {
        return Ok(m.clone());
    }
    let module = match load_precompiled(host, &sha) {
        Some(m) => m,
        None => {
            let invalid = |e: wasmtime::Error| LoadError::Invalid {
                plugin: plugin.to_string(),
                reason: format!("{e:#}"),
            };
            Module::validate(&host.engine, wasm).map_err(invalid)?;
            let module = Module::new(&host.engine, wasm).map_err(invalid)?;
            store_precompiled(host, &sha, &module);
            module
        }
    };
    finish(host, plugin, sha, module)
}

fn finish(
    host: &HostInner,
    plugin: &str,
    sha: String,
    module: Module,
) -> Result<Arc<CompiledModule>, LoadError> {
    let abi = check_exports(plugin, &module)?;
    let pre = host
        .linker
        .instantiate_pre(&module)
        .map_err(|e| LoadError::Link {
            plugin: plugin.to_string(),
            reason: format!("{e:#}"),
        })?;
    let compiled = Arc::new(CompiledModule {
        sha256: sha.clone(),
        abi,
        pre,
    });
    host.modules
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(sha, compiled.clone());
    Ok(compiled)
}

fn check_exports(plugin: &str, module: &Module) -> Result<AbiVersion, LoadError> {
    let has = |name: &str| module.get_export(name).is_some();
    let abi = AbiVersion::MARKERS
        .iter()
        .find(|(m, _)| has(m))
        .map(|(_, v)| *v);
    let Some(abi) = abi else {
        if let Some(m) = AbiVersion::UNSUPPORTED.iter().find(|m| has(m)) {
            return Err(LoadError::UnsupportedAbi {
                plugin: plugin.to_string(),
                marker: m.to_string(),
            });
        }
        return Err(LoadError::NoAbiVersion {
            plugin: plugin.to_string(),
        });
    };
    if !matches!(module.get_export("memory"), Some(ExternType::Memory(_))) {
        return Err(LoadError::MissingExport {
            plugin: plugin.to_string(),
            export: "memory",
        });
    }
    if !has("proxy_on_memory_allocate") && !has("malloc") {
        return Err(LoadError::MissingExport {
            plugin: plugin.to_string(),
            export: "proxy_on_memory_allocate (or malloc)",
        });
    }
    Ok(abi)
}

fn load_precompiled(host: &HostInner, sha: &str) -> Option<Module> {
    let path = cache_path(host, sha)?;
    if !path.exists() {
        return None;
    }
    // SAFETY: the file was written by `store_precompiled` of a host with the same engine
    // configuration (the engine key is in its name; wasmtime checks compatibility again), in
    // a directory only this proxy writes to. Deserializing arbitrary bytes would be unsound,
    // which is why the cache directory must not be writable by anyone else.
    #[allow(unsafe_code)]
    let loaded = unsafe { Module::deserialize_file(&host.engine, &path) };
    match loaded {
        Ok(m) => Some(m),
        Err(e) => {
            tracing::warn!(path = %path.display(), "ignoring unusable precompiled module: {e:#}");
            None
        }
    }
}

fn store_precompiled(host: &HostInner, sha: &str, module: &Module) {
    let Some(path) = cache_path(host, sha) else {
        return;
    };
    let write = || -> std::io::Result<()> {
        let bytes = module
            .serialize()
            .map_err(|e| std::io::Error::other(format!("{e:#}")))?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        std::fs::write(&tmp, bytes)?;
        std::fs::rename(&tmp, &path)
    };
    if let Err(e) = write() {
        tracing::warn!(path = %path.display(), "could not cache the precompiled module: {e}");
    }
}
