"""Account the compaction workspace in vLLM's memory profiling (CUDA).

Compacting one request in one layer needs temporary memory bounded by
``selection.compaction_workspace_bytes`` (prompt-length independent; ~136 MiB for a
Llama-3.1-8B shape at budget 4096). vLLM sizes the KV cache from the peak memory of its profiling
run; a workspace it never saw could push a compaction step past ``gpu_memory_utilization``. With
decode compression on, the bound of the buffered window queries (``decode_window_buffer_of``) is
added. At run time both live alongside a forward's activations (the compaction runs inside the
attention layers), so the bound is held *across* the profiling forward: the peak vLLM sizes the
KV cache from is then forward + workspace, not the larger of the two.

Patched (vLLM 0.32/0.33):
- ``GPUModelRunner.profile_run`` (around): allocate the workspace (+ window buffer) bound before
  the profiling forward and free it after, on CUDA devices (the CPU build sizes its KV cache from
  ``kv_cache_memory_bytes`` or a memory fraction, not a profiled peak).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from vllm.v1.worker.gpu_model_runner import GPUModelRunner

from vllm_snapkv.config import SnapKVConfig, config_from_additional
from vllm_snapkv.scoring import SCORE_NAMES
from vllm_snapkv.selection import compaction_workspace_bytes, value_metric_bytes

#: Block size vLLM's CUDA backends default to when the cache config names none yet.
DEFAULT_CUDA_BLOCK_SIZE = 16

#: Device types whose KV cache vLLM sizes from the peak memory of ``profile_run``.
PROFILED_DEVICE_TYPES = frozenset({"cuda"})


def compaction_workspace_of(vllm_config: Any, config: SnapKVConfig) -> int:
    """The workspace bound for this model on this rank (its query and KV heads): the largest
    over every selection rule (any request may pick one), plus the value metrics the
    value-aware rules keep per layer once built."""
    model, parallel, cache = (
        vllm_config.model_config, vllm_config.parallel_config, vllm_config.cache_config
    )
    element_bytes = 1 if cache.cache_dtype.startswith("fp8") else model.dtype.itemsize
    workspace = max(
        compaction_workspace_bytes(
            model.get_num_attention_heads(parallel),
            model.get_num_kv_heads(parallel),
            model.get_head_size(),
            config.window_size,
            config.budget,
            config.kernel_size,
            cache.block_size or DEFAULT_CUDA_BLOCK_SIZE,
            element_bytes,
            score=score,
            hidden_size=model.get_hidden_size(),
            model_element_bytes=model.dtype.itemsize,
        )
        for score in SCORE_NAMES
    )
    metrics = value_metric_bytes(
        model.get_num_kv_heads(parallel), model.get_head_size(), model.get_num_layers(parallel)
    )
    return workspace + metrics


def decode_window_buffer_of(vllm_config: Any, config: SnapKVConfig) -> int:
    """Bound, in bytes, of the decode window ring (``adapter.window_ring``) on this rank: a slot
    of ``window_size`` query rows per running request (``max_num_seqs``) + one scratch row, per
    attention layer (0 when decode compression is off). The ring is allocated once the KV cache
    exists, from the memory this bound kept free in profiling. ~2 GiB for a Llama-3.1-8B shape in
    bf16 at window 32 and 256 running requests; lower ``--max-num-seqs`` lowers it."""
    if not config.decode_interval:
        return 0
    model, parallel = vllm_config.model_config, vllm_config.parallel_config
    rows = vllm_config.scheduler_config.max_num_seqs * config.window_size + 1
    per_row = (
        model.get_num_layers(parallel)
        * model.get_num_attention_heads(parallel)
        * model.get_head_size()
        * model.dtype.itemsize
    )
    return rows * per_row


def _patch_profile_run(original):
    @functools.wraps(original)
    def profile_run(self: GPUModelRunner, *args: Any, **kwargs: Any):
        config = config_from_additional(self.vllm_config.additional_config)
        if config is None or self.device.type not in PROFILED_DEVICE_TYPES:
            return original(self, *args, **kwargs)
        workspace = torch.empty(
            compaction_workspace_of(self.vllm_config, config)
            + decode_window_buffer_of(self.vllm_config, config),
            dtype=torch.uint8,
            device=self.device,
        )
        try:
            return original(self, *args, **kwargs)  # its peak includes the workspace
        finally:
            del workspace

    return profile_run


WORKSPACE_PATCHES = ((GPUModelRunner, "profile_run", _patch_profile_run),)
