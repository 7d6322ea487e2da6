//! `l7 --tracing --interleaved`: the cost of tracing on a machine whose speed swings.
//!
//! The default `--tracing` run starts fresh pods for every pair and round, so the pairs it
//! compares run tens of seconds apart; on a machine where another tenant or the hypervisor
//! takes a varying share for minutes at a time, the same pair moves by 2× between rounds and
//! a 10 % effect drowns. Here one wasmesh pair (no `OTEL_*` in its pods) runs for the whole
//! run, and its tracing is switched between steps the way an operator switches it mesh-wide:
//! control is restarted with `--otlp-endpoint`/`--otlp-protocol grpc`/`--trace-sampling N/100`
//! (or without them, for off), and both sidecars take the new settings from the new stream
//! (their exporter started, replaced or stopped without a restart). Each round runs every
//! setting back to back with short saturation phases, so the paired ratios compare
//! measurements seconds apart, on the same processes, connections and pods.
//!
//! Every step is checked: the sidecars reconnected and report the tracing state the step
//! wants; an off step recorded no span; a traced step's spans (the growth of the sidecars'
//! counters over the step) reached the receiver and add up to the step's sampling ratio,
//! as in the default run ([`crate::trace_check`]).

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use wasmesh_benches::harness::mesh;
use wasmesh_benches::harness::mtls::{Flavor, prom_sum};
use wasmesh_benches::harness::netns::{Daemon, Pod, Topology};
use wasmesh_benches::harness::report::Results;
use wasmesh_benches::harness::run::interrupted;

use crate::Params;
use crate::pairs::{self, Kind, Pair, Tools};
use crate::trace_check::{self, Sidecar};

/// Runs every round: each of `p.pairs` (`wasmesh` = tracing off, `wasmesh-traceN`) as a
/// setting of the same pair, measured and checked; results under the setting's pair name.
pub fn measure(
    p: &Params,
    tools: &Tools,
    topo: &mut Topology,
    (client_host, server_host): (u8, u8),
    ticks: f64,
    results: &mut Results,
    control: &mut Option<Daemon>,
) -> anyhow::Result<()> {
    if let Some(k) = p
        .pairs
        .iter()
        .find(|k| !matches!(k, Kind::Wasmesh | Kind::Traced { .. }))
    {
        bail!(
            "--interleaved switches the tracing of one wasmesh pair: its pairs are wasmesh and \
             wasmesh-traceN, not {}",
            k.name()
        );
    }
    let receiver = tools.otlp.context("no OTLP receiver")?;
    let base = Pair {
        kind: Kind::Wasmesh,
        client: topo.add_pod("wasmesh-c", client_host)?,
        server: topo.add_pod("wasmesh-s", server_host)?,
    };
    let outcome = (|| -> anyhow::Result<()> {
        mesh::init_rules(&tools.proxy, &[&base.client, &base.server])?;
        let mut running = base.start(tools, 0)?;
        for round in 1..=p.rounds {
            for kind in crate::round_order(&p.pairs, round) {
                if interrupted() {
                    bail!("interrupted");
                }
                let started = Instant::now();
                eprintln!("round {round}/{}: {}", p.rounds, kind.name());
                switch(tools, topo, server_host, control, &base, *kind)
                    .with_context(|| format!("switching the pair to {}", kind.name()))?;
                let otlp_before = receiver.counts(tools.run(), &tools.node)?;
                let sidecars_before = (
                    trace_check::sidecar(tools.run(), Flavor::Wasmesh, &base.client)?,
                    trace_check::sidecar(tools.run(), Flavor::Wasmesh, &base.server)?,
                );
                let pair = Pair {
                    kind: *kind,
                    ..base.clone()
                };
                crate::measure_pair(p, tools, &pair, &mut running, ticks, results, (round, None))?;
                if let Some(ratio) = kind.tracing() {
                    let check = trace_check::check_pair(
                        tools.run(),
                        Flavor::Wasmesh,
                        &base.client,
                        &base.server,
                        &tools.node,
                        &receiver,
                        (&otlp_before, &sidecars_before),
                        ratio,
                        Duration::from_secs(45),
                    )
                    .with_context(|| format!("checking {}'s spans", kind.name()))?;
                    let line = check.line(&kind.name(), round);
                    eprintln!("  spans: {line}");
                    results.note_on("tracing", line);
                    let mut rec = std::collections::BTreeMap::new();
                    check.record(&mut rec);
                    results.add(&kind.name(), rec);
                } else {
                    // Off (both sidecars said so before the step): not one span more.
                    let (c, s) = (
                        trace_check::sidecar(tools.run(), Flavor::Wasmesh, &base.client)?,
                        trace_check::sidecar(tools.run(), Flavor::Wasmesh, &base.server)?,
                    );
                    let recorded =
                        c.since(&sidecars_before.0).spans + s.since(&sidecars_before.1).spans;
                    if recorded > 0.0 {
                        bail!(
                            "tracing was switched off, yet the sidecars recorded {recorded} spans"
                        );
                    }
                }
                eprintln!("  done in {:.0} s", started.elapsed().as_secs_f64());
            }
        }
        Ok(())
    })();
    let removed = topo
        .remove_pod(&base.client)
        .and_then(|()| topo.remove_pod(&base.server));
    outcome?;
    removed
}

