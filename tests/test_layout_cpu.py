"""CPU paged-cache layout (CPU_ATTN): what vLLM's own write op stores is what read_kv returns."""

from __future__ import annotations

import pytest
import torch

from vllm_snapkv.adapter.layouts import PagedTokens
from vllm_snapkv.adapter.layouts.cpu import gather_values, read_keys, read_kv, write_kv


def slots_of(block_ids, num_tokens: int, block_size: int) -> torch.Tensor:
    return PagedTokens.of(block_ids, block_size, num_tokens, "cpu").slots()


LAYOUTS = [
    ("vec", torch.float32, 128, 64),
    ("vec16", torch.float32, 16, 64),
    ("vec", torch.bfloat16, 128, 64),
    ("amx", torch.bfloat16, 128, 64),
    ("amx", torch.bfloat16, 32, 128),
]


@pytest.mark.parametrize("isa,dtype,block_size,head_dim", LAYOUTS)
def test_round_trip_through_vllm_cache_write_op(isa, dtype, block_size, head_dim):
    if isa == "amx" and not torch.cpu._is_amx_tile_supported():
        pytest.skip("AMX layout needs an AMX CPU")
    num_blocks, num_heads, num_tokens = 9, 3, 2 * block_size + 7
    cache = torch.zeros(num_blocks, num_heads, block_size, 2 * head_dim, dtype=dtype)
    keys = torch.randn(num_tokens, num_heads, head_dim).to(dtype)
    values = torch.randn(num_tokens, num_heads, head_dim).to(dtype)
    block_ids = [5, 2, 7]  # out of order on purpose, as a block table is
    write_kv(cache, keys, values, slots_of(block_ids, num_tokens, block_size), isa)
    got_keys, got_values = read_kv(cache, block_ids, num_tokens, isa)
    assert torch.equal(got_keys, keys)
    assert torch.equal(got_values, values)


def test_per_head_lanes_keep_different_positions_per_head():
    # The compaction writes row i of head h from position kept[h, i]: one slot, three sources.
    block_size, head_dim = 16, 64
    cache = torch.zeros(4, 3, block_size, 2 * head_dim)
    keys = torch.randn(40, 3, head_dim)
    values = torch.randn(40, 3, head_dim)
    kept = torch.tensor([[0, 5, 39], [1, 2, 3], [30, 31, 39]])
    heads = torch.arange(3)
    slots = slots_of([3], 3, block_size)
    write_kv(cache, keys[kept.T, heads], values[kept.T, heads], slots, "vec16")
    got_keys, got_values = read_kv(cache, [3], 3, "vec16")
    for h in range(3):
        assert torch.equal(got_keys[:, h], keys[kept[h], h])
        assert torch.equal(got_values[:, h], values[kept[h], h])


def test_unknown_isa_is_refused():
    with pytest.raises(NotImplementedError, match="neon"):
        read_kv(torch.zeros(2, 1, 16, 8), [0], 4, "neon")


@pytest.mark.parametrize("isa,dtype,block_size,head_dim", LAYOUTS)
def test_fast_readers_agree_with_the_full_unpack(isa, dtype, block_size, head_dim):
    if isa == "amx" and not torch.cpu._is_amx_tile_supported():
        pytest.skip("AMX layout needs an AMX CPU")
    num_heads, num_tokens = 3, 2 * block_size + 5
    cache = torch.randn(6, num_heads, block_size, 2 * head_dim).to(dtype)
    block_ids = [4, 0, 2]
    keys, values = read_kv(cache, block_ids, num_tokens, isa)
    assert torch.equal(read_keys(cache, block_ids, num_tokens, isa), keys)
    positions = torch.randint(0, num_tokens, (17, num_heads))
    heads = torch.arange(num_heads)
    assert torch.equal(gather_values(cache, block_ids, positions, isa), values[positions, heads])
