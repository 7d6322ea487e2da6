//! Access logs: one JSON line per HTTP request and per proxied TCP connection, off by default
//! (`--access-log off|stdout|stderr|<file>`), a sampled share of them (`--access-log-sample`).
//!
//! Traffic never waits for the log: a request or connection hands its line to a bounded queue
//! ([`QUEUE`] lines) with `try_send`; a thread of its own (`access-log`) serializes and writes
//! the lines and flushes whenever the queue runs empty. When the queue is full the line is
//! dropped and counted (`wasmesh_access_log_dropped_total`). Fields: docs/observability.md.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::time::{Duration, SystemTime};

use rand::Rng;
use serde::Serialize;

use crate::metrics::Direction;

/// Lines that may wait for the writer; more are dropped.
pub const QUEUE: usize = 4096;

/// Where the lines go.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Target {
    #[default]
    Off,
    Stdout,
    Stderr,
    /// Appended to (created if missing).
    File(PathBuf),
}

impl std::str::FromStr for Target {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" | "" => Ok(Target::Off),
            "stdout" | "-" => Ok(Target::Stdout),
            "stderr" => Ok(Target::Stderr),
            path => Ok(Target::File(PathBuf::from(path))),
        }
    }
}

/// A `--access-log-sample` value: a share between 0 and 1.
pub fn parse_sample(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        _ => Err(format!(
            "{s:?} is not a sample rate: give a number from 0.0 (none) to 1.0 (every request)"
        )),
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct AccessLogConfig {
    pub target: Target,
    /// Share of requests and connections logged, 0.0–1.0.
    pub sample: f64,
}

impl Default for AccessLogConfig {
    fn default() -> Self {
        Self {
            target: Target::Off,
            sample: 1.0,
        }
    }
}

/// Why the access log cannot start.
#[derive(Debug, thiserror::Error)]
pub enum AccessLogError {
    #[error(
        "cannot open the access log {path}: {source} (give a writable file, stdout, stderr or off)"
    )]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start the access log writer thread: {0}")]
    Thread(std::io::Error),
}

/// One line.
#[derive(Debug, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Line {
    Http(HttpLine),
    Tcp(TcpLine),
}

/// An HTTP request, written when its response head goes back.
#[derive(Debug, Serialize)]
pub struct HttpLine {
    /// When the request arrived (RFC 3339, UTC, µs).
    pub time: String,
    pub direction: Direction,
    /// Who sent it: the app (outbound) or the peer (inbound), `ip:port`.
    pub client: SocketAddr,
    pub method: String,
    /// `:authority` or `Host` as the client sent it.
    pub authority: Option<String>,
    /// The path, without the query string.
    pub path: String,
    pub protocol: &'static str,
    pub status: u16,
    /// `x-wasmesh-error` of the response: why the proxy answered itself.
    pub error: Option<&'static str>,
    /// Arrival to response head.
    pub duration_us: u64,
    /// The endpoint that answered (or was tried last); inbound: the app's address.
    pub upstream: Option<SocketAddr>,
    /// `namespace/name` of the destination Service.
    pub service: Option<String>,
    /// `namespace/route/rule` of the HTTPRoute rule that matched.
    pub route: Option<String>,
    /// Endpoints tried beyond the first (failovers and retries).
    pub retries: u32,
    /// The client's SPIFFE ID (inbound mTLS).
    pub peer: Option<String>,
    /// The request's trace, when tracing is on.
    pub trace_id: Option<String>,
}

/// A proxied TCP connection, written when it closes.
#[derive(Debug, Serialize)]
pub struct TcpLine {
    /// When it was connected through (RFC 3339, UTC, µs).
    pub time: String,
    pub direction: Direction,
    pub client: SocketAddr,
    pub upstream: SocketAddr,
    pub service: Option<String>,
    pub peer: Option<String>,
    /// Client → upstream.
    pub sent_bytes: u64,
    /// Upstream → client.
    pub received_bytes: u64,
    pub duration_us: u64,
}

/// The sending side, shared by every task.
#[derive(Debug, Default)]
pub struct AccessLog {
    /// None: off.
    tx: Option<SyncSender<Line>>,
    sample: f64,
    queued: AtomicU64,
    dropped: AtomicU64,
}

impl AccessLog {
    /// Off: [`AccessLog::sampled`] is always false.
    pub fn off() -> Self {
        Self::default()
    }

