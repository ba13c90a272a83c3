"""Metrics snapshots and their Prometheus exposition (no engine)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from vllm_snapkv.metrics import CompressionStats, SnapKVCollector, SnapshotWriter, read_snapshots


def test_snapshots_round_trip_and_expose_labelled_series(tmp_path):
    stats = CompressionStats()
    stats.record_compression(prompt_len=2000, kept=256, evicted=1744, freed_blocks=14)
    stats.record_compression(prompt_len=600, kept=512, evicted=88, freed_blocks=1)
    SnapshotWriter(tmp_path, 0).write(stats)
    SnapshotWriter(tmp_path, 1).write(CompressionStats(skipped_no_free_blocks=2))
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
