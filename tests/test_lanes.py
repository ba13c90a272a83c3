"""The lanes plugin (tests/lanes.py) pins each xdist worker to its cores in pytest_configure; the
pinning must come before torch starts its thread pool, so nothing imported with conftest may
import torch (an early import made the engine modules about 10x slower)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lanes


def test_conftest_and_lanes_import_without_torch():
    tests_dir = Path(__file__).parent
    probe = "import sys, conftest, lanes; print('torch' in sys.modules)"
    # The repository root on the path, as pytest puts it (benchmarks.* importable).
    env = {**os.environ, "PYTHONPATH": str(tests_dir.parent)}
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=tests_dir, env=env, capture_output=True, text=True,
        timeout=120, check=True,
    )
    assert result.stdout.strip().splitlines()[-1] == "False", result.stdout + result.stderr


def test_lane_cores_split_the_cores_evenly():
    assert lanes.lane_cores(0, 2, [0, 1]) == [0]
    assert lanes.lane_cores(1, 2, [0, 1]) == [1]
    assert lanes.lane_cores(0, 2, [0, 1, 2]) == [0, 1]
    assert lanes.lane_cores(1, 2, [0, 1, 2]) == [2]
