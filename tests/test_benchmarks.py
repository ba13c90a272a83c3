"""Smoke runs of every benchmark (tiny sizes): they run and produce their table, so they cannot
rot. Each runs in its own process, as a user would run it; no figure is asserted."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.engine

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "module,files",
    [
        ("benchmarks.quality.run", ["rows.csv", "table.md", "accuracy.png"]),
        ("benchmarks.performance.memory", ["memory.csv", "table.md", "memory.png"]),
        ("benchmarks.performance.decode", ["decode.csv", "table.md", "decode.png"]),
        ("benchmarks.performance.overhead", ["overhead.csv", "table.md"]),
        ("benchmarks.performance.throughput", ["throughput.csv", "table.md"]),
        (
            "benchmarks.performance.long_generation",
            ["growth.csv", "growth.png", "throughput.csv", "table.md"],
        ),
        ("benchmarks.quality.decode_quality", ["quality.csv", "table.md"]),
        # RULER through lm_eval (its own venv, scripts/setup --test) against `vllm serve`.
        (
            "benchmarks.quality.ruler",
            ["samples.jsonl", "passes.json", "scores.csv", "table.md", "ruler.png"],
        ),
        (
            "benchmarks.hybrid.gemma3",
            ["memory.csv", "memory.png", "quality.csv", "quality.png", "reference.csv", "table.md"],
        ),
    ],
)
def test_benchmark_smoke_run_produces_its_table(module, files, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", module, "--smoke", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| " in result.stdout and "Machine:" in result.stdout
    for name in files:
        assert (tmp_path / name).stat().st_size > 0, name
