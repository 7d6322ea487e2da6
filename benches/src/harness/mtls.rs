//! mTLS for the pairs that run with it (`wasmesh-mtls`, `envoy-mtls`, `envoy-mtls-h2`): one CA
//! for both meshes, how each side gets its certificates, Envoy's TLS contexts, and the checks
//! that show a pair really did mTLS.
//!
//! - **One CA** ([`Pki::create`]): made by control's own code (`Root::load_or_generate`, what
//!   `wasmesh-control serve --ca-dir` runs) in `<run>/pki/ca`; control is then started with
//!   `--ca-dir` on that folder and `--tokens dir:<run>/pki/tokens`, as the local mesh runs it.
//! - **wasmesh**: each sidecar proves its ServiceAccount with a token file (`--token-file`) and
//!   gets its workload certificate from control; the server pod is in control's folder as a
//!   meshed Pod (`wasmesh.io/injected`, ServiceAccount `bench-server`), so the client sidecar
//!   opens TLS 1.3 to it and requires `spiffe://cluster.local/ns/default/sa/bench-server`; the
//!   server sidecar runs `--inbound-mtls strict` (plaintext refused, like Envoy's TLS listener).
//! - **Envoy**: certificates for the same two identities, signed by the same root with control's
//!   `Authority::issue` (ECDSA P-256, the SPIFFE ID as the only name — what control issues to
//!   a sidecar); an `UpstreamTlsContext` on the client's cluster (its certificate, the CA, the
//!   server's URI SAN required) and a `DownstreamTlsContext` on the inbound listener (client
//!   certificate required and verified against the CA, URI SAN in the trust domain). TLS 1.3 on
//!   both, like wasmesh; session resumption as each ships it (Envoy: client session cache and
//!   server tickets; wasmesh/rustls: client session cache and server session cache).
//! - **Checks** ([`check_pair`]), after a pair's phases: the proxies' own counters (wasmesh's
//!   `/metrics`, Envoy's `ssl.*` stats) must show handshakes on both sides and, for wasmesh, no
//!   plaintext accepted; then a TLS client of the bench (`__tls-probe`, [`super::tls_probe`])
//!   connects from the node to the server pod's app port — through the server-side proxy — with
//!   no TLS, with TLS but no certificate, with a certificate of another CA (all three must be
//!   refused) and with a certificate of the run's CA (must reach the app), and checks the
//!   server's certificate: a chain to the run's CA naming `bench-server`.

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use wasmesh_api::spiffe::SpiffeId;
use wasmesh_control::identity::{Authority, AuthorityConfig, Root};

use super::mesh::{APP_PORT, PROXY_UID};
use super::netns::Pod;
use super::run::{Run, tool};

pub const TRUST_DOMAIN: &str = "cluster.local";
pub const NAMESPACE: &str = "default";

/// The identity of one side of a pair (`client`, `server`), or of the bench's prober: the
/// ServiceAccount `bench-<role>` in `default`. The pods in control's folder and the sidecars'
/// `--pod-name` are named the same.
pub fn identity(role: &str) -> SpiffeId {
    SpiffeId::new(TRUST_DOMAIN, NAMESPACE, format!("bench-{role}"))
}

/// A certificate chain and its key, as PEM files.
#[derive(Debug, Clone)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Everything the mTLS pairs need, made once per run.
#[derive(Debug, Clone)]
pub struct Pki {
    /// control's `--ca-dir`: `ca.pem`, `ca-key.pem`.
    pub ca_dir: PathBuf,
    /// The root certificate (the trust anchor every side is given).
    pub ca_cert: PathBuf,
    /// control's `--tokens dir:`; `<ns>/<sa>/<pod>.token` for each sidecar.
    pub tokens: PathBuf,
    pub envoy_client: CertFiles,
    pub envoy_server: CertFiles,
    /// The probe's certificate from the run's CA (must be accepted).
    pub prober: CertFiles,
    /// The probe's certificate from another CA, same trust domain (must be refused).
    pub foreign: CertFiles,
}