/// The settings, for the report's header.
pub fn describe(protocol: &str) -> String {
    format!(
        "--interleaved: ONE wasmesh pair for the whole run (no OTEL_* in its pods); each step \
         restarts control with the step's mesh-wide tracing flags (`wasmesh`: none, tracing off; \
         `wasmesh-traceN`: --otlp-endpoint http://{} --otlp-protocol {protocol} \
         --trace-sampling N/100, parent-based) and waits until both sidecars are on the new \
         stream with tracing on or off; batching at the defaults (queue 2048, batch 512, every \
         5 s); the load generator sends no traceparent; OTLP receiver `l7 __otlp` in the node's \
         namespace on core {}; rows named after the setting; every traced step's spans checked \
         against the receiver",
        pairs::otlp_address(),
        mesh::LOAD_CPU
    )
}

/// Control's mesh-wide tracing flags for a setting (none: off), exporting over `protocol`.
pub fn control_args(kind: Kind, protocol: &str) -> Vec<String> {
    match kind.tracing() {
        None => Vec::new(),
        Some(ratio) => vec![
            "--otlp-endpoint".into(),
            format!("http://{}", pairs::otlp_address()),
            "--otlp-protocol".into(),
            protocol.into(),
            "--trace-sampling".into(),
            ratio.to_string(),
        ],
    }
}

/// Restarts control with `kind`'s tracing flags and waits until both sidecars are on the new
/// stream with tracing on or off as `kind` says.
fn switch(
    tools: &Tools,
    topo: &Topology,
    server_host: u8,
    control: &mut Option<Daemon>,
    pair: &Pair,
    kind: Kind,
) -> anyhow::Result<()> {
    let reconnects = |pod: &Pod| -> anyhow::Result<(f64, String)> {
        let text = mesh::admin_get(tools.run(), pod, "/metrics")?;
        Ok((prom_sum(&text, "wasmesh_control_reconnects_total"), text))
    };
    let before = (reconnects(&pair.client)?.0, reconnects(&pair.server)?.0);
    // Stopped (and waited for) before the new one binds the same address.
    drop(control.take());
    *control = Some(mesh::start_control(
        tools.run(),
        &tools.control,
        topo,
        server_host,
        "http",
        None,
        &control_args(
            kind,
            tools.otlp.as_ref().context("no OTLP receiver")?.protocol,
        ),
    )?);
    let want = kind.tracing().is_some();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut done = true;
        for (pod, was) in [(&pair.client, before.0), (&pair.server, before.1)] {
            let (n, text) = reconnects(pod)?;
            let side = Sidecar::parse(&text);
            let connected = prom_sum(&text, "wasmesh_control_connected") >= 1.0;
            done &= n > was && connected && side.enabled == want;
        }
        if done {
            // The tracer is swapped by a task of its own right after the table: a moment.
            std::thread::sleep(Duration::from_millis(200));
            return Ok(());
        }
        if Instant::now() >= deadline || interrupted() {
            bail!(
                "the sidecars did not reconnect to the restarted control with tracing {} within \
                 30 s",
                if want { "on" } else { "off" }
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
