"""Draft-model speculative decoding: the drafter's attention layers compress with the target's.

vLLM 0.32 runs a draft model (``method: draft_model``) in the same model runner as the target,
after the target's forward and sampling (``GPUModelRunner.sample_tokens`` →
``propose_draft_token_ids``). Its attention layers (``draft_model.model.layers.<i>...``) are
ordinary KV cache layers: with the target's KV spec, vLLM puts them in the target's KV cache
group, so they share its block table and block pool, and every block holds both models' layers.
The drafter's first pass runs over the target's chunk (the target's tokens at the target's
positions, plus the sampled token one position on); its later passes add one draft position
each.

Compressing the target's blocks therefore compresses the drafter's too: the request's block list
becomes the compaction's targets for every layer of the group. The drafter's layers keep the
entries the target kept, at the same stored positions (the TensorRT-LLM way): drafter layer
``j`` of ``L_d`` takes the selection of target layer ``j * L_t // L_d`` (the same KV heads: the
group has one spec). The drafter's window queries are never captured: the drafter's selection
only decides how well it drafts, never which tokens come out (the target verifies every draft),
and with the target as its own drafter the shared selection is the drafter's own SnapKV
selection.

What this module does:
- :class:`DrafterLayers`: which layers are the drafter's, and whose selection each one takes;
  refuses (at engine start, naming the layer) a drafter layer outside a compressed group, or
  with other KV heads or head size than its target layer.
- :func:`compact_drafter_layers`: after the drafter ran in a compressing step, move each of its
  layers' kept entries into the plan's targets (the same targets as the target's layers).
- Proposer patches (vLLM 0.32; contract tests in tests/test_contract.py): the drafter computes
  its own slots from RoPE positions (``compute_new_slot_mapping`` in its first pass,
  ``eagle_step_update_slot_mapping_and_metadata`` for each further draft). For compressed
  requests those positions are logical while the block table is physical: the post-hooks
  recompute the slots from ``position - evicted`` (the positions stay logical, as for the
  target). ``seq_lens`` come from the target's (already physical) attention metadata.
- ``GPUModelRunner.sample_tokens`` (post): compact the drafter's layers once the drafter has
  written its KV of the compressing chunk.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any

import torch
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.spec_decode.llm_base_proposer import PADDING_SLOT_ID, SpecDecodeBaseProposer
from vllm.v1.spec_decode.utils import compute_new_slot_mapping
from vllm.v1.worker.gpu_model_runner import GPUModelRunner

from vllm_snapkv.adapter.compaction import CompactionJob, move_kept_entries
from vllm_snapkv.adapter.physical import STEP_STATE_ATTR, wrap_runner_step


class UnsupportedDrafter(ValueError):
    """The draft model's KV cache cannot be compressed with the target's."""


@dataclass(frozen=True)
class DrafterLayers:
    """The drafter's attention layers in this worker's compressed groups. Invariant: every one
    of them is in a compressed group, and shares the selection of one target layer."""

    #: Drafter layer name -> its compressed KV cache group.
    group_of: dict[str, int]
    #: Drafter layer name -> the target layer index whose kept entries it keeps.
    shares: dict[str, int]

    @classmethod
    def of(
        cls, drafter_layer_names: set[str], group_of_layer: dict[str, int], target_layers: list[str]
    ) -> "DrafterLayers | None":
        """``group_of_layer``: every layer of the compressed groups (the drafter's included);
        ``target_layers``: the target model's compressed layers. None without drafter layers."""
        if not drafter_layer_names:
            return None
        outside = sorted(name for name in drafter_layer_names if name not in group_of_layer)
        if outside:
            raise UnsupportedDrafter(
                f"kv_compression: the draft model's attention layer {outside[0]} is not in a "
                "compressed (plain full-attention) KV cache group, so its cache could not follow "
                "the target's compaction (a drafter with another KV cache spec than the target, "
                "or with sliding-window layers). Use a draft model with the target's KV layout "
                "(KV heads, head size, dtype, full attention), or turn compression off."
            )
        drafters = sorted(drafter_layer_names, key=extract_layer_index)
        targets = sorted({extract_layer_index(name) for name in target_layers})
        return cls(
            group_of={name: group_of_layer[name] for name in drafters},
            shares={
                name: targets[depth * len(targets) // len(drafters)]
                for depth, name in enumerate(drafters)
            },
        )

    def check_heads(self, forward_context: dict, target_names: dict[int, str]) -> None:
        """Refuse (at engine start) a drafter layer whose KV heads or head size differ from its
        shared target layer's (a drafter in a full-attention group of its own, with another
        spec): the shared selection has one row per target KV head."""
        for name, shared in self.shares.items():
            drafter = forward_context[name].impl
            target = forward_context[target_names[shared]].impl
            mine = (drafter.num_kv_heads, drafter.head_size)
            theirs = (target.num_kv_heads, target.head_size)
            if mine != theirs:
                raise UnsupportedDrafter(
                    f"kv_compression: the draft model's attention layer {name} has "
                    f"{mine[0]} KV heads of size {mine[1]}, its target layer "
                    f"{target_names[shared]} {theirs[0]} of size {theirs[1]}; SnapKV compresses "
                    "a drafter with the target's KV layout only. Turn compression off for it."
                )


def drafter_layer_names(runner: GPUModelRunner) -> set[str]:
    """The attention layers the runner's drafter runs (empty: no model-based drafter)."""
    drafter = getattr(runner, "drafter", None)
    return set(getattr(drafter, "_draft_attn_layer_names", None) or ())


def compact_drafter_layers(
    drafter: DrafterLayers, jobs: list[CompactionJob], forward_context: dict, layout_of: Any
) -> None:
    """Move every drafter layer's entries that its shared target layer kept (``job.kept``) into
    each job's targets. Runs after the drafter wrote the compressing chunk, before the block
    swap; reads the same sources the target's layers read (still the request's block list)."""
    for job in jobs:
        for name, shared in drafter.shares.items():
            layer = forward_context[name]
            kv_cache = layer.kv_cache
            move_kept_entries(
                layout_of(layer.impl, layer), job, job.kept[shared], kv_cache,
                drafter.group_of[name],
            )


def _offsets(proposer: Any, batch_size: int) -> torch.Tensor | None:
    """Evicted tokens per batch row of this step (rows past the real requests: 0), or None when
    no compressed request is in the step."""
    state = getattr(proposer, STEP_STATE_ATTR, None)
    offsets = state.row_offsets if state is not None else None
    if offsets is None:
        return None
    if offsets.shape[0] < batch_size:
        offsets = torch.nn.functional.pad(offsets, (0, batch_size - offsets.shape[0]))
    return offsets[:batch_size]


def physical_first_pass_slots(
    proposer: Any, cad: Any, num_tokens: int, offsets: torch.Tensor
) -> torch.Tensor:
    """The first pass's slot mapping as vLLM computes it, from ``position - evicted`` instead
    of the logical position (rejected tokens and positions past ``max_model_len``: padding)."""
    num_new = proposer.net_num_new_slots_per_request
    rows = torch.arange(cad.batch_size(), device=offsets.device)
    row_of_token = torch.repeat_interleave(
        rows, cad.naive_query_lens() + num_new, output_size=num_tokens
    )
    logical = proposer.positions[:num_tokens]
    physical = (logical - offsets[row_of_token].to(logical.dtype)).clamp(min=0)
    slots = compute_new_slot_mapping(
        cad=cad,
        new_positions=physical,
        is_rejected_token_mask=proposer.is_rejected_token_mask[:num_tokens],
        block_size=proposer.block_size,
        num_new_tokens=num_new,
        max_model_len=proposer.max_model_len,
    )
    return slots.masked_fill_(logical >= proposer.max_model_len, PADDING_SLOT_ID)


def _patch_set_inputs_first_pass(original):
    signature = inspect.signature(original)

    @functools.wraps(original)
    def set_inputs_first_pass(self: SpecDecodeBaseProposer, *args: Any, **kwargs: Any):
        num_tokens, token_indices_to_sample, cad = original(self, *args, **kwargs)
        if not self.needs_extra_input_slots:
            return num_tokens, token_indices_to_sample, cad  # the target's (physical) slots
        target_cad = signature.bind(self, *args, **kwargs).arguments["cad"]
        offsets = _offsets(self, target_cad.batch_size())
        if offsets is None:
            return num_tokens, token_indices_to_sample, cad
        slots = physical_first_pass_slots(self, target_cad, num_tokens, offsets)
        return num_tokens, token_indices_to_sample, cad.replace(slot_mapping=slots)

    return set_inputs_first_pass


def _patch_update_positions(original):
    @functools.wraps(original)
    def _update_positions_dependent_metadata(
        self: SpecDecodeBaseProposer,
        positions: torch.Tensor,
        common_attn_metadata: Any,
        batch_size: int,
        input_batch_size: int,
        block_size: int,
    ) -> torch.Tensor:
        new_positions = original(
            self, positions, common_attn_metadata, batch_size, input_batch_size, block_size
        )
        offsets = _offsets(self, batch_size)
        if offsets is None:
            return new_positions
        logical = new_positions if new_positions.dim() == 1 else new_positions[0]
        physical = (logical - offsets.to(logical.dtype)).clamp(min=0)
        table = common_attn_metadata.block_table_tensor
        block = (physical // block_size).clamp(max=table.shape[1] - 1)
        rows = torch.arange(batch_size, device=table.device)
        physical_slots = table[rows, block].to(torch.int64) * block_size + physical % block_size
        slots = self._slot_mapping_buffer[:batch_size]
        # Padding (a position past max_model_len) stays padding.
        slots.copy_(torch.where(slots == PADDING_SLOT_ID, slots, physical_slots))
        return new_positions

    return _update_positions_dependent_metadata


def _patch_sample_tokens(original):
    return wrap_runner_step(
        original,
        on_return=lambda state: state.end_drafter_step(compact=True),
        on_raise=lambda state: state.end_drafter_step(compact=False),
    )


DRAFTER_PATCHES = (
    (SpecDecodeBaseProposer, "set_inputs_first_pass", _patch_set_inputs_first_pass),
    (SpecDecodeBaseProposer, "_update_positions_dependent_metadata", _patch_update_positions),
    (GPUModelRunner, "sample_tokens", _patch_sample_tokens),
)