impl Pki {
    /// The CA (control's code, in `<run_dir>/pki/ca`), Envoy's and the probe's certificates,
    /// the sidecars' tokens. Keys and tokens are readable by the proxies' UID only.
    pub fn create(run_dir: &Path) -> anyhow::Result<Pki> {
        let dir = run_dir.join("pki");
        mkdir(&dir)?;
        let ca_dir = dir.join("ca");
        let (root, _) = Root::load_or_generate(
            &ca_dir,
            TRUST_DOMAIN,
            Duration::from_secs(10 * 365 * 24 * 3600),
        )
        .context("making the run's CA")?;
        std::fs::set_permissions(&ca_dir, std::fs::Permissions::from_mode(0o755))?;
        let ours = Authority::new(AuthorityConfig::new(TRUST_DOMAIN), root);
        let other = Authority::new(
            AuthorityConfig::new(TRUST_DOMAIN),
            Root::generate(TRUST_DOMAIN, Duration::from_secs(24 * 3600))
                .context("making the foreign CA")?,
        );
        let tokens = dir.join("tokens");
        mkdir(&tokens)?;
        mkdir(&tokens.join(NAMESPACE))?;
        for role in ["client", "server"] {
            let id = identity(role);
            let folder = tokens.join(&id.namespace).join(&id.service_account);
            mkdir(&folder)?;
            let mut raw = [0u8; 24];
            std::fs::File::open("/dev/urandom")
                .and_then(|mut f| f.read_exact(&mut raw))
                .context("reading /dev/urandom for a token")?;
            let token: String = raw.iter().map(|b| format!("{b:02x}")).collect();
            write_private(&token_file(&tokens, role), &token)?;
        }
        Ok(Pki {
            ca_cert: ca_dir.join("ca.pem"),
            ca_dir,
            envoy_client: issue(&ours, &identity("client"), &dir, "envoy-client")?,
            envoy_server: issue(&ours, &identity("server"), &dir, "envoy-server")?,
            prober: issue(&ours, &identity("prober"), &dir, "prober")?,
            foreign: issue(&other, &identity("prober"), &dir, "foreign")?,
            tokens,
        })
    }

    /// Control as the CA, tokens checked against the files.
    pub fn control_args(&self) -> Vec<String> {
        vec![
            "--ca-dir".into(),
            self.ca_dir.display().to_string(),
            "--tokens".into(),
            format!("dir:{}", self.tokens.display()),
        ]
    }

    /// A sidecar with mTLS on (its token) and plaintext refused inbound.
    pub fn proxy_args(&self, role: &str) -> Vec<String> {
        vec![
            "--token-file".into(),
            token_file(&self.tokens, role).display().to_string(),
            "--inbound-mtls".into(),
            "strict".into(),
        ]
    }

    /// For the report's header.
    pub fn describe(&self) -> Vec<String> {
        vec![
            format!(
                "mTLS: one CA for both meshes, {} (made with control's code, served by control with \
                 --ca-dir); wasmesh sidecars get their certificates from control (--token-file, \
                 --inbound-mtls strict), Envoy's are signed by the same root with control's \
                 Authority::issue; identities {} and {}; TLS 1.3 on both",
                self.ca_cert.display(),
                identity("client"),
                identity("server"),
            ),
            format!(
                "envoy-mtls: client cluster UpstreamTlsContext (its certificate, the CA, server URI \
                 SAN must be {}), inbound listener DownstreamTlsContext (client certificate required, \
                 the CA, URI SAN prefix spiffe://{TRUST_DOMAIN}/); Envoy's default session \
                 resumption; its ssl.* stats on (read by the checks); envoy-mtls-h2: the same with HTTP/2 between the Envoys (HTTP/1.1 to the app)",
                identity("server")
            ),
        ]
    }
}

