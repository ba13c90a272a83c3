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
    """K of the first ``num_tokens`` slots as ``[num_tokens, H, D]``, from the K halves of the
    blocks only.

    For ``vec``/``vec16`` the result is a view over ``[H, D, num_tokens]`` storage: the cache
    already holds K transposed per block, which is the layout the scoring matmul wants, so one
    copy suffices. For ``amx``: one gathering copy and one reordering copy.
    """
    num_blocks, num_heads, block_size, double_dim = kv_cache.shape
    dim = double_dim // 2
    index = torch.as_tensor(block_ids, dtype=torch.long, device=kv_cache.device)
    if isa == "amx":
        keys = kv_cache.view(num_blocks, num_heads, 2, block_size * dim)[:, :, 0][index]
        # [n, H, BS/16, D/2, 16, 2] over (t//16, d//2, t%16, d%2) -> [n * BS, H, D]
        keys = keys.view(-1, num_heads, block_size // 16, dim // 2, 16, 2)
        return keys.permute(0, 2, 4, 1, 3, 5).reshape(-1, num_heads, dim)[:num_tokens]
    if isa not in ("vec", "vec16"):
        return read_kv(kv_cache, block_ids, num_tokens, isa)[0]  # raises, naming the ISA
    # K halves only, as [H, D, blocks, BS]; one gathering copy, then a free reshape.
    keys_t = kv_cache.view(num_blocks, num_heads, 2, dim, block_size)[:, :, 0].permute(1, 2, 0, 3)
    keys_t = keys_t[:, :, index].reshape(num_heads, dim, -1)[:, :, :num_tokens]
    return keys_t.permute(2, 0, 1)


def _entries(
    kv_cache: torch.Tensor, blocks: torch.Tensor, offsets: torch.Tensor, isa: str, values: bool
) -> tuple[torch.Tensor, tuple, tuple[int, ...]]:
    """Where the K (or V) rows of entries ``(blocks[i, h], head h, offsets[i, h])`` lie in the
    packing: a view of the cache, the index into it (the unpack's formulas, per entry; indexing
    gives ``[N, H, *rest]``) and ``rest``, a row's dims in that order. Reading or writing through
    it touches those entries only."""
    num_blocks, num_heads, block_size, double_dim = kv_cache.shape
    dim = double_dim // 2
    heads = torch.arange(num_heads, device=kv_cache.device)
    half = kv_cache.view(num_blocks, num_heads, 2, block_size * dim)[:, :, int(values)]
    every = slice(None)
    if isa in ("vec", "vec16"):
        if values:  # row-major [BS, D]
            view = half.view(num_blocks, num_heads, block_size, dim)
            return view, (blocks, heads, offsets), (dim,)
        # K transposed per block, [D, BS]
        view = half.view(num_blocks, num_heads, dim, block_size)
        return view, (blocks, heads, every, offsets), (dim,)
    if isa == "amx":
        if values:  # [D/16][BS/2][16][2] over (d//16, t//2, d%16, t%2)
            view = half.view(num_blocks, num_heads, dim // 16, block_size // 2, 16, 2)
            index = (blocks, heads, every, offsets // 2, every, offsets % 2)
            return view, index, (dim // 16, 16)
        # K: [BS/16][D/2][16][2] over (t//16, d//2, t%16, d%2)
        view = half.view(num_blocks, num_heads, block_size // 16, dim // 2, 16, 2)
        return view, (blocks, heads, offsets // 16, every, offsets % 16), (dim // 2, 2)
    _unpack(kv_cache[:1], isa)  # raises, naming the ISA
    raise AssertionError("unreachable")


def _gather(
    kv_cache: torch.Tensor, block_ids, positions: torch.Tensor, isa: str, values: bool
) -> torch.Tensor:
    index = torch.as_tensor(block_ids, dtype=torch.long, device=kv_cache.device)
    blocks, offsets = index[positions // kv_cache.shape[2]], positions % kv_cache.shape[2]
    view, entries, _ = _entries(kv_cache, blocks, offsets, isa, values)
    return view[entries].reshape(*positions.shape, kv_cache.shape[-1] // 2)


def gather_keys(
    kv_cache: torch.Tensor, block_ids, positions: torch.Tensor, isa: str
) -> torch.Tensor:
    """K at ``positions`` (``[N, H]``: row i of head h is position ``positions[i, h]``) as
    ``[N, H, D]``, read in place (only those entries)."""
    return _gather(kv_cache, block_ids, positions, isa, values=False)


def gather_values(
    kv_cache: torch.Tensor, block_ids, positions: torch.Tensor, isa: str
) -> torch.Tensor:
    """V at ``positions`` (``[N, H]``: row i of head h is position ``positions[i, h]``) as
    ``[N, H, D]``, read in place (only those entries)."""
    return _gather(kv_cache, block_ids, positions, isa, values=True)


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


def write_packed(
    kv_cache: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    slot_mapping: torch.Tensor,
    isa: str,
) -> None:
    """Store ``[N, H, D]`` K/V rows, already in the cache's dtype, unchanged at
    ``slot_mapping``, in ``isa``'s packing (pure torch; for fp8 caches, whose op would
    re-quantise): the gathers' indexing, assigned to."""
    if keys.dtype != kv_cache.dtype or values.dtype != kv_cache.dtype:
        raise ValueError(
            f"K/V rows of dtype {keys.dtype}/{values.dtype} for a {kv_cache.dtype} cache: write "
            "back what was read"
        )
    block_size = kv_cache.shape[2]
    blocks, offsets = (slot_mapping // block_size)[:, None], (slot_mapping % block_size)[:, None]
    for rows, is_values in ((keys, False), (values, True)):
        view, entries, rest = _entries(kv_cache, blocks, offsets, isa, is_values)
        view[entries] = rows.reshape(*rows.shape[:2], *rest)


class CpuPackedLayout:
    """:class:`~vllm_snapkv.adapter.layouts.PagedKVLayout` of one CPU attention layer: its ISA
    packing, its cache dtype and (for fp8) the K and V scales scores dequantise with. CPU kernel
    blocks are the scheduler's blocks, so block ids index the cache directly."""

    name = "cpu"

    def __init__(
        self, isa: str, kv_cache_dtype: str = "auto", k_scale: float = 1.0, v_scale: float = 1.0
    ):
        if isa not in SUPPORTED_ISAS:
            _unpack(torch.zeros(1, 1, 16, 32), isa)  # raises, naming the ISA
        self.isa, self.k_scale, self.v_scale = isa, k_scale, v_scale
        self.fp8_format = fp8_format(kv_cache_dtype)

    def read_keys(self, kv_cache: torch.Tensor, tokens: PagedTokens) -> torch.Tensor:
        return read_keys(kv_cache, tokens.block_ids, tokens.num_tokens, self.isa)

    def scoring_keys(self, keys: torch.Tensor) -> torch.Tensor:
        return dequantised(keys, self.fp8_format, self.k_scale)

    def scoring_values(self, values: torch.Tensor) -> torch.Tensor:
        return dequantised(values, self.fp8_format, self.v_scale)

    def gather_keys(
        self, kv_cache: torch.Tensor, tokens: PagedTokens, positions: torch.Tensor
    ) -> torch.Tensor:
        return gather_keys(kv_cache, tokens.block_ids, positions, self.isa)

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
