//! The folder source: a directory of Kubernetes YAML, the same manifests `kubectl apply -f`
//! takes, watched for changes.
//!
//! - Every `*.yaml`, `*.yml` and `*.json` file below the folder (hidden ones excepted) is read;
//!   files may hold many documents, and `List` documents are expanded.
//! - Objects get the defaults the API server would give them, including a ClusterIP allocated
//!   from the service CIDR when a Service has none (stable for as long as control runs).
//! - A file that cannot be read or parsed, or an invalid object, is reported with the file, the
//!   document's index and line, and the reason; the rest of the folder still loads, and the last
//!   good version of that object stays in force.
//! - A WasmPlugin's module file (`spec.url`, relative paths against the manifest's folder) is
//!   read and hashed on every scan (unless its size, mtime and inode are unchanged); a plugin
//!   whose module cannot be read or does not match `spec.sha256` is reported like an invalid
//!   object, and its last good version (with the module bytes it had) stays in force; one never
//!   read is left out until its module can be read. Module files inside the folder are watched
//!   with the manifests; the folders of those outside it are watched too (for a module not
//!   there yet, the nearest existing folder above it), whether the plugin is in force or not,
//!   so a module written later goes out without the manifest being touched.
//! - Changes are picked up through inotify (with a short debounce) and a slow periodic rescan as
//!   a safety net; only changed objects are sent on.

mod parse;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::mpsc;

pub use parse::{Document, Outcome, default_and_validate, objects_from_manifest, parse_file};

use super::wasmplugin::{ModuleCache, PluginError, resolve_module_path};
use super::{Event, EventSender, Kind, Object, ObjectKey, SourceError};
use crate::model::Cidr;

/// Something wrong in the folder; the object it names (if any) keeps its last good version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: PathBuf,
    /// 1-based document index within the file (0: the file as a whole).
    pub document: usize,
    pub line: usize,
    pub object: Option<ObjectKey>,
    pub reason: String,
    /// A last good version of the object is still in force.
    pub kept: bool,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.file.display())?;
        if self.document > 0 {
            write!(f, ":{} (document {})", self.line, self.document)?;
        }
        write!(f, ": {}", self.reason)?;
        if self.kept {
            f.write_str("; keeping the last good version")?;
        }
        Ok(())
    }
}

/// What one scan found.
#[derive(Debug, Default)]
pub struct ScanReport {
    pub events: Vec<Event>,
    pub problems: Vec<Problem>,
    /// Kinds of documents skipped because control does not read them, with counts.
    pub skipped: BTreeMap<String, usize>,
}

#[derive(Debug, Default)]
struct FileState {
    text: String,
    docs: Vec<Document>,
    /// What each document index contributed last time (for documents that later break).
    keys: BTreeMap<usize, Vec<ObjectKey>>,
}

/// The folder's state between scans. Pure apart from reading files.
#[derive(Debug)]
pub struct Folder {
    root: PathBuf,
    service_cidr: Cidr,
    files: BTreeMap<PathBuf, FileState>,
    current: BTreeMap<ObjectKey, Object>,
    /// WasmPlugin module files, by path.
    modules: ModuleCache,
    /// Folders outside the root to watch for module files (see [`Folder::module_dirs_outside`]).
    module_dirs: BTreeSet<PathBuf>,
    scanned: bool,
}

/// The default service CIDR, as a default kubeadm cluster has it.
pub const DEFAULT_SERVICE_CIDR: &str = "10.96.0.0/12";

