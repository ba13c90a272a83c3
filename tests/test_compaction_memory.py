"""The compaction the worker runs (``WorkerCompression._compact``) in bounded memory: keys read a
span of blocks at a time, kept K/V gathered entry by entry, the selection equal to the dense
reference, and a peak of temporary memory that does not grow with the prompt.

Peak memory is measured on CPU with ``torch.profiler`` (``profile_memory=True``): every CPU
allocation and free during the call, with the allocator's running total after each, so the peak
counts every intermediate tensor (ATen's own temporaries included), however briefly it lived.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from vllm_snapkv import selection
from vllm_snapkv.adapter.layouts import PagedTokens, read_key_span
from vllm_snapkv.adapter.layouts.cpu import CpuPackedLayout, read_keys, read_kv
from vllm_snapkv.adapter.layouts.standard import StandardLayout
from vllm_snapkv.adapter.worker import WorkerCompression
from vllm_snapkv.plan import CompressionPlan
from vllm_snapkv.scoring import SCORE_NAMES, score_rule, value_metric
from vllm_snapkv.selection import compaction_workspace_bytes, select_kept_positions

sys.path.insert(0, str(Path(__file__).parents[1]))  # the repository root: benchmarks/
from benchmarks.gpu.compaction import peak_cpu_bytes  # noqa: E402
from test_selection import frequent_and_rare_ids  # noqa: E402

FP8 = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def standard_cache(num_blocks, num_heads, block_size, head_size, dtype, seed=0):
    """A layer's logical [blocks, heads, block_size, K|V] view into an HND-ordered buffer (a
    strided view, as vLLM lays some backends out)."""
    gen = torch.Generator().manual_seed(seed)
    buffer = torch.randn(num_blocks, block_size, num_heads, 2 * head_size, generator=gen)
    return buffer.to(dtype).transpose(1, 2)


def cpu_cache(num_blocks, num_heads, block_size, head_size, kv_cache_dtype, seed=0):
    """A CPU_ATTN cache: random fp32 entries, or random fp8 bytes (finite ones) for fp8."""
    gen = torch.Generator().manual_seed(seed)
    shape = (num_blocks, num_heads, block_size, 2 * head_size)
    if kv_cache_dtype == "auto":
        return torch.randn(shape, generator=gen)
    values = torch.randn(shape, generator=gen) * 4
    return values.to(FP8[kv_cache_dtype]).view(torch.uint8)


def stored_keys_and_values(layout, kv_cache, tokens):
    every = torch.arange(tokens.num_tokens)[:, None].expand(-1, kv_cache.shape[1])
    return layout.gather_keys(kv_cache, tokens, every), layout.gather_values(
        kv_cache, tokens, every
    )


# --- Reads: spans of blocks and per-entry gathers -----------------------------------------------


@pytest.mark.parametrize("isa", ["vec", "vec16", "amx"])
def test_cpu_gathers_read_the_unpacked_entries(isa):
    block_size, head_dim, num_heads = 32, 64, 3
    cache = torch.randint(0, 256, (7, num_heads, block_size, 2 * head_dim), dtype=torch.uint8)
    block_ids, num_tokens = [4, 1, 6], 3 * block_size - 5
    keys, values = read_kv(cache, block_ids, num_tokens, isa)
    assert torch.equal(read_keys(cache, block_ids, num_tokens, isa), keys)
    positions = torch.randint(0, num_tokens, (40, num_heads))
    heads = torch.arange(num_heads)
    layout = CpuPackedLayout(isa, "fp8_e4m3")
    tokens = PagedTokens.of(block_ids, block_size, num_tokens, "cpu")
    assert torch.equal(layout.gather_keys(cache, tokens, positions), keys[positions, heads])
    assert torch.equal(layout.gather_values(cache, tokens, positions), values[positions, heads])


@pytest.mark.parametrize("layout_name", ["standard", "vec", "amx"])
def test_key_spans_are_the_rows_of_the_whole_read(layout_name):
    block_size, num_heads, head_size = 16, 2, 32
    if layout_name == "standard":
        layout, cache = StandardLayout(), standard_cache(9, num_heads, block_size, head_size,
                                                         torch.bfloat16)
    else:
        layout = CpuPackedLayout(layout_name, "fp8_e5m2")
        cache = cpu_cache(9, num_heads, block_size, head_size, "fp8_e5m2")
    tokens = PagedTokens.of([3, 8, 1, 5, 2], block_size, 4 * block_size + 3, "cpu")
    whole = layout.read_keys(cache, tokens)
    for start, end in [(0, 16), (16, 67), (5, 6), (15, 17), (30, 67), (0, 67), (64, 67)]:
        assert torch.equal(read_key_span(layout, cache, tokens, start, end), whole[start:end])
    sub, offset = tokens.span(20, 40)
    assert sub.block_ids.tolist() == [8, 1] and sub.num_tokens == 40 - 16 and offset == 4
    with pytest.raises(ValueError, match="outside"):
        tokens.span(60, 68)


# --- The worker's compaction: equal to the dense selection, rows moved exactly ------------------


def compact(layout, kv_cache, window_queries, plan, source, scale=0.125, kernel_size=7,
            pooling="max", sinks=None, soft_cap=None, metric=None, token_features=None):
    """``WorkerCompression._compact`` itself, on a stand-in worker state and layer (``metric``:
    the layer's value metric, for value-aware rules; ``token_features``: the job's, for rules
    that read token ids)."""
    state = SimpleNamespace(
        _layout=lambda impl, layer: layout,
        _value_metric=lambda impl, layer, device: metric,
        config=SimpleNamespace(kernel_size=kernel_size, pooling=pooling),
    )
    impl = SimpleNamespace(head_size=window_queries.shape[-1], scale=scale, sinks=sinks,
                           logits_soft_cap=soft_cap)
    layer = SimpleNamespace(layer_name="model.layers.0.self_attn.attn")
    job = SimpleNamespace(
        request_id="r", plan=plan, sources={0: source}, token_features=token_features,
        target_slots={0: PagedTokens.of(plan.target_block_ids[0], source.block_size,
                                        plan.num_kept, "cpu").slots()},
    )
    return WorkerCompression._compact(state, impl, layer, job, window_queries, kv_cache, 0)


CASES = [
    # layout, kv cache dtype, model dtype, score chunk, kernel, pooling, sinks+soft-cap
    ("standard", torch.bfloat16, torch.bfloat16, 256, 7, "max", False),
    ("standard", torch.float16, torch.float16, 100, 3, "avg", True),
    ("standard", torch.float32, torch.float32, 16, 1, "max", False),
    ("vec", "auto", torch.float32, 64, 7, "avg", False),
    ("vec", "fp8_e4m3", torch.float32, 512, 7, "max", True),
    ("amx", "fp8_e5m2", torch.bfloat16, 48, 3, "max", False),
]


@pytest.mark.parametrize("score", SCORE_NAMES)
@pytest.mark.parametrize("layout_name,cache_dtype,dtype,chunk,kernel_size,pooling,extras", CASES)
def test_worker_compaction_is_the_dense_selection_moved_in_place(
    monkeypatch, layout_name, cache_dtype, dtype, chunk, kernel_size, pooling, extras, score
):
    """Spans of ``chunk`` positions (the module constant, patched smaller so several spans and
    block boundaries occur), targets reusing the request's own first source blocks, two earlier
    outputs re-prefilled after the prompt: kept positions equal the dense reference's on the
    stored keys (and, for the value-aware rule, the stored values dequantised with the layer's
    V scale), the targets hold exactly the stored K/V rows of those positions, and the
    temporary memory stayed under the documented bound for this rule, layout, dtype and span."""
    monkeypatch.setattr(selection, "SCORE_CHUNK_TOKENS", chunk)
    block_size, num_heads, q_heads, head_size, window = 16, 2, 6, 32, 8
    prompt_len, outputs, budget = 1500, 2, 200
    num_blocks = -(-(prompt_len + outputs) // block_size)
    gen = torch.Generator().manual_seed(7)
    if layout_name == "standard":
        layout = StandardLayout()
        cache = standard_cache(num_blocks + 4, num_heads, block_size, head_size, cache_dtype)
    else:
        layout = CpuPackedLayout(layout_name, cache_dtype, k_scale=0.5, v_scale=2.0)
        cache = cpu_cache(num_blocks + 4, num_heads, block_size, head_size, cache_dtype)
    block_ids = (torch.randperm(num_blocks + 3, generator=gen) + 1)[:num_blocks].tolist()
    source = PagedTokens.of(block_ids, block_size, prompt_len + outputs, "cpu")
    targets = tuple(block_ids[: -(-(budget + outputs) // block_size)])  # in place
    plan = CompressionPlan(prompt_len, budget, window, prompt_len, outputs, {0: targets},
                           score=score)
    stored_keys, stored_values = stored_keys_and_values(layout, cache, source)
    scoring = layout.scoring_keys(stored_keys[:prompt_len]).float()
    scoring_values = layout.scoring_values(stored_values[:prompt_len]).float()
    q_heads_hidden = 48
    w_o = torch.randn(q_heads_hidden, q_heads * head_size, generator=gen)
    metric = value_metric(lambda x: x @ w_o.T, q_heads, num_heads, head_size, torch.float32,
                          "cpu")
    window_queries = (torch.randn(window, q_heads, head_size, generator=gen) * 3).to(dtype)
    options = {}
    if extras:
        options = {"sinks": torch.randn(q_heads, generator=gen) * 2, "soft_cap": 20.0}

    token_ids = frequent_and_rare_ids(prompt_len, seed=7)
    rule = score_rule(score)
    features = rule.token_features(token_ids) if rule.needs_token_ids else None
    kept = None

    def run():
        nonlocal kept
        kept = compact(layout, cache, window_queries, plan, source, kernel_size=kernel_size,
                       pooling=pooling, metric=metric, token_features=features, **options)

    peak = peak_cpu_bytes(run)
    element_bytes = cache.element_size()
    bound = compaction_workspace_bytes(q_heads, num_heads, head_size, window, budget, kernel_size,
                                       block_size, element_bytes, num_outputs=outputs,
                                       chunk_size=chunk, score=score, hidden_size=q_heads_hidden)
    assert 0 < peak <= bound, (peak, bound)

    want = select_kept_positions(window_queries, scoring, budget, 0.125, kernel_size, pooling,
                                 score=score, values=scoring_values, value_metric=metric,
                                 token_ids=token_ids, **options)
    assert torch.equal(kept, want)
    per_slot = torch.cat([kept, torch.arange(prompt_len, prompt_len + outputs).expand(2, -1)], 1)
    heads = torch.arange(num_heads)
    written = PagedTokens.of(targets, block_size, budget + outputs, "cpu")
    got_keys, got_values = stored_keys_and_values(layout, cache, written)
    assert torch.equal(got_keys, stored_keys[per_slot.T, heads])
    assert torch.equal(got_values, stored_values[per_slot.T, heads])


# --- The bound -----------------------------------------------------------------------------------

SHAPE = dict(block_size=16, kv_heads=2, q_heads=8, head_size=32, window=16, budget=512)


def paged_request(prompt_len, seed=0):
    bs, heads, head_size = SHAPE["block_size"], SHAPE["kv_heads"], SHAPE["head_size"]
    num_blocks = -(-prompt_len // bs)
    cache = standard_cache(num_blocks + 1, heads, bs, head_size, torch.bfloat16, seed)
    gen = torch.Generator().manual_seed(seed)
    block_ids = (torch.randperm(num_blocks, generator=gen) + 1).tolist()
    source = PagedTokens.of(block_ids, bs, prompt_len, "cpu")
    targets = tuple(block_ids[: -(-SHAPE["budget"] // bs)])
    plan = CompressionPlan(
        prompt_len, SHAPE["budget"], SHAPE["window"], prompt_len, 0, {0: targets}
    )
    window_queries = torch.randn(SHAPE["window"], SHAPE["q_heads"], head_size, generator=gen)
    return cache, source, plan, window_queries.to(torch.bfloat16)


def test_compaction_workspace_is_bounded_whatever_the_prompt_length():
    """The worker's compaction of one layer at 8K, 32K and 64K prompt tokens (default span,
    :data:`~vllm_snapkv.selection.SCORE_CHUNK_TOKENS`): under the documented bound at every
    length, and the same peak from the second span on (at 8K the prompt is one span, so the
    running top has nothing to merge with yet: the only difference is that ``O(H_kv·(C + P))``
    merge). The dense reference at 64K exceeds the bound several times, so an L-proportional
    ``[heads, window, L]`` tensor or a whole-prompt key copy would fail this."""
    bound = compaction_workspace_bytes(
        SHAPE["q_heads"], SHAPE["kv_heads"], SHAPE["head_size"], SHAPE["window"],
        SHAPE["budget"], 7, SHAPE["block_size"], cache_element_bytes=2,
    )
    merge = 48 * SHAPE["kv_heads"] * (SHAPE["budget"] + selection.SCORE_CHUNK_TOKENS)
    peaks = {}
    for prompt_len in (8192, 32768, 65536):
        cache, source, plan, queries = paged_request(prompt_len)
        compact(StandardLayout(), cache, queries, plan, source)  # warm-up
        peaks[prompt_len] = peak_cpu_bytes(
            lambda: compact(StandardLayout(), cache, queries, plan, source)
        )
    assert all(0 < peak <= bound for peak in peaks.values()), (peaks, bound)
    assert peaks[65536] - peaks[8192] <= merge, (peaks, merge)
    assert peaks[65536] <= 1.01 * peaks[32768], peaks  # twice the prompt, the same workspace

    # The measurement sees an L-proportional tensor: the dense reference on the same request.
    keys = StandardLayout().read_keys(cache, source)
    dense = peak_cpu_bytes(
        lambda: select_kept_positions(queries, keys, plan.budget, 0.125, 7, "max")
    )
    assert dense > 4 * bound, (dense, bound)


def test_profiling_run_holds_the_workspace_bound_on_cuda(monkeypatch):
    """vLLM sizes the KV cache from the profiling run's peak: on CUDA it includes the bound."""
    from vllm_snapkv.adapter import workspace
    from vllm_snapkv.config import parse_config

    config = parse_config({"budget": 2048})
    model = SimpleNamespace(
        dtype=torch.bfloat16,
        get_num_attention_heads=lambda parallel: 32 // parallel.tensor_parallel_size,
        get_num_kv_heads=lambda parallel: 8 // parallel.tensor_parallel_size,
        get_head_size=lambda: 128,
        get_hidden_size=lambda: 4096,
        get_num_layers=lambda parallel: 32,
    )
    vllm_config = SimpleNamespace(
        model_config=model,
        parallel_config=SimpleNamespace(tensor_parallel_size=2),
        cache_config=SimpleNamespace(cache_dtype="auto", block_size=16),
        additional_config={"kv_compression": {"budget": 2048}},
    )
    # The largest over the rules (any request may pick one), plus the value metrics kept
    # per layer: 32 layers x 4 KV heads x 128 x 128 x float32 on this rank.
    expected = max(
        compaction_workspace_bytes(16, 4, 128, 32, 2048, 7, 16, 2),
        compaction_workspace_bytes(16, 4, 128, 32, 2048, 7, 16, 2, score="critical",
                                   hidden_size=4096),
    ) + 32 * 4 * 128 * 128 * 4
    assert workspace.compaction_workspace_of(vllm_config, config) == expected
    allocations = []
    monkeypatch.setattr(
        workspace.torch, "empty", lambda size, dtype, device: allocations.append((size, device))
    )
    profile_run = workspace._patch_profile_run(lambda self, *a, **k: "profiled")
    on_cuda = SimpleNamespace(vllm_config=vllm_config, device=torch.device("cuda", 0))
    on_cpu = SimpleNamespace(vllm_config=vllm_config, device=torch.device("cpu"))
    assert profile_run(on_cuda) == "profiled" and profile_run(on_cpu) == "profiled"
    assert allocations == [(expected, torch.device("cuda", 0))]