/// `<tokens>/default/bench-<role>/bench-<role>.token`, as `wasmesh-local` lays them out.
fn token_file(tokens: &Path, role: &str) -> PathBuf {
    let id = identity(role);
    tokens
        .join(&id.namespace)
        .join(&id.service_account)
        .join(format!("bench-{role}.token"))
}

fn mkdir(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
        .with_context(|| format!("chmod {}", dir.display()))
}

/// Writes a secret readable by the proxies' UID only (mode 0400, owned by it).
fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    std::os::unix::fs::chown(path, Some(PROXY_UID), Some(PROXY_UID))
        .with_context(|| format!("chown {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o400))
        .with_context(|| format!("chmod {}", path.display()))
}

/// A workload certificate for `id` from `ca`, as control signs one for a sidecar: a fresh
/// ECDSA P-256 key, a CSR naming `id`, `Authority::issue`.
fn issue(ca: &Authority, id: &SpiffeId, dir: &Path, name: &str) -> anyhow::Result<CertFiles> {
    let key = rcgen::KeyPair::generate().context("generating a key")?;
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = vec![rcgen::SanType::URI(
        id.uri().try_into().context("the SPIFFE ID as a URI SAN")?,
    )];
    let csr = params
        .serialize_request(&key)
        .context("making a certificate signing request")?;
    let issued = ca
        .issue(csr.der().as_ref(), id, None)
        .with_context(|| format!("signing {id}"))?;
    let pem: String = issued
        .chain
        .iter()
        .map(|c| pem_block("CERTIFICATE", c))
        .collect();
    let files = CertFiles {
        cert: dir.join(format!("{name}.pem")),
        key: dir.join(format!("{name}-key.pem")),
    };
    std::fs::write(&files.cert, pem)
        .with_context(|| format!("writing {}", files.cert.display()))?;
    std::fs::set_permissions(&files.cert, std::fs::Permissions::from_mode(0o644))?;
    write_private(&files.key, &key.serialize_pem())?;
    Ok(files)
}

fn pem_block(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

// ---------------------------------------------------------------------------------------------
// Envoy's TLS contexts

/// `text` with every line indented by `n` spaces.
fn indent(text: &str, n: usize) -> String {
    let pad = " ".repeat(n);
    text.lines().map(|l| format!("{pad}{l}\n")).collect()
}

fn common_tls(cert: &CertFiles, ca: &Path, san: &str) -> String {
    format!(
        r#"common_tls_context:
  tls_params: {{ tls_minimum_protocol_version: TLSv1_3, tls_maximum_protocol_version: TLSv1_3 }}
  tls_certificates:
  - certificate_chain: {{ filename: "{cert}" }}
    private_key: {{ filename: "{key}" }}
  validation_context:
    trusted_ca: {{ filename: "{ca}" }}
    match_typed_subject_alt_names:
    - san_type: URI
      matcher: {san}
"#,
        cert = cert.cert.display(),
        key = cert.key.display(),
        ca = ca.display(),
    )
}

/// The client side's `transport_socket` (a cluster's key), indented by `n`: TLS 1.3 with the
/// client's certificate, the server must present `bench-server`'s SPIFFE ID from the CA.
pub fn envoy_upstream_tls(pki: &Pki, n: usize) -> String {
    let tls = common_tls(
        &pki.envoy_client,
        &pki.ca_cert,
        &format!("{{ exact: \"{}\" }}", identity("server")),
    );
    indent(
        &format!(
            "transport_socket:\n  name: envoy.transport_sockets.tls\n  typed_config:\n    \
             \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext\n{}",
            indent(&tls, 4)
        ),
        n,
    )
}

/// The server side's `transport_socket` (a filter chain's key), indented by `n`: TLS 1.3, the
/// client must present a certificate from the CA with a SPIFFE ID of the trust domain.
pub fn envoy_downstream_tls(pki: &Pki, n: usize) -> String {
    let tls = common_tls(
        &pki.envoy_server,
        &pki.ca_cert,
        &format!("{{ prefix: \"spiffe://{TRUST_DOMAIN}/\" }}"),
    );
    indent(
        &format!(
            "transport_socket:\n  name: envoy.transport_sockets.tls\n  typed_config:\n    \
             \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext\n    \
             require_client_certificate: true\n{}",
            indent(&tls, 4)
        ),
        n,
    )
}

/// Stats for a config that otherwise turns them off: only the TLS ones (`*.ssl.*`), which
/// [`check_pair`] reads.
pub const ENVOY_SSL_STATS_ONLY: &str = "stats_config:\n  stats_matcher:\n    inclusion_list:\n      patterns: [{ contains: \".ssl.\" }]\n";

// ---------------------------------------------------------------------------------------------
// Checks

/// Whose proxies a pair runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    Wasmesh,
    Envoy,
}

/// What the app behind the pair speaks, for the probe's request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum App {
    /// The `l4` app: `E` then 64-byte messages echoed.
    Echo,
    /// The `l7` app: `GET /` answered `200`.
    Http,
}

