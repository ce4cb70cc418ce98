#!/usr/bin/env bash
# The GPU checks as one script, for a lent GPU machine (its python3 has torch,
# aiohttp, numpy, pytest and nvidia-ml-py; the plugin runs from the checkout).
# Results land in $OUT (or ./gpu-out) as gpus.json, gpu_server.json and gpu.log.
set -uo pipefail
cd "$(dirname "$0")/../.."
out="${OUT:-gpu-out}"; mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" INFMAX_GPU_OUT="$out" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv 2>&1 | tee "$out/nvidia-smi.txt"
python3 -m pytest -p pytest_infmax.plugin -p no:cacheprovider -o addopts= -rA -s -v tests/gpu 2>&1 | tee "$out/gpu.log"
status=${PIPESTATUS[0]}
echo "pytest exit status: $status"
nvidia-smi --query-compute-apps=pid,used_memory --format=csv 2>&1 | tee -a "$out/nvidia-smi.txt"
exit "$status"
