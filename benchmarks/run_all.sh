#!/usr/bin/env bash
# Runs every benchmark with its published settings, one after another (nothing else should run
# on the machine meanwhile: the performance numbers are wall-clock). Results land in
# benchmarks/results/<name>/; docs/results.md quotes them.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${VLLM_SNAPKV_VENV:-.venv}/bin/python"
"$PY" -m benchmarks.performance.memory
"$PY" -m benchmarks.performance.overhead
"$PY" -m benchmarks.performance.decode
"$PY" -m benchmarks.performance.throughput
"$PY" -m benchmarks.quality.run
"$PY" -m benchmarks.quality.run --kernel-size 11 --out benchmarks/results/quality-kernel11
"$PY" -m benchmarks.hybrid.gemma3
"$PY" -m benchmarks.performance.long_generation
"$PY" -m benchmarks.quality.decode_quality