def test_profiling_run_adds_the_decode_window_buffer_bound_when_decode_compression_is_on(
    monkeypatch,
):
    """Decode compressions buffer the last window's queries of every request near its decode
    point: max_num_seqs x layers x window x query heads x head size, reserved with the rest."""
    from vllm_snapkv.adapter import workspace
    from vllm_snapkv.config import parse_config

    model = SimpleNamespace(
        dtype=torch.bfloat16,
        get_num_attention_heads=lambda parallel: 32,
        get_num_kv_heads=lambda parallel: 8,
        get_head_size=lambda: 128,
        get_hidden_size=lambda: 4096,
        get_num_layers=lambda parallel: 32 // parallel.pipeline_parallel_size,
    )
    settings = {"budget": 2048, "decode_interval": 512}
    vllm_config = SimpleNamespace(
        model_config=model,
        parallel_config=SimpleNamespace(tensor_parallel_size=1, pipeline_parallel_size=2),
        cache_config=SimpleNamespace(cache_dtype="auto", block_size=16),
        scheduler_config=SimpleNamespace(max_num_seqs=256),
        additional_config={"kv_compression": settings},
    )
    # (seqs x W + a scratch row) x layers (of this stage) x heads x d x bf16
    buffer = (256 * 32 + 1) * 16 * 32 * 128 * 2
    assert workspace.decode_window_buffer_of(vllm_config, parse_config(settings)) == buffer
    assert workspace.decode_window_buffer_of(vllm_config, parse_config({"budget": 2048})) == 0
    allocations = []
    monkeypatch.setattr(
        workspace.torch, "empty", lambda size, dtype, device: allocations.append(size)
    )
    profile_run = workspace._patch_profile_run(lambda self, *a, **k: None)
    profile_run(SimpleNamespace(vllm_config=vllm_config, device=torch.device("cuda", 0)))
    compaction = workspace.compaction_workspace_of(vllm_config, parse_config(settings))
    assert allocations == [compaction + buffer]


