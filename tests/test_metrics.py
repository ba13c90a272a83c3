"""Metrics snapshots and their Prometheus exposition (no engine)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from vllm_snapkv.metrics import CompressionStats, SnapKVCollector, SnapshotWriter, read_snapshots


def test_snapshots_round_trip_and_expose_labelled_series(tmp_path):
    stats = CompressionStats()
    stats.record_compression(prompt_len=2000, kept=256, evicted=1744, freed_blocks=14)
    stats.record_compression(prompt_len=600, kept=512, evicted=88, freed_blocks=1)
    SnapshotWriter(tmp_path, 0).publish(stats)
    SnapshotWriter(tmp_path, 1).publish(CompressionStats(skipped_no_free_blocks=2))
    assert dict(read_snapshots(tmp_path))["0"] == stats

    registry = CollectorRegistry()
    registry.register(SnapKVCollector(tmp_path, "smol"))
    text = generate_latest(registry).decode()
    assert 'vllm:snapkv_compressed_requests_total{engine="0",model_name="smol"} 2.0' in text
    assert 'vllm:snapkv_evicted_tokens_total{engine="0",model_name="smol"} 1832.0' in text
    assert 'vllm:snapkv_freed_blocks_total{engine="0",model_name="smol"} 15.0' in text
    assert 'vllm:snapkv_skipped_compressions_total{engine="1",model_name="smol"} 2.0' in text
    # Ratios 7.8125 and 1.171875: cumulative buckets.
    assert 'vllm:snapkv_compression_ratio_bucket{engine="0",le="1.5",model_name="smol"} 1.0' in text
    assert 'vllm:snapkv_compression_ratio_bucket{engine="0",le="8.0",model_name="smol"} 2.0' in text
    assert 'vllm:snapkv_compression_ratio_count{engine="0",model_name="smol"} 2.0' in text
    assert 'vllm:snapkv_compression_ratio_sum{engine="0",model_name="smol"} 8.984375' in text


def test_no_snapshot_no_series(tmp_path):
    registry = CollectorRegistry()
    registry.register(SnapKVCollector(tmp_path, "smol"))
    assert "snapkv_compressed_requests_total{" not in generate_latest(registry).decode()


def test_multiprocess_publisher_is_summed_per_engine_by_prometheus(tmp_path):
    # vLLM's /metrics with several API servers: a fresh registry over PROMETHEUS_MULTIPROC_DIR.
    # prometheus_client picks its value class at import, so engines are separate processes here too.
    import os
    import subprocess
    import sys

    from prometheus_client import multiprocess

    publish = (
        "import sys\n"
        "from vllm_snapkv.metrics import CompressionStats, publishers_from_environment\n"
        "(publisher,) = publishers_from_environment('smol', int(sys.argv[1]))\n"
        "stats = CompressionStats()\n"
        "publisher.publish(stats, ())\n"
        "for prompt_len in map(int, sys.argv[2:]):\n"
        "    ratio = stats.record_compression(prompt_len, 256, prompt_len - 256, 3)\n"
        "    publisher.publish(stats, [ratio])\n"
    )
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    env.pop("VLLM_SNAPKV_METRICS_DIR", None)
    for engine, prompts in (("0", ["2048", "512"]), ("1", []), ("0", ["1024"])):
        subprocess.run([sys.executable, "-c", publish, engine, *prompts], env=env, check=True)

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(tmp_path))
    text = generate_latest(registry).decode()
    # Engine 0 ran twice (two processes): prometheus sums them, as after an engine restart.
    assert 'vllm:snapkv_compressed_requests_total{engine="0",model_name="smol"} 3.0' in text
    assert 'vllm:snapkv_evicted_tokens_total{engine="0",model_name="smol"} 2816.0' in text
    assert 'vllm:snapkv_freed_blocks_total{engine="0",model_name="smol"} 9.0' in text
    assert 'vllm:snapkv_compressed_requests_total{engine="1",model_name="smol"} 0.0' in text
    assert 'vllm:snapkv_skipped_compressions_total{engine="1",model_name="smol"} 0.0' in text
    # Ratios 8, 2 and 4.
    assert 'vllm:snapkv_compression_ratio_bucket{engine="0",le="2.0",model_name="smol"} 1.0' in text
    assert 'vllm:snapkv_compression_ratio_bucket{engine="0",le="4.0",model_name="smol"} 2.0' in text
    assert 'vllm:snapkv_compression_ratio_count{engine="0",model_name="smol"} 3.0' in text
    assert 'vllm:snapkv_compression_ratio_sum{engine="0",model_name="smol"} 14.0' in text
