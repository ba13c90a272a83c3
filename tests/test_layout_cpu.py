"""CPU paged-cache layout (CPU_ATTN): what vLLM's own write op stores is what read_kv returns;
fp8 caches are scored dequantised and compacted byte for byte."""

from __future__ import annotations

import pytest
import torch

from vllm_snapkv.adapter.layouts import PagedTokens
from vllm_snapkv.adapter.layouts.cpu import (
    CpuPackedLayout,
    gather_values,
    read_keys,
    read_kv,
    write_kv,
)


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


# --- fp8 caches: uint8 bytes in the ISA's packing, scored dequantised, compacted as bytes ------

FP8_KV_CACHE_DTYPES = {
    "fp8": torch.float8_e4m3fn,
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}


def skip_without_fp8_cpu(isa: str) -> None:
    """vLLM refuses an fp8 KV cache on CPUs without AVX-512 or AMX (``_get_attn_isa``); the AMX
    packing needs AMX tiles."""
    if not (torch.cpu._is_avx512_supported() or torch.cpu._is_amx_tile_supported()):
        pytest.skip("vLLM's CPU fp8 KV cache needs AVX-512 or AMX; this CPU has neither")
    if isa == "amx" and not torch.cpu._is_amx_tile_supported():
        pytest.skip("AMX layout needs an AMX CPU")


def fp8_representable(shape, fmt: torch.dtype, scale: float) -> torch.Tensor:
    """Nonzero values ``q * scale`` with q exact in ``fmt`` (scale a power of two): vLLM stores
    exactly q whatever its rounding (it stores -0.0 as +0.0, hence nonzero)."""
    q = torch.randn(shape).to(fmt).float()
    return torch.where(q == 0, 1.0, q) * scale


@pytest.mark.parametrize("kv_cache_dtype", list(FP8_KV_CACHE_DTYPES))
@pytest.mark.parametrize(
    "isa,dtype",
    [
        ("vec", torch.float32),
        ("vec", torch.float16),
        ("vec", torch.bfloat16),
        ("amx", torch.bfloat16),  # what vLLM picks for a bf16 model on an AMX CPU
    ],
)
def test_fp8_round_trip_through_vllm_cache_write_op(isa, dtype, kv_cache_dtype):
    skip_without_fp8_cpu(isa)
    fmt = FP8_KV_CACHE_DTYPES[kv_cache_dtype]
    k_scale, v_scale = 0.25, 4.0
    block_size, head_dim, num_heads = 32, 64, 3
    num_tokens = 2 * block_size + 7
    cache = torch.zeros(9, num_heads, block_size, 2 * head_dim, dtype=torch.uint8)
    keys = fp8_representable((num_tokens, num_heads, head_dim), fmt, k_scale)
    values = fp8_representable((num_tokens, num_heads, head_dim), fmt, v_scale)
    block_ids = [5, 2, 7]
    slots = slots_of(block_ids, num_tokens, block_size)
    write_kv(
        cache, keys.to(dtype), values.to(dtype), slots, isa, k_scale, v_scale, kv_cache_dtype
    )

    got_keys, got_values = read_kv(cache, block_ids, num_tokens, isa)
    assert torch.equal(got_keys, (keys / k_scale).to(fmt).view(torch.uint8))
    assert torch.equal(got_values, (values / v_scale).to(fmt).view(torch.uint8))
    layout = CpuPackedLayout(isa, kv_cache_dtype=kv_cache_dtype, k_scale=k_scale)
    scoring = layout.scoring_keys(read_keys(cache, block_ids, num_tokens, isa))
    assert scoring.dtype == torch.float32 and torch.equal(scoring, keys)
    # The pure-torch write puts every byte where vLLM's op put it: same whole cache.
    replica = torch.zeros_like(cache)
    layout.write(replica, got_keys, got_values, slots)
    assert torch.equal(replica, cache)


@pytest.mark.parametrize("kv_cache_dtype", ["fp8_e4m3", "fp8_e5m2"])
@pytest.mark.parametrize("isa", ["vec", "amx"])
def test_fp8_compaction_copies_the_stored_bytes(isa, kv_cache_dtype):
    # Pure torch (no AVX-512 needed): every byte pattern, NaNs and -0 included, in the packing.
    fmt = FP8_KV_CACHE_DTYPES[kv_cache_dtype]
    block_size, head_dim, num_heads, k_scale = 32, 64, 3, 0.5
    cache = torch.randint(0, 256, (6, num_heads, block_size, 2 * head_dim), dtype=torch.uint8)
    before = cache.clone()
    tokens = PagedTokens.of([4, 1], block_size, 2 * block_size, "cpu")
    layout = CpuPackedLayout(isa, kv_cache_dtype=kv_cache_dtype, k_scale=k_scale)

    # The worker's sequence, compacting in place: the targets are the first source block.
    keys = layout.read_keys(cache, tokens)
    stored_keys, stored_values = read_kv(before, [4, 1], 2 * block_size, isa)
    expected = stored_keys.view(fmt).float() * k_scale
    torch.testing.assert_close(layout.scoring_keys(keys), expected, rtol=0, atol=0, equal_nan=True)
    heads = torch.arange(num_heads)
    per_slot = torch.randint(0, 2 * block_size, (block_size, num_heads))
    kept_values = layout.gather_values(cache, tokens, per_slot)
    targets = PagedTokens.of([4], block_size, block_size, "cpu").slots()
    layout.write(cache, keys[per_slot, heads], kept_values, targets)

    got_keys, got_values = read_kv(cache, [4], block_size, isa)
    assert torch.equal(got_keys, stored_keys[per_slot, heads])
    assert torch.equal(got_values, stored_values[per_slot, heads])
    others = [0, 1, 2, 3, 5]
    assert torch.equal(cache[others], before[others])


def test_fp8_rows_of_another_dtype_are_refused():
    # A float row would have to be quantised: compaction writes back the bytes it read.
    cache = torch.zeros(2, 1, 32, 64, dtype=torch.uint8)
    rows = torch.zeros(1, 1, 32)
    with pytest.raises(ValueError, match="dtype"):
        CpuPackedLayout("vec", kv_cache_dtype="fp8").write(cache, rows, rows, torch.tensor([0]))


def test_non_quantised_keys_are_scored_as_stored():
    keys = torch.randn(4, 2, 32).to(torch.bfloat16)
    assert CpuPackedLayout("vec").scoring_keys(keys) is keys


def test_layout_for_a_cpu_layer_takes_its_cache_dtype_and_k_scale():
    from types import SimpleNamespace

    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl

    from vllm_snapkv.adapter.attention import layout_for

    impl = object.__new__(CPUAttentionBackendImpl)  # only its type and kv_cache_dtype matter
    impl.kv_cache_dtype = "fp8_e5m2"
    layer = SimpleNamespace(isa="vec", _k_scale_float=0.5, _v_scale_float=2.0)
    layout = layout_for(impl, layer)
    assert isinstance(layout, CpuPackedLayout)
    assert (layout.isa, layout.fp8_format, layout.k_scale) == ("vec", torch.float8_e5m2, 0.5)