def small_vllm_config(settings: dict) -> SimpleNamespace:
    """A 4-layer model shape small enough to allocate its workspace bound on the CPU."""
    model = SimpleNamespace(
        dtype=torch.float16,
        get_num_attention_heads=lambda parallel: 8,
        get_num_kv_heads=lambda parallel: 2,
        get_head_size=lambda: 64,
        get_hidden_size=lambda: 512,
        get_num_layers=lambda parallel: 4,
    )
    return SimpleNamespace(
        model_config=model,
        parallel_config=SimpleNamespace(tensor_parallel_size=1, pipeline_parallel_size=1),
        cache_config=SimpleNamespace(cache_dtype="auto", block_size=16),
        scheduler_config=SimpleNamespace(max_num_seqs=16),
        additional_config={"kv_compression": settings},
    )


def profiled_peak(device: torch.device, monkeypatch) -> tuple[int, int, int]:
    """``(peak while the patched profile_run ran, its forward's activations, the reserved
    bound)``: the stand-in forward allocates activations of the bound's size and frees them, as
    vLLM's dummy forward does before ``profile_run`` returns. The peak is the allocator's: the
    CPU allocator's running total (``torch.profiler``) or CUDA's ``max_memory_allocated``."""
    from vllm_snapkv.adapter import workspace
    from vllm_snapkv.config import parse_config

    settings = {"budget": 256, "window_size": 16, "decode_interval": 128}
    vllm_config = small_vllm_config(settings)
    config = parse_config(settings)
    bound = (workspace.compaction_workspace_of(vllm_config, config)
             + workspace.decode_window_buffer_of(vllm_config, config))
    activations_bytes = bound

    def dummy_forward(runner):
        activations = torch.ones(activations_bytes, dtype=torch.uint8, device=runner.device)
        del activations

    monkeypatch.setattr(workspace, "PROFILED_DEVICE_TYPES", frozenset({device.type}))
    profile_run = workspace._patch_profile_run(dummy_forward)
    runner = SimpleNamespace(vllm_config=vllm_config, device=device)
    if device.type == "cpu":
        return peak_cpu_bytes(lambda: profile_run(runner)), activations_bytes, bound
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    profile_run(runner)
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before, activations_bytes, bound


