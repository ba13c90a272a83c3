"""The standard-layout (GPU backends') path end to end, on CPU: vLLM's FlexAttention backend.

FlexAttention stores the KV cache in the layout vLLM 0.32 gives FlashAttention, Triton and
FlashInfer (tests/standard_layout_harness.py). These tests run the plugin's capture, selection,
compaction, block swaps and physical lengths through it on the real SmolLM2 model: blocks from
vLLM's block pool, selections against the transformers reference, chunked prefill with the window
split, prefix caching and preemption. Eager flex attends over the whole cache, so caches are tiny.
"""

from __future__ import annotations

import pytest
from vllm import SamplingParams

from conftest import (
    as_prompt,
    close_llm,
    decode_checking_physical_blocks,
    generate_preempted_at,
    generate_under_preemption,
    greedy,
    internal_id,
    load_dump,
    make_llm,
    prompt_of_length,
    reference_kept_positions,
    scheduler_of,
    snapkv_config,
    token_ids,
)
from standard_layout_harness import BLOCK_SIZE, flex_attention_on_cpu, flex_kv_caches
from vllm_snapkv.adapter.worker import worker_report
from vllm_snapkv.plan import cdiv, prefix_hit_limit

pytestmark = pytest.mark.engine

CHUNK = 256
WINDOW = 32
BUDGET = 128  # the server's; 8 blocks of 16
DECODE_INTERVAL = 128  # decode compressions at 256 stored entries (16 blocks)


def make_flex_llm(model_dir: str, dump_dir: str, num_blocks: int, max_model_len: int):
    with flex_attention_on_cpu():
        return make_llm(
            model_dir,
            enforce_eager=True,
            block_size=BLOCK_SIZE,
            num_gpu_blocks_override=num_blocks,
            max_model_len=max_model_len,
            max_num_batched_tokens=CHUNK,
            additional_config=snapkv_config(
                dump_dir, budget=BUDGET, window_size=WINDOW, decode_interval=DECODE_INTERVAL
            ),
        )


@pytest.fixture(scope="module")
def flex_dump_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("flex"))


@pytest.fixture(scope="module")
def flex_llm(model_dir: str, flex_dump_dir: str):
    """SnapKV on, FlexAttention, 96 blocks of 16 tokens, chunked prefill of 256, prefix caching."""
    llm = make_flex_llm(model_dir, flex_dump_dir, num_blocks=96, max_model_len=1024)
    yield llm
    close_llm(llm)


@pytest.fixture(scope="module")
def tokenizer(flex_llm):
    return flex_llm.get_tokenizer()


def full_cache(max_tokens: int = 16) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, extra_args={"kv_compression": "none"})


def test_engine_runs_flex_attention_on_a_strided_standard_layout_view(flex_llm):
    (report,) = flex_llm.collective_rpc(worker_report)
    assert report["backends"] == ["FLEX_ATTENTION"] and report["compression"]
    cache = flex_kv_caches(flex_llm)[0]
    # Logical [blocks, kv_heads, block_size, K|V] over LBNHC storage: not contiguous.
    assert cache.shape[1:] == (3, BLOCK_SIZE, 2 * 64)
    assert not cache.is_contiguous()


def test_prompt_within_budget_generates_exactly_as_the_full_cache(flex_llm, tokenizer):
    prompt = as_prompt(prompt_of_length(tokenizer, 120, 31415))
    stats = scheduler_of(flex_llm)._snapkv.stats
    before = stats.compressed_requests
    (snap,) = flex_llm.generate(prompt, greedy())
    (full,) = flex_llm.generate(prompt, full_cache())
    assert stats.compressed_requests == before
    assert token_ids([snap]) == token_ids([full])


def test_compression_changes_generation_versus_full_cache(flex_llm, tokenizer):
    # Guards the equality tests against a plugin that silently does nothing on this backend.
    prompt = as_prompt(prompt_of_length(tokenizer, 600, 27182))
    (snap,) = flex_llm.generate(prompt, greedy(48, max_tokens=32))
    (full,) = flex_llm.generate(prompt, full_cache(max_tokens=32))
    assert token_ids([snap]) != token_ids([full])


