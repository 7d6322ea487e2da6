//! The folder source (to be written).
use super::{EventSender, SourceError};

#[derive(Debug)]
pub struct FolderSource {}

impl FolderSource {
    pub async fn run(self, _tx: EventSender) -> Result<(), SourceError> {
        Err(SourceError::Folder { path: String::new(), reason: "not built yet".into() })
    }
}