impl Folder {
    pub fn new(root: impl Into<PathBuf>, service_cidr: Cidr) -> Self {
        Self {
            root: root.into(),
            service_cidr,
            files: BTreeMap::new(),
            current: BTreeMap::new(),
            modules: ModuleCache::new(),
            module_dirs: BTreeSet::new(),
            scanned: false,
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The objects in force.
    pub fn objects(&self) -> impl Iterator<Item = &Object> {
        self.current.values()
    }

    /// Folders outside the root to watch, as of the last scan: the folder of the module of
    /// every plugin in the manifests — in force or not, so that a module that was not there
    /// yet is picked up when it is written — or, while that folder does not exist, the
    /// nearest one above it that does.
    pub fn module_dirs_outside(&self) -> BTreeSet<PathBuf> {
        self.module_dirs.clone()
    }

    /// Reads the folder and returns the events that bring a consumer up to date: on the first
    /// scan a `Replace` and `Synced` per kind, afterwards `Apply`/`Delete` for what changed.
    pub fn scan(&mut self) -> Result<ScanReport, SourceError> {
        let mut report = ScanReport::default();
        let paths = list_manifests(&self.root).map_err(|e| SourceError::Folder {
            path: self.root.display().to_string(),
            reason: e.to_string(),
        })?;
        let mut desired: BTreeMap<ObjectKey, Object> = BTreeMap::new();
        let mut origin: HashMap<ObjectKey, (PathBuf, usize)> = HashMap::new();
        let mut new_files = BTreeMap::new();
        let mut modules_used = std::collections::HashSet::new();
        let mut modules_named: BTreeSet<PathBuf> = BTreeSet::new();
        for path in paths {
            let old = self.files.remove(&path);
            let text = match std::fs::read_to_string(&path) {
                Ok(t) => t,
                Err(e) => {
                    // Keep whatever the file contributed before.
                    let mut kept = false;
                    if let Some(old) = old {
                        for key in old.keys.values().flatten() {
                            if let Some(obj) = self.current.get(key) {
                                desired.insert(key.clone(), obj.clone());
                                kept = true;
                            }
                        }
                        new_files.insert(path.clone(), old);
                    }
                    report.problems.push(Problem {
                        file: path.clone(),
                        document: 0,
                        line: 0,
                        object: None,
                        reason: format!("cannot read: {e}"),
                        kept,
                    });
                    continue;
                }
            };
            let (docs, old_keys) = match old {
                Some(old) if old.text == text => (old.docs, old.keys),
                Some(old) => (parse_file(&text), old.keys),
                None => (parse_file(&text), BTreeMap::new()),
            };
            let mut keys: BTreeMap<usize, Vec<ObjectKey>> = BTreeMap::new();
            for doc in &docs {
                match &doc.outcome {
                    Outcome::Objects(objs) => {
                        for obj in objs {
                            let key = obj.key();
                            // A plugin goes on with its module, or not at all (its last good
                            // version, if any, stays).
                            let loaded;
                            let obj = match obj {
                                Object::WasmPlugin(p) => {
                                    let mut p = p.clone();
                                    let base = path.parent();
                                    if let Ok(m) = resolve_module_path(&p.spec.url, base) {
                                        modules_named.insert(m);
                                    }
                                    match p.load_module(base, &mut self.modules) {
                                        Ok(()) => {
                                            if let Some(m) = &p.module {
                                                modules_used.insert(m.path.clone());
                                            }
                                            loaded = Object::WasmPlugin(p);
                                            &loaded
                                        }
                                        Err(e) => {
                                            let mut kept = false;
                                            if !desired.contains_key(&key)
                                                && let Some(old) = self.current.get(&key)
                                            {
                                                if let Object::WasmPlugin(p) = old
                                                    && let Some(m) = &p.module
                                                {
                                                    modules_used.insert(m.path.clone());
                                                }
                                                desired.insert(key.clone(), old.clone());
                                                origin
                                                    .insert(key.clone(), (path.clone(), doc.index));
                                                keys.entry(doc.index)
                                                    .or_default()
                                                    .push(key.clone());
                                                kept = true;
                                            }
                                            let reason = match &e {
                                                PluginError::Module { .. } if !kept => format!(
                                                    "{e}; the plugin is not sent to proxies until its module can be read (control reads it again when the file changes)"
                                                ),
                                                _ => e.to_string(),
                                            };
                                            report.problems.push(Problem {
                                                file: path.clone(),
                                                document: doc.index,
                                                line: doc.line,
                                                object: Some(key),
                                                reason,
                                                kept,
                                            });
                                            continue;
                                        }
                                    }
                                }
                                other => other,
                            };
                            if let Some((other, idx)) = origin.get(&key) {
                                report.problems.push(Problem {
                                    file: path.clone(),
                                    document: doc.index,
                                    line: doc.line,
                                    object: Some(key.clone()),
                                    reason: format!(
                                        "{key} is also defined in {} (document {idx}); using this one",
                                        other.display()
                                    ),
                                    kept: false,
                                });
                            }
                            origin.insert(key.clone(), (path.clone(), doc.index));
                            desired.insert(key.clone(), obj.clone());
                            keys.entry(doc.index).or_default().push(key);
                        }
                    }
                    Outcome::Skipped(kind) => {
                        *report.skipped.entry(kind.clone()).or_default() += 1;
                    }
                    Outcome::Invalid { object, reason } => {
                        // The last good version: by identity when the document names one,
                        // else whatever this document held before.
                        let candidates: Vec<ObjectKey> = match object {
                            Some(k) => vec![k.clone()],
                            None => old_keys.get(&doc.index).cloned().unwrap_or_default(),
                        };
                        let mut kept = false;
                        for key in candidates {
                            if desired.contains_key(&key) {
                                continue;
                            }
                            if let Some(obj) = self.current.get(&key) {
                                desired.insert(key.clone(), obj.clone());
                                origin.insert(key.clone(), (path.clone(), doc.index));
                                keys.entry(doc.index).or_default().push(key);
                                kept = true;
                            }
                        }
                        report.problems.push(Problem {
                            file: path.clone(),
                            document: doc.index,
                            line: doc.line,
                            object: object.clone(),
                            reason: reason.clone(),
                            kept,
                        });
                    }
                }
            }
            new_files.insert(path, FileState { text, docs, keys });
        }
        self.files = new_files;
        self.modules.retain(&modules_used);
        self.module_dirs = modules_named
            .iter()
            .filter(|m| !m.starts_with(&self.root))
            .filter_map(|m| m.parent())
            .filter_map(|dir| dir.ancestors().find(|d| d.is_dir()))
            .map(Path::to_path_buf)
            .collect();
        self.allocate(&mut desired);

        if !self.scanned {
            self.scanned = true;
            let mut by_kind: BTreeMap<Kind, Vec<Object>> =
                Kind::ALL.iter().map(|k| (*k, Vec::new())).collect();
            for obj in desired.values() {
                by_kind.entry(obj.kind()).or_default().push(obj.clone());
            }
            for (kind, objects) in by_kind {
                report.events.push(Event::Replace {
                    kind,
                    namespace: None,
                    objects,
                });
                report.events.push(Event::Synced(kind));
            }
        } else {
            for (key, obj) in &self.current {
                if !desired.contains_key(key) {
                    report.events.push(Event::Delete(obj.clone()));
                }
            }
            for (key, obj) in &desired {
                if self.current.get(key) != Some(obj) {
                    report.events.push(Event::Apply(obj.clone()));
                }
            }
        }
        self.current = desired;
        Ok(report)
    }

    /// Gives Services without a clusterIP one from the service CIDR, as the API server does:
    /// the one they had before if any, else a free address derived from their name.
    fn allocate(&self, desired: &mut BTreeMap<ObjectKey, Object>) {
        let mut used: BTreeSet<IpAddr> = BTreeSet::new();
        let mut needs = Vec::new();
        for (key, obj) in desired.iter() {
            let Object::Service(svc) = obj else { continue };
            let spec = svc.spec.as_ref();
            let ty = spec.and_then(|s| s.type_.as_deref());
            let ip = spec.and_then(|s| s.cluster_ip.as_deref());
            match ip {
                Some(ip) if !ip.is_empty() => {
                    for ip in spec
                        .and_then(|s| s.cluster_ips.as_ref())
                        .into_iter()
                        .flatten()
                    {
                        if let Ok(ip) = ip.parse() {
                            used.insert(ip);
                        }
                    }
                }
                _ if ty != Some("ExternalName") => needs.push(key.clone()),
                _ => {}
            }
        }
        for key in needs {
            let previous = match self.current.get(&key) {
                Some(Object::Service(s)) => s
                    .spec
                    .as_ref()
                    .and_then(|s| s.cluster_ip.as_deref())
                    .and_then(|ip| ip.parse::<IpAddr>().ok()),
                _ => None,
            };
            let ip = match previous {
                Some(ip) if !used.contains(&ip) && self.service_cidr.contains(ip) => Some(ip),
                _ => self.free_address(&key, &used),
            };
            let Some(ip) = ip else {
                tracing::warn!(service = %key, cidr = %self.service_cidr, "service CIDR is full; Service has no clusterIP");
                continue;
            };
            used.insert(ip);
            if let Some(Object::Service(svc)) = desired.get_mut(&key)
                && let Some(spec) = svc.spec.as_mut()
            {
                spec.cluster_ip = Some(ip.to_string());
                spec.cluster_ips = Some(vec![ip.to_string()]);
            }
        }
    }

    fn free_address(&self, key: &ObjectKey, used: &BTreeSet<IpAddr>) -> Option<IpAddr> {
        let host_bits = match self.service_cidr.addr {
            IpAddr::V4(_) => 32 - u32::from(self.service_cidr.prefix),
            IpAddr::V6(_) => (128 - u32::from(self.service_cidr.prefix)).min(64),
        };
        // Leave out the network address and the first host (the `kubernetes` Service's).
        let size: u64 = 1u64.checked_shl(host_bits).unwrap_or(u64::MAX);
        if size < 4 {
            return None;
        }
        let span = size - 3;
        let mut h = DefaultHasher::new();
        (&key.namespace, &key.name).hash(&mut h);
        let start = h.finish() % span;
        (0..span.min(1 << 20)).find_map(|i| {
            let offset = 2 + (start + i) % span;
            let ip = match self.service_cidr.addr {
                IpAddr::V4(net) => IpAddr::V4((u32::from(net) + offset as u32).into()),
                IpAddr::V6(net) => IpAddr::V6((u128::from(net) + u128::from(offset)).into()),
            };
            (!used.contains(&ip)).then_some(ip)
        })
    }
}

fn list_manifests(root: &Path) -> std::io::Result<Vec<PathBuf>> {
    let meta = std::fs::metadata(root)?;
    if !meta.is_dir() {
        return Err(std::io::Error::other("not a directory"));
    }
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let path = entry.path();
            let name = entry.file_name();
            if name.to_string_lossy().starts_with('.') {
                continue;
            }
            let ty = entry.file_type()?;
            if ty.is_dir() {
                stack.push(path);
            } else if matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("yaml" | "yml" | "json")
            ) {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The folder source: scans once, then follows changes.
#[derive(Debug)]
pub struct FolderSource {
    folder: Folder,
    /// Wait this long after a change notification for more before rescanning.
    pub debounce: Duration,
    /// Rescan this often even without notifications.
    pub resync: Duration,
}

impl FolderSource {
    pub fn new(root: impl Into<PathBuf>, service_cidr: Cidr) -> Self {
        Self {
            folder: Folder::new(root, service_cidr),
            debounce: Duration::from_millis(100),
            resync: Duration::from_secs(5),
        }
    }

    pub async fn run(self, tx: EventSender) -> Result<(), SourceError> {
        let mut folder = self.folder;
        let root = folder.root().to_path_buf();
        let (ntx, mut nrx) = mpsc::unbounded_channel::<()>();
        // Keep the watcher alive for the life of the loop.
        let mut watcher = match watch(&root, ntx) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(folder = %root.display(), error = %e, "cannot watch folder; rescanning every {:?} instead", self.resync);
                None
            }
        };
        let mut last_problems = Vec::new();
        let mut module_dirs: BTreeSet<PathBuf> = BTreeSet::new();
        let mut resync = tokio::time::interval(self.resync);
        resync.tick().await;
        loop {
            let (f, report) = tokio::task::spawn_blocking(move || {
                let r = folder.scan();
                (folder, r)
            })
            .await
            .map_err(|e| SourceError::Folder {
                path: root.display().to_string(),
                reason: format!("scan task failed: {e}"),
            })?;
            folder = f;
            // A folder watched from now on may have got its module between the scan and the
            // watch: look again (the next scan watches no new folder, so this stops).
            let mut again = false;
            if let Some(w) = watcher.as_mut() {
                again = watch_module_dirs(w, &mut module_dirs, folder.module_dirs_outside());
            }
            match report {
                Ok(report) => {
                    if report.problems != last_problems {
                        for p in &report.problems {
                            tracing::error!(target: "wasmesh::folder", "{p}");
                        }
                        last_problems = report.problems;
                    }
                    for (kind, n) in &report.skipped {
                        tracing::debug!(
                            kind,
                            count = n,
                            "skipped documents of a kind control does not read"
                        );
                    }
                    for ev in report.events {
                        if tx.send(ev).await.is_err() {
                            return Ok(());
                        }
                    }
                }
                Err(e) if !folder.scanned => return Err(e),
                Err(e) => {
                    tracing::error!(folder = %root.display(), "{e}; keeping the last good objects")
                }
            }
            if again {
                tokio::time::sleep(self.debounce).await;
                while nrx.try_recv().is_ok() {}
                continue;
            }
            tokio::select! {
                got = nrx.recv() => {
                    if got.is_none() {
                        // The watcher is gone; rely on the periodic rescan.
                        resync.tick().await;
                    } else {
                        tokio::time::sleep(self.debounce).await;
                        while nrx.try_recv().is_ok() {}
                    }
                }
                _ = resync.tick() => {}
                _ = tx.closed() => return Ok(()),
            }
        }
    }
}

/// Watches the folders of modules outside the root (and stops watching those no longer
/// named). Whether a folder is watched that was not before.
fn watch_module_dirs(
    w: &mut notify::RecommendedWatcher,
    watched: &mut BTreeSet<PathBuf>,
    wanted: BTreeSet<PathBuf>,
) -> bool {
    use notify::Watcher;
    for gone in watched.difference(&wanted) {
        let _ = w.unwatch(gone);
    }
    let mut added = false;
    for dir in wanted.difference(watched) {
        match w.watch(dir, notify::RecursiveMode::NonRecursive) {
            Ok(()) => added = true,
            Err(e) => {
                tracing::debug!(folder = %dir.display(), error = %e, "cannot watch a module folder; the periodic rescan will notice changes")
            }
        }
    }
    *watched = wanted;
    added
}

fn watch(root: &Path, tx: mpsc::UnboundedSender<()>) -> notify::Result<notify::RecommendedWatcher> {
    use notify::Watcher;
    let mut w = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if res.is_ok() {
            let _ = tx.send(());
        }
    })?;
    w.watch(root, notify::RecursiveMode::Recursive)?;
    Ok(w)
}

#[cfg(test)]
mod tests;
