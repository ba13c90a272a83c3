"""The attention backends SnapKV hooks in vLLM 0.32, and the KV layout each one stores.

Window-query capture and compaction run right after vLLM's own attention in each layer, inside
the implementation's ``forward`` (so on the layer's device and stream, after the step's K/V were
written). Each supported backend names the implementation class whose ``forward`` is wrapped and
the layout of its cache (:mod:`vllm_snapkv.adapter.layouts`). A model whose layers run any other
implementation is refused when its worker initialises the KV cache, naming the backend.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from typing import Any

import torch

from vllm_snapkv.adapter.layouts import PagedKVLayout

#: Dtypes vLLM's ``QuantFP8`` produces for queries (``current_platform.fp8_dtype()``).
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e4m3fnuz)


@dataclass(frozen=True)
class SupportedBackend:
    """One attention backend: ``name`` as vLLM spells it (``--attention-backend``)."""

    name: str
    module: str
    impl_class: str
    layout: str  # "cpu" or "standard"

    def load_impl(self) -> type | None:
        """The implementation class, or None where its module cannot be imported (FlashInfer
        without the ``flashinfer`` package: vLLM cannot select that backend either)."""
        try:
            return getattr(importlib.import_module(self.module), self.impl_class)
        except ImportError:
            return None


_BACKENDS = "vllm.v1.attention.backends"

SUPPORTED_BACKENDS: tuple[SupportedBackend, ...] = (
    SupportedBackend("CPU_ATTN", f"{_BACKENDS}.cpu_attn", "CPUAttentionBackendImpl", "cpu"),
    SupportedBackend("FLASH_ATTN", f"{_BACKENDS}.flash_attn", "FlashAttentionImpl", "standard"),
    SupportedBackend("TRITON_ATTN", f"{_BACKENDS}.triton_attn", "TritonAttentionImpl", "standard"),
    SupportedBackend("FLASHINFER", f"{_BACKENDS}.flashinfer", "FlashInferImpl", "standard"),
    SupportedBackend(
        "FLEX_ATTENTION", f"{_BACKENDS}.flex_attention", "FlexAttentionImpl", "standard"
    ),
)


@functools.cache
def loaded_impls() -> tuple[tuple[SupportedBackend, type], ...]:
    """Every supported backend whose implementation imports in this process."""
    return tuple((b, impl) for b in SUPPORTED_BACKENDS if (impl := b.load_impl()) is not None)


def backend_of(impl: Any) -> SupportedBackend | None:
    for backend, impl_class in loaded_impls():
        if type(impl) is impl_class:
            return backend
    return None


class UnsupportedAttentionBackend(ValueError):
    """A layer runs an attention implementation SnapKV cannot compact."""


def check_attention_layers(layers: dict[str, Any]) -> dict[str, SupportedBackend]:
    """The backend of every attention layer (``name -> vLLM Attention module``); raises naming
    the backend when any layer's implementation is not supported."""
    backends = {}
    for name, layer in layers.items():
        impl = getattr(layer, "impl", None)
        backend = backend_of(impl)
        if backend is None:
            attn_backend = getattr(layer, "attn_backend", None)
            backend_name = attn_backend.get_name() if attn_backend else type(impl).__name__
            raise UnsupportedAttentionBackend(
                f"kv_compression: attention backend {backend_name} (layer {name}, "
                f"{type(impl).__name__}) is not supported by vllm-snapkv; supported: "
                f"{', '.join(b.name for b in SUPPORTED_BACKENDS)}. Choose one with "
                "--attention-backend or turn compression off."
            )
        reason = uncompressible_reason(layer)
        if reason:
            raise UnsupportedAttentionBackend(
                f"kv_compression: layer {name} uses {reason}; SnapKV cannot compress it "
                "correctly. Turn compression off for this model (leave out --kv-compression, "
                "or set kv_compression to 'none')."
            )
        backends[name] = backend
    return backends


