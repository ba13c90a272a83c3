"""Metrics snapshots and their Prometheus exposition (no engine)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from vllm_snapkv.metrics import CompressionStats, SnapKVCollector, SnapshotWriter, read_snapshots


def test_snapshots_round_trip_and_expose_labelled_series(tmp_path):
    stats = CompressionStats()
    stats.record_compression(prompt_len=2000, kept=256, evicted=1744, freed_blocks=14)
    stats.record_compression(prompt_len=600, kept=512, evicted=88, freed_blocks=1)
    stats.record_decode_compression(evicted=512, freed_blocks=4)
    stats.record_decode_compression(evicted=512, freed_blocks=4)
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
    # Decode compressions: their own series; the prompt series and the ratio do not count them.
    assert 'vllm:snapkv_decode_compressions_total{engine="0",model_name="smol"} 2.0' in text
    assert 'vllm:snapkv_decode_evicted_tokens_total{engine="0",model_name="smol"} 1024.0' in text
    assert 'vllm:snapkv_decode_freed_blocks_total{engine="0",model_name="smol"} 8.0' in text
    # Ratios 7.8125 and 1.171875: cumulative buckets.
    assert 'vllm:snapkv_compression_ratio_bucket{engine="0",le="1.5",model_name="smol"} 1.0' in text
    assert 'vllm:snapkv_compression_ratio_bucket{engine="0",le="8.0",model_name="smol"} 2.0' in text
    assert 'vllm:snapkv_compression_ratio_count{engine="0",model_name="smol"} 2.0' in text
    assert 'vllm:snapkv_compression_ratio_sum{engine="0",model_name="smol"} 8.984375' in text


def test_no_snapshot_no_series(tmp_path):
    registry = CollectorRegistry()
    registry.register(SnapKVCollector(tmp_path, "smol"))
    assert "snapkv_compressed_requests_total{" not in generate_latest(registry).decode()


def test_both_channels_expose_the_same_series(tmp_path):
    """The multiprocess channel (vLLM's /metrics with several API servers: a fresh registry over
    PROMETHEUS_MULTIPROC_DIR) shows exactly what the snapshot collector shows. prometheus_client
    picks its value class at import, so each engine publishes from its own process, as in vLLM."""
    import os
    import subprocess
    import sys

    from prometheus_client import multiprocess

    publish = (
        "import sys\n"
        "from vllm_snapkv.metrics import CompressionStats, publishers_from_environment\n"
        "publishers = publishers_from_environment('smol', int(sys.argv[1]))\n"
        "assert len(publishers) == 2\n"
        "stats = CompressionStats(skipped_no_free_blocks=int(sys.argv[1]))\n"
        "for publisher in publishers: publisher.publish(stats, ())\n"
        "for prompt_len in map(int, sys.argv[2:]):\n"
        "    ratio = stats.record_compression(prompt_len, 256, prompt_len - 256, 3)\n"
        "    for publisher in publishers: publisher.publish(stats, [ratio])\n"
    )
    snapshots, multiprocess_dir = tmp_path / "snapshots", tmp_path / "multiprocess"
    snapshots.mkdir()
    multiprocess_dir.mkdir()
    env = {**os.environ, "VLLM_SNAPKV_METRICS_DIR": str(snapshots),
           "PROMETHEUS_MULTIPROC_DIR": str(multiprocess_dir)}
    for engine, prompts in (("0", ["2048", "512", "1024"]), ("1", ["600"])):
        subprocess.run([sys.executable, "-c", publish, engine, *prompts], env=env, check=True)

    def series(registry) -> set[str]:
        return {line for line in generate_latest(registry).decode().splitlines()
                if line.startswith("vllm:snapkv")}

    from_files = CollectorRegistry()
    multiprocess.MultiProcessCollector(from_files, path=str(multiprocess_dir))
    from_snapshots = CollectorRegistry()
    from_snapshots.register(SnapKVCollector(snapshots, "smol"))
    assert series(from_files) == series(from_snapshots)
    text = "\n".join(series(from_files))
    assert 'vllm:snapkv_compressed_requests_total{engine="0",model_name="smol"} 3.0' in text
    assert 'vllm:snapkv_skipped_compressions_total{engine="1",model_name="smol"} 1.0' in text
    # Ratios 8, 2 and 4.
    assert 'vllm:snapkv_compression_ratio_bucket{engine="0",le="2.0",model_name="smol"} 1.0' in text
    assert 'vllm:snapkv_compression_ratio_sum{engine="0",model_name="smol"} 14.0' in text
