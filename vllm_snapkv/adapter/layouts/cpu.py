"""The CPU attention backend's paged KV layout (``CPU_ATTN``, vLLM 0.32).

Layer cache: ``[num_blocks, num_kv_heads, block_size, 2 * head_size]``. Per (block, head) the first
``block_size * head_size`` elements hold K and the rest V, packed by the attention ISA that
``cpu_attn_reshape_and_cache`` writes with (``layer.isa``). Reads unpack with the formulas below
(round-trip tested against the real op in tests/test_layout_cpu.py).

fp8 caches are uint8 tensors, one byte per element in the same packed positions (``vec``, or
``amx`` with a bf16 model on an AMX CPU; vLLM needs AVX-512 or AMX for them), quantised by the op
as ``value / scale`` to e4m3 (``fp8``, ``fp8_e4m3``) or e5m2. Writes of a non-quantised cache go
through vLLM's own op, so they stay correct by construction. That op only quantises from floats,
and re-quantising dequantised bytes is not the identity (it stores -0.0 as +0.0, and it truncates,
so ``q * scale / scale`` just below ``q`` lands one code lower: measured on vLLM 0.32), so fp8
rows are written by :func:`write_packed`, the unpack's exact inverse.
"""

from __future__ import annotations

import torch
from vllm import _custom_ops as ops

from vllm_snapkv.adapter.layouts import PagedTokens, dequantised, fp8_format

#: ISAs whose packing :func:`read_kv` knows. Others fail at the first compaction.
SUPPORTED_ISAS = ("vec", "vec16", "amx")


