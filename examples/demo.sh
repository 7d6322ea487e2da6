#!/usr/bin/env bash
# The wasmesh demo, from a fresh clone: builds control, serves the demo manifests in
# examples/demo/ and shows the service table it streams to proxies.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never

cargo build --release -p wasmesh-control
bin=target/release/wasmesh-control

echo "== the service table control computes from examples/demo/"
"$bin" table --source dir:examples/demo

echo
echo "== one Service in detail (YAML)"
"$bin" table --source dir:examples/demo -o yaml legacy-db

echo
echo "== serving discovery on 127.0.0.1:15010 (admin on 127.0.0.1:15014) for 3 seconds"
"$bin" serve --source dir:examples/demo --listen 127.0.0.1:15010 --admin 127.0.0.1:15014 &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
for _ in $(seq 50); do
  if (exec 3<>/dev/tcp/127.0.0.1/15014) 2>/dev/null; then break; fi
  sleep 0.1
done
python3 - <<'PY'
import urllib.request
for path in ("/ready", "/metrics"):
    with urllib.request.urlopen("http://127.0.0.1:15014" + path, timeout=5) as r:
        print(f"GET {path} -> {r.status}")
        print(r.read().decode().strip())
PY
sleep 3
