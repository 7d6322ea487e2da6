//! Proof of who asks for a certificate: a token, mapped to the ServiceAccount it was given to.
//!
//! - In a cluster ([`TokenReviewer::Kube`]): the pod's projected ServiceAccount token, checked
//!   by the API server with a TokenReview (audience `wasmesh` by default). The API server says
//!   whether it is valid, unexpired and bound to a live pod; we only read its answer.
//! - In the local mesh ([`TokenReviewer::Dir`]): `wasmesh-local` writes one random token per pod
//!   to `<dir>/<namespace>/<serviceaccount>/<pod>.token`, gives the proxy that file, and removes
//!   it with the pod. The path is the claim; a token that is in no file is refused.

use std::path::{Path, PathBuf};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};

/// Who a valid token belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    pub namespace: String,
    pub service_account: String,
    /// The pod, when the proof names one.
    pub pod: Option<String>,
}

/// Why a token proves nothing.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("no token was sent")]
    Missing,
    #[error("the token is not one this mesh issued (unknown, expired, or from another cluster)")]
    Unknown,
    #[error("the API server rejected the token: {0}")]
    Rejected(String),
    #[error("the token belongs to {0:?}, which is not a ServiceAccount")]
    NotServiceAccount(String),
    #[error("cannot ask the API server about the token: {0}")]
    Api(String),
    #[error("cannot read the token directory {path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl TokenError {
    /// True when the caller is at fault (as opposed to us being unable to check).
    pub fn is_refusal(&self) -> bool {
        !matches!(self, TokenError::Api(_) | TokenError::Dir { .. })
    }
}

/// How tokens are checked.
#[derive(Clone)]
pub enum TokenReviewer {
    Kube {
        client: kube::Client,
        audiences: Vec<String>,
    },
    Dir(PathBuf),
}

impl std::fmt::Debug for TokenReviewer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TokenReviewer::Kube { audiences, .. } => {
                write!(f, "TokenReview(audiences={audiences:?})")
            }
            TokenReviewer::Dir(d) => write!(f, "token files under {}", d.display()),
        }
    }
}

impl TokenReviewer {
    pub async fn review(&self, token: &str) -> Result<Claims, TokenError> {
        let token = token.trim();
        if token.is_empty() {
            return Err(TokenError::Missing);
        }
        match self {
            TokenReviewer::Kube { client, audiences } => {
                review_with_api(client, audiences, token).await
            }
            TokenReviewer::Dir(dir) => {
                let dir = dir.clone();
                let token = token.to_string();
                tokio::task::spawn_blocking(move || find_in_dir(&dir, &token))
                    .await
                    .map_err(|e| TokenError::Api(e.to_string()))?
            }
        }
    }
}

async fn review_with_api(
    client: &kube::Client,
    audiences: &[String],
    token: &str,
) -> Result<Claims, TokenError> {
    let api: kube::Api<TokenReview> = kube::Api::all(client.clone());
    let review = TokenReview {
        spec: TokenReviewSpec {
            token: Some(token.to_string()),
            audiences: (!audiences.is_empty()).then(|| audiences.to_vec()),
        },
        ..Default::default()
    };
    let answer = api
        .create(&kube::api::PostParams::default(), &review)
        .await
        .map_err(|e| TokenError::Api(e.to_string()))?;
    let status = answer.status.unwrap_or_default();
    if status.authenticated != Some(true) {
        return Err(match status.error {
            Some(e) if !e.is_empty() => TokenError::Rejected(e),
            _ => TokenError::Unknown,
        });
    }
    let user = status.user.unwrap_or_default();
    let username = user.username.unwrap_or_default();
    let (namespace, service_account) = parse_service_account(&username)
        .ok_or_else(|| TokenError::NotServiceAccount(username.clone()))?;
    let pod = user
        .extra
        .as_ref()
        .and_then(|e| e.get("authentication.kubernetes.io/pod-name"))
        .and_then(|v| v.first().cloned());
    Ok(Claims {
        namespace,
        service_account,
        pod,
    })
}

/// `system:serviceaccount:<ns>:<sa>` → (ns, sa).
pub fn parse_service_account(username: &str) -> Option<(String, String)> {
    let rest = username.strip_prefix("system:serviceaccount:")?;
    let (ns, sa) = rest.split_once(':')?;
    (!ns.is_empty() && !sa.is_empty() && !sa.contains(':'))
        .then(|| (ns.to_string(), sa.to_string()))
}

/// Looks for `token` in `<dir>/<ns>/<sa>/<pod>.token`.
fn find_in_dir(dir: &Path, token: &str) -> Result<Claims, TokenError> {
    let read_dir = |p: &Path| {
        std::fs::read_dir(p).map_err(|source| TokenError::Dir {
            path: p.to_path_buf(),
            source,
        })
    };
    for ns in read_dir(dir)?.flatten() {
        let Ok(sas) = std::fs::read_dir(ns.path()) else {
            continue;
        };
        for sa in sas.flatten() {
            let Ok(pods) = std::fs::read_dir(sa.path()) else {
                continue;
            };
            for pod in pods.flatten() {
                let path = pod.path();
                if path.extension().is_none_or(|e| e != "token") {
                    continue;
                }
                let Ok(found) = std::fs::read_to_string(&path) else {
                    continue;
                };
                if equal_in_constant_time(found.trim().as_bytes(), token.as_bytes()) {
                    return Ok(Claims {
                        namespace: ns.file_name().to_string_lossy().into_owned(),
                        service_account: sa.file_name().to_string_lossy().into_owned(),
                        pod: path.file_stem().map(|s| s.to_string_lossy().into_owned()),
                    });
                }
            }
        }
    }
    Err(TokenError::Unknown)
}

fn equal_in_constant_time(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Where the local mesh keeps a pod's token.
pub fn token_path(dir: &Path, namespace: &str, service_account: &str, pod: &str) -> PathBuf {
    dir.join(namespace)
        .join(service_account)
        .join(format!("{pod}.token"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn token_files_prove_the_service_account_in_their_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = token_path(dir.path(), "demo", "backend", "backend-1");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, "s3cret\n").unwrap();
        let reviewer = TokenReviewer::Dir(dir.path().to_path_buf());
        let claims = reviewer.review("s3cret").await.unwrap();
        assert_eq!(
            claims,
            Claims {
                namespace: "demo".into(),
                service_account: "backend".into(),
                pod: Some("backend-1".into())
            }
        );
        assert!(matches!(
            reviewer.review("other").await,
            Err(TokenError::Unknown)
        ));
        assert!(matches!(
            reviewer.review("  ").await,
            Err(TokenError::Missing)
        ));
        std::fs::remove_file(&path).unwrap();
        assert!(
            matches!(reviewer.review("s3cret").await, Err(TokenError::Unknown)),
            "a removed pod's token no longer proves anything"
        );
    }

    #[test]
    fn service_account_usernames() {
        assert_eq!(
            parse_service_account("system:serviceaccount:demo:backend"),
            Some(("demo".into(), "backend".into()))
        );
        assert_eq!(parse_service_account("alice"), None);
        assert_eq!(parse_service_account("system:serviceaccount:demo"), None);
    }
}
