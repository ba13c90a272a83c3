"""Compression under vLLM's scheduling features: chunked prefill, prefix caching, preemption."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from conftest import (
    assert_same_selection,
    close_llm,
    generate_preempted_after_decoding,
    generate_under_preemption,
    greedy,
    as_prompt,
    load_dump,
    make_llm,
    prompt_of_length,
    scheduler_of,
    snapkv_config,
    token_ids,
)
from vllm_snapkv.plan import prefix_hit_limit

pytestmark = pytest.mark.engine

CHUNK = 256
WINDOW = 32
BUDGET = 256


@pytest.fixture(scope="module")
def tokenizer(snap_llm):
    return snap_llm.get_tokenizer()


@pytest.fixture(scope="module")
def chunked_dump_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("chunked"))


@pytest.fixture(scope="module")
def chunked_llm(model_dir: str, chunked_dump_dir: str):
    llm = make_llm(
        model_dir,
        enforce_eager=True,
        max_num_batched_tokens=CHUNK,
        additional_config=snapkv_config(chunked_dump_dir),
    )
    yield llm
    close_llm(llm)


def test_window_split_across_chunks_keeps_one_shot_positions(
    snap_llm, chunked_llm, tokenizer, dump_dir, chunked_dump_dir
):
    # 7 full chunks, then 12 tokens: the 32-token window spans the last two chunks.
    ids = prompt_of_length(tokenizer, 7 * CHUNK + 12, 53535)
    snap_llm.reset_prefix_cache()
    (one_shot,) = snap_llm.generate(as_prompt(ids), greedy(BUDGET))
    (chunked,) = chunked_llm.generate(as_prompt(ids), greedy(BUDGET))
    assert token_ids([chunked]) == token_ids([one_shot])
    expected = load_dump(dump_dir, one_shot.request_id)["layers"]
    assert sorted(expected) == list(range(30))
    assert_same_selection(expected, load_dump(chunked_dump_dir, chunked.request_id)["layers"], BUDGET)


def test_shared_prefix_stays_cached_and_correct(snap_llm, tokenizer):
    shared = prompt_of_length(tokenizer, 1500, 86420)[:-12]  # drop the question
    first = shared + tokenizer(" What is the pass key? The pass key is").input_ids
    second = shared + tokenizer(" Tell me the pass key again. The pass key is").input_ids

    snap_llm.reset_prefix_cache()
    (second_alone,) = snap_llm.generate(as_prompt(second), greedy(BUDGET))
    assert second_alone.num_cached_tokens == 0
    snap_llm.reset_prefix_cache()

    stats = scheduler_of(snap_llm)._snapkv.stats
    before = stats.compressed_requests
    (first_out,) = snap_llm.generate(as_prompt(first), greedy(BUDGET))
    (second_out,) = snap_llm.generate(as_prompt(second), greedy(BUDGET))
    assert stats.compressed_requests == before + 2
    # The first request's uncompressed prompt blocks stayed in the prefix cache...
    assert second_out.num_cached_tokens >= 1024
    # ...and hitting them gives what a run without any cache hit gives.
    assert token_ids([second_out]) == token_ids([second_alone])

    (repeat,) = snap_llm.generate(as_prompt(first), greedy(BUDGET))
    # A repeated prompt hits everything but its observation window (queries are not cached).
    assert repeat.num_cached_tokens == prefix_hit_limit(len(first), WINDOW, 128)
    assert token_ids([repeat]) == token_ids([first_out])


BLOCK_BYTES = 30 * 3 * 128 * 2 * 64 * 4  # layers * kv heads * block * (K+V) * head_dim * fp32


@pytest.fixture(scope="module")
def small_cache_llm(model_dir: str, tmp_path_factory):
    llm = make_llm(
        model_dir,
        enforce_eager=True,
        max_model_len=2048,
        max_num_batched_tokens=2048,
        kv_cache_memory_bytes=18 * BLOCK_BYTES,
        additional_config=snapkv_config(str(tmp_path_factory.mktemp("small"))),
    )
    yield llm
    close_llm(llm)


def test_preemption_recomputes_and_recompresses_transparently(snap_llm, small_cache_llm, tokenizer):
    prompts = [as_prompt(prompt_of_length(tokenizer, 1000, 1000 + i, 0.3 * i)) for i in range(4)]
    params = greedy(BUDGET, max_tokens=300)
    expected = token_ids(snap_llm.generate(prompts, params))

    got, _ = generate_under_preemption(small_cache_llm, prompts, params)
    assert got == expected


@contextmanager
def compresses_without_leaking(llm, num_compressions: int) -> Iterator[None]:
    """Runs the block from an empty prefix cache; then exactly ``num_compressions`` compressions
    happened, none was skipped, and the pool's free count is back at its start."""
    scheduler = scheduler_of(llm)
    pool = scheduler.kv_cache_manager.block_pool
    stats = scheduler._snapkv.stats
    llm.reset_prefix_cache()
    free_at_start = pool.get_num_free_blocks()
    compressed, skipped = stats.compressed_requests, stats.skipped_no_free_blocks
    yield
    assert stats.compressed_requests == compressed + num_compressions
    assert stats.skipped_no_free_blocks == skipped
    assert pool.get_num_free_blocks() == free_at_start


