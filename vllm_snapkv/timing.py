"""Timing of asynchronous device work without a host sync per measured piece. No vLLM import."""

from __future__ import annotations

import time
from typing import Any

import torch


class CompactionClock:
    """Time spent selecting and compacting, as the device sees it: wall time on the CPU; CUDA
    events on a GPU, where the work is asynchronous and a host timer would only time the kernel
    launches.

    The events are read lazily, so timing never makes a step wait for the GPU: :meth:`settle`
    (once per step) adds the pairs whose end event has already completed (``Event.query``, which
    does not wait) and keeps the rest for a later step. Only reading :attr:`seconds` (a benchmark
    asking) waits for the pairs still in flight."""

    def __init__(self) -> None:
        self._settled_seconds = 0.0
        #: (start, end) CUDA event pairs not read yet, in recording order (one stream).
        self._pending: list[tuple[Any, Any]] = []

    def start(self, device: torch.device) -> Any:
        if device.type != "cuda":
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def stop(self, started: Any, device: torch.device) -> None:
        if device.type != "cuda":
            self._settled_seconds += time.perf_counter() - started
            return
        ended = torch.cuda.Event(enable_timing=True)
        ended.record()
        self._pending.append((started, ended))

    def settle(self) -> None:
        """Add the pairs the device has finished; never waits for it."""
        done = 0
        for started, ended in self._pending:
            if not ended.query():
                break  # recorded in order on one stream: the later ones are not done either
            self._settled_seconds += started.elapsed_time(ended) / 1000
            done += 1
        del self._pending[:done]

    @property
    def seconds(self) -> float:
        """Total so far; waits for the device work still being timed (only when asked)."""
        if self._pending:
            self._pending[-1][1].synchronize()
            self.settle()
        return self._settled_seconds
