#!/usr/bin/env bash
# The GPU checks as one script, for a lent GPU machine (its python3 has torch,
# aiohttp, numpy, uvloop, pytest and nvidia-ml-py; the plugin runs from the checkout).
# Results land in $OUT (or ./gpu-out) as gpus.json, gpu_server.json, gpu.log and
# workers.txt. docs/gpu-checks.md says what to carry there (.whl: msgspec, httptools).
set -uo pipefail
cd "$(dirname "$0")/../.."
out="${OUT:-gpu-out}"; mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" INFMAX_GPU_OUT="$out" PYTHONUNBUFFERED=1
# What the image lacks, carried as wheels (docs/gpu-checks.md), installed beside it.
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
# The load generator's C lane, built in place (without it the client reads in Python: slower, same counts).
python3 setup.py -q build_ext --inplace >"$out/build_ext.log" 2>&1 || echo "C lane not built: see $out/build_ext.log"
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv 2>&1 | tee "$out/nvidia-smi.txt"
python3 -m pytest -p pytest_infmax.plugin -p no:cacheprovider -o addopts= -rA -s -v tests/gpu 2>&1 | tee "$out/gpu.log"
status=${PIPESTATUS[0]}
echo "pytest exit status: $status"
nvidia-smi --query-compute-apps=pid,used_memory --format=csv 2>&1 | tee -a "$out/nvidia-smi.txt"
# Issue 20, item 6: tokens/s the client consumes with 1..N worker processes on this host's cores.
# Half the CPUs run emitters (one port, one each, asked for 0.4M events/s a core), the other half the clients.
if [ "${INFMAX_GPU_WORKERS_SWEEP:-1}" != 0 ]; then
    cpus=$(nproc); emitters=$(( cpus / 2 )); [ "$emitters" -ge 1 ] || emitters=1
    counts=""; for n in 1 2 4 8 16 32; do [ "$n" -le $(( cpus - emitters )) ] && counts="$counts $n"; done
    timeout 420 python3 benchmarks/client_overhead.py --workers-sweep $counts --repeat 3 --streams 1024 \
        --pin-emitter $(seq 0 $(( emitters - 1 ))) --sweep-event-rate $(( emitters * 400000 )) 2>&1 | tee "$out/workers.txt"
    echo "workers sweep exit status: ${PIPESTATUS[0]}"
fi
exit "$status"