def test_full_pool_compacts_in_place_into_the_requests_own_blocks(
    snap_llm, small_cache_llm, tokenizer
):
    # 16 of the 17 usable blocks (vLLM keeps one as its null block) hold the prompt; a 384
    # budget needs 3 targets and 1 is free.
    prompt = as_prompt(prompt_of_length(tokenizer, 2000, 97531))
    params = greedy(384, max_tokens=24)
    (expected,) = snap_llm.generate(prompt, params)
    with compresses_without_leaking(small_cache_llm, 1):
        (got,) = small_cache_llm.generate(prompt, params)
    assert token_ids([got]) == token_ids([expected])
    # The 3 tail blocks were rewritten and lost their prefix-cache entries; the 13 leading
    # blocks went back to the pool untouched and a repeat hits them with the same output.
    (repeat,) = small_cache_llm.generate(prompt, params)
    assert repeat.num_cached_tokens == 13 * 128
    assert token_ids([repeat]) == token_ids([expected])


def test_full_pool_with_shared_leading_blocks_compacts_into_owned_tail_blocks(
    snap_llm, small_cache_llm, tokenizer, monkeypatch
):
    from vllm import SamplingParams

    import vllm_snapkv.adapter.block_accounting as accounting

    # The same 2000-token prompt twice, once with the full cache (16 of the 17 usable blocks),
    # once compressed to 1 block: the second request hits the first one's 15 full blocks and takes
    # the last free block. At its compaction no block is free and all but its last block are
    # shared, so only that owned tail block can take the target (budget 100).
    prompt = as_prompt(prompt_of_length(tokenizer, 2000, 24680))
    full_params = SamplingParams(
        temperature=0.0, max_tokens=40, extra_args={"kv_compression": "none"}
    )
    snap_llm.reset_prefix_cache()
    (expected_compressed,) = snap_llm.generate(prompt, greedy(100))
    (expected_full,) = snap_llm.generate(prompt, full_params)

    calls: list[tuple[int, dict, set]] = []
    in_place_targets = accounting._in_place_targets

    def spy(block_pool, sources, num_targets):
        (group_sources,) = sources.values()  # one KV cache group
        shared_sources = sum(block.ref_cnt != 1 for block in group_sources)
        targets, reused = in_place_targets(block_pool, sources, num_targets)
        calls.append((shared_sources, targets, reused))
        return targets, reused

    monkeypatch.setattr(accounting, "_in_place_targets", spy)
    with compresses_without_leaking(small_cache_llm, 1):
        got_full, got_compressed = small_cache_llm.generate(
            [prompt, prompt], [full_params, greedy(100)]
        )
    ((shared_sources, targets, reused),) = calls
    assert shared_sources == 15
    (group_targets,) = targets.values()
    assert {block.block_id for block in group_targets} == reused and len(reused) == 1
    assert token_ids([got_compressed]) == token_ids([expected_compressed])
    assert token_ids([got_full]) == token_ids([expected_full])


def test_preemption_after_decoding_continues_as_if_never_preempted(snap_llm, tokenizer):
    # vLLM recomputes a preempted request's prompt *and* earlier outputs. Those outputs were
    # first computed attending to the compressed cache; recomputing them over the full prompt
    # would change their KV and so the continuation. The plugin splits the re-prefill at the
    # prompt's end: compress exactly as the first time, then recompute the outputs over it.
    ids = prompt_of_length(tokenizer, 1500, 60221, 0.5)
    params = greedy(BUDGET, max_tokens=48)
    snap_llm.reset_prefix_cache()
    (expected,) = snap_llm.generate(as_prompt(ids), params)
    got = generate_preempted_after_decoding(snap_llm, ids, params, steps=20)
    assert got == list(expected.outputs[0].token_ids)


def test_seeded_requests_keep_one_re_prefill_chunk_on_cpu():
    # vLLM 0.32's CPU worker cannot rewind a seeded request's generator after a partial prefill.
    from types import SimpleNamespace

    from vllm_snapkv.adapter.scheduler import _split_crashes_vllm

    seeded = SimpleNamespace(sampling_params=SimpleNamespace(seed=7))
    unseeded = SimpleNamespace(sampling_params=SimpleNamespace(seed=None))
    assert _split_crashes_vllm(seeded) and not _split_crashes_vllm(unseeded)
