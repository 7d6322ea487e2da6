//! What the proxies cost, read from /proc: CPU seconds (utime + stime of every thread, from
//! `/proc/<pid>/stat`), resident memory (`/proc/<pid>/status`), and how busy each core was
//! (`/proc/stat`), sampled around each phase.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, bail};

/// Clock ticks per second of the times in /proc (USER_HZ, 100 on Linux).
pub fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .trim()
                .parse::<f64>()
                .ok()
        })
        .filter(|t| *t > 0.0)
        .unwrap_or(100.0)
}

/// User + system CPU seconds a process has used so far, all threads.
pub fn cpu_seconds(pid: u32, ticks: f64) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // The command name is in parentheses and may hold spaces: fields start after the last ')'.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("unexpected /proc/<pid>/stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Field 3 (state) is fields[0]; utime is field 14, stime field 15.
    let utime: f64 = fields.get(11).context("no utime")?.parse()?;
    let stime: f64 = fields.get(12).context("no stime")?.parse()?;
    Ok((utime + stime) / ticks)
}

/// Resident memory of a process, KiB.
#[derive(Debug, Clone, Copy, Default)]
pub struct Memory {
    /// VmRSS: all resident pages (anonymous, file-backed, shared).
    pub rss: u64,
    /// RssAnon: heap, stacks; without the mapped binary.
    pub anon: u64,
    /// VmHWM: the peak of VmRSS since the process started.
    pub hwm: u64,
}

pub fn memory(pid: u32) -> anyhow::Result<Memory> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let mut m = Memory::default();
    for line in status.lines() {
        let mut it = line.split_whitespace();
        let (Some(key), Some(value)) = (it.next(), it.next()) else {
            continue;
        };
        let v: u64 = value.parse().unwrap_or(0);
        match key {
            "VmRSS:" => m.rss = v,
            "RssAnon:" => m.anon = v,
            "VmHWM:" => m.hwm = v,
            _ => {}
        }
    }
    if m.rss == 0 {
        bail!("no VmRSS in /proc/{pid}/status");
    }
    Ok(m)
}

/// Busy and total jiffies of each core, from /proc/stat, and steal (time the hypervisor
/// gave to other guests, counted as busy).
#[derive(Debug, Clone, Default)]
pub struct CoreTimes(Vec<(u64, u64)>, u64);

impl CoreTimes {
    pub fn now() -> Self {
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let mut cores = Vec::new();
        let mut steal = 0;
        for line in stat.lines() {
            let Some(rest) = line.strip_prefix("cpu") else {
                continue;
            };
            if !rest.starts_with(|c: char| c.is_ascii_digit()) {
                continue;
            }
            let v: Vec<u64> = rest
                .split_whitespace()
                .skip(1)
                .filter_map(|x| x.parse().ok())
                .collect();
            // user nice system idle iowait irq softirq steal (guest time is inside user).
            let total: u64 = v.iter().take(8).sum();
            let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
            steal += v.get(7).copied().unwrap_or(0);
            cores.push((total.saturating_sub(idle), total));
        }
        Self(cores, steal)
    }

    /// Busy seconds of all cores together between `self` and `later`.
    pub fn busy_seconds_since(&self, later: &CoreTimes, ticks: f64) -> f64 {
        self.0
            .iter()
            .zip(&later.0)
            .map(|((b0, _), (b1, _))| b1.saturating_sub(*b0) as f64 / ticks)
            .sum()
    }

    /// Steal as a share of all cores' time between `self` and `later`.
    pub fn steal_since(&self, later: &CoreTimes) -> f64 {
        let total: u64 = later
            .0
            .iter()
            .zip(&self.0)
            .map(|((_, t1), (_, t0))| t1.saturating_sub(*t0))
            .sum();
        if total == 0 {
            0.0
        } else {
            later.1.saturating_sub(self.1) as f64 / total as f64
        }
    }

    /// Fraction of each core that was busy between `self` and `later`.
    pub fn busy_since(&self, later: &CoreTimes) -> Vec<f64> {
        self.0
            .iter()
            .zip(&later.0)
            .map(|((b0, t0), (b1, t1))| {
                let dt = t1.saturating_sub(*t0);
                if dt == 0 {
                    0.0
                } else {
                    b1.saturating_sub(*b0) as f64 / dt as f64
                }
            })
            .collect()
    }
}

/// Samples VmRSS of some processes every 50 ms until stopped; keeps the maximum per process.
pub struct RssSampler {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<HashMap<u32, u64>>,
}

impl RssSampler {
    pub fn start(pids: Vec<u32>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut peak: HashMap<u32, u64> = HashMap::new();
            // Bounded: at most an hour of samples even if never stopped.
            for _ in 0..72_000 {
                for pid in &pids {
                    if let Ok(m) = memory(*pid) {
                        let e = peak.entry(*pid).or_default();
                        *e = (*e).max(m.rss);
                    }
                }
                if flag.load(Ordering::Relaxed) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            peak
        });
        Self { stop, handle }
    }

    /// The peak VmRSS of each process, KiB.
    pub fn finish(self) -> HashMap<u32, u64> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap_or_default()
    }
}
