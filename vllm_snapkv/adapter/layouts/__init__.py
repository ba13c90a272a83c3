"""Paged KV-cache layouts the compaction reads and writes, one module per layout.

- :mod:`.cpu` — vLLM's CPU attention backend (``CPU_ATTN``): K/V packed per (block, head) by the
  attention ISA; writes go through vLLM's own CPU cache-write op.
- :mod:`.standard` — the layout vLLM 0.32 gives every non-CPU backend (FlashAttention, Triton,
  FlashInfer, FlexAttention): a logical ``[blocks, kv_heads, block_size, head_size + head_size_v]``
  view whose strides encode the physical ``KVCacheLayout``; pure torch.

Both implement :class:`PagedKVLayout`. Which one a layer uses is decided from the attention
implementation vLLM instantiated for it (``vllm_snapkv.adapter.attention``), never guessed.

fp8 caches (``--kv-cache-dtype fp8|fp8_e4m3|fp8_e5m2``, one scale per layer and tensor) hold
bytes: layouts read and write those bytes unchanged, so kept entries stay bit-identical to what
vLLM stored (re-quantising would not: vLLM's CPU quantiser maps -0.0 to +0.0 and truncates), and
only the scores see dequantised keys (:meth:`PagedKVLayout.scoring_keys`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

#: Float8 format of each per-tensor-scaled fp8 ``--kv-cache-dtype``, as vLLM names them (``fp8``
#: is e4m3). A layout may store another format for a name (see ``layouts.standard``).
FP8_FORMATS: dict[str, torch.dtype] = {
    "fp8": torch.float8_e4m3fn,
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}


def fp8_format(kv_cache_dtype: str) -> torch.dtype | None:
    """The float8 format ``kv_cache_dtype`` names; None for a cache that is not quantised.

    Other quantised caches (per-token-head scales, nvfp4, ...) keep scales or packing that a copy
    of the K/V bytes alone would not move: they are refused rather than compacted wrong.
    """
    # Imported here: the layouts themselves are pure torch (benchmarks/gpu/compaction.py runs
    # them where vLLM is not installed).
    from vllm.v1.kv_cache_interface import is_quantized_kv_cache

    if not is_quantized_kv_cache(kv_cache_dtype):
        return None
    if kv_cache_dtype not in FP8_FORMATS:
        raise NotImplementedError(
            f"vllm-snapkv cannot compact a {kv_cache_dtype!r} KV cache; quantised caches "
            f"supported: {', '.join(FP8_FORMATS)}"
        )
    return FP8_FORMATS[kv_cache_dtype]


def dequantised(stored: torch.Tensor, fmt: torch.dtype | None, scale: float) -> torch.Tensor:
    """What attention computes with for ``stored`` cache elements: fp8 bytes read as ``fmt``
    times the tensor's ``scale``, in float32; elements of a non-quantised cache (``fmt`` None)
    as they are."""
    if fmt is None:
        return stored
    return stored.view(fmt).float() * scale


@dataclass(frozen=True)
class PagedTokens:
    """Tokens ``0 .. num_tokens-1`` of one request, stored in ``block_ids`` (the scheduler's
    blocks of ``block_size`` tokens, a long tensor on the cache's device)."""

    block_ids: torch.Tensor
    block_size: int
    num_tokens: int

    @classmethod
    def of(cls, block_ids, block_size: int, num_tokens: int, device) -> "PagedTokens":
        ids = torch.as_tensor(list(block_ids), dtype=torch.long).to(device, non_blocking=True)
        return cls(ids, block_size, num_tokens)

    def slots(self, positions: torch.Tensor | None = None) -> torch.Tensor:
        """vLLM slot numbers (``block * block_size + offset``) of ``positions`` (any shape;
        default: every token), in the scheduler's block size."""
        if positions is None:
            positions = torch.arange(self.num_tokens, device=self.block_ids.device)
        return self.block_ids[positions // self.block_size] * self.block_size + (
            positions % self.block_size
        )

    def span(self, start: int, end: int) -> tuple["PagedTokens", int]:
        """Tokens ``[start, end)`` in whole blocks: the tokens of the blocks that hold them, from
        the first of those blocks' start up to ``end`` (a view of ``block_ids``, no copy), and
        where ``start`` lies in them."""
        if not 0 <= start < end <= self.num_tokens:
            raise ValueError(f"span [{start}, {end}) outside tokens [0, {self.num_tokens})")
        first = start // self.block_size
        last = -(-end // self.block_size)
        offset = first * self.block_size
        sub = PagedTokens(self.block_ids[first:last], self.block_size, end - offset)
        return sub, start - offset


class PagedKVLayout(Protocol):
    """Read one request's K/V out of a layer's paged cache and write compacted rows back.

    Keys and values are ``[tokens, kv_heads, dim]`` as the cache stores them: in the cache's
    dtype, which for an fp8 cache means its raw bytes (uint8). ``dim`` is the width the layout
    stores (it may exceed the model's head size when a backend pads); callers score
    ``scoring_keys`` of the first ``head_size`` dims and write back rows of what they read.
    """

    def read_keys(self, kv_cache: torch.Tensor, tokens: PagedTokens) -> torch.Tensor:
        """K of every token of ``tokens`` as ``[num_tokens, H, dim]`` (may be a view of a copy)."""
        ...

    def scoring_keys(self, keys: torch.Tensor) -> torch.Tensor:
        """``keys`` (rows of :meth:`read_keys`) as the values attention sees, for scoring:
        dequantised to float32 with the layer's K scale for an fp8 cache; ``keys`` itself
        otherwise (the scorer computes in float32 whatever the dtype)."""
        ...

    def scoring_values(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` (rows of :meth:`gather_values`) as attention sees them, for value-aware
        selection rules: dequantised to float32 with the layer's V scale for an fp8 cache;
        ``values`` itself otherwise."""
        ...

    def gather_keys(
        self, kv_cache: torch.Tensor, tokens: PagedTokens, positions: torch.Tensor
    ) -> torch.Tensor:
        """K at ``positions`` (``[N, H]``: row i of head h is position ``positions[i, h]``) as
        ``[N, H, dim]``, a copy; reads nothing beyond those entries."""
        ...

    def gather_values(
        self, kv_cache: torch.Tensor, tokens: PagedTokens, positions: torch.Tensor
    ) -> torch.Tensor:
        """V at ``positions`` (``[N, H]``: row i of head h is position ``positions[i, h]``) as
        ``[N, H, dim]``, a copy; reads nothing beyond those entries."""
        ...

    def write(
        self, kv_cache: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor
    ) -> None:
        """Store row i of ``keys``/``values`` (``[N, H, dim]``, rows of what :meth:`read_keys`,
        :meth:`gather_keys` and :meth:`gather_values` returned) at slot ``slots[i]``, every head,
        unchanged."""
        ...


def read_key_span(
    layout: PagedKVLayout, kv_cache: torch.Tensor, tokens: PagedTokens, start: int, end: int
) -> torch.Tensor:
    """K of tokens ``[start, end)`` as ``[end - start, H, dim]``: ``layout.read_keys`` of the
    blocks holding them (one copy of at most ``end - start + 2 * block_size`` rows), sliced."""
    sub, offset = tokens.span(start, end)
    return layout.read_keys(kv_cache, sub)[offset:]


def read_value_span(
    layout: PagedKVLayout, kv_cache: torch.Tensor, tokens: PagedTokens, start: int, end: int
) -> torch.Tensor:
    """V of tokens ``[start, end)`` as ``[end - start, H, dim]``: ``layout.gather_values`` of
    exactly those entries (one copy of ``end - start`` rows per head)."""
    positions = torch.arange(start, end, device=tokens.block_ids.device)
    return layout.gather_values(kv_cache, tokens, positions[:, None].expand(-1, kv_cache.shape[1]))
