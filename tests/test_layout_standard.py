"""The standard KV layout of vLLM 0.32's GPU backends, for every physical order and float dtype,
and fp8 caches (uint8 bytes, scored dequantised, compacted byte for byte) in every order.

Caches are built as vLLM builds them: one buffer for all layers in a ``KVCacheLayout``'s physical
order, each layer a strided logical ``[blocks, kv_heads, block_size, K|V]`` view into it. The
reference writer/reader is the backends' own view, ``kv_cache.transpose(1, 2).split(half, -1)``.
"""

from __future__ import annotations

import pytest
import torch
from vllm.v1.kv_cache_layout import KVCacheLayout

from vllm_snapkv.adapter.layouts import PagedTokens
from vllm_snapkv.adapter.layouts.standard import StandardLayout, stored_fp8_format

NUM_LAYERS, NUM_BLOCKS, NUM_HEADS, HEAD_SIZE = 3, 10, 4, 8
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def layer_views(layout: KVCacheLayout, block_size: int, dtype) -> list[torch.Tensor]:
    """Per-layer logical views into one buffer stored in ``layout``'s physical order."""
    logical = (NUM_LAYERS, NUM_BLOCKS, NUM_HEADS, block_size, 2 * HEAD_SIZE)
    physical = [logical[axis] for axis in layout.stride_order]
    buffer = torch.zeros(physical, dtype=dtype)
    inverse = sorted(range(5), key=lambda i: layout.stride_order[i])
    whole = buffer.permute(*inverse)
    assert whole.shape == logical
    return [whole[layer] for layer in range(NUM_LAYERS)]


