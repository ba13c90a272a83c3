"""Paged KV-cache layouts the compaction reads and writes, one module per layout.

- :mod:`.cpu` — vLLM's CPU attention backend (``CPU_ATTN``): K/V packed per (block, head) by the
  attention ISA; writes go through vLLM's own CPU cache-write op.
- :mod:`.standard` — the layout vLLM 0.32 gives every non-CPU backend (FlashAttention, Triton,
  FlashInfer, FlexAttention): a logical ``[blocks, kv_heads, block_size, head_size + head_size_v]``
  view whose strides encode the physical ``KVCacheLayout``; pure torch.

Both implement :class:`PagedKVLayout`. Which one a layer uses is decided from the attention
implementation vLLM instantiated for it (``vllm_snapkv.adapter.attention``), never guessed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


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


class PagedKVLayout(Protocol):
    """Read one request's K/V out of a layer's paged cache and write compacted rows back.

    Keys and values are ``[tokens, kv_heads, dim]`` in the cache's dtype. ``dim`` is the width
    the layout stores (it may exceed the model's head size when a backend pads); callers score
    with the first ``head_size`` dims and write back what they read.
    """

    def read_keys(self, kv_cache: torch.Tensor, tokens: PagedTokens) -> torch.Tensor:
        """K of every token of ``tokens`` as ``[num_tokens, H, dim]`` (may be a view of a copy)."""
        ...

    def gather_values(
        self, kv_cache: torch.Tensor, tokens: PagedTokens, positions: torch.Tensor
    ) -> torch.Tensor:
        """V at ``positions`` (``[N, H]``: row i of head h is position ``positions[i, h]``)."""
        ...

    def write(
        self, kv_cache: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor
    ) -> None:
        """Store row i of ``keys``/``values`` (``[N, H, dim]``) at slot ``slots[i]``, every head."""
        ...