def uncompressible_reason(layer: Any) -> str | None:
    """Why a layer of a full-attention KV cache group cannot be compacted, or None.

    - ALiBi: the kernels add ``slope * (key index - query index)`` from *physical* key indices,
      which compaction shifts, and the window scores would miss the bias.
    - A sliding window inside a full-attention group (vLLM's hybrid KV cache manager turned
      off): the kernel's window is counted back from the physical length, so after compaction it
      would cover kept entries from long before the window.
    - KV sharing (``kv_sharing_target_layer_name``: Gemma 3n, the "fast prefill" variants): the
      layer is in its target's group and reads the target's cache, which would be compacted
      twice (with fresh targets the second selection replaces the first; in place the second
      pass reads entries the first already overwrote).
    """
    impl = layer.impl
    target = getattr(layer, "kv_sharing_target_layer_name", None)
    if target is not None:
        return (
            f"KV sharing: it reads the KV cache of layer {target} (vLLM puts both in one KV "
            "cache group, so the shared cache would be compacted once per layer, each pass "
            "with its own selection)"
        )
    if getattr(impl, "alibi_slopes", None) is not None:
        return "ALiBi position biases (computed from key indices, which compaction changes)"
    if getattr(layer, "sliding_window", None) is not None:
        return (
            "sliding-window attention inside a full-attention KV cache group (vLLM's hybrid KV "
            "cache manager is off, e.g. --disable-hybrid-kv-cache-manager or a KV connector)"
        )
    return None


def scoring_options(impl: Any) -> dict[str, Any]:
    """What the layer's own softmax adds to ``Q K^T * scale``: learned sinks (gpt-oss) and logit
    soft-capping (Gemma 2); backends spell "none" as None or 0."""
    return {
        "sinks": getattr(impl, "sinks", None),
        "soft_cap": getattr(impl, "logits_soft_cap", None) or None,
    }


def layout_for(impl: Any, layer: Any) -> PagedKVLayout:
    """The layout of ``layer``'s cache, from the implementation vLLM runs for it: its cache dtype
    (``impl.kv_cache_dtype``) and, for fp8 caches, the layer's K and V scales the scores
    dequantise with."""
    backend = backend_of(impl)
    if backend is None:
        raise UnsupportedAttentionBackend(f"no KV layout for {type(impl).__name__}")
    if backend.layout == "cpu":
        from vllm_snapkv.adapter.layouts.cpu import CpuPackedLayout

        return CpuPackedLayout(
            layer.isa,
            kv_cache_dtype=impl.kv_cache_dtype,
            k_scale=layer._k_scale_float,
            v_scale=layer._v_scale_float,
        )
    from vllm_snapkv.adapter.layouts.standard import StandardLayout, stored_fp8_format

    return StandardLayout(
        stored_fp8_format(backend.name, impl.kv_cache_dtype),
        k_scale=layer._k_scale_float,
        v_scale=layer._v_scale_float,
    )


def unquantised_queries(layer: Any, rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Query rows ``[n, H_q, D]`` as the layer's ``Attention.forward`` received them. With an fp8
    KV cache on a backend that takes quantised queries (``impl.supports_quant_query_input``:
    FlashAttention 3, Triton on CUDA, FlashInfer's trtllm path), vLLM hands the implementation
    ``query_quant(query, _q_scale)``, fp8 values of ``query / q_scale``; scoring those as they
    are would use the wrong softmax temperature with a calibrated scale (and fp8 is what
    attention reads, but the window scores are defined on the layer's queries). Dequantised with
    the layer's ``_q_scale`` (per tensor, or per KV head), in ``dtype``; other rows unchanged."""
    if getattr(layer, "query_quant", None) is None or rows.dtype not in FP8_DTYPES:
        return rows
    scale = layer._q_scale.to(device=rows.device, dtype=torch.float32)
    num_rows, num_heads, head_size = rows.shape
    if scale.numel() == 1:
        return (rows.float() * scale.reshape(())).to(dtype)
    # Per KV head (QuantFP8's group shape (-1, head_size * H_q / H_kv)): one scale per group of
    # query heads sharing a KV head.
    grouped = rows.float().view(num_rows, scale.numel(), -1, head_size)
    return (grouped * scale.view(1, -1, 1, 1)).view(num_rows, num_heads, head_size).to(dtype)