def test_compressed_request_holds_budget_blocks_from_the_pool_and_returns_the_rest(
    flex_llm, tokenizer
):
    budget = 100  # not a block multiple
    engine = flex_llm.llm_engine
    scheduler = scheduler_of(flex_llm)
    manager = scheduler.kv_cache_manager.coordinator.single_type_managers[0]
    pool = scheduler.kv_cache_manager.block_pool
    assert manager.block_size == BLOCK_SIZE
    flex_llm.reset_prefix_cache()
    free_at_start = pool.get_num_free_blocks()
    prompt_ids = prompt_of_length(tokenizer, 700, 16180)
    engine.add_request("blocks", as_prompt(prompt_ids), greedy(budget, max_tokens=40))
    engine.step()
    request_id = internal_id(scheduler, "blocks")
    request = scheduler.requests[request_id]
    while request.num_computed_tokens < len(prompt_ids):  # chunked: 256 + 256 + 188
        assert len(manager.req_to_blocks[request_id]) == cdiv(request.num_computed_tokens, 16)
        engine.step()
    assert len(manager.req_to_blocks[request_id]) == cdiv(budget, BLOCK_SIZE)
    assert pool.get_num_free_blocks() == free_at_start - cdiv(budget, BLOCK_SIZE)
    decode_checking_physical_blocks(engine, scheduler, request_id, len(prompt_ids), budget)
    assert request.num_output_tokens == 40
    assert pool.get_num_free_blocks() == free_at_start


def test_window_split_across_chunks_selects_as_the_transformers_reference(
    flex_llm, tokenizer, flex_dump_dir, model_dir, monkeypatch
):
    from vllm_snapkv.adapter import worker as worker_module

    # Chunks of 256, 256, 20: the 32-token window spans the last two.
    prompt_ids = prompt_of_length(tokenizer, 2 * CHUNK + 20, 14142)
    buffered: list[int] = []
    on_attention_layer = worker_module.WorkerCompression.on_attention_layer

    def spy(self, impl, layer, query, kv_cache):
        for job in self.jobs:
            if job.plan is None:  # a chunk before the last: its window rows are buffered
                rows = job.window_rows()
                buffered.append(rows.stop - rows.start)
        return on_attention_layer(self, impl, layer, query, kv_cache)

    monkeypatch.setattr(worker_module.WorkerCompression, "on_attention_layer", spy)
    flex_llm.reset_prefix_cache()
    (output,) = flex_llm.generate(as_prompt(prompt_ids), greedy(BUDGET, max_tokens=4))
    assert set(buffered) == {WINDOW - 20}, "12 window queries buffered in every layer"
    dump = load_dump(flex_dump_dir, output.request_id)
    assert dump["prompt_len"] == len(prompt_ids) and sorted(dump["layers"]) == list(range(30))
    reference = reference_kept_positions(model_dir, prompt_ids, BUDGET, WINDOW)
    for layer, kept in dump["layers"].items():
        assert kept.shape == (3, BUDGET)
        for head in range(3):
            assert set(kept[head].tolist()) == reference[layer][head], (layer, head)


def test_shared_prefix_stays_cached_and_correct(flex_llm, tokenizer):
    shared = prompt_of_length(tokenizer, 500, 86420)[:-12]  # drop the question
    first = shared + tokenizer(" What is the pass key? The pass key is").input_ids
    second = shared + tokenizer(" Tell me the pass key again. The pass key is").input_ids
    flex_llm.reset_prefix_cache()
    (second_alone,) = flex_llm.generate(as_prompt(second), greedy())
    flex_llm.reset_prefix_cache()
    stats = scheduler_of(flex_llm)._snapkv.stats
    before = stats.compressed_requests
    (first_out,) = flex_llm.generate(as_prompt(first), greedy())
    (second_out,) = flex_llm.generate(as_prompt(second), greedy())
    assert stats.compressed_requests == before + 2
    # The first request's uncompressed prompt blocks stayed cached and give the same output.
    assert second_out.num_cached_tokens >= 400
    assert token_ids([second_out]) == token_ids([second_alone])
    (repeat,) = flex_llm.generate(as_prompt(first), greedy())
    assert repeat.num_cached_tokens == prefix_hit_limit(len(first), WINDOW, BLOCK_SIZE)
    assert token_ids([repeat]) == token_ids([first_out])


def test_aborted_compressed_request_releases_every_block(flex_llm, tokenizer):
    engine = flex_llm.llm_engine
    scheduler = scheduler_of(flex_llm)
    pool = scheduler.kv_cache_manager.block_pool
    flex_llm.reset_prefix_cache()
    free_at_start = pool.get_num_free_blocks()
    engine.add_request("to-abort", as_prompt(prompt_of_length(tokenizer, 400, 1212)), greedy(64, 100))
    for _ in range(4):
        engine.step()
    internal = internal_id(scheduler, "to-abort")
    assert scheduler._snapkv.evicted[internal] > 0
    engine.abort_request(["to-abort"])
    engine.step()
    assert not engine.has_unfinished_requests()
    assert pool.get_num_free_blocks() == free_at_start


