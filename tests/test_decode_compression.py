"""SnapKV while decoding (``decode_interval``): bounded blocks over long generations, the
transformers reference, preemption, prefix caching, opt-out, several requests in one step.

One engine: budget 256, window 32, decode_interval 128, block size 128, chunks of 512 tokens.
Decode threshold 384 entries: a request holds at most 3 blocks while it generates, 2 after each
compression.
"""

from __future__ import annotations

import glob
import os
import time

import pytest
import torch

from benchmarks.quality.decode_reference import DecodeSnapKVReference
from conftest import (
    as_prompt,
    close_llm,
    generate_preempted_at,
    internal_id,
    load_dump,
    make_llm,
    prompt_of_length,
    scheduler_of,
    snapkv_config,
)
from vllm_snapkv.plan import cdiv, decode_threshold

pytestmark = pytest.mark.engine

BUDGET, WINDOW, INTERVAL, BLOCK, CHUNK = 256, 32, 128, 128, 512
THRESHOLD = decode_threshold(BUDGET, INTERVAL, BLOCK)
MAX_BLOCKS = cdiv(THRESHOLD, BLOCK)


@pytest.fixture(scope="module")
def decode_dump_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("decode-selections"))


@pytest.fixture(scope="module")
def decode_llm(model_dir: str, decode_dump_dir: str):
    llm = make_llm(
        model_dir,
        enforce_eager=True,
        max_num_batched_tokens=CHUNK,
        additional_config=snapkv_config(
            decode_dump_dir, budget=BUDGET, window_size=WINDOW, decode_interval=INTERVAL
        ),
    )
    assert scheduler_of(llm).kv_cache_manager.coordinator.block_pool is not None
    yield llm
    close_llm(llm)


@pytest.fixture(scope="module")
def tokenizer(decode_llm):
    return decode_llm.get_tokenizer()


def long_generation(max_tokens: int, opt_out: bool = False):
    from vllm import SamplingParams

    extra_args = {"kv_compression": "none"} if opt_out else None
    return SamplingParams(
        temperature=0.0, max_tokens=max_tokens, ignore_eos=True, extra_args=extra_args
    )


def manager_of(llm):
    return scheduler_of(llm).kv_cache_manager.coordinator.single_type_managers[0]


