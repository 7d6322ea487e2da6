//! Module files: read, hashed (sha256), checked against what the plugin says, and cached by
//! file identity so an unchanged file is not read again on every rescan.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use bytes::Bytes;

/// The magic number and version every binary Wasm module starts with.
pub const WASM_MAGIC: [u8; 8] = *b"\0asm\x01\0\0\0";

/// A module's bytes and their sha256 (hex, lower case). Equal when the hashes are.
#[derive(Clone)]
pub struct Module {
    pub sha256: String,
    pub bytes: Bytes,
    /// The file it was read from.
    pub path: PathBuf,
}

impl PartialEq for Module {
    fn eq(&self, other: &Self) -> bool {
        self.sha256 == other.sha256
    }
}

impl std::fmt::Debug for Module {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Module")
            .field("sha256", &self.sha256)
            .field("size", &self.bytes.len())
            .field("path", &self.path)
            .finish()
    }
}

impl Module {
    /// A module from bytes in memory (tests, tools).
    pub fn from_bytes(path: impl Into<PathBuf>, bytes: impl Into<Bytes>) -> Self {
        let bytes = bytes.into();
        Module {
            sha256: sha256_hex(&bytes),
            bytes,
            path: path.into(),
        }
    }
}

/// Why a module could not be used; every variant names the file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModuleError {
    #[error("module {path}: cannot read: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error(
        "module {path}: {size} bytes, more than the {max} control serves (wasmesh_api::MAX_MODULE_SIZE)"
    )]
    TooLarge {
        path: PathBuf,
        size: u64,
        max: usize,
    },
    #[error(
        "module {path}: not a binary Wasm module (it does not start with \\0asm, version 1); compile it to .wasm"
    )]
    NotWasm { path: PathBuf },
    #[error(
        "module {path}: sha256 is {actual}, but spec.sha256 says {expected} (a different build of the module, or a stale sha256 in the plugin)"
    )]
    Mismatch {
        path: PathBuf,
        expected: String,
        actual: String,
    },
}

impl ModuleError {
    fn read(path: &Path, e: impl std::fmt::Display) -> Self {
        ModuleError::Read {
            path: path.to_path_buf(),
            reason: e.to_string(),
        }
    }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut out = String::with_capacity(64);
    for b in digest.as_ref() {
        use std::fmt::Write;
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// What says a file is unchanged without reading it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    len: u64,
    modified: Option<SystemTime>,
    inode: u64,
    ctime: (i64, i64),
}

fn stamp(meta: &std::fs::Metadata) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    Stamp {
        len: meta.len(),
        modified: meta.modified().ok(),
        inode: meta.ino(),
        ctime: (meta.ctime(), meta.ctime_nsec()),
    }
}

/// Modules read so far, by path. [`ModuleCache::retain`] forgets paths no plugin names.
#[derive(Debug, Default)]
pub struct ModuleCache {
    files: HashMap<PathBuf, (Stamp, Module)>,
}

impl ModuleCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// The module at `path` (read again only if the file changed), checked against
    /// `expected` (hex sha256) when given.
    pub fn read(&mut self, path: &Path, expected: Option<&str>) -> Result<Module, ModuleError> {
        let module = self.read_file(path)?;
        if let Some(expected) = expected
            && !expected.eq_ignore_ascii_case(&module.sha256)
        {
            return Err(ModuleError::Mismatch {
                path: path.to_path_buf(),
                expected: expected.to_ascii_lowercase(),
                actual: module.sha256,
            });
        }
        Ok(module)
    }

    fn read_file(&mut self, path: &Path) -> Result<Module, ModuleError> {
        let meta = std::fs::metadata(path).map_err(|e| ModuleError::read(path, e))?;
        if !meta.is_file() {
            return Err(ModuleError::read(path, "not a file"));
        }
        let max = wasmesh_api::MAX_MODULE_SIZE;
        if meta.len() > max as u64 {
            return Err(ModuleError::TooLarge {
                path: path.to_path_buf(),
                size: meta.len(),
                max,
            });
        }
        let st = stamp(&meta);
        if let Some((s, m)) = self.files.get(path)
            && *s == st
        {
            return Ok(m.clone());
        }
        let bytes = std::fs::read(path).map_err(|e| ModuleError::read(path, e))?;
        if bytes.len() > max {
            return Err(ModuleError::TooLarge {
                path: path.to_path_buf(),
                size: bytes.len() as u64,
                max,
            });
        }
        if !bytes.starts_with(&WASM_MAGIC) {
            self.files.remove(path);
            return Err(ModuleError::NotWasm {
                path: path.to_path_buf(),
            });
        }
        let module = Module::from_bytes(path, bytes);
        // The file may have changed while it was read: keep the stamp taken before, so the
        // next read compares against it and reads again.
        self.files.insert(path.to_path_buf(), (st, module.clone()));
        Ok(module)
    }

    /// Forgets every file not in `keep`.
    pub fn retain(&mut self, keep: &std::collections::HashSet<PathBuf>) {
        self.files.retain(|p, _| keep.contains(p));
    }

    pub fn len(&self) -> usize {
        self.files.len()
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }
}
