"""Test lanes: the suite on a 2-core machine, one xdist worker per core, plus module times.

vLLM's CPU worker binds its OpenMP threads to one core and reserves the other one for a
scheduler process that an in-process engine never starts, so a single pytest process leaves a
core idle for most of the suite. ``scripts/test`` runs one xdist worker per lane instead; this
plugin gives each worker its own cores (``VLLM_CPU_OMP_THREADS_BIND`` and the process' affinity,
both inherited by the servers it starts) and keeps each module on one worker, so module- and
session-scoped engines are shared as before.

Modules are handed out longest first (the recorded times in ``tests/module_times.json``) so the
two lanes end together. A test that starts a local Ray cluster holds ``local_ray_cluster_slot()``:
two clusters at once would compete for Ray's ports and the two cores.

Every run ends with a table of each module's time next to its recorded one, so a change shows
what it added; ``VLLM_SNAPKV_TEST_TIMES=path`` also writes the measured times as JSON (the
format of ``tests/module_times.json``).
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

RECORDED_TIMES = Path(__file__).with_name("module_times.json")

def _recorded_times() -> dict[str, float]:
    if not RECORDED_TIMES.exists():
        return {}
    return json.loads(RECORDED_TIMES.read_text())["seconds"]


def lane_cores(worker_index: int, worker_count: int, cores: list[int]) -> list[int]:
    """The cores of one lane: the machine's cores split into ``worker_count`` runs of equal
    length (the last lanes take one fewer when they do not divide)."""
    size, extra = divmod(len(cores), worker_count)
    start = worker_index * size + min(worker_index, extra)
    return cores[start : start + size + (worker_index < extra)]


def pytest_configure(config: pytest.Config) -> None:
    worker = getattr(config, "workerinput", None)
    if worker is None:  # the controller (or a plain run) reports the module times
        config.pluginmanager.register(ModuleClock(), "vllm-snapkv-module-clock")
        return
    if "VLLM_CPU_OMP_THREADS_BIND" in os.environ:
        return  # binding chosen by the caller
    cores = sorted(os.sched_getaffinity(0))
    index, count = int(worker["workerid"].removeprefix("gw")), int(worker["workercount"])
    if len(cores) < count:
        return
    mine = lane_cores(index, count, cores)
    os.sched_setaffinity(0, mine)
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, mine))
    os.environ["OMP_NUM_THREADS"] = str(len(mine))


#: Modules that must be the first to start an in-process engine in their process: vLLM keeps one
#: process-wide distributed state, built for the first engine's model, and creates the expert-
#: parallel group only when that model is a mixture of experts; a later MoE engine (the gpt-oss
#: and Qwen3-Next families) then fails to load ("expert parallel group is not initialized").
#: xdist's loadfile scheduler gives each worker the first unit of the queue before any other.
FIRST_IN_A_FRESH_PROCESS = ("test_architectures.py",)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if getattr(config, "workerinput", None) is None:
        return  # one process: collection order (test_architectures.py comes first)
    # xdist workers: longest module first (``--dist loadfile --no-loadscope-reorder`` hands
    # modules out in this order), tests of a module in collection order.
    recorded = _recorded_times()
    position = {item: i for i, item in enumerate(items)}
    items.sort(key=lambda item: (
        item.path.name not in FIRST_IN_A_FRESH_PROCESS,
        -recorded.get(item.path.name, 0.0),
        position[item],
    ))


@contextmanager
def local_ray_cluster_slot() -> Iterator[None]:
    """Held while a test starts a local Ray cluster: two at once (one per lane) would compete
    for Ray's ports and the two cores, so the other lane's waits here."""
    with open(os.path.join(tempfile.gettempdir(), "vllm-snapkv-tests-ray.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class ModuleClock:
    """Seconds spent per test module (setup + call + teardown of its tests, fixtures included)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.tests: dict[str, int] = defaultdict(int)
        # Per test: lane, start and stop (epoch s) of setup to teardown, to see what overlapped.
        self.spans: dict[str, list] = {}

    @pytest.hookimpl
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        name = report.nodeid.split("::", 1)[0].rsplit("/", 1)[-1]
        self.seconds[name] += report.duration
        if report.when == "call" or (report.when == "setup" and report.skipped):
            self.tests[name] += 1
        lane = getattr(getattr(report, "node", None), "gateway", None)
        span = self.spans.setdefault(report.nodeid, [getattr(lane, "id", "main"), report.start,
                                                     report.stop])
        span[1], span[2] = min(span[1], report.start), max(span[2], report.stop)

    @pytest.hookimpl
    def pytest_terminal_summary(self, terminalreporter) -> None:
        if not self.seconds:
            return
        recorded = _recorded_times()
        write = terminalreporter.write_line
        terminalreporter.section("time per module (s; recorded: tests/module_times.json)")
        for name, seconds in sorted(self.seconds.items(), key=lambda kv: -kv[1]):
            before = recorded.get(name)
            delta = "new" if before is None else f"{seconds - before:+.0f}"
            write(f"{name:<34} {self.tests[name]:>4} tests {seconds:>7.0f}   ({delta})")
        write(f"{'all modules (summed over lanes)':<34} {sum(self.tests.values()):>4} tests "
              f"{sum(self.seconds.values()):>7.0f}")
        out = os.environ.get("VLLM_SNAPKV_TEST_TIMES")
        if out:
            Path(out).write_text(json.dumps(
                {"seconds": {k: round(v, 1) for k, v in sorted(self.seconds.items())},
                 "spans": {k: [lane, round(start, 1), round(stop, 1)]
                           for k, (lane, start, stop) in self.spans.items()}}, indent=1
            ) + "\n")


