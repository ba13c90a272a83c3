"""Test-only harness: vLLM's FlexAttention backend on the CPU build.

vLLM 0.32 gives every non-CPU attention backend one standard KV layout (a logical
``[blocks, kv_heads, block_size, head_size + head_size_v]`` view), and FlexAttention is one of
them. Its implementation runs on the CPU wheel with three substitutions (facts:
shared/docs/gpu-backends.md), so the plugin's standard-layout path (capture, selection,
compaction, block swaps, physical lengths) runs end to end here through vLLM's own GPU-backend
code. Never imported by the product.

1. ``CpuPlatform.get_attn_backend_cls`` returns FLEX_ATTENTION (the CPU platform otherwise always
   picks CPU_ATTN) — only while an engine is being built inside :func:`flex_attention_on_cpu`;
2. ``FlexAttentionImpl.do_kv_cache_update`` writes the step's K/V with pure torch (the CPU wheel
   has no ``_C_cache_ops.reshape_and_cache_flash``);
3. ``flex_attention_compiled`` is eager flex attention (the compiled one trips an inductor CPU
   lowering assertion), with its mask evaluated once per block mask instead of once per layer:
   :func:`eager_flex_attention`.

Eager flex attention is torch's math reference: every call evaluates the mask function, vmapped,
at every (query, cache slot) pair of the whole paged cache, which was three quarters of these
engine tests' time (py-spy). vLLM builds one block mask per step and KV-cache group and hands the
same object to all its layers, so :func:`eager_flex_attention` evaluates that mask once (the same
vmapped evaluation, through ``create_mask``) and then runs the math reference's own arithmetic:
the same operations in the same order, so the same bits (tests/test_layout_standard.py checks it
against torch's eager ``flex_attention``). Calls it does not cover (a score_mod, auxiliary
outputs) go to torch's eager ``flex_attention`` unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch

#: FlexAttention accepts 16-token blocks (CPU_ATTN needs multiples of 32).
BLOCK_SIZE = 16


def _write_slots(self, layer, key, value, kv_cache, slot_mapping) -> None:
    # (B, H, N, 2*hs) -> (B, N, H, hs) views, as the CUDA op sees them.
    key_cache, value_cache = kv_cache.transpose(1, 2).split(self.head_size, dim=-1)
    num_tokens = slot_mapping.shape[0]
    valid = slot_mapping >= 0  # padded tokens carry -1
    slots = slot_mapping[valid]
    blocks, offsets = slots // key_cache.shape[1], slots % key_cache.shape[1]
    key_cache[blocks, offsets] = key[:num_tokens][valid].to(key_cache.dtype)
    value_cache[blocks, offsets] = value[:num_tokens][valid].to(value_cache.dtype)


class _MaskOfLastBlockMask:
    """The dense mask of the block mask last seen. It holds that block mask, so a new one (vLLM
    builds one per step and group) can never reuse its identity while the mask is kept."""

    block_mask = None
    dense: torch.Tensor | None = None

    def of(self, block_mask, batch: int, heads: int, queries: int, slots: int, device):
        from torch.nn.attention.flex_attention import create_mask

        shape = (batch, heads, queries, slots)
        if self.block_mask is not block_mask or tuple(self.dense.shape) != shape:
            self.dense = create_mask(block_mask.mask_mod, *shape, device=device)
            self.block_mask = block_mask
        return self.dense


_last_mask = _MaskOfLastBlockMask()


def eager_flex_attention(query, key, value, score_mod=None, block_mask=None, scale=None,
                         enable_gqa=False, return_lse=False, kernel_options=None,
                         return_aux=None, **kwargs):
    """torch's eager ``flex_attention`` (its math reference, ``math_attention``), with the mask
    evaluated once per block mask (module docstring)."""
    from torch.nn.attention.flex_attention import flex_attention

    if score_mod is not None or block_mask is None or return_lse or return_aux is not None or kwargs:
        return flex_attention(query, key, value, score_mod, block_mask, scale,
                              enable_gqa=enable_gqa, return_lse=return_lse,
                              kernel_options=kernel_options, return_aux=return_aux, **kwargs)
    if scale is None:
        scale = 1.0 / math.sqrt(query.size(-1))
    groups = query.size(1) // key.size(1)
    key = torch.repeat_interleave(key, groups, dim=1).expand(query.size(0), -1, -1, -1)
    value = torch.repeat_interleave(value, groups, dim=1).expand(query.size(0), -1, -1, -1)
    precision = torch.float64 if query.dtype == torch.float64 else torch.float32
    scores = query.to(precision) @ key.to(precision).transpose(-2, -1)
    scores = (scores * scale).to(precision)
    mask = _last_mask.of(block_mask, *scores.shape, device=scores.device)
    scores = torch.where(mask, scores, torch.tensor(-float("inf"), dtype=precision,
                                                    device=scores.device))
    return torch._safe_softmax(scores, dim=-1).to(query.dtype) @ value.to(query.dtype)


def _install_flex_substitutions() -> None:
    from vllm.v1.attention.backends import flex_attention as flex_module

    flex_module.flex_attention_compiled = eager_flex_attention
    flex_module.FlexAttentionImpl.do_kv_cache_update = _write_slots


@contextmanager
def flex_attention_on_cpu() -> Iterator[None]:
    """Engines built inside this block run FlexAttention instead of CPU_ATTN (in-process engine
    cores only: the substitutions live in this process)."""
    from vllm.platforms.cpu import CpuPlatform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    _install_flex_substitutions()
    original = CpuPlatform.__dict__["get_attn_backend_cls"]

    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None):
        if attn_selector_config.use_mla or attn_selector_config.use_sparse:
            return original.__func__(cls, selected_backend, attn_selector_config, num_heads)
        return AttentionBackendEnum.FLEX_ATTENTION.get_path()

    CpuPlatform.get_attn_backend_cls = classmethod(get_attn_backend_cls)
    try:
        yield
    finally:
        CpuPlatform.get_attn_backend_cls = original


def flex_kv_caches(llm) -> list[torch.Tensor]:
    """The layer caches of an in-process engine's worker (for layout assertions)."""
    runner = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner
    return runner.kv_caches
