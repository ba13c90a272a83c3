"""One request's compaction in one attention layer, and its debug dump.

The worker (``worker.WorkerCompression``) finds each step's jobs and calls
:func:`compact_layer` from inside every attention layer of a compressed KV cache group, right
after vLLM's own attention wrote this step's K/V: score the stored entries with the window
queries, keep ``budget`` per KV head, gather them and write them into the plan's targets, in
the layer's own cache layout.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch

from vllm_snapkv.adapter.attention import scoring_options
from vllm_snapkv.adapter.layouts import (
    PagedKVLayout,
    PagedTokens,
    read_key_span,
    read_value_span,
)
from vllm_snapkv.plan import CompressionPlan, WindowCapture
from vllm_snapkv.selection import select_kept_positions_chunked


@dataclass
class CompactionJob:
    """One request's SnapKV work in this step: rows of the flattened batch and what to do."""

    request_id: str
    first_row: int  # row of the chunk's first token in the flattened batch
    chunk_start: int  # logical position of that token
    chunk_len: int
    capture: WindowCapture | None = None
    plan: CompressionPlan | None = None
    #: With a plan, per compressed group: the entries it reads as stored now (the prompt, or
    #: everything stored at a decode compression; + re-prefilled outputs), and the slots the
    #: kept ones move to.
    sources: dict[int, PagedTokens] = field(default_factory=dict)
    target_slots: dict[int, torch.Tensor] = field(default_factory=dict)
    #: A decode compression whose window began before this chunk: the ring rows
    #: (``window_ring``) of those earlier window positions, in position order.
    ring_rows: torch.Tensor | None = None
    #: The plan's rule's ``token_features`` of the prompt (``[L]``, on the device), for a rule
    #: that reads token ids: computed once for all layers.
    token_features: torch.Tensor | None = None
    layers_done: set[int] = field(default_factory=set)
    kept: dict[int, torch.Tensor] = field(default_factory=dict)

    def window_rows(self) -> slice:
        """Rows of this chunk that hold observation-window tokens (possibly none)."""
        spec = self.plan or self.capture
        first = max(self.chunk_start, spec.window_end - spec.window_size)
        last = max(min(self.chunk_start + self.chunk_len, spec.window_end), first)
        offset = self.first_row - self.chunk_start
        return slice(first + offset, last + offset)


def compact_layer(
    layout: PagedKVLayout,
    impl: Any,
    layer: torch.nn.Module,
    job: CompactionJob,
    window_queries: torch.Tensor,
    kv_cache: torch.Tensor,
    group_id: int,
    kernel_size: int,
    pooling: str,
    score: str = "snapkv",
    value_metric: torch.Tensor | None = None,
) -> torch.Tensor:
    """Compact ``job``'s request in this layer with selection rule ``score``
    (``vllm_snapkv.scoring``; ``value_metric``: the layer's, for rules that read values);
    returns the kept entry indices ``[H_kv, budget]`` (prompt positions for a prompt
    compression)."""
    plan = job.plan
    source = job.sources[group_id]
    if window_queries.shape[0] != plan.window_size:
        raise RuntimeError(
            f"SnapKV: request {job.request_id} has {window_queries.shape[0]} window queries "
            f"at layer {layer.layer_name}, expected {plan.window_size}"
        )
    head_size = impl.head_size

    def read_scoring_keys(start: int, end: int) -> torch.Tensor:
        keys = read_key_span(layout, kv_cache, source, start, end)
        return layout.scoring_keys(keys[:, :, :head_size])

    def read_scoring_values(start: int, end: int) -> torch.Tensor:
        values = read_value_span(layout, kv_cache, source, start, end)
        return layout.scoring_values(values[:, :, :head_size])

    # Bounded workspace, whatever the prompt length (selection.compaction_workspace_bytes):
    # keys (and values, for value-aware rules) are scored a span at a time, never copied whole.
    kept = select_kept_positions_chunked(
        window_queries,
        read_scoring_keys,
        plan.num_scored,
        plan.budget,
        impl.scale,
        kernel_size,
        pooling,
        block_size=source.block_size,
        score=score,
        read_values=read_scoring_values,
        value_metric=value_metric,
        token_features=job.token_features,
        **scoring_options(impl),
    )
    move_kept_entries(layout, job, kept, kv_cache, group_id)
    return kept


def move_kept_entries(
    layout: PagedKVLayout, job: CompactionJob, kept: torch.Tensor, kv_cache: torch.Tensor,
    group_id: int,
) -> None:
    """Write the stored entries ``kept`` (``[H_kv, budget]``) of ``job``'s sources, then its
    verbatim outputs, into the plan's targets, in the layer's layout."""
    plan = job.plan
    num_heads = kept.shape[0]
    outputs = torch.arange(plan.num_scored, plan.num_sources, device=kept.device)
    # Slot i of head h holds stored entry per_slot[i, h]: the selection, then earlier outputs.
    per_slot = torch.cat([kept, outputs.expand(num_heads, -1)], dim=1).T
    # Both gathers are copies taken before the write: targets may be reused sources
    # (in-place compaction).
    source = job.sources[group_id]
    kept_keys = layout.gather_keys(kv_cache, source, per_slot)
    kept_values = layout.gather_values(kv_cache, source, per_slot)
    layout.write(kv_cache, kept_keys, kept_values, job.target_slots[group_id])


def write_selection_dump(directory: str, job: CompactionJob, suffix: str) -> None:
    """``<dir>/<request id><suffix>.pt`` for a prompt compression (kept prompt positions);
    ``<dir>/decode/<request id><suffix>.<index>.pt`` for a decode compression (kept *stored
    entry* indices: entry ``i`` is the ``i``-th entry the request held before it)."""
    plan = job.plan
    name = job.request_id + suffix
    if plan.phase == "decode":
        directory = os.path.join(directory, "decode")
        name += f".{plan.index}"
    os.makedirs(directory, exist_ok=True)
    torch.save(
        {
            "phase": plan.phase,
            "index": plan.index,
            "prompt_len" if plan.phase == "prompt" else "num_scored": plan.num_scored,
            "window_end": plan.window_end,
            "budget": plan.budget,
            "score": plan.score,
            "layers": {index: job.kept[index].cpu() for index in sorted(job.kept)},
        },
        os.path.join(directory, f"{name}.pt"),
    )
