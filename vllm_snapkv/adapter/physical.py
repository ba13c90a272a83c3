"""The model runner's view of compressed requests: block lists, slots and KV lengths of the
compressed KV cache groups become physical; everything else stays logical.

vLLM 0.32's V1 runner keeps one ``seq_lens`` for all KV cache groups (each group only gets its own
block table and slot mapping). The runner's ``seq_lens`` are made physical, which is what the
compressed (full-attention) groups read; on hybrid models the groups left alone (sliding window,
recurrent state) get the logical lengths back while their attention metadata is built.

The per-row offsets reach the device the way the runner's own inputs do: written into a
persistent host buffer (pinned where CUDA pins, vLLM's ``CpuGpuBuffer``) and copied with
``non_blocking=True``, so a decode step never waits for the device. The host half is rewritten
in the next step's ``_prepare_inputs``, which vLLM orders after this step's copies as it does for
its own buffers (``synchronize_input_prep`` with async scheduling; the step's own sync without).

FlashInfer plans its pages on the host from ``seq_lens_cpu_upper_bound`` (the runner's
``optimistic_seq_lens_cpu``, made physical here) or from ``seq_lens`` (contract:
tests/test_contract_sources.py, for every supported minor).

Patched (vLLM 0.32; contract tests in tests/test_contract.py):
- ``AttentionGroup.build_metadata`` (args): in a step with compressed requests on a hybrid model,
  the metadata of groups left alone is built from the logical lengths.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from vllm.v1.utils import CpuGpuBuffer
from vllm.v1.worker.gpu_model_runner import GPUModelRunner
from vllm.v1.worker.utils import AttentionGroup

from vllm_snapkv.adapter.groups import CompressedGroups


def swap_block_lists(
    runner: GPUModelRunner, request_id: str, targets: dict[int, tuple[int, ...]]
) -> None:
    """Make each compressed group's targets the request's whole block list in that group, in its
    state and its block-table row; other groups keep theirs."""
    request_state = runner.requests.get(request_id)
    if request_state is None:
        return
    row = runner.input_batch.req_id_to_index.get(request_id)
    for group_id, blocks in targets.items():
        request_state.block_ids[group_id][:] = blocks
        if row is None:
            continue  # not in the persistent batch: re-added from request_state.block_ids later
        table = runner.input_batch.block_table[group_id]
        old_len = int(table.num_blocks_per_row[row])
        table.add_row(list(blocks), row)
        table.block_table.np[row, len(blocks) : max(old_len, len(blocks))] = 0


@dataclass(frozen=True)
class LogicalLengths:
    """The step's logical KV lengths, for the groups left alone on a hybrid model."""

    left_alone: frozenset[int]  # KV cache group ids
    seq_lens: torch.Tensor
    seq_lens_cpu_upper_bound: torch.Tensor
    max_seq_len: int


#: Attribute under which the runner's hooked objects (each of its ``AttentionGroup``\ s, its
#: CUDA-graph dispatcher, the implementations of compressed layers) hold the runner's SnapKV
#: state (``worker.WorkerCompression``): per engine, never a process global. What this module
#: reads of it: ``logical_lengths``, the step's :class:`LogicalLengths` or None.
STEP_STATE_ATTR = "_snapkv"


def wrap_runner_step(
    original: Callable[..., Any],
    on_return: Callable[[Any], None],
    on_raise: Callable[[Any], None],
) -> Callable[..., Any]:
    """``original`` (a ``GPUModelRunner`` method that ends a step or part of one), followed by
    ``on_return(state)`` or, if it raises, ``on_raise(state)`` before the error goes on to vLLM,
    where ``state`` is the runner's :data:`STEP_STATE_ATTR` (nothing runs on runners without
    one): a step's state never outlives the step, whichever way it ends."""

    @functools.wraps(original)
    def wrapped(self: GPUModelRunner, *args: Any, **kwargs: Any):
        state = self.__dict__.get(STEP_STATE_ATTR)
        try:
            result = original(self, *args, **kwargs)
        except BaseException:
            if state is not None:
                on_raise(state)
            raise
        if state is not None:
            on_return(state)
        return result

    return wrapped


