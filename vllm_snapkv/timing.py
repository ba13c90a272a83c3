"""Timing of asynchronous device work without a host sync per measured piece. No vLLM import."""

from __future__ import annotations

import time
from typing import Any

import torch


class CompactionClock:
    """Time spent selecting and compacting, as the device sees it: wall time on the CPU; CUDA
    events on a GPU, where the work is asynchronous and a host timer would only time the kernel
    launches. The events are read in :meth:`settle`, once per step: at most one host sync per
    step with compaction work, none per layer."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._events: list[tuple[Any, Any]] = []

    def start(self, device: torch.device) -> Any:
        if device.type != "cuda":
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def stop(self, started: Any, device: torch.device) -> None:
        if device.type != "cuda":
            self.seconds += time.perf_counter() - started
            return
        ended = torch.cuda.Event(enable_timing=True)
        ended.record()
        self._events.append((started, ended))

    def settle(self) -> None:
        if not self._events:
            return
        self._events[-1][1].synchronize()
        self.seconds += sum(start.elapsed_time(end) for start, end in self._events) / 1000
        self._events.clear()