def _unpack(blocks: torch.Tensor, isa: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``[n, H, BS, 2D]`` packed blocks -> K and V as ``[n, H, BS, D]``. Element positions, not
    element sizes: fp8 bytes sit where bf16 elements would."""
    num_blocks, num_heads, block_size, double_dim = blocks.shape
    dim = double_dim // 2
    flat = blocks.reshape(num_blocks, num_heads, 2 * block_size * dim)
    keys, values = flat[..., : block_size * dim], flat[..., block_size * dim :]
    shape = (num_blocks, num_heads, block_size, dim)
    if isa in ("vec", "vec16"):
        # K transposed per block: element (t, d) at d * BS + t. V row-major.
        return keys.reshape(num_blocks, num_heads, dim, block_size).transpose(-1, -2), (
            values.reshape(shape)
        )
    if isa == "amx":
        # K: [BS/16][D/2][16][2] over (t//16, d//2, t%16, d%2).
        k = keys.reshape(num_blocks, num_heads, block_size // 16, dim // 2, 16, 2)
        # V: [D/16][BS/2][16][2] over (d//16, t//2, d%16, t%2).
        v = values.reshape(num_blocks, num_heads, dim // 16, block_size // 2, 16, 2)
        return (
            k.permute(0, 1, 2, 4, 3, 5).reshape(shape),
            v.permute(0, 1, 3, 5, 2, 4).reshape(shape),
        )
    raise NotImplementedError(
        f"vllm-snapkv cannot read the CPU KV cache packed for ISA {isa!r}; "
        f"supported: {', '.join(SUPPORTED_ISAS)}"
    )


def read_kv(
    kv_cache: torch.Tensor, block_ids: list[int], num_tokens: int, isa: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of the first ``num_tokens`` slots of ``block_ids``, each ``[num_tokens, H, D]``."""
    index = torch.as_tensor(block_ids, dtype=torch.long, device=kv_cache.device)
    keys, values = _unpack(kv_cache.index_select(0, index), isa)

    def tokens_first(x: torch.Tensor) -> torch.Tensor:
        # [n, H, BS, D] -> [n * BS, H, D]
        return x.permute(0, 2, 1, 3).reshape(-1, x.shape[1], x.shape[3])[:num_tokens]

    return tokens_first(keys), tokens_first(values)


def read_keys(kv_cache: torch.Tensor, block_ids: list[int], num_tokens: int, isa: str):
    """K of the first ``num_tokens`` slots as ``[num_tokens, H, D]``.

    For ``vec``/``vec16`` the result is a view over ``[H, D, num_tokens]`` storage: the cache
    already holds K transposed per block, which is the layout the scoring matmul wants, so one
    copy suffices.
    """
    if isa not in ("vec", "vec16"):
        return read_kv(kv_cache, block_ids, num_tokens, isa)[0]
    num_blocks, num_heads, block_size, double_dim = kv_cache.shape
    dim = double_dim // 2
    index = torch.as_tensor(block_ids, dtype=torch.long, device=kv_cache.device)
    # K halves only, as [H, D, blocks, BS]; one gathering copy, then a free reshape.
    keys_t = kv_cache.view(num_blocks, num_heads, 2, dim, block_size)[:, :, 0].permute(1, 2, 0, 3)
    keys_t = keys_t[:, :, index].reshape(num_heads, dim, -1)[:, :, :num_tokens]
    return keys_t.permute(2, 0, 1)


def gather_values(
    kv_cache: torch.Tensor, block_ids: list[int], positions: torch.Tensor, isa: str
) -> torch.Tensor:
    """V at ``positions`` (``[N, H]``: row i of head h is position ``positions[i, h]``) as
    ``[N, H, D]``, read in place where the layout allows (``vec``/``vec16``: V is row-major)."""
    num_heads = kv_cache.shape[1]
    heads = torch.arange(num_heads, device=kv_cache.device)
    if isa not in ("vec", "vec16"):
        values = read_kv(kv_cache, block_ids, int(positions.max()) + 1, isa)[1]
        return values[positions, heads]
    num_blocks, _, block_size, double_dim = kv_cache.shape
    values = kv_cache.view(num_blocks, num_heads, 2, block_size, double_dim // 2)[:, :, 1]
    blocks = torch.as_tensor(block_ids, dtype=torch.long, device=kv_cache.device)
    return values[blocks[positions // block_size], heads, positions % block_size]


def write_kv(
    kv_cache: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    slot_mapping: torch.Tensor,
    isa: str,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    kv_cache_dtype: str = "auto",
) -> None:
    """Write ``[N, H, D]`` K/V rows to ``slot_mapping`` with vLLM's CPU cache-write op."""
    num_blocks, num_heads, block_size, _ = kv_cache.shape
    key_cache, value_cache = kv_cache.view(num_blocks, num_heads, 2 * block_size, -1).chunk(2, 2)
    ops.cpu_attn_reshape_and_cache(
        keys,
        values,
        key_cache,
        value_cache,
        slot_mapping,
        isa,
        k_scale=k_scale,
        v_scale=v_scale,
        kv_cache_dtype=kv_cache_dtype,
    )


def _packed_offsets(
    isa: str, block_size: int, dim: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Where K and V element ``(t, d)`` lie in a (block, head)'s ``2 * block_size * dim``
    elements, each ``[block_size, dim]``: the unpack applied to the positions themselves, so a
    write through these offsets is its exact inverse."""
    positions = torch.arange(2 * block_size * dim, device=device)
    keys, values = _unpack(positions.view(1, 1, block_size, 2 * dim), isa)
    return keys[0, 0], values[0, 0]


def write_packed(
    kv_cache: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    slot_mapping: torch.Tensor,
    isa: str,
) -> None:
    """Store ``[N, H, D]`` K/V rows, already in the cache's dtype, unchanged at
    ``slot_mapping``, in ``isa``'s packing (pure torch; for fp8 caches, whose op would
    re-quantise)."""
    if keys.dtype != kv_cache.dtype or values.dtype != kv_cache.dtype:
        raise ValueError(
            f"K/V rows of dtype {keys.dtype}/{values.dtype} for a {kv_cache.dtype} cache: write "
            "back what was read"
        )
    num_blocks, num_heads, block_size, double_dim = kv_cache.shape
    key_offsets, value_offsets = _packed_offsets(isa, block_size, double_dim // 2, kv_cache.device)
    flat = kv_cache.view(num_blocks, num_heads, -1)
    # [N, 1, 1] x [1, H, 1] x [N, 1, D] -> [N, H, D], the rows' shape.
    blocks = (slot_mapping // block_size)[:, None, None]
    heads = torch.arange(num_heads, device=kv_cache.device)[None, :, None]
    offsets = slot_mapping % block_size
    flat[blocks, heads, key_offsets[offsets][:, None]] = keys
    flat[blocks, heads, value_offsets[offsets][:, None]] = values


class CpuPackedLayout:
    """:class:`~vllm_snapkv.adapter.layouts.PagedKVLayout` of one CPU attention layer: its ISA
    packing, its cache dtype and (for fp8) the K scale scores dequantise with. CPU kernel blocks
    are the scheduler's blocks, so block ids index the cache directly."""

    name = "cpu"

    def __init__(self, isa: str, kv_cache_dtype: str = "auto", k_scale: float = 1.0):
        if isa not in SUPPORTED_ISAS:
            _unpack(torch.zeros(1, 1, 16, 32), isa)  # raises, naming the ISA
        self.isa, self.k_scale = isa, k_scale
        self.fp8_format = fp8_format(kv_cache_dtype)

    def read_keys(self, kv_cache: torch.Tensor, tokens: PagedTokens) -> torch.Tensor:
        return read_keys(kv_cache, tokens.block_ids, tokens.num_tokens, self.isa)

    def scoring_keys(self, keys: torch.Tensor) -> torch.Tensor:
        return dequantised(keys, self.fp8_format, self.k_scale)

    def gather_values(
        self, kv_cache: torch.Tensor, tokens: PagedTokens, positions: torch.Tensor
    ) -> torch.Tensor:
        return gather_values(kv_cache, tokens.block_ids, positions, self.isa)

    def write(
        self, kv_cache: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor
    ) -> None:
        if self.fp8_format is not None:
            write_packed(kv_cache, keys, values, slots, self.isa)
        else:
            write_kv(kv_cache, keys.contiguous(), values.contiguous(), slots, self.isa)