    /// Opens the target and starts the writer thread.
    pub fn start(cfg: &AccessLogConfig) -> Result<Self, AccessLogError> {
        let out: Box<dyn Write + Send> = match &cfg.target {
            Target::Off => return Ok(Self::off()),
            Target::Stdout => Box::new(std::io::stdout()),
            Target::Stderr => Box::new(std::io::stderr()),
            Target::File(path) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|source| AccessLogError::Open {
                        path: path.clone(),
                        source,
                    })?,
            ),
        };
        let (log, rx) = Self::channel(QUEUE, cfg.sample);
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_lines(rx, out))
            .map_err(AccessLogError::Thread)?;
        Ok(log)
    }

    fn channel(capacity: usize, sample: f64) -> (Self, Receiver<Line>) {
        let (tx, rx) = sync_channel(capacity);
        (
            Self {
                tx: Some(tx),
                sample: sample.clamp(0.0, 1.0),
                queued: AtomicU64::new(0),
                dropped: AtomicU64::new(0),
            },
            rx,
        )
    }

    /// Whether this request or connection is to be logged (decided once, when it starts).
    pub fn sampled(&self) -> bool {
        self.tx.is_some()
            && (self.sample >= 1.0
                || (self.sample > 0.0 && rand::rng().random::<f64>() < self.sample))
    }

    /// Queues a line; never waits. A full queue drops it.
    pub fn send(&self, line: Line) {
        let Some(tx) = &self.tx else { return };
        match tx.try_send(line) {
            Ok(()) => {
                self.queued.fetch_add(1, Ordering::Relaxed);
            }
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Lines queued for the writer so far.
    pub fn queued(&self) -> u64 {
        self.queued.load(Ordering::Relaxed)
    }

    /// Lines dropped so far.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// The writer thread: until every sender is gone.
fn write_lines(rx: Receiver<Line>, out: Box<dyn Write + Send>) {
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, out);
    let mut failing_since: Option<SystemTime> = None;
    let report = |e: std::io::Error, failing_since: &mut Option<SystemTime>| {
        // One warning per minute while writes fail (a full disk must not flood the log).
        let now = SystemTime::now();
        let quiet = failing_since
            .and_then(|t| now.duration_since(t).ok())
            .is_some_and(|d| d < Duration::from_secs(60));
        if !quiet {
            tracing::warn!(error = %e, "writing the access log failed; lines are lost until it works again");
            *failing_since = Some(now);
        }
    };
    while let Ok(first) = rx.recv() {
        let mut next = Some(first);
        while let Some(line) = next {
            let r = serde_json::to_writer(&mut out, &line)
                .map_err(std::io::Error::from)
                .and_then(|()| out.write_all(b"\n"));
            if let Err(e) = r {
                report(e, &mut failing_since);
            }
            next = rx.try_recv().ok();
        }
        if let Err(e) = out.flush() {
            report(e, &mut failing_since);
        }
    }
    let _ = out.flush();
}

/// `2026-11-21T23:40:01.123456Z`.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    let (y, m, day) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        d.subsec_micros()
    )
}

/// Days since 1970-01-01 → (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(i: u64) -> Line {
        Line::Tcp(TcpLine {
            time: rfc3339(SystemTime::UNIX_EPOCH),
            direction: Direction::Outbound,
            client: "127.0.0.1:1".parse().expect("addr"),
            upstream: "127.0.0.1:2".parse().expect("addr"),
            service: None,
            peer: None,
            sent_bytes: i,
            received_bytes: 0,
            duration_us: 0,
        })
    }

    #[test]
    fn a_full_queue_drops_and_counts_instead_of_waiting() {
        let (log, rx) = AccessLog::channel(2, 1.0);
        for i in 0..5 {
            log.send(line(i));
        }
        assert_eq!((log.queued(), log.dropped()), (2, 3));
        assert_eq!(rx.try_iter().count(), 2);
        // The writer gone: lines are dropped (and counted), never an error for traffic.
        drop(rx);
        log.send(line(9));
        assert_eq!(log.dropped(), 4);
    }

    #[test]
    fn sampling() {
        assert!(!AccessLog::off().sampled());
        let (all, _rx) = AccessLog::channel(1, 1.0);
        assert!((0..1000).all(|_| all.sampled()));
        let (none, _rx) = AccessLog::channel(1, 0.0);
        assert!((0..1000).all(|_| !none.sampled()));
        let (some, _rx) = AccessLog::channel(1, 0.5);
        let n = (0..10_000).filter(|_| some.sampled()).count();
        assert!((4_000..6_000).contains(&n), "{n} of 10000 at 0.5");
    }

    #[test]
    fn flags() {
        assert_eq!("off".parse::<Target>(), Ok(Target::Off));
        assert_eq!("stdout".parse::<Target>(), Ok(Target::Stdout));
        assert_eq!("stderr".parse::<Target>(), Ok(Target::Stderr));
        assert_eq!(
            "/var/log/access.json".parse::<Target>(),
            Ok(Target::File("/var/log/access.json".into()))
        );
        assert_eq!(parse_sample("0.25"), Ok(0.25));
        assert!(parse_sample("1.5").unwrap_err().contains("0.0"));
        assert!(parse_sample("x").is_err());
        assert!(parse_sample("NaN").is_err());
        let e = AccessLog::start(&AccessLogConfig {
            target: Target::File("/nonexistent-dir/access.json".into()),
            sample: 1.0,
        })
        .unwrap_err();
        assert!(
            e.to_string().contains("/nonexistent-dir/access.json"),
            "{e}"
        );
    }

    #[test]
    fn times_are_rfc3339() {
        assert_eq!(
            rfc3339(SystemTime::UNIX_EPOCH),
            "1970-01-01T00:00:00.000000Z"
        );
        // 2024-02-29T12:34:56.789012Z (a leap day).
        let t = SystemTime::UNIX_EPOCH + Duration::new(1_709_210_096, 789_012_000);
        assert_eq!(rfc3339(t), "2024-02-29T12:34:56.789012Z");
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(4_102_444_799);
        assert_eq!(rfc3339(t), "2099-12-31T23:59:59.000000Z");
    }

    #[test]
    fn lines_are_one_json_object_each() {
        let (log, rx) = AccessLog::channel(4, 1.0);
        log.send(line(7));
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("a.json");
        let file = std::fs::File::create(&path).expect("create");
        drop(log);
        write_lines(rx, Box::new(file));
        let text = std::fs::read_to_string(&path).expect("read");
        let v: serde_json::Value = serde_json::from_str(text.trim_end()).expect("json");
        assert_eq!(v["kind"], "tcp");
        assert_eq!(v["direction"], "outbound");
        assert_eq!(v["sent_bytes"], 7);
        assert_eq!(v["service"], serde_json::Value::Null);
        assert!(text.ends_with("}\n"));
    }
}
