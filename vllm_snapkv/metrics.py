"""Compression metrics: counted where compression happens, served by the API server's /metrics.

The engine core (a separate process) owns the counts; vLLM 0.32 has no generic channel for
plugin statistics from the engine core to the frontend (``SchedulerStats`` has fixed fields). So
each engine writes a small JSON snapshot into ``$VLLM_SNAPKV_METRICS_DIR`` whenever its counts
change (only at steps that compress), and a Prometheus collector in the API server reads the
snapshots at scrape time.

When ``PROMETHEUS_MULTIPROC_DIR`` is set (vLLM sets it for several API server processes,
``--api-server-count``, the default under data parallelism; or the user does), /metrics is built
at each scrape from prometheus_client's per-process files in that directory only, and no
collector registered in the API server is read. Each engine core then also keeps its counts as
multiprocess-mode prometheus_client metrics (:class:`MultiprocessPublisher`), which every API
server sums per label like vLLM's own. No vLLM import here.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Protocol, Sequence

METRICS_DIR_ENV = "VLLM_SNAPKV_METRICS_DIR"
#: prometheus_client's multiprocess directory; vLLM sets it for multi-API-server deployments.
PROMETHEUS_MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

#: Upper bounds of the compression-ratio histogram (prompt tokens / kept tokens).
RATIO_BUCKETS = (1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0, 64.0, 128.0)


@dataclass
class CompressionStats:
    """Cumulative counts of one engine. Only compressions that happened count."""

    compressed_requests: int = 0
    evicted_tokens: int = 0
    freed_blocks: int = 0
    skipped_no_free_blocks: int = 0
    #: Compressions while decoding (``decode_interval``), and what they evicted and freed.
    decode_compressions: int = 0
    decode_evicted_tokens: int = 0
    decode_freed_blocks: int = 0
    #: Non-cumulative counts per RATIO_BUCKETS bound, plus one for +Inf.
    ratio_bucket_counts: list[int] = field(default_factory=lambda: [0] * (len(RATIO_BUCKETS) + 1))
    ratio_sum: float = 0.0

    def record_compression(
        self, prompt_len: int, kept: int, evicted: int, freed_blocks: int
    ) -> float:
        """Count one compression; returns its ratio (prompt tokens / kept tokens)."""
        self.compressed_requests += 1
        self.evicted_tokens += evicted
        self.freed_blocks += freed_blocks
        ratio = prompt_len / kept
        self.ratio_sum += ratio
        index = next((i for i, bound in enumerate(RATIO_BUCKETS) if ratio <= bound), -1)
        self.ratio_bucket_counts[index] += 1
        return ratio

    def record_decode_compression(self, evicted: int, freed_blocks: int) -> None:
        self.decode_compressions += 1
        self.decode_evicted_tokens += evicted
        self.decode_freed_blocks += freed_blocks


#: Metric suffix -> (help text, CompressionStats attribute), for every counter.
COUNTERS = {
    "compressed_requests": (
        "Requests whose prompt KV cache SnapKV compressed.", "compressed_requests"
    ),
    "evicted_tokens": ("Prompt KV entries evicted per KV head by SnapKV.", "evicted_tokens"),
    "freed_blocks": (
        "KV cache blocks SnapKV returned to the block pool at prompt compressions.",
        "freed_blocks",
    ),
    "skipped_compressions": (
        "Compressions skipped (prompt or decode): no block to compact into.",
        "skipped_no_free_blocks",
    ),
    "decode_compressions": (
        "Compressions of a request's KV cache while it decodes (--snapkv-decode-interval).",
        "decode_compressions",
    ),
    "decode_evicted_tokens": (
        "KV entries evicted per KV head by compressions while decoding.",
        "decode_evicted_tokens",
    ),
    "decode_freed_blocks": (
        "KV cache blocks returned to the block pool by compressions while decoding.",
        "decode_freed_blocks",
    ),
}
RATIO_METRIC = "vllm:snapkv_compression_ratio"
RATIO_HELP = "Prompt tokens / KV entries kept per head, per compressed request."
LABELS = ("model_name", "engine")


class StatsPublisher(Protocol):
    def publish(self, stats: CompressionStats, new_ratios: Sequence[float]) -> None:
        """Make ``stats`` (cumulative) visible; ``new_ratios`` were recorded since the last call."""


class SnapshotWriter:
    """Writes one engine's stats atomically to ``<dir>/engine-<index>.json``."""

    def __init__(self, directory: str | os.PathLike, engine_index: int):
        self.path = Path(directory) / f"engine-{engine_index}.json"

    @classmethod
    def from_environment(cls, engine_index: int) -> "SnapshotWriter | None":
        directory = os.environ.get(METRICS_DIR_ENV)
        return cls(directory, engine_index) if directory else None

    def publish(self, stats: CompressionStats, new_ratios: Sequence[float] = ()) -> None:
        partial = self.path.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(json.dumps(asdict(stats)))
        os.replace(partial, self.path)