impl App {
    pub fn name(self) -> &'static str {
        match self {
            App::Echo => "echo",
            App::Http => "http",
        }
    }
}

/// What the probe saw (`__tls-probe` prints it as JSON).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ProbeReport {
    /// No TLS: `accepted` or `refused: <why>`.
    pub plaintext: String,
    /// TLS, no client certificate.
    pub no_cert: String,
    /// TLS, a client certificate from another CA.
    pub foreign_ca: String,
    /// TLS, a client certificate from the run's CA.
    pub mesh_ca: String,
    /// The server's certificate: its URI SANs.
    pub server_uris: Vec<String>,
    /// Whether the server's chain verified to the run's CA (or why not).
    pub server_chain: String,
    /// A second connection with the run's certificate resumed the first one's session.
    pub resumed: bool,
}

/// A pair's mTLS, as checked after its phases.
#[derive(Debug, Clone)]
pub struct Check {
    /// TLS handshakes completed by the client-side proxy (wasmesh: mTLS connections opened).
    pub client_handshakes: f64,
    /// ... and by the server-side proxy (wasmesh: mTLS connections accepted).
    pub server_handshakes: f64,
    /// Envoy only: handshakes that resumed a session (client side).
    pub client_resumed: Option<f64>,
    /// wasmesh only: plaintext connections the server side accepted (must be 0).
    pub server_plaintext: Option<f64>,
    pub probe: ProbeReport,
}

impl Check {
    /// Numbers for the report (`mtls.*`).
    pub fn record(&self, rec: &mut BTreeMap<String, f64>) {
        rec.insert("mtls.client_handshakes".into(), self.client_handshakes);
        rec.insert("mtls.server_handshakes".into(), self.server_handshakes);
        if let Some(r) = self.client_resumed {
            rec.insert("mtls.client_resumed".into(), r);
        }
        rec.insert(
            "mtls.server_resumes".into(),
            f64::from(u8::from(self.probe.resumed)),
        );
    }

    /// One line for the report.
    pub fn line(&self, pair: &str, round: usize) -> String {
        let resumed = self
            .client_resumed
            .map(|r| format!(" ({r:.0} resumed)"))
            .unwrap_or_default();
        let plain = self
            .server_plaintext
            .map(|p| format!(", {p:.0} plaintext accepted"))
            .unwrap_or_default();
        format!(
            "{pair} (round {round}): handshakes client side {:.0}{resumed}, server side {:.0}{plain}; \
             server presented {} ({}); from the node to the server pod's :{APP_PORT}: plaintext {}, \
             TLS without a certificate {}, certificate of another CA {}, certificate of the run's CA \
             {}; server resumes sessions: {}",
            self.client_handshakes,
            self.server_handshakes,
            self.probe.server_uris.join(" "),
            self.probe.server_chain,
            self.probe.plaintext,
            self.probe.no_cert,
            self.probe.foreign_ca,
            self.probe.mesh_ca,
            if self.probe.resumed { "yes" } else { "no" },
        )
    }
}

