"""The standard KV layout of vLLM 0.32's non-CPU attention backends (RFC #42082).

A layer's cache tensor is the *logical* view ``[num_blocks, num_kv_heads, block_size, C]`` with
``C = head_size + head_size_v`` (K in the first half of the last dimension, V in the second),
however it is laid out in memory: the physical ``KVCacheLayout`` order (LBNHC by default, HND for
FlashInfer on SM100, ...) and views into one buffer shared by all layers only change the strides.
Indexing the logical view is therefore correct for every order; nothing here assumes
contiguity. Pure torch on the cache's device: advanced indexing reads copies, ``index_put_`` writes
through the view into the shared storage.

The kernel block size of the cache may be smaller than the scheduler's (vLLM splits a manager
block into kernel blocks of consecutive tokens); slots are the same numbers in both, so a slot
``s`` lives at kernel block ``s // N``, offset ``s % N`` with ``N = kv_cache.shape[2]``.

An fp8 cache is a uint8 view (vLLM allocates ``STR_DTYPE_TO_TORCH_DTYPE[fp8*] = uint8``); the
backends reinterpret its bytes as a float8 type (:func:`stored_fp8_format`) holding
``value / scale``. Rows move as bytes, so compaction never re-quantises.
"""

from __future__ import annotations

import torch

from vllm_snapkv.adapter.layouts import PagedTokens, dequantised, fp8_format


def stored_fp8_format(backend: str, kv_cache_dtype: str) -> torch.dtype | None:
    """The float8 format of the bytes ``backend`` (vLLM's name) stores for ``kv_cache_dtype``;
    None for a cache that is not quantised.

    FlashInfer stores the format named (``get_dtype_for_flashinfer``: e4m3fn or e5m2, which
    ``reshape_and_cache_flash`` quantises to). FlashAttention (fp8/fp8_e4m3 only) and Triton view
    the cache as ``current_platform.fp8_dtype()`` for every fp8 name, and Triton's write kernel
    casts to that view, so a Triton ``fp8_e5m2`` cache holds e4m3 bytes.
    """
    named = fp8_format(kv_cache_dtype)
    if named is None or backend == "FLASHINFER":
        return named
    from vllm.platforms import current_platform  # here: the layout itself is pure torch

    return current_platform.fp8_dtype()


class StandardLayout:
    """:class:`~vllm_snapkv.adapter.layouts.PagedKVLayout` of the standard layout. ``fp8_format``:
    the float8 type an fp8 cache's bytes encode (None: not quantised); ``k_scale``: the layer's
    per-tensor K scale, which scores dequantise with; ``v_scale``: its V scale (value-aware
    selection rules)."""

    name = "standard"

    def __init__(
        self, fp8_format: torch.dtype | None = None, k_scale: float = 1.0, v_scale: float = 1.0
    ):
        self.fp8_format, self.k_scale, self.v_scale = fp8_format, k_scale, v_scale

    @staticmethod
    def _locate(kv_cache: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        block_size = kv_cache.shape[2]
        return slots // block_size, slots % block_size

    @staticmethod
    def _half(kv_cache: torch.Tensor) -> int:
        # Backends split K|V at C // 2 (Triton pads both halves alike), never at head_size_v.
        return kv_cache.shape[-1] // 2

    def read_keys(self, kv_cache: torch.Tensor, tokens: PagedTokens) -> torch.Tensor:
        blocks, offsets = self._locate(kv_cache, tokens.slots())
        # Advanced indices around a slice: the indexed dim comes first -> [N, H, half].
        return kv_cache[blocks, :, offsets, : self._half(kv_cache)]

    def scoring_keys(self, keys: torch.Tensor) -> torch.Tensor:
        return dequantised(keys, self.fp8_format, self.k_scale)

    def scoring_values(self, values: torch.Tensor) -> torch.Tensor:
        return dequantised(values, self.fp8_format, self.v_scale)

    def _gather(self, kv_cache, tokens: PagedTokens, positions: torch.Tensor, values: bool):
        blocks, offsets = self._locate(kv_cache, tokens.slots(positions))
        heads = torch.arange(kv_cache.shape[1], device=kv_cache.device)
        half = self._half(kv_cache)
        return kv_cache[blocks, heads, offsets, slice(half, None) if values else slice(half)]

    def gather_keys(
        self, kv_cache: torch.Tensor, tokens: PagedTokens, positions: torch.Tensor
    ) -> torch.Tensor:
        return self._gather(kv_cache, tokens, positions, values=False)

    def gather_values(
        self, kv_cache: torch.Tensor, tokens: PagedTokens, positions: torch.Tensor
    ) -> torch.Tensor:
        return self._gather(kv_cache, tokens, positions, values=True)

    def write(
        self, kv_cache: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor
    ) -> None:
        if keys.shape[-1] + values.shape[-1] != kv_cache.shape[-1]:
            raise ValueError(
                f"K/V rows of width {keys.shape[-1]}+{values.shape[-1]} do not fill a cache "
                f"entry of width {kv_cache.shape[-1]}"
            )
        if keys.dtype != kv_cache.dtype or values.dtype != kv_cache.dtype:
            # A cast would re-quantise (or garble the bytes of) an fp8 cache.
            raise ValueError(
                f"K/V rows of dtype {keys.dtype}/{values.dtype} for a {kv_cache.dtype} cache: "
                "write back what was read"
            )
        blocks, offsets = self._locate(kv_cache, slots)
        kv_cache[blocks, :, offsets] = torch.cat([keys, values], dim=-1)
