//! The Kubernetes source (being written).
use super::{EventSender, SourceError};

#[derive(Debug)]
pub struct KubeSource {}

impl KubeSource {
    pub async fn from_env(_namespaces: Vec<String>) -> Result<Self, SourceError> {
        Err(SourceError::Kube("the kube source is not built yet".into()))
    }

    pub async fn run(self, _tx: EventSender) -> Result<(), SourceError> {
        Err(SourceError::Kube("not built yet".into()))
    }
}
