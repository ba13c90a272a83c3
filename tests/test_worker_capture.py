"""The worker's capture point, without an engine: the window queries SnapKV scores are the
queries the layer's ``Attention.forward`` received, whatever vLLM hands the implementation."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from vllm_snapkv.adapter.compaction import CompactionJob
from vllm_snapkv.adapter.groups import CompressedGroups
from vllm_snapkv.adapter.layouts import PagedTokens
from vllm_snapkv.adapter.layouts.standard import StandardLayout
from vllm_snapkv.adapter.worker import WorkerCompression
from vllm_snapkv.config import parse_config
from vllm_snapkv.plan import CompressionPlan

LAYER = "model.layers.0.self_attn.attn"
PROMPT_LEN, BUDGET, WINDOW, BLOCK = 96, 40, 8, 16
Q_HEADS, KV_HEADS, HEAD_SIZE = 4, 2, 16


def compact_prompt(layer, query: torch.Tensor) -> torch.Tensor:
    """One prompt compression of a 96-token chunk through ``WorkerCompression.on_attention_layer``
    on a standard-layout cache (the layout of FLASH_ATTN / TRITON_ATTN / FLASHINFER): the kept
    positions ``[H_kv, budget]``."""
    gen = torch.Generator().manual_seed(7)
    kv_cache = torch.randn(12, KV_HEADS, BLOCK, 2 * HEAD_SIZE, generator=gen)
    groups = CompressedGroups(group_ids=(0,), block_size=BLOCK, group_of_layer={LAYER: 0},
                              hybrid=False)
    state = WorkerCompression(
        parse_config({"budget": BUDGET, "window_size": WINDOW}), groups, query_dtype=torch.float32
    )
    state.layouts[LAYER] = StandardLayout()
    plan = CompressionPlan(PROMPT_LEN, BUDGET, WINDOW, PROMPT_LEN, 0, {0: (6, 7, 8)})
    job = CompactionJob(request_id="r", first_row=0, chunk_start=0, chunk_len=PROMPT_LEN, plan=plan)
    job.sources[0] = PagedTokens.of([0, 1, 2, 3, 4, 5], BLOCK, PROMPT_LEN, "cpu")
    job.target_slots[0] = PagedTokens.of([6, 7, 8], BLOCK, BUDGET, "cpu").slots()
    state.jobs = [job]
    impl = SimpleNamespace(num_heads=Q_HEADS, head_size=HEAD_SIZE, scale=HEAD_SIZE**-0.5,
                           sinks=None, logits_soft_cap=None)
    state.on_attention_layer(impl, layer, query, kv_cache)
    return job.kept[0]


def test_fp8_quantised_queries_select_what_the_layer_queries_select():
    """With an fp8 cache on a backend that takes quantised queries, vLLM's ``Attention.forward``
    passes the implementation ``query_quant(query, _q_scale)``: fp8 ``query / q_scale``. The
    selection must be the one of the layer's own queries. Queries are chosen on the fp8 grid
    times a power-of-two scale, so quantising loses nothing and the two must be equal."""
    gen = torch.Generator().manual_seed(3)
    scale = 0.125
    on_grid = (torch.randn(PROMPT_LEN, Q_HEADS * HEAD_SIZE, generator=gen) * 8).to(
        torch.float8_e4m3fn
    )
    layer_queries = on_grid.float() * scale  # what Attention.forward received
    quantised = (layer_queries / scale).to(torch.float8_e4m3fn)  # what vLLM hands the impl
    assert torch.equal(quantised.float(), on_grid.float())

    plain_layer = SimpleNamespace(layer_name=LAYER, query_quant=None)
    fp8_layer = SimpleNamespace(layer_name=LAYER, query_quant=object(),
                                _q_scale=torch.tensor(scale))
    expected = compact_prompt(plain_layer, layer_queries)
    assert torch.equal(compact_prompt(fp8_layer, quantised), expected)
    # The check can fail: the fp8 values scored as they are (8x the logits) select otherwise.
    assert not torch.equal(compact_prompt(plain_layer, quantised.float()), expected)


def test_per_kv_head_query_scales_dequantise_each_head_group():
    from vllm_snapkv.adapter.attention import unquantised_queries

    scales = torch.tensor([0.5, 4.0])  # one per KV head: query heads {0, 1} and {2, 3}
    rows = torch.ones(3, Q_HEADS, HEAD_SIZE).to(torch.float8_e4m3fn)
    layer = SimpleNamespace(query_quant=object(), _q_scale=scales)
    got = unquantised_queries(layer, rows, torch.float32)
    assert got[:, :2].eq(0.5).all() and got[:, 2:].eq(4.0).all()
    # Unquantised queries (no query_quant, or 16-bit queries) pass through unchanged.
    plain = torch.randn(3, Q_HEADS, HEAD_SIZE)
    assert unquantised_queries(layer, plain, torch.float32) is plain