/// Reads the pair's TLS counters, then probes the server side from the node namespace (see the
/// module's comment). Fails, saying what is wrong, when the pair did not do mTLS as configured.
pub fn check_pair(
    run: Run<'_>,
    flavor: Flavor,
    client: &Pod,
    server: &Pod,
    node_ns: &str,
    app: App,
    pki: &Pki,
) -> anyhow::Result<Check> {
    let get = |pod: &Pod, path: &str| super::mesh::admin_get(run, pod, path);
    let mut check = match flavor {
        Flavor::Wasmesh => {
            let c = get(client, "/metrics")?;
            let s = get(server, "/metrics")?;
            Check {
                client_handshakes: prom_sum(&c, "wasmesh_mtls_outbound_connections_total"),
                server_handshakes: prom_sum(&s, "wasmesh_mtls_inbound_connections_total"),
                client_resumed: None,
                server_plaintext: Some(prom_sum(&s, "wasmesh_inbound_plaintext_connections_total")),
                probe: ProbeReport::default_unprobed(),
            }
        }
        Flavor::Envoy => {
            let c = get(client, "/stats?filter=ssl")?;
            let s = get(server, "/stats?filter=ssl")?;
            Check {
                client_handshakes: envoy_sum(&c, "cluster.", ".ssl.handshake"),
                server_handshakes: envoy_sum(&s, "listener.", ".ssl.handshake"),
                client_resumed: Some(envoy_sum(&c, "cluster.", ".ssl.session_reused")),
                server_plaintext: None,
                probe: ProbeReport::default_unprobed(),
            }
        }
    };
    if check.client_handshakes < 1.0 || check.server_handshakes < 1.0 {
        bail!(
            "no mTLS between the proxies: {:.0} TLS handshakes counted by the client side, {:.0} by \
             the server side",
            check.client_handshakes,
            check.server_handshakes
        );
    }
    if let Some(p) = check.server_plaintext.filter(|p| *p > 0.0) {
        bail!("the server-side sidecar accepted {p:.0} plaintext connections");
    }
    let to = format!("{}:{APP_PORT}", server.ip);
    let out = tool(
        run,
        node_ns,
        &[
            "__tls-probe",
            "--to",
            &to,
            "--app",
            app.name(),
            "--ca",
            &pki.ca_cert.to_string_lossy(),
            "--cert",
            &pki.prober.cert.to_string_lossy(),
            "--key",
            &pki.prober.key.to_string_lossy(),
            "--foreign-cert",
            &pki.foreign.cert.to_string_lossy(),
            "--foreign-key",
            &pki.foreign.key.to_string_lossy(),
        ],
        Duration::from_secs(60),
    )?;
    check.probe = serde_json::from_str(out.trim().lines().last().unwrap_or(""))
        .with_context(|| format!("reading the probe's result: {out}"))?;
    let p = &check.probe;
    for (what, outcome) in [
        ("plaintext", &p.plaintext),
        ("TLS without a client certificate", &p.no_cert),
        ("a client certificate of another CA", &p.foreign_ca),
    ] {
        if !outcome.starts_with("refused") {
            bail!("the server side accepted {what} ({outcome}): it does not enforce mTLS");
        }
    }
    if p.mesh_ca != "accepted" {
        bail!(
            "the server side refused a client certificate of the run's CA ({})",
            p.mesh_ca
        );
    }
    let server_id = identity("server").uri();
    if p.server_uris != [server_id.clone()] || p.server_chain != "chain to the run's CA" {
        bail!(
            "the server side presented {:?} ({}), not {server_id} from the run's CA",
            p.server_uris,
            p.server_chain
        );
    }
    Ok(check)
}