@pytest.fixture(scope="module")
def small_flex_llm(model_dir: str, tmp_path_factory):
    """25 blocks of 16 tokens (one is vLLM's null block): three compressed requests outgrow it
    while decoding."""
    llm = make_flex_llm(
        model_dir, str(tmp_path_factory.mktemp("flex-small")), num_blocks=25, max_model_len=384
    )
    yield llm
    close_llm(llm)


def test_preemption_recomputes_and_recompresses_transparently(flex_llm, small_flex_llm, tokenizer):
    prompts = [as_prompt(prompt_of_length(tokenizer, 250, 500 + i, 0.3 * i)) for i in range(3)]
    params = greedy(48, max_tokens=120)  # 3 + 8 blocks each once decoded: 33 > 24
    flex_llm.reset_prefix_cache()
    expected = token_ids(flex_llm.generate(prompts, params))

    got, _ = generate_under_preemption(small_flex_llm, prompts, params)
    assert got == expected


def test_decode_compressions_equal_the_transformers_reference(
    flex_llm, tokenizer, flex_dump_dir, model_dir
):
    """A 100-token prompt generating 300 tokens on the standard layout: compressed while
    decoding at positions 256 and 384 (blocks of 16), each compression's kept entries and the
    tokens equal the decode-time transformers reference; never more than 16 blocks."""
    import glob
    import os

    import torch

    from benchmarks.quality.decode_reference import DecodeSnapKVReference

    prompt_ids = prompt_of_length(tokenizer, 100, 57721)
    params = SamplingParams(temperature=0.0, max_tokens=300, ignore_eos=True)
    scheduler = scheduler_of(flex_llm)
    manager = scheduler.kv_cache_manager.coordinator.single_type_managers[0]
    pool = scheduler.kv_cache_manager.block_pool
    flex_llm.reset_prefix_cache()
    free_at_start = pool.get_num_free_blocks()
    engine = flex_llm.llm_engine
    engine.add_request("decode", as_prompt(prompt_ids), params)
    request_id = internal_id(scheduler, "decode")
    held, tokens = [], None
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                tokens = list(output.outputs[0].token_ids)
        if request_id in manager.req_to_blocks:
            held.append(len(manager.req_to_blocks[request_id]))
    assert max(held) == cdiv(BUDGET + DECODE_INTERVAL, BLOCK_SIZE)
    assert pool.get_num_free_blocks() == free_at_start

    reference = DecodeSnapKVReference(
        model_dir, BUDGET, WINDOW, DECODE_INTERVAL, 7, BLOCK_SIZE
    ).run(prompt_ids, 300)
    assert [c.window_end for c in reference.compressions] == [256, 384]
    assert tokens == reference.tokens
    for index, expected in enumerate(reference.compressions):
        (path,) = glob.glob(os.path.join(flex_dump_dir, "decode", f"{request_id}.{index}.pt"))
        dump = torch.load(path)
        assert dump["window_end"] == expected.window_end
        for layer, kept in dump["layers"].items():
            for head in range(3):  # float32 on both sides: the same entries, every one
                assert kept[head].tolist() == sorted(
                    expected.kept_entries[layer][head].tolist()
                ), (index, layer, head)


def test_short_prompt_preempted_inside_its_decode_window_continues_unchanged(
    flex_llm, tokenizer, flex_dump_dir
):
    """A 100-token prompt (not compressed) preempted at 250, while the window [224, 256) of its
    first decode point is captured. Blocks of 16: a hit up to 240 would leave the resumed request
    only part of that window (compressing later, with another window). The hit stops at 224, the
    window is captured again, and it compresses at 256 and generates as without preemption."""
    import os

    import torch

    prompt_ids = prompt_of_length(tokenizer, 100, 31415)
    params = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
    flex_llm.reset_prefix_cache()
    (unpreempted,) = flex_llm.generate(as_prompt(prompt_ids), params)
    tokens, request_id = generate_preempted_at(flex_llm, prompt_ids, params, 250)
    dump = torch.load(os.path.join(flex_dump_dir, "decode", f"{request_id}.0.pt"))
    assert dump["window_end"] == 256
    assert tokens == list(unpreempted.outputs[0].token_ids)
