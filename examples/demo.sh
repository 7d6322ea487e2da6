#!/usr/bin/env bash
# The wasmesh demo, from a fresh clone (as root; Debian 12): a whole mesh on this machine from
# the Kubernetes YAML in examples/demo/. A client pod calls a 3-replica backend through its
# Service name (`http://backend/`), every call through both pods' sidecars; every replica
# answers; then the Deployment is scaled to 2 while the client keeps calling, without a failed
# call; one call client → frontend → backend is shown as a trace (spans from both sidecars of
# each hop). Everything the mesh made is removed at the end (also on Ctrl-C or an error).
#
# Pods are network namespaces hanging off a bridge in a "node" namespace; nothing is added to
# this machine's own network. docs/local-mesh.md explains it all.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never

if [ "$(id -u)" != 0 ]; then
  echo "the local mesh makes network namespaces and iptables rules: run as root (sudo bash examples/demo.sh)" >&2
  exit 1
fi

# What the mesh runs besides our binaries: ip (iproute2), iptables-restore (iptables, nft
# backend), setpriv (util-linux), kill (procps).
packages=(iproute2 iptables util-linux procps)
missing=()
for p in "${packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "== installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

echo "== building (release)"
cargo build --release -p wasmesh-local -p wasmesh-demo -p wasmesh-proxy -p wasmesh-control
bin=target/release
local=$bin/wasmesh-local

# A mesh of its own: prefix and state directory, so a mesh you run yourself is not touched.
prefix=wmdemo-
export WASMESH_LOCAL_STATE_DIR=/run/wasmesh-local-demo
work=$(mktemp -d)
cp examples/demo/*.yaml "$work/"
up_log=$work/up.log
up=""
follow=""
cleanup() {
  [ -n "$follow" ] && kill "$follow" 2>/dev/null || true
  if [ -n "$up" ]; then
    kill -TERM "$up" 2>/dev/null || true
    wait "$up" 2>/dev/null || true
  fi
  "$local" down --prefix "$prefix" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

echo
echo "== wasmesh-local up $work  (a copy of examples/demo/; its log: $up_log)"
"$local" up "$work" --prefix "$prefix" --otlp local >"$up_log" 2>&1 &
up=$!
if ! "$local" wait --timeout 120; then
  cat "$up_log"
  exit 1
fi

echo
echo "== the client's calls: wasmesh-local logs -n demo client -f"
"$local" logs -n demo client -f &
follow=$!
sleep 5
kill "$follow" 2>/dev/null || true
wait "$follow" 2>/dev/null || true
follow=""

echo
echo "== scaling the backend to 2 replicas (editing replicas: in $work/backend.yaml)"
sed -i 's/replicas: 3/replicas: 2/' "$work/backend.yaml"
sleep 0.7
"$local" get pods -n demo
"$local" get endpoints -n demo
echo
"$local" logs -n demo client -f --tail 0 &
follow=$!
sleep 5
kill "$follow" 2>/dev/null || true
follow=""

echo
echo "== after the change"
"$local" get pods -n demo
echo
"$local" get endpoints -n demo
echo
"$local" get services -n demo

echo
echo "== checking the client's log"
client_log=$("$local" logs -n demo client)
calls=$(grep -c '^#' <<<"$client_log" || true)
failed=$(grep -c 'failed after' <<<"$client_log" || true)
replicas=$(grep -o 'answered by backend-[a-z0-9-]*' <<<"$client_log" | sort -u | wc -l)
echo "$calls calls, $failed failed, $replicas backend replicas answered"
if [ "$failed" != 0 ] || [ "$replicas" -lt 3 ]; then
  echo "FAILED: expected no failed call and all 3 replicas answering" >&2
  echo "--- up's log" >&2
  cat "$up_log" >&2
  exit 1
fi
echo "OK: every replica answered and removing one cost no call"

echo
echo "== one call client → frontend → backend, traced (up --otlp local: spans to the mesh's OTLP receiver)"
"$local" exec -n demo client -- wasmesh-demo fetch http://frontend/
sleep 1.5
trace=$("$local" traces --service frontend --last 1)
echo "$trace"
spans=$(grep -c ' µs ' <<<"$trace" || true)
if [ "$spans" -lt 4 ]; then
  echo "FAILED: expected one trace of 4 spans (client and server span in each sidecar on the way)" >&2
  exit 1
fi

echo
echo "== wasmesh-local down"
kill -TERM "$up"
wait "$up" || true
up=""
tail -n 4 "$up_log"
if ip netns list | grep -q "^$prefix"; then
  echo "FAILED: network namespaces left behind" >&2
  exit 1
fi
echo "nothing left: no network namespace with prefix $prefix, no /etc/netns/$prefix*, no state directory"
