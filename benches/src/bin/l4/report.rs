//! The figures: every round's values per pair, reported as medians in Markdown tables with the
//! ratios the issue's targets are stated in.

use std::fmt::Write as _;

use wasmesh_benches::harness::report::{Results, f, pct, with_spread, x};

use crate::Params;

pub fn render(header: &[String], p: &Params, r: &Results) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "```");
    for h in header {
        let _ = writeln!(s, "{h}");
    }
    let _ = writeln!(s, "```\n");
    let rounds = if p.rounds > 1 {
        format!("median of {} rounds (lowest–highest)", p.rounds)
    } else {
        "one round".to_string()
    };
    let pairs = r.pairs().to_vec();
    // Other work on the machine during the phases: the worst phase per pair.
    let mut busy = Vec::new();
    let mut steal: f64 = 0.0;
    for pair in &pairs {
        for ph in ["bulk1", "bulk4", "conns", "rr", "lat"] {
            steal = steal.max(r.max(pair, &format!("{ph}.steal")).unwrap_or(0.0));
        }
        let worst = ["bulk1", "bulk4", "conns", "rr", "lat"]
            .iter()
            .filter_map(|ph| r.max(pair, &format!("{ph}.other")))
            .fold(0.0, f64::max);
        if worst > 0.10 {
            busy.push(format!("{pair} {:.0} %", worst * 100.0));
        }
    }
    let _ = writeln!(
        s,
        "Other load on the machine during a phase (CPU not used by the pair, its app or its load \
         generator, as a share of both cores; worst phase): {}; hypervisor steal at most {:.0} %\n",
        if busy.is_empty() {
            "under 10 % in every phase".to_string()
        } else {
            busy.join(", ")
        },
        steal * 100.0
    );
    let proxied = |pair: &str| pair != "direct";
    let cores = |pair: &str, phase: &str| {
        format!(
            "{} / {}",
            pct(r.get(pair, &format!("{phase}.core0"))),
            pct(r.get(pair, &format!("{phase}.core1")))
        )
    };

    if r.measured("bulk1.gbps") || r.measured("bulk4.gbps") {
        // Bulk.
        let _ = writeln!(
            s,
            "**Bulk throughput** (Gbit/s, {rounds}; {} s per phase; the server counts what it received)\n",
            p.secs
        );
        let _ = writeln!(
            s,
            "| pair | 1 stream | × direct | 4 streams | × direct | proxy CPU s per GB (1 / 4 streams) | core 0 / core 1 busy (1 stream) |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|---|");
        for pair in &pairs {
            let per_gb = |ph: &str| {
                if !proxied(pair) {
                    return None;
                }
                Some(r.get(pair, &format!("{ph}.cpu"))? / r.get(pair, &format!("{ph}.gb"))?)
            };
            let _ = writeln!(
                s,
                "| {pair} | {} | {} | {} | {} | {} / {} | {} |",
                with_spread(r, pair, "bulk1.gbps", 2),
                x(r.ratio(pair, "direct", "bulk1.gbps")),
                with_spread(r, pair, "bulk4.gbps", 2),
                x(r.ratio(pair, "direct", "bulk4.gbps")),
                f(per_gb("bulk1"), 2),
                f(per_gb("bulk4"), 2),
                cores(pair, "bulk1"),
            );
        }
        if pairs
            .iter()
            .any(|pair| r.get(pair, "iperf3.gbps").is_some())
        {
            let _ = writeln!(s, "\niperf3, one stream (cross-check): {}", {
                pairs
                    .iter()
                    .map(|pair| format!("{pair} {} Gbit/s", f(r.get(pair, "iperf3.gbps"), 2)))
                    .collect::<Vec<_>>()
                    .join(", ")
            });
        }
    }

    if r.measured("conns.per_s") {
        // New connections.
        let _ = writeln!(
            s,
            "\n**New connections per second** (8 at a time, each: connect, 64-byte request, 64-byte \
             response, close; up to {} connections or {} s; {rounds})\n",
            p.conns,
            (p.secs * 2.0).max(5.0)
        );
        let _ = writeln!(
            s,
            "| pair | conn/s | × direct | first → last quarter | one connection p50 / p99 (µs) | proxy CPU µs per connection | core 0 / core 1 busy | failed |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|---|---|");
        for pair in &pairs {
            let per = proxied(pair)
                .then(|| Some(r.get(pair, "conns.cpu")? / r.get(pair, "conns.ok")? * 1e6))
                .flatten();
            let _ = writeln!(
                s,
                "| {pair} | {} | {} | {} → {} | {} / {} | {} | {} | {} |",
                with_spread(r, pair, "conns.per_s", 0),
                x(r.ratio(pair, "direct", "conns.per_s")),
                f(r.get(pair, "conns.first_quarter_per_s"), 0),
                f(r.get(pair, "conns.last_quarter_per_s"), 0),
                f(r.get(pair, "conns.p50_us"), 0),
                f(r.get(pair, "conns.p99_us"), 0),
                f(per, 1),
                cores(pair, "conns"),
                f(r.get(pair, "conns.failed"), 0),
            );
        }
    }

    if r.measured("rr.per_s") {
        // Requests per second.
        let _ = writeln!(
            s,
            "\n**Requests per second on persistent connections** (16 connections, each sends a 64-byte \
             request when the previous response arrived; {} s; {rounds})\n",
            p.secs
        );
        let _ = writeln!(
            s,
            "| pair | req/s | × direct | proxy CPU µs per request | core 0 / core 1 busy |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|");
        for pair in &pairs {
            let per = proxied(pair)
                .then(|| Some(r.get(pair, "rr.cpu")? / r.get(pair, "rr.requests")? * 1e6))
                .flatten();
            let _ = writeln!(
                s,
                "| {pair} | {} | {} | {} | {} |",
                with_spread(r, pair, "rr.per_s", 0),
                x(r.ratio(pair, "direct", "rr.per_s")),
                f(per, 2),
                cores(pair, "rr"),
            );
        }
    }

    if r.measured("lat.p99_us") {
        // Latency.
        let _ = writeln!(
            s,
            "\n**Round-trip latency at a fixed rate** ({} req/s over {} persistent connections, 64-byte \
             messages, {} s after 1 s of warm-up; µs from each request's *scheduled* send time, so a \
             stall delays and counts against the requests behind it; {rounds})\n",
            p.rate, p.latency_conns, p.latency_secs
        );
        let _ = writeln!(
            s,
            "| pair | p50 | p90 | p99 | p99.9 | max | from the actual send p50 / p99 | proxy CPU (share of a core) |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|---|---|");
        for pair in &pairs {
            let share = proxied(pair)
                .then(|| Some(r.get(pair, "lat.cpu")? / r.get(pair, "lat.secs")?))
                .flatten();
            let _ = writeln!(
                s,
                "| {pair} | {} | {} | {} | {} | {} | {} / {} | {} |",
                f(r.get(pair, "lat.p50_us"), 0),
                f(r.get(pair, "lat.p90_us"), 0),
                with_spread(r, pair, "lat.p99_us", 0),
                f(r.get(pair, "lat.p999_us"), 0),
                f(r.get(pair, "lat.max_us"), 0),
                f(r.get(pair, "lat.service_p50_us"), 0),
                f(r.get(pair, "lat.service_p99_us"), 0),
                pct(share),
            );
        }
    }

    // Memory.
    let _ = writeln!(
        s,
        "\n**Proxy memory** (MiB; idle = 1 s after the first request, before any load; RSS \
         includes the mapped binary, anon does not; peak = VmHWM after all phases; {rounds})\n"
    );
    let _ = writeln!(
        s,
        "| pair | idle RSS client-side / server-side | idle anon client / server | peak RSS during load client / server |"
    );
    let _ = writeln!(s, "|---|---|---|---|");
    for pair in pairs.iter().filter(|p| proxied(p)) {
        let _ = writeln!(
            s,
            "| {pair} | {} / {} | {} / {} | {} / {} |",
            f(r.get(pair, "idle.rss.client"), 1),
            f(r.get(pair, "idle.rss.server"), 1),
            f(r.get(pair, "idle.anon.client"), 1),
            f(r.get(pair, "idle.anon.server"), 1),
            f(r.get(pair, "hwm.client"), 1),
            f(r.get(pair, "hwm.server"), 1),
        );
    }

    if r.has("wasmesh-mtls") || r.has("envoy-mtls") {
        mtls_section(&mut s, r);
    }

    // Ratios and targets.
    if r.has("wasmesh") {
        let w = "wasmesh";
        let _ = writeln!(s, "\n**Ratios and the issue's targets**\n");
        let _ = writeln!(
            s,
            "| measure | wasmesh / direct | wasmesh / Envoy | wasmesh / HAProxy | target | met |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|");
        let met = |ok: Option<bool>| match ok {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "—",
        };
        let row = |s: &mut String, name: &str, key: &str, target: &str, ok: Option<bool>| {
            if !r.measured(key) {
                return;
            }
            let _ = writeln!(
                s,
                "| {name} | {} | {} | {} | {target} | {} |",
                x(r.ratio(w, "direct", key)),
                x(r.ratio(w, "envoy", key)),
                x(r.ratio(w, "haproxy", key)),
                met(ok)
            );
        };
        let bulk1 = r.ratio(w, "direct", "bulk1.gbps");
        row(
            &mut s,
            "bulk, 1 stream",
            "bulk1.gbps",
            "≥ 0.6× direct",
            bulk1.map(|v| v >= 0.6),
        );
        row(
            &mut s,
            "bulk, 4 streams",
            "bulk4.gbps",
            "≥ 0.6× direct",
            r.ratio(w, "direct", "bulk4.gbps").map(|v| v >= 0.6),
        );
        row(
            &mut s,
            "new connections/s",
            "conns.per_s",
            "≥ HAProxy",
            r.ratio(w, "haproxy", "conns.per_s").map(|v| v >= 1.0),
        );
        row(
            &mut s,
            "requests/s, persistent",
            "rr.per_s",
            "≥ HAProxy",
            r.ratio(w, "haproxy", "rr.per_s").map(|v| v >= 1.0),
        );
        row(
            &mut s,
            "p99 at the fixed rate",
            "lat.p99_us",
            "< Envoy",
            r.ratio(w, "envoy", "lat.p99_us").map(|v| v < 1.0),
        );
        let idle = match (r.get(w, "idle.rss.client"), r.get(w, "idle.rss.server")) {
            (Some(a), Some(b)) => Some(a.max(b)),
            _ => None,
        };
        let _ = writeln!(
            s,
            "| idle RSS per proxy | {} MiB | Envoy {} MiB | HAProxy {} MiB | < 15 MiB | {} |",
            f(idle, 1),
            f(r.get("envoy", "idle.rss.client"), 1),
            f(r.get("haproxy", "idle.rss.client"), 1),
            met(idle.map(|v| v < 15.0))
        );
    }
    s
}

