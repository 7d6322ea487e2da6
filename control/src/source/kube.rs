//! The Kubernetes source (to be written).
use super::{EventSender, SourceError};

#[derive(Debug)]
pub struct KubeSource {}

impl KubeSource {
    pub async fn run(self, _tx: EventSender) -> Result<(), SourceError> {
        Err(SourceError::Kube("not built yet".into()))
    }
}
