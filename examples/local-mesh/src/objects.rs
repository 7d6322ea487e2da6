//! The folder control reads (`wasmesh-control serve --source dir:<state>/objects`): one JSON
//! file per object — the user's Services (with the ClusterIPs allocated here) and
//! EndpointSlices, the EndpointSlices derived from selectors, the Pods and the Nodes. Only files
//! whose content changed are written, each atomically (a hidden temporary file, which control
//! skips, renamed), so control's inotify sees whole objects only.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::state::{StateError, write_atomic};

/// The objects folder and what is in it.
#[derive(Debug)]
pub struct ObjectsDir {
    dir: PathBuf,
    written: BTreeMap<String, String>,
}

impl ObjectsDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            written: BTreeMap::new(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Makes the folder hold exactly `objects` (file name → object); returns how many files
    /// changed.
    pub fn sync(&mut self, objects: &BTreeMap<String, String>) -> Result<usize, StateError> {
        let mut changed = 0;
        let gone: Vec<String> = self
            .written
            .keys()
            .filter(|k| !objects.contains_key(*k))
            .cloned()
            .collect();
        for name in gone {
            let path = self.dir.join(&name);
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => return Err(StateError::Io { path, source }),
            }
            self.written.remove(&name);
            changed += 1;
        }
        for (name, text) in objects {
            if self.written.get(name) != Some(text) {
                write_atomic(&self.dir.join(name), text.as_bytes())?;
                self.written.insert(name.clone(), text.clone());
                changed += 1;
            }
        }
        Ok(changed)
    }
}

/// Adds one object: file `<kind>.<namespace>.<name>.json`.
pub fn add<T: Serialize>(
    out: &mut BTreeMap<String, String>,
    api_version: &str,
    kind: &str,
    namespace: Option<&str>,
    name: &str,
    object: &T,
) {
    let Ok(serde_json::Value::Object(mut map)) = serde_json::to_value(object) else {
        return;
    };
    map.insert("apiVersion".into(), api_version.into());
    map.insert("kind".into(), kind.into());
    let file = match namespace {
        Some(ns) => format!("{}.{ns}.{name}.json", kind.to_lowercase()),
        None => format!("{}.{name}.json", kind.to_lowercase()),
    };
    if let Ok(text) = serde_json::to_string_pretty(&map) {
        out.insert(file, text + "\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Node;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    #[test]
    fn only_changes_are_written_and_control_can_read_them() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut dir = ObjectsDir::new(tmp.path());
        let node = Node {
            metadata: ObjectMeta {
                name: Some("n1".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        let mut objects = BTreeMap::new();
        add(&mut objects, "v1", "Node", None, "n1", &node);
        assert_eq!(dir.sync(&objects).expect("sync"), 1);
        assert_eq!(dir.sync(&objects).expect("sync"), 0);
        let text = std::fs::read_to_string(tmp.path().join("node.n1.json")).expect("read");
        // Control's own parser reads it.
        let docs = wasmesh_control::source::folder::parse_file(&text);
        assert!(
            matches!(&docs[0].outcome, wasmesh_control::source::folder::Outcome::Objects(o) if o.len() == 1),
            "{docs:?}"
        );
        assert_eq!(dir.sync(&BTreeMap::new()).expect("sync"), 1);
        assert!(!tmp.path().join("node.n1.json").exists());
    }
}