def step_until_done(llm, on_step=None) -> dict[str, list[int]]:
    """Step the engine until every request finished; ``on_step()`` after each step."""
    engine, outputs = llm.llm_engine, {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                outputs[output.request_id] = list(output.outputs[0].token_ids)
        if on_step is not None:
            on_step()
    return outputs


def plugin_compressions(dump_dir: str, request_id: str, prompt_len: int, compressed_prompt: bool):
    """The plugin's compressions of one request as ``(window_end, {layer: logical positions
    [H_kv, budget]})``: decode dumps hold stored-entry indices, mapped here through the
    positions each entry held."""
    compressions, end = [], prompt_len
    if compressed_prompt:
        logical = load_dump(dump_dir, request_id)["layers"]
        compressions.append((prompt_len, logical))
    else:
        logical = None
    paths = glob.glob(os.path.join(dump_dir, "decode", f"{request_id}-*.pt"))
    for path in sorted(paths, key=lambda p: int(p.rsplit(".", 2)[-2])):
        dump = torch.load(path)
        assert dump["phase"] == "decode" and dump["budget"] == BUDGET
        mapped = {}
        for layer, kept in dump["layers"].items():
            heads = kept.shape[0]
            if logical is None:  # nothing compressed yet: entry i is position i
                before = torch.arange(dump["window_end"]).expand(heads, -1)
            else:
                generated = torch.arange(end, dump["window_end"]).expand(heads, -1)
                before = torch.cat([logical[layer], generated], 1)
            assert before.shape[1] == dump["num_scored"]
            mapped[layer] = before.gather(1, kept)
        logical, end = mapped, dump["window_end"]
        compressions.append((end, mapped))
    return compressions


def test_long_generation_stays_within_the_threshold_blocks_and_starts_as_uncompressed(
    decode_llm, tokenizer, decode_dump_dir
):
    """A 100-token prompt (not compressed) generating 700 tokens: compressed at positions 384,
    512, 640, 768; never more than 3 blocks; the first budget + interval - prompt tokens (and
    the one sampled in the first compression's step) are those of the uncompressed cache; an
    opted-out request is never touched and holds all its blocks."""
    prompt = prompt_of_length(tokenizer, 100, 31337)
    scheduler = scheduler_of(decode_llm)
    manager, pool = manager_of(decode_llm), scheduler.kv_cache_manager.block_pool
    stats = scheduler._snapkv.stats
    decode_llm.reset_prefix_cache()
    free_at_start = pool.get_num_free_blocks()
    before = stats.decode_compressions

    engine = decode_llm.llm_engine
    engine.add_request("grow", as_prompt(prompt), long_generation(700))
    engine.add_request("full", as_prompt(prompt), long_generation(700, opt_out=True))
    grow, full = internal_id(scheduler, "grow"), internal_id(scheduler, "full")
    held = {grow: [], full: []}

    def record():
        for request_id in held:
            if request_id in manager.req_to_blocks:
                held[request_id].append(len(manager.req_to_blocks[request_id]))

    outputs = step_until_done(decode_llm, record)
    assert stats.decode_compressions - before == 4
    assert max(held[grow]) == MAX_BLOCKS
    assert held[full][-1] == cdiv(100 + 699, BLOCK)  # every entry, as without the plugin
    assert len(glob.glob(os.path.join(decode_dump_dir, "decode", "grow-*"))) == 4
    assert not glob.glob(os.path.join(decode_dump_dir, "decode", "full-*"))
    same = THRESHOLD - len(prompt) + 1
    assert outputs["grow"][:same] == outputs["full"][:same]
    assert pool.get_num_free_blocks() == free_at_start
    assert not scheduler._snapkv.requests


@pytest.fixture(scope="module")
def reference_case(decode_llm, tokenizer, decode_dump_dir):
    """A 530-token prompt (its window spans two prefill chunks) generating 400 tokens: prompt
    compression, then decode compressions at 658, 786 and 914."""
    prompt = prompt_of_length(tokenizer, 530, 27182)
    decode_llm.reset_prefix_cache()
    (output,) = decode_llm.generate(as_prompt(prompt), long_generation(400))
    return prompt, output


def test_kept_positions_and_tokens_equal_the_transformers_reference(
    reference_case, decode_dump_dir, model_dir
):
    prompt, output = reference_case
    got = plugin_compressions(decode_dump_dir, output.request_id, len(prompt), True)
    reference = DecodeSnapKVReference(model_dir, BUDGET, WINDOW, INTERVAL, 7, BLOCK).run(
        prompt, 400
    )
    assert [c.window_end for c in reference.compressions] == [530, 658, 786, 914]
    assert [end for end, _ in got] == [530, 658, 786, 914]
    for (_, kept), expected in zip(got, reference.compressions):
        assert sorted(kept) == list(range(30))
        for layer, positions in kept.items():
            assert positions.shape == (3, BUDGET)
            for head in range(3):  # float32 on both sides: the same positions, every one
                assert positions[head].tolist() == sorted(expected.kept[layer][head].tolist()), (
                    expected.window_end, layer, head
                )
    assert list(output.outputs[0].token_ids) == reference.tokens


def test_preemption_mid_generation_reproduces_the_cache(decode_llm, reference_case):
    """Preempted after two decode compressions: the recompute stops at the prompt's end and at
    each decode point, compresses there again, and the continuation is the unpreempted one."""
    prompt, unpreempted = reference_case
    engine, scheduler = decode_llm.llm_engine, scheduler_of(decode_llm)
    pool = scheduler.kv_cache_manager.block_pool
    stats = scheduler._snapkv.stats
    decode_llm.reset_prefix_cache()
    free_at_start = pool.get_num_free_blocks()
    prompts_before, decodes_before = stats.compressed_requests, stats.decode_compressions
    engine.add_request("preempt-me", as_prompt(prompt), long_generation(400))
    request_id = internal_id(scheduler, "preempt-me")
    outputs = []
    while stats.decode_compressions - decodes_before < 2 or len(outputs) < 1:
        outputs += engine.step()
    for _ in range(20):
        outputs += engine.step()
    (request,) = [r for r in scheduler.running if r.request_id == request_id]
    scheduler.running.remove(request)
    scheduler._preempt_request(request, time.monotonic())
    splits = []
    reserve = scheduler._reserve_prefill_lookahead

    def spy(req, computed, new):
        result = reserve(req, computed, new)
        if req.request_id == request_id and result > 1:
            splits.append((computed, computed + result))
        return result

    scheduler._reserve_prefill_lookahead = spy
    try:
        while engine.has_unfinished_requests():
            outputs += engine.step()
    finally:
        del scheduler._reserve_prefill_lookahead
    (final,) = [o for o in outputs if o.finished]
    assert list(final.outputs[0].token_ids) == list(unpreempted.outputs[0].token_ids)
    # Re-prefill chunks (after a prefix hit on its own first 384 prompt tokens) end at the prompt
    # (530) and at the two decode points it had passed, then one more up to its outputs.
    assert [end for _, end in splits][:3] == [530, 658, 786] and len(splits) == 4
    assert stats.compressed_requests - prompts_before == 2
    assert stats.decode_compressions - decodes_before == 2 + 3
    assert pool.get_num_free_blocks() == free_at_start


def test_short_prompt_preempted_after_its_first_decode_compression_continues_unchanged(
    decode_llm, tokenizer, decode_dump_dir
):
    """A 100-token prompt (not compressed) preempted 20 tokens after its decode compression at
    384. Its first 3 blocks went back to the pool untouched, hashes intact: the resumed request
    may hit at most the blocks before that point's window ([352, 384): 256 tokens), so it
    recomputes the window and compresses at 384 again, and generates as without preemption."""
    prompt = prompt_of_length(tokenizer, 100, 16180)
    decode_llm.reset_prefix_cache()
    (unpreempted,) = decode_llm.generate(as_prompt(prompt), long_generation(380))
    stats = scheduler_of(decode_llm)._snapkv.stats
    before = stats.decode_compressions
    tokens, request_id = generate_preempted_at(
        decode_llm, prompt, long_generation(380), THRESHOLD + 20
    )
    # 384 before the preemption, 384 again after it (nothing else before the end at 479).
    assert stats.decode_compressions - before == 2
    dump = torch.load(os.path.join(decode_dump_dir, "decode", f"{request_id}.0.pt"))
    assert dump["window_end"] == THRESHOLD  # the resumed request's compression, same point
    assert tokens == list(unpreempted.outputs[0].token_ids)


def test_several_requests_compress_in_the_same_step(decode_llm, tokenizer):
    scheduler = scheduler_of(decode_llm)
    stats, pool = scheduler._snapkv.stats, scheduler.kv_cache_manager.block_pool
    decode_llm.reset_prefix_cache()
    free_at_start = pool.get_num_free_blocks()
    engine = decode_llm.llm_engine
    for index in range(3):
        prompt = prompt_of_length(tokenizer, 120, 1000 + index, depth=0.3)
        engine.add_request(f"together-{index}", as_prompt(prompt), long_generation(300))
    per_step = []
    counts = [stats.decode_compressions]

    def record():
        counts.append(stats.decode_compressions)
        per_step.append(counts[-1] - counts[-2])
        for request_id, blocks in manager_of(decode_llm).req_to_blocks.items():
            assert len(blocks) <= MAX_BLOCKS, request_id

    step_until_done(decode_llm, record)
    assert sorted(n for n in per_step if n) == [3]  # all three in one step, at position 384
    assert pool.get_num_free_blocks() == free_at_start


def test_generated_prefix_is_shared_through_the_prefix_cache(decode_llm, tokenizer):
    """A request whose prompt is another's prompt + 300 of its generated tokens hits the blocks
    that request filled before its first decode compression (released untouched, hashes
    intact), and generates as it does with an empty prefix cache."""
    prompt = prompt_of_length(tokenizer, 100, 42424)
    decode_llm.reset_prefix_cache()
    (first,) = decode_llm.generate(as_prompt(prompt), long_generation(500))
    follow_up = prompt + list(first.outputs[0].token_ids[:300])
    (hit,) = decode_llm.generate(as_prompt(follow_up), long_generation(300))
    assert hit.num_cached_tokens == 256  # window kept out: (400 - 32) // 128 * 128
    decode_llm.reset_prefix_cache()
    (cold,) = decode_llm.generate(as_prompt(follow_up), long_generation(300))
    assert cold.num_cached_tokens == 0
    assert list(hit.outputs[0].token_ids) == list(cold.outputs[0].token_ids)


def test_request_aborted_while_its_window_is_captured_leaves_nothing_behind(
    decode_llm, tokenizer
):
    """Aborted between its capture steps and its decode point: its blocks go back, and the
    scheduler's and the worker's per-request state (buffered window queries) is gone."""
    from benchmarks.common import worker_state_of

    scheduler = scheduler_of(decode_llm)
    pool, state = scheduler.kv_cache_manager.block_pool, scheduler._snapkv
    worker = worker_state_of(decode_llm)
    decode_llm.reset_prefix_cache()
    free_at_start = pool.get_num_free_blocks()
    engine = decode_llm.llm_engine
    engine.add_request("abort-me", as_prompt(prompt_of_length(tokenizer, 100, 8080)),
                       long_generation(400))
    request_id = internal_id(scheduler, "abort-me")
    while scheduler.requests[request_id].num_computed_tokens < THRESHOLD - 10:
        engine.step()
    assert state.requests[request_id].window_captured_from == THRESHOLD - WINDOW
    # One ring row per step so far.
    assert worker.ring.captured(request_id) == (THRESHOLD - WINDOW, THRESHOLD - 10)
    engine.abort_request(["abort-me"])
    engine.step()
    assert not engine.has_unfinished_requests()
    # Workers learn of finished requests with the next step that runs the model.
    decode_llm.generate(as_prompt(prompt_of_length(tokenizer, 40, 1)), long_generation(2))
    assert pool.get_num_free_blocks() == free_at_start
    assert request_id not in state.requests
    assert request_id not in worker.window_queries
    assert worker.ring.captured(request_id) is None