#: Runner attribute holding its :func:`evicted_offsets_buffer` (one per model runner, like the
#: runner's own input buffers).
EVICTED_OFFSETS_ATTR = "_snapkv_evicted_offsets"


def evicted_offsets_buffer(runner: GPUModelRunner) -> CpuGpuBuffer:
    """The runner's persistent buffer of per-row evicted-token counts (``max_num_reqs`` rows),
    made by the runner's own ``_make_buffer`` on first use."""
    buffer = runner.__dict__.get(EVICTED_OFFSETS_ATTR)
    if buffer is None:
        buffer = runner._make_buffer(runner.max_num_reqs, dtype=torch.int32)
        setattr(runner, EVICTED_OFFSETS_ATTR, buffer)
    return buffer


def make_lengths_physical(
    runner: GPUModelRunner,
    scheduler_output: Any,
    request_ids: list[str],
    evicted: dict[str, int],
    groups: CompressedGroups,
) -> LogicalLengths | None:
    """KV lengths and slots of compressed requests become physical in the compressed groups;
    RoPE positions stay logical, and so does everything the other groups read. Returns the
    logical lengths the groups left alone read in this step (a hybrid model with compressed
    requests in the step), or None."""
    if not evicted:
        return None
    num_reqs = len(request_ids)
    offsets = evicted_offsets_buffer(runner)
    offsets.np[:num_reqs] = [evicted.get(r, 0) for r in request_ids]
    if not offsets.np[:num_reqs].any():
        return None
    logical_lengths = None
    if groups.hybrid:
        upper_bound = runner.optimistic_seq_lens_cpu[:num_reqs].clone()
        logical_lengths = LogicalLengths(
            left_alone=frozenset(
                g for g in range(len(runner.kv_cache_config.kv_cache_groups))
                if g not in groups.group_ids
            ),
            seq_lens=runner.seq_lens[:num_reqs].clone(),
            seq_lens_cpu_upper_bound=upper_bound,
            max_seq_len=int(upper_bound.max()),
        )
    num_tokens = scheduler_output.total_num_scheduled_tokens
    runner.optimistic_seq_lens_cpu[:num_reqs] -= offsets.cpu[:num_reqs]
    per_row = offsets.copy_to_gpu(num_reqs)  # non-blocking, from the persistent host buffer
    runner.seq_lens[:num_reqs] -= per_row
    row_of_token = runner.req_indices.gpu[:num_tokens]
    physical = runner.positions[:num_tokens] - per_row[row_of_token]
    query_start_loc = runner.query_start_loc.gpu[: num_reqs + 1]
    for group_id in groups.group_ids:
        runner.input_batch.block_table[group_id].compute_slot_mapping(
            num_reqs, query_start_loc, physical
        )
    return logical_lengths


def _patch_build_metadata(original):
    @functools.wraps(original)
    def build_metadata(self: AttentionGroup, common_attn_metadata: Any, *args: Any, **kwargs: Any):
        state = getattr(self, STEP_STATE_ATTR, None)
        logical = state.logical_lengths if state is not None else None
        if logical is not None and self.kv_cache_group_id in logical.left_alone:
            num_reqs = logical.seq_lens.shape[0]
            common_attn_metadata = replace(
                common_attn_metadata,
                seq_lens=_padded(common_attn_metadata.seq_lens, logical.seq_lens, num_reqs),
                seq_lens_cpu_upper_bound=_padded(
                    common_attn_metadata.seq_lens_cpu_upper_bound,
                    logical.seq_lens_cpu_upper_bound,
                    num_reqs,
                ),
                max_seq_len=max(logical.max_seq_len, common_attn_metadata.max_seq_len),
                _num_computed_tokens_cache=None,
            )
        return original(self, common_attn_metadata, *args, **kwargs)

    return build_metadata


def _padded(physical: torch.Tensor, logical: torch.Tensor, num_reqs: int) -> torch.Tensor:
    """``physical`` (possibly padded past the real requests) with its real rows logical."""
    merged = physical.clone()
    merged[:num_reqs] = logical.to(merged.device)
    return merged


PHYSICAL_PATCHES = ((AttentionGroup, "build_metadata", _patch_build_metadata),)
