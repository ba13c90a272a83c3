"""Hybrid models, worker side, without an engine: which group reads which KV lengths, and which
steps may replay a full CUDA graph."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from vllm.config import CUDAGraphMode
from vllm.v1.attention.backend import CommonAttentionMetadata

from vllm_snapkv.adapter import physical
from vllm_snapkv.adapter import worker as worker_module


def common_metadata(seq_lens: list[int]) -> CommonAttentionMetadata:
    """What the runner builds for 3 rows (one padded): physical seq_lens, as after the
    post-hook."""
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    return CommonAttentionMetadata(
        query_start_loc=torch.tensor([0, 1, 2, 3], dtype=torch.int32),
        query_start_loc_cpu=torch.tensor([0, 1, 2, 3], dtype=torch.int32),
        seq_lens=lens,
        num_reqs=3,
        num_actual_tokens=3,
        max_query_len=1,
        max_seq_len=int(lens.max()),
        block_table_tensor=torch.zeros(3, 4, dtype=torch.int32),
        slot_mapping=torch.zeros(3, dtype=torch.int64),
        seq_lens_cpu_upper_bound=lens.clone(),
    )


class FakeAttentionGroup:
    """An attention group of a runner whose SnapKV state holds ``logical_lengths``."""

    def __init__(self, kv_cache_group_id: int, logical_lengths=None):
        self.kv_cache_group_id = kv_cache_group_id
        setattr(self, physical.STEP_STATE_ATTR, SimpleNamespace(logical_lengths=logical_lengths))


def built_lengths(group: FakeAttentionGroup, metadata: CommonAttentionMetadata):
    build = physical._patch_build_metadata(lambda self, cm, *a, **k: cm)
    got = build(group, metadata)
    assert got.seq_lens_cpu_upper_bound.tolist() == got.seq_lens.tolist()
    return got.seq_lens.tolist(), got.max_seq_len


def test_groups_left_alone_read_logical_lengths_compressed_groups_physical():
    # Row 0 compressed (logical 1000, physical 300), row 1 not, row 2 CUDA-graph padding.
    logical = torch.tensor([1000, 50], dtype=torch.int32)
    lengths = physical.LogicalLengths(frozenset({0, 1}), logical, logical.clone(), 1000)
    metadata = common_metadata([300, 50, 0])
    # The sliding-window group, then the full-attention group.
    assert built_lengths(FakeAttentionGroup(0, lengths), metadata) == ([1000, 50, 0], 1000)
    assert built_lengths(FakeAttentionGroup(2, lengths), metadata) == ([300, 50, 0], 300)
    assert metadata.seq_lens.tolist() == [300, 50, 0], "the runner's buffer is not modified"


def test_without_compressed_requests_every_group_reads_the_runner_lengths():
    assert built_lengths(FakeAttentionGroup(0), common_metadata([300, 50, 0])) == (
        [300, 50, 0], 300
    )
    # Another engine's group (no SnapKV state) is never given this runner's lengths.
    group = FakeAttentionGroup(0)
    delattr(group, physical.STEP_STATE_ATTR)
    assert built_lengths(group, common_metadata([300, 50, 0])) == ([300, 50, 0], 300)


def test_steps_whose_groups_read_different_lengths_never_replay_a_full_graph():
    calls = []

    def original(self, num_tokens, **kwargs):
        calls.append(kwargs)
        return CUDAGraphMode.PIECEWISE, None

    dispatch = worker_module._patch_cudagraph_dispatch(original)
    state = SimpleNamespace(step_has_work=False, step_uses_mixed_lengths=True)
    dispatcher = SimpleNamespace(**{physical.STEP_STATE_ATTR: state})
    dispatch(dispatcher, 8, uniform_decode=True, invalid_modes=None)
    state.step_uses_mixed_lengths = False
    dispatch(dispatcher, 8, uniform_decode=True, invalid_modes=None)
    assert calls == [
        {"uniform_decode": True, "invalid_modes": {CUDAGraphMode.FULL}},
        {"uniform_decode": True, "invalid_modes": None},
    ]


def kv_cache_config(*specs):
    from types import SimpleNamespace

    return SimpleNamespace(kv_cache_groups=[
        SimpleNamespace(kv_cache_spec=spec, layer_names=[f"model.layers.{i}.attn"])
        for i, spec in enumerate(specs)
    ])


def attention_spec(kind, block_size=32, **extra):
    return kind(block_size=block_size, num_kv_heads=2, head_size=64, dtype=torch.float32, **extra)


def test_groups_decided_once_full_attention_compressed_bounded_groups_left_alone():
    import pytest
    from vllm.v1.kv_cache_interface import (
        ChunkedLocalAttentionSpec,
        FullAttentionSpec,
        MLAAttentionSpec,
        SlidingWindowSpec,
    )

    from vllm_snapkv.adapter.groups import CompressedGroups, UnsupportedKVCacheGroups

    full, sliding = attention_spec(FullAttentionSpec), attention_spec(
        SlidingWindowSpec, sliding_window=256
    )
    groups = CompressedGroups.of(kv_cache_config(sliding, sliding, full))
    assert groups.group_ids == (2,) and groups.hybrid and groups.block_size == 32
    assert groups.group_of_layer == {"model.layers.2.attn": 2}
    plain = CompressedGroups.of(kv_cache_config(full))
    assert plain.group_ids == (0,) and not plain.hybrid
    for other in (
        attention_spec(MLAAttentionSpec),
        attention_spec(ChunkedLocalAttentionSpec, attention_chunk_size=8192),
    ):
        with pytest.raises(UnsupportedKVCacheGroups, match=type(other).__name__):
            CompressedGroups.of(kv_cache_config(full, other))
    with pytest.raises(UnsupportedKVCacheGroups, match="no full-attention layer"):
        CompressedGroups.of(kv_cache_config(sliding))
    with pytest.raises(UnsupportedKVCacheGroups, match="different block sizes"):
        CompressedGroups.of(kv_cache_config(full, attention_spec(FullAttentionSpec, 64)))
