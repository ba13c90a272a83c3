"""The output projection that an attention layer's heads feed, for value-aware selection rules
(``vllm_snapkv.scoring``, e.g. ``critical``: ``||W_o^q v||`` per query head ``q``).

vLLM 0.32's decoder attention modules (Llama, Qwen2/3, Gemma 2/3, Mistral, gpt-oss, SmolLM2, ...)
hold the ``Attention`` layer as ``<prefix>.attn`` beside their output projection
``<prefix>.o_proj``, a ``RowParallelLinear``. Row parallel means its *input* dimension (the
concatenated head outputs) is split across tensor-parallel ranks: rank ``r`` loads the columns
``[r * H_q_local * D, (r + 1) * H_q_local * D)`` of ``W_o`` (``RowParallelLinear.weight_loader``
narrows ``input_dim`` by ``tp_rank``), which are exactly the columns its own query heads (the
same contiguous range, from ``QKVParallelLinear``) meet, and the output dimension is whole. So
``W_o^q`` of every local head is local: no communication is needed.

``W_o`` is read through ``o_proj.quant_method.apply`` (the rank's partial product, before the
all-reduce): the CPU build repacks linear weights for oneDNN and replaces ``o_proj.weight`` with
an empty tensor, so the plain matrix is not there to read. Only unquantised projections are
used (``UnquantizedLinearMethod``); anything else makes the value-aware rules unavailable for the
model, with the reason (contract: tests/test_contract.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from vllm.model_executor.layers.linear import RowParallelLinear, UnquantizedLinearMethod

#: Attribute of the attention module holding the output projection, beside its ``attn``.
OUTPUT_PROJECTION_ATTR = "o_proj"


def find_output_projection(
    model: torch.nn.Module, layer_name: str, num_heads: int, head_size: int
) -> tuple[Any | None, str | None]:
    """``(o_proj, None)`` for the attention layer named ``layer_name`` (``<prefix>.attn``) with
    ``num_heads`` local query heads of ``head_size``, or ``(None, reason)``."""
    parent_name = layer_name.rpartition(".")[0]
    try:
        parent = model.get_submodule(parent_name)
    except AttributeError:
        return None, f"layer {layer_name} has no parent module {parent_name!r} in the model"
    projection = getattr(parent, OUTPUT_PROJECTION_ATTR, None)
    if not isinstance(projection, RowParallelLinear):
        return None, (
            f"{parent_name} ({type(parent).__name__}) has no RowParallelLinear "
            f"{OUTPUT_PROJECTION_ATTR}"
        )
    if not isinstance(projection.quant_method, UnquantizedLinearMethod):
        return None, (
            f"{parent_name}.{OUTPUT_PROJECTION_ATTR} is quantised "
            f"({type(projection.quant_method).__name__})"
        )
    width = num_heads * head_size
    if projection.input_size_per_partition != width:
        return None, (
            f"{parent_name}.{OUTPUT_PROJECTION_ATTR} takes {projection.input_size_per_partition} "
            f"inputs on this rank, not {num_heads} heads x {head_size}"
        )
    return projection, None


def rank_projection(projection: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x -> x W_o_local^T``: this rank's partial product, no bias, no all-reduce."""
    return lambda rows: projection.quant_method.apply(projection, rows, None)