def read_snapshots(directory: str | os.PathLike) -> Iterator[tuple[str, CompressionStats]]:
    for path in sorted(Path(directory).glob("engine-*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # replaced mid-read on a non-atomic filesystem: next scrape sees it
        yield path.stem.removeprefix("engine-"), CompressionStats(**data)


class SnapKVCollector:
    """Prometheus collector for the engines' snapshots, labelled like vLLM's own metrics."""

    def __init__(self, directory: str | os.PathLike, model_name: str):
        self.directory = directory
        self.model_name = model_name

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

        families = {
            name: CounterMetricFamily(f"vllm:snapkv_{name}", text, labels=LABELS)
            for name, (text, _) in COUNTERS.items()
        }
        ratio = HistogramMetricFamily(RATIO_METRIC, RATIO_HELP, labels=LABELS)
        for engine, stats in read_snapshots(self.directory):
            values = [self.model_name, engine]
            for name, (_, attribute) in COUNTERS.items():
                families[name].add_metric(values, getattr(stats, attribute))
            cumulative, buckets = 0, []
            for bound, count in zip((*RATIO_BUCKETS, float("inf")), stats.ratio_bucket_counts):
                cumulative += count
                buckets.append(("+Inf" if bound == float("inf") else str(bound), cumulative))
            ratio.add_metric(values, buckets, stats.ratio_sum)
        yield from families.values()
        yield ratio


class MultiprocessPublisher:
    """One engine's counts as multiprocess-mode prometheus_client metrics, written by the engine
    core process into ``PROMETHEUS_MULTIPROC_DIR``; vLLM's /metrics sums them per label across
    processes. Same names, labels and buckets as :class:`SnapKVCollector`."""

    def __init__(self, model_name: str, engine_index: int):
        from prometheus_client import Counter, Histogram

        labels = {"model_name": model_name, "engine": str(engine_index)}
        # registry=None: the values live in this process's multiprocess files, not a registry.
        self.counters = {
            attribute: Counter(f"vllm:snapkv_{name}", text, LABELS, registry=None).labels(**labels)
            for name, (text, attribute) in COUNTERS.items()
        }
        self.ratio = Histogram(
            RATIO_METRIC, RATIO_HELP, LABELS, buckets=RATIO_BUCKETS, registry=None
        ).labels(**labels)
        self.published = CompressionStats()

    @classmethod
    def from_environment(cls, model_name: str, engine_index: int) -> "MultiprocessPublisher | None":
        return cls(model_name, engine_index) if os.environ.get(PROMETHEUS_MULTIPROC_ENV) else None

    def publish(self, stats: CompressionStats, new_ratios: Sequence[float] = ()) -> None:
        for attribute, counter in self.counters.items():
            delta = getattr(stats, attribute) - getattr(self.published, attribute)
            if delta:
                counter.inc(delta)
        for ratio in new_ratios:
            self.ratio.observe(ratio)
        self.published = CompressionStats(**asdict(stats))


def publishers_from_environment(model_name: str, engine_index: int) -> list[StatsPublisher]:
    """The channels this engine core process publishes its counts through."""
    publishers = [
        SnapshotWriter.from_environment(engine_index),
        MultiprocessPublisher.from_environment(model_name, engine_index),
    ]
    return [publisher for publisher in publishers if publisher is not None]


_registered_collector: SnapKVCollector | None = None


def serve_metrics_from_this_process(model_name: str) -> None:
    """In the frontend process, before engines start: create the snapshot directory (inherited
    by the engine processes it starts, through the environment) and register the collector.
    Idempotent. Always a new directory, never one found in the environment: that one belongs to
    another server (a process that ran an engine itself and then started this one, e.g. a test
    harness or a Ray driver), whose engine 0 would overwrite this server's engine 0."""
    global _registered_collector
    if _registered_collector is not None:
        return
    directory = tempfile.mkdtemp(prefix="vllm-snapkv-metrics-")
    os.environ[METRICS_DIR_ENV] = directory
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    from prometheus_client import REGISTRY

    _registered_collector = SnapKVCollector(directory, model_name)
    REGISTRY.register(_registered_collector)
