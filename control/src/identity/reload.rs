//! CA rotation from files: the certificate and key files are checked every couple of seconds;
//! when they change and parse, the new root is introduced (see [`super::authority`]). A change
//! that does not parse is logged with the file's name and the current root keeps signing.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::authority::Authority;
use super::root::{Root, hex};

/// Where the root lives.
#[derive(Debug, Clone)]
pub struct RootFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn stamp(files: &RootFiles) -> Option<(SystemTime, u64, SystemTime, u64)> {
    let c = std::fs::metadata(&files.cert).ok()?;
    let k = std::fs::metadata(&files.key).ok()?;
    Some((c.modified().ok()?, c.len(), k.modified().ok()?, k.len()))
}

/// Watches `files` forever, introducing each new root.
pub async fn watch(files: RootFiles, authority: Arc<Authority>, every: Duration) {
    let mut last = stamp(&files);
    loop {
        tokio::time::sleep(every).await;
        let now = stamp(&files);
        if now == last {
            continue;
        }
        // Let a writer that replaces both files finish.
        tokio::time::sleep(Duration::from_millis(200)).await;
        last = stamp(&files);
        match Root::from_files(&files.cert, &files.key) {
            Ok(root) => {
                let fp = hex(&root.fingerprint[..8]);
                if authority.introduce(root) {
                    tracing::info!(cert = %files.cert.display(), root = %fp, "CA files changed: rotating");
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "CA files changed but cannot be used; the current root keeps signing")
            }
        }
    }
}