impl ProbeReport {
    fn default_unprobed() -> Self {
        Self {
            plaintext: String::new(),
            no_cert: String::new(),
            foreign_ca: String::new(),
            mesh_ca: String::new(),
            server_uris: Vec::new(),
            server_chain: String::new(),
            resumed: false,
        }
    }
}

/// Sum of a Prometheus metric's samples (every label set).
pub fn prom_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let rest = if let Some(labels) = rest.strip_prefix('{') {
                labels.split_once('}')?.1
            } else {
                rest
            };
            rest.strip_prefix(' ')?.trim().parse::<f64>().ok()
        })
        .sum()
}

/// Sum of Envoy's stats (`name: value` lines) whose name starts with `prefix` and ends with
/// `suffix`.
pub fn envoy_sum(text: &str, prefix: &str, suffix: &str) -> f64 {
    text.lines()
        .filter_map(|l| {
            let (name, value) = l.split_once(": ")?;
            (name.starts_with(prefix) && name.ends_with(suffix))
                .then(|| value.trim().parse::<f64>().ok())
                .flatten()
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_summed_over_labels_and_names() {
        let prom = "# HELP wasmesh_mtls_refused_total x\n\
                    wasmesh_mtls_refused_total{reason=\"expired\"} 2\n\
                    wasmesh_mtls_refused_total{reason=\"untrusted\"} 3\n\
                    wasmesh_mtls_refused_total_other 7\n\
                    wasmesh_mtls_outbound_connections_total 3005\n";
        assert_eq!(prom_sum(prom, "wasmesh_mtls_refused_total"), 5.0);
        assert_eq!(
            prom_sum(prom, "wasmesh_mtls_outbound_connections_total"),
            3005.0
        );
        assert_eq!(prom_sum(prom, "wasmesh_absent_total"), 0.0);
        let envoy = "cluster.bench.ssl.handshake: 12\n\
                     cluster.bench.ssl.session_reused: 11\n\
                     listener.0.0.0.0_15006.ssl.handshake: 13\n\
                     listener.admin.ssl.handshake_other: 9\n";
        assert_eq!(envoy_sum(envoy, "cluster.", ".ssl.handshake"), 12.0);
        assert_eq!(envoy_sum(envoy, "listener.", ".ssl.handshake"), 13.0);
        assert_eq!(envoy_sum(envoy, "cluster.", ".ssl.session_reused"), 11.0);
    }

    #[test]
    fn envoy_tls_contexts_name_the_files_and_identities() {
        let files = |n: &str| CertFiles {
            cert: PathBuf::from(format!("/p/{n}.pem")),
            key: PathBuf::from(format!("/p/{n}-key.pem")),
        };
        let pki = Pki {
            ca_dir: "/p/ca".into(),
            ca_cert: "/p/ca/ca.pem".into(),
            tokens: "/p/tokens".into(),
            envoy_client: files("envoy-client"),
            envoy_server: files("envoy-server"),
            prober: files("prober"),
            foreign: files("foreign"),
        };
        let up = envoy_upstream_tls(&pki, 4);
        assert!(up.starts_with("    transport_socket:\n"));
        assert!(up.contains("UpstreamTlsContext"));
        assert!(up.contains("filename: \"/p/envoy-client.pem\""));
        assert!(up.contains("exact: \"spiffe://cluster.local/ns/default/sa/bench-server\""));
        let down = envoy_downstream_tls(&pki, 6);
        assert!(down.contains("require_client_certificate: true"));
        assert!(down.contains("filename: \"/p/envoy-server-key.pem\""));
        assert!(down.contains("prefix: \"spiffe://cluster.local/\""));
        assert!(down.lines().all(|l| l.starts_with("      ")));
        assert_eq!(
            pki.proxy_args("server"),
            [
                "--token-file",
                "/p/tokens/default/bench-server/bench-server.token",
                "--inbound-mtls",
                "strict"
            ]
        );
    }
}
