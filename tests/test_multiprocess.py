"""vLLM's default engine: separate engine-core and worker processes, compiled model.

The plugin must load in every process through its entry point, and the scheduler's plans must
reach the worker inside the pickled SchedulerOutput. Runs the offline example in a subprocess
(the default multiprocess engine), then checks its selections against the in-process engine's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import assert_same_selection, greedy, load_dump
from vllm_snapkv.tasks import passkey_prompt

pytestmark = pytest.mark.engine

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "offline_passkey.py"


def test_default_multiprocess_engine_compresses_in_its_worker(snap_llm, dump_dir, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), "--budget", "512", "--json",
         "--dump-selections-to", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(records) == 3
    for record in records:
        assert str(record["passkey"]) in record["text"], record
    # The worker process wrote one selection per request: compaction ran there.
    assert len(list(tmp_path.glob("*.pt"))) == 3

    # Same prompt through the in-process engine (eager): the same positions are kept.
    record = records[1]
    (output,) = snap_llm.generate(
        passkey_prompt(2000, record["passkey"], record["depth"]), greedy(512, max_tokens=8)
    )
    assert output.outputs[0].text == record["text"]
    expected = load_dump(dump_dir, output.request_id)["layers"]
    assert_same_selection(expected, load_dump(str(tmp_path), record["request_id"])["layers"], 512)