/// The mTLS pairs against each other (the issue's target: more new mTLS connections per second
/// than Envoy), against their plaintext selves, and the checks of their TLS.
fn mtls_section(s: &mut String, r: &Results) {
    let (w, e) = ("wasmesh-mtls", "envoy-mtls");
    let _ = writeln!(
        s,
        "\n**mTLS between the proxies** (same run; through an mTLS pair every app connection is \
         a new TLS 1.3 connection between the proxies, certificates from one CA)\n"
    );
    let _ = writeln!(s, "| measure | {w} | {e} | {w} / {e} | target | met |");
    let _ = writeln!(s, "|---|---|---|---|---|---|");
    let per_conn = |pair: &str| Some(r.get(pair, "conns.cpu")? / r.get(pair, "conns.ok")? * 1e6);
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b != 0.0 => Some(a / b),
        _ => None,
    };
    if r.measured("conns.per_s") {
        let conns = r.ratio(w, e, "conns.per_s");
        let _ = writeln!(
            s,
            "| new mTLS connections/s | {} | {} | {} | > Envoy with mTLS | {} |",
            with_spread(r, w, "conns.per_s", 0),
            with_spread(r, e, "conns.per_s", 0),
            x(conns),
            match conns {
                Some(v) if v > 1.0 => "yes",
                Some(_) => "**no**",
                None => "—",
            }
        );
        let _ = writeln!(
            s,
            "| proxy CPU µs per connection | {} | {} | {} | (reported) | — |",
            f(per_conn(w), 1),
            f(per_conn(e), 1),
            x(ratio(per_conn(w), per_conn(e))),
        );
        let _ = writeln!(
            s,
            "| conn/s × the same proxies without mTLS | {} | {} | — | (reported) | — |",
            x(r.ratio(w, "wasmesh", "conns.per_s")),
            x(r.ratio(e, "envoy", "conns.per_s")),
        );
    }
    if r.measured("rr.per_s") {
        let _ = writeln!(
            s,
            "| requests/s, persistent | {} | {} | {} | (reported) | — |",
            with_spread(r, w, "rr.per_s", 0),
            with_spread(r, e, "rr.per_s", 0),
            x(r.ratio(w, e, "rr.per_s")),
        );
    }
    let per_app =
        |pair: &str| Some(r.get(pair, "mtls.client_handshakes")? / r.get(pair, "load.conns")?);
    let _ = writeln!(
        s,
        "| TLS handshakes by the client side per app connection | {} | {} | — | 1 (no pooling at L4) | — |",
        f(per_app(w), 2),
        f(per_app(e), 2),
    );
    let resumed = |pair: &str| {
        Some(r.get(pair, "mtls.client_resumed")? / r.get(pair, "mtls.client_handshakes")?)
    };
    let server_resumes = |pair: &str| match r.get(pair, "mtls.server_resumes") {
        Some(v) if v >= 0.5 => "yes",
        Some(_) => "no",
        None => "—",
    };
    let _ = writeln!(
        s,
        "| sessions resumed: share of the client side's handshakes / server side resumes (probe) | — / {} | {} / {} | — | (reported) | — |",
        server_resumes(w),
        pct(resumed(e)),
        server_resumes(e),
    );
    if !r.notes().is_empty() {
        let _ = writeln!(
            s,
            "\nmTLS checks (after each mTLS pair's phases: the proxies' own TLS counters, then a \
             TLS client of the bench from the node to the server pod's app port):\n"
        );
        for n in r.notes() {
            let _ = writeln!(s, "- {n}");
        }
    }
}
