#!/bin/bash
# Instructions per request of the wasmesh proxies, tracing off / at 1 % / at 100 %, counted
# by callgrind in l7's pods: deterministic where l7's requests/s swing with the machine.
# See benches/README.md, "Instructions per request (callgrind)".
#
#   sudo bash benches/callgrind/run.sh [h1|h2] [SECONDS]      (after the release build)
#
# SECONDS: each pair's saturation phase, default 60; 40 leaves too few dumps to count on.
#
# Needs valgrind (apt), python3, and what l7 needs. Prints the per-request table and writes
# the raw dumps and the monitor's log into $OUT (default /tmp/wasmesh-cg-<protocol>).
set -euo pipefail
proto=${1:-h2}
secs=${2:-60}
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
out=${OUT:-/tmp/wasmesh-cg-$proto}
command -v valgrind >/dev/null || { echo "run.sh: needs valgrind (apt-get install valgrind)" >&2; exit 2; }
rm -rf "$out" && mkdir -p "$out" && chmod 1777 "$out"   # the proxies run as uid 1337

# Every 2 s: each callgrind'd proxy's requests so far (its own /metrics), to turn the
# periodic dumps into counts per request.
monitor() {
  set +eo pipefail   # a proxy not up yet, or gone: try again in 2 s
  while true; do
    for pid in $(pgrep -f 'tool=callgrind.*wasmesh-proxy run' || true); do
      ratio=$(tr '\0' '\n' < /proc/$pid/environ 2>/dev/null | sed -n 's/^OTEL_TRACES_SAMPLER_ARG=//p')
      req=$(nsenter -t "$pid" -n curl -s -m 2 127.0.0.1:15000/metrics 2>/dev/null \
        | awk '/^wasmesh_(inbound_)?http_requests_total/ {s += $NF} END {print s + 0}')
      echo "$(date +%s.%N) $pid ${ratio:-off} $req"
    done
    sleep 2
  done
}
monitor > "$out/monitor.log" 2>&1 &
mon=$!
trap 'kill $mon 2>/dev/null || true' EXIT

# The wrapper (l7 copies it into its run folder) learns where to write and which proxy to run
# from the environment --alt gives it.
cg="$here/proxy.sh,WASMESH_CG_DIR=$out,WASMESH_CG_PROXY=$root/target/release/wasmesh-proxy"
otel="OTEL_EXPORTER_OTLP_ENDPOINT=http://10.244.0.1:4317,OTEL_EXPORTER_OTLP_PROTOCOL=grpc,OTEL_TRACES_SAMPLER=parentbased_traceidratio"
# wasmesh-trace100 runs at full speed: it starts the run's OTLP receiver (and checks it).
"$root/target/release/l7" --pairs cg-off,wasmesh-trace100,cg-1,cg-100 \
  --alt "cg-off=$cg" \
  --alt "cg-1=$cg,$otel,OTEL_TRACES_SAMPLER_ARG=0.01" \
  --alt "cg-100=$cg,$otel,OTEL_TRACES_SAMPLER_ARG=1" \
  --protocols "$proto" --phases sat --rounds 1 --secs "$secs" --quiet-wait 0 \
  > "$out/l7.md" 2> "$out/l7.err" || { tail -5 "$out/l7.err" >&2; exit 1; }
kill $mon 2>/dev/null || true
python3 "$here/per_request.py" "$out" "$proto"