def test_profiled_peak_holds_the_workspace_and_the_forward_together(monkeypatch):
    """Issue 22 item 3: at run time the workspace and window buffer coexist with a forward's
    activations, so the peak vLLM sizes the KV cache from must be their sum, not the larger of
    the two. Measured on the CPU allocator (the device gate opened for CPU): every allocation
    during the patched profile_run, with the running total after each."""
    peak, activations, bound = profiled_peak(torch.device("cpu"), monkeypatch)
    assert bound > 1 << 20  # a real allocation, not noise
    assert peak >= activations + bound, (peak, activations, bound)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu-check)")
def test_profiled_peak_holds_the_workspace_and_the_forward_together_on_cuda(monkeypatch):
    """The same on CUDA's caching allocator, whose peak ``memory_profiling`` reads."""
    peak, activations, bound = profiled_peak(torch.device("cuda", 0), monkeypatch)
    assert peak >= activations + bound, (peak, activations, bound)


def test_profile_run_outside_profiled_devices_is_vllms_own(monkeypatch):
    from vllm_snapkv.adapter import workspace

    allocations = []
    monkeypatch.setattr(workspace.torch, "empty", lambda *a, **k: allocations.append(a))
    profile_run = workspace._patch_profile_run(lambda self: "profiled")
    runner = SimpleNamespace(vllm_config=small_vllm_config({"budget": 256}),
                             device=torch.device("cpu"))
    assert profile_run(runner) == "profiled" and allocations == []