def backend_write(kv_cache, keys, values, slots) -> None:
    """What ``reshape_and_cache_flash`` does, through the backends' own K/V views."""
    key_cache, value_cache = kv_cache.transpose(1, 2).split(kv_cache.shape[-1] // 2, dim=-1)
    block_size = kv_cache.shape[2]
    for row, slot in enumerate(slots.tolist()):
        key_cache[slot // block_size, slot % block_size] = keys[row]
        value_cache[slot // block_size, slot % block_size] = values[row]


def backend_read(kv_cache, slots):
    key_cache, value_cache = kv_cache.transpose(1, 2).split(kv_cache.shape[-1] // 2, dim=-1)
    block_size = kv_cache.shape[2]
    keys = torch.stack([key_cache[s // block_size, s % block_size] for s in slots.tolist()])
    values = torch.stack([value_cache[s // block_size, s % block_size] for s in slots.tolist()])
    return keys, values


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", list(KVCacheLayout), ids=lambda layout: layout.name)
def test_reads_what_the_backend_wrote_and_writes_what_it_reads(layout, dtype):
    block_size = 4
    views = layer_views(layout, block_size, dtype)
    cache = views[1]  # a middle layer: a strided view into the shared buffer
    tokens = PagedTokens.of([7, 2, 5], block_size, 11, "cpu")  # out of order, as a block table
    keys = torch.randn(11, NUM_HEADS, HEAD_SIZE).to(dtype)
    values = torch.randn(11, NUM_HEADS, HEAD_SIZE).to(dtype)
    backend_write(cache, keys, values, tokens.slots())

    standard = StandardLayout()
    assert torch.equal(standard.read_keys(cache, tokens), keys)
    positions = torch.tensor([[0, 10, 3, 3], [9, 1, 2, 8]])  # per head
    heads = torch.arange(NUM_HEADS)
    assert torch.equal(standard.gather_values(cache, tokens, positions), values[positions, heads])

    # Compaction: row i of head h from position positions[i, h], into other blocks.
    targets = PagedTokens.of([3], block_size, 2, "cpu").slots()
    others = [view.clone() for view in (views[0], views[2])]
    standard.write(cache, keys[positions, heads], values[positions, heads], targets)
    got_keys, got_values = backend_read(cache, targets)
    assert torch.equal(got_keys, keys[positions, heads])
    assert torch.equal(got_values, values[positions, heads])
    # The sources and the other layers sharing the buffer are untouched.
    assert torch.equal(standard.read_keys(cache, tokens), keys)
    assert torch.equal(views[0], others[0]) and torch.equal(views[2], others[1])


def test_kernel_blocks_smaller_than_the_schedulers_hold_the_same_slots():
    # vLLM splits a 16-token scheduler block into kernel blocks of 4 consecutive tokens
    # (block b -> kernel blocks 4b .. 4b+3): slot numbers are unchanged.
    kernel = torch.zeros(4 * NUM_BLOCKS, NUM_HEADS, 4, 2 * HEAD_SIZE)
    tokens = PagedTokens.of([6, 1], 16, 20, "cpu")
    keys, values = torch.randn(2, 20, NUM_HEADS, HEAD_SIZE).unbind(0)
    backend_write(kernel, keys, values, tokens.slots())
    assert torch.equal(StandardLayout().read_keys(kernel, tokens), keys)
    assert torch.equal(kernel[4 * 6 + 1, :, 2, :HEAD_SIZE], keys[6])  # token 6: 2nd kernel block


def test_rows_that_do_not_fill_an_entry_are_refused():
    cache = torch.zeros(2, NUM_HEADS, 4, 2 * HEAD_SIZE)
    short = torch.zeros(1, NUM_HEADS, HEAD_SIZE - 1)
    with pytest.raises(ValueError, match="width"):
        StandardLayout().write(cache, short, short, torch.tensor([0]))


def test_slots_follow_the_block_list():
    assert PagedTokens.of((4, 1, 6), 2, 5, "cpu").slots().tolist() == [8, 9, 2, 3, 12]
    positions = torch.tensor([[4, 0], [1, 2]])
    assert PagedTokens.of((4, 1, 6), 2, 5, "cpu").slots(positions).tolist() == [[12, 8], [9, 2]]


# --- fp8 caches: uint8 views whose bytes the backends read as a float8 format -----------------

FP8_FORMATS = (torch.float8_e4m3fn, torch.float8_e5m2)


@pytest.mark.parametrize("fp8_format", FP8_FORMATS, ids=str)
@pytest.mark.parametrize("layout", list(KVCacheLayout), ids=lambda layout: layout.name)
def test_fp8_cache_is_scored_dequantised_and_compacted_byte_for_byte(layout, fp8_format):
    block_size, k_scale = 4, 0.375
    views = layer_views(layout, block_size, torch.uint8)  # vLLM allocates fp8 caches as uint8
    cache = views[1]
    tokens = PagedTokens.of([7, 2, 5], block_size, 11, "cpu")
    # Every byte pattern, NaNs and -0 included: compaction must copy them, never re-quantise.
    key_bytes = torch.randint(0, 256, (11, NUM_HEADS, HEAD_SIZE), dtype=torch.uint8)
    value_bytes = torch.randint(0, 256, (11, NUM_HEADS, HEAD_SIZE), dtype=torch.uint8)
    # The backends read and write the uint8 cache through a view in the float8 format.
    backend_write(
        cache.view(fp8_format),
        key_bytes.view(fp8_format),
        value_bytes.view(fp8_format),
        tokens.slots(),
    )
    standard = StandardLayout(fp8_format, k_scale=k_scale)

    # The worker's sequence.
    keys = standard.read_keys(cache, tokens)
    assert torch.equal(keys, key_bytes)
    scoring = standard.scoring_keys(keys)
    expected = key_bytes.view(fp8_format).float() * k_scale
    assert scoring.dtype == torch.float32
    torch.testing.assert_close(scoring, expected, rtol=0, atol=0, equal_nan=True)
    positions = torch.tensor([[0, 10, 3, 3], [9, 1, 2, 8]])
    heads = torch.arange(NUM_HEADS)
    kept_values = standard.gather_values(cache, tokens, positions)
    targets = PagedTokens.of([3], block_size, 2, "cpu").slots()
    others = [view.clone() for view in (views[0], views[2])]
    standard.write(cache, keys[positions, heads], kept_values, targets)

    got_keys, got_values = backend_read(cache.view(fp8_format), targets)
    assert torch.equal(got_keys.view(torch.uint8), key_bytes[positions, heads])
    assert torch.equal(got_values.view(torch.uint8), value_bytes[positions, heads])
    assert torch.equal(standard.read_keys(cache, tokens), key_bytes)
    assert torch.equal(views[0], others[0]) and torch.equal(views[2], others[1])


def test_fp8_scoring_keys_are_what_the_backend_quantised():
    # reshape_and_cache_flash stores value / k_scale in the format; scores see value again.
    fp8_format, k_scale = torch.float8_e4m3fn, 0.125
    cache = torch.zeros(4, NUM_HEADS, 4, 2 * HEAD_SIZE, dtype=torch.uint8)
    tokens = PagedTokens.of([2, 0], 4, 7, "cpu")
    keys = torch.randn(7, NUM_HEADS, HEAD_SIZE).to(fp8_format).float() * k_scale  # exact in fp8
    stored = (keys / k_scale).to(fp8_format).view(torch.uint8)
    backend_write(cache, stored, stored, tokens.slots())
    standard = StandardLayout(fp8_format, k_scale=k_scale)
    assert torch.equal(standard.scoring_keys(standard.read_keys(cache, tokens)), keys)


@pytest.mark.parametrize(
    "backend,kv_cache_dtype,expected",
    [
        ("FLASHINFER", "fp8", torch.float8_e4m3fn),
        ("FLASHINFER", "fp8_e4m3", torch.float8_e4m3fn),
        ("FLASHINFER", "fp8_e5m2", torch.float8_e5m2),
        ("FLASH_ATTN", "fp8", "platform"),
        ("FLASH_ATTN", "fp8_e4m3", "platform"),
        ("TRITON_ATTN", "fp8_e4m3", "platform"),
        ("TRITON_ATTN", "fp8_e5m2", "platform"),  # Triton's write casts to the platform's type
        ("FLASH_ATTN", "auto", None),
        ("TRITON_ATTN", "bfloat16", None),
        ("FLEX_ATTENTION", "float16", None),
    ],
)
def test_stored_fp8_format_is_the_one_each_backend_reads(backend, kv_cache_dtype, expected):
    from vllm.platforms import current_platform

    if expected == "platform":
        expected = current_platform.fp8_dtype()
    assert stored_fp8_format(backend, kv_cache_dtype) == expected


@pytest.mark.parametrize(
    "kv_cache_dtype", ["fp8_per_token_head", "int8_per_token_head", "nvfp4", "fp8_inc"]
)
def test_other_quantised_caches_are_refused(kv_cache_dtype):
    # Their per-token scales or packing would not move with a copy of the K/V bytes.
    with pytest.raises(NotImplementedError, match=kv_cache_dtype):
        stored_fp8_format("TRITON_ATTN", kv_cache_dtype)


def test_rows_of_another_dtype_are_refused():
    # Casting float rows into an fp8 cache would garble it: compaction writes back what it read.
    cache = torch.zeros(2, NUM_HEADS, 4, 2 * HEAD_SIZE, dtype=torch.uint8)
    rows = torch.zeros(1, NUM_HEADS, HEAD_SIZE)
    with pytest.raises(ValueError, match="dtype"):
        StandardLayout(torch.float8_e4m3fn).write(cache, rows, rows, torch.tensor([0]))


def test_non_quantised_keys_are_scored_as_stored():
    keys = torch.randn(4, NUM_HEADS, HEAD_SIZE).to(torch.float16)
    assert StandardLayout().scoring_keys(keys) is keys


def test_layout_for_a_standard_layer_takes_its_stored_format_and_k_scale():
    from types import SimpleNamespace

    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.triton_attn import TritonAttentionImpl

    from vllm_snapkv.adapter.attention import layout_for

    impl = object.__new__(TritonAttentionImpl)  # only its type and kv_cache_dtype matter
    impl.kv_cache_dtype = "fp8_e5m2"
    layout = layout_for(impl, SimpleNamespace(_k_scale_float=0.5, _v_scale_float=2.0))
    assert isinstance(layout, StandardLayout)
    assert (layout.fp8_format, layout.k_scale) == (current_platform.fp8_dtype(), 0.5)


def test_harness_flex_attention_is_torchs_eager_flex_attention_bit_for_bit():
    """The FlexAttention harness evaluates a block mask once for all layers
    (tests/standard_layout_harness.py); its outputs must be torch's eager ``flex_attention``'s,
    bit for bit, for each new block mask (a paged-cache mask like vLLM's: queries of two requests
    over slots of their own blocks, causal)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from standard_layout_harness import eager_flex_attention

    torch.manual_seed(0)
    slots, queries = 128, 24
    query = torch.randn(1, 6, queries, 16)
    key, value = torch.randn(1, 2, slots, 16), torch.randn(1, 2, slots, 16)
    for shift in (0, 16):  # a new block mask (the next step): its own mask, not the last one's
        owner = torch.tensor([0] * 10 + [1] * 14)
        position = torch.cat([torch.arange(30, 40), torch.arange(50, 64)])
        slot_owner = torch.arange(slots) // 16 % 2  # blocks of 16 alternate between requests
        slot_position = (torch.arange(slots) + shift) % 64

        def mask_mod(b, h, q, kv):
            return (owner[q] == slot_owner[kv]) & (slot_position[kv] <= position[q])

        block_mask = create_block_mask(mask_mod, 1, None, queries, slots, device="cpu")
        expected = flex_attention(query, key, value, None, block_mask, 0.25, enable_gqa=True)
        for _ in range(2):  # the second call reuses the evaluated mask
            got = eager_flex_attention(query, key, value, None, block_mask, 0.25, enable_gqa=True)
            assert torch.equal(got, expected)
