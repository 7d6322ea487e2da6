#!/bin/sh
# wasmesh-proxy under callgrind: what `run.sh` gives l7 as an --alt build. Counts every
# instruction the proxy executes (and simulated cache misses), and dumps the counts every
# 20M basic blocks into $WASMESH_CG_DIR (run.sh gives it and WASMESH_CG_PROXY through --alt's
# environment; l7 kills the proxy at the end of its pair, so the periodic dumps are what is left).
exec valgrind --tool=callgrind --cache-sim=yes --vgdb=no --dump-every-bb=20000000 \
  --callgrind-out-file="${WASMESH_CG_DIR:?}/cg.%p.out" "${WASMESH_CG_PROXY:?}" "$@"
