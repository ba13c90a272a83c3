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
   lowering assertion).
"""

from __future__ import annotations

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


def _install_flex_substitutions() -> None:
    from torch.nn.attention.flex_attention import flex_attention
    from vllm.v1.attention.backends import flex_attention as flex_module

    flex_module.flex_attention_compiled = flex_attention
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
