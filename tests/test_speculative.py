"""Speculative decoding (n-gram) with SnapKV: lossless, bounded, preemptible.

One engine: n-gram speculation with 3 draft tokens a step, SnapKV budget 256, window 32,
decode_interval 128, block size 128, chunks of 512 tokens (the decode threshold is 384 entries,
so a request holds at most 3 blocks while it generates). It needs its own engine: speculation is
an engine setting (test_speculative_draft.py has the draft-model one).

The non-speculative reference runs on the same engine with the drafts dropped before they reach
the scheduler (``Scheduler.update_draft_token_ids``): vLLM then schedules one token a step per
request and samples without the rejection sampler, as an engine without speculation does. Greedy
speculative decoding is lossless, so with the same compression the tokens must be equal; that
holds only if every compression happens at the same position, over the same entries and window
queries, whatever the drafts and their rejections did.
"""

from __future__ import annotations

import time

import pytest

import speculation
from conftest import (
    as_prompt,
    assert_same_selection,
    close_llm,
    internal_id,
    make_llm,
    scheduler_of,
    snapkv_config,
)
from speculation import Run, kept_entries, repetitive_prompt
from vllm_snapkv.plan import cdiv, decode_threshold

pytestmark = pytest.mark.engine

BUDGET, WINDOW, INTERVAL, BLOCK, CHUNK = 256, 32, 128, 128, 512
NUM_DRAFTS = 3
THRESHOLD = decode_threshold(BUDGET, INTERVAL, BLOCK)
MAX_BLOCKS = cdiv(THRESHOLD, BLOCK)
MAX_TOKENS = 300

@pytest.fixture(scope="module")
def spec_dump_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("speculative"))


@pytest.fixture(scope="module")
def spec_llm(model_dir: str, spec_dump_dir: str):
    llm = make_llm(
        model_dir,
        enforce_eager=True,
        max_num_batched_tokens=CHUNK,
        speculative_config={
            "method": "ngram",
            "num_speculative_tokens": NUM_DRAFTS,
            "prompt_lookup_min": 2,
            "prompt_lookup_max": 4,
        },
        additional_config=snapkv_config(
            spec_dump_dir, budget=BUDGET, window_size=WINDOW, decode_interval=INTERVAL
        ),
    )
    yield llm
    close_llm(llm)


@pytest.fixture(scope="module")
def prompts(spec_llm) -> dict[str, list[int]]:
    """``long``: ~1000 tokens, compressed at its prompt's end, then at 128-token intervals;
    ``short``: ~200 tokens (under the budget), compressed only while decoding."""
    tokenizer = spec_llm.get_tokenizer()
    cases = {"long": repetitive_prompt(tokenizer, 48), "short": repetitive_prompt(tokenizer, 9)}
    assert len(cases["long"]) > 2 * BUDGET and len(cases["short"]) < BUDGET
    return cases


def generation():
    return speculation.generation(MAX_TOKENS)


@pytest.fixture(scope="module")
def plain(spec_llm, prompts) -> Run:
    return Run(spec_llm, prompts, speculate=False, max_tokens=MAX_TOKENS)


@pytest.fixture(scope="module")
def speculative(spec_llm, prompts) -> Run:
    return Run(spec_llm, prompts, speculate=True, max_tokens=MAX_TOKENS)


def test_speculative_greedy_tokens_equal_plain_greedy_with_the_same_compression(
    plain, speculative, prompts, spec_dump_dir
):
    """Prompt compression (``long``) and decode compressions (both): the same compressions (phase,
    position, entries scored), the same tokens, and drafts really were accepted (many steps
    added several tokens)."""
    assert plain.accepted == {"long": 0, "short": 0}
    for name in prompts:
        assert speculative.accepted[name] >= MAX_TOKENS // 4, (name, speculative.accepted)
    # No draft in a compressing step, while drafts run up to the points; each compression where
    # it is without speculation, over the same entries, keeping the same ones; the same tokens.
    assert speculative.drafts_when_compressing == 0
    assert speculative.drafts_when_capturing > 0
    assert speculative.compressions == plain.compressions
    assert speculative.tokens == plain.tokens
    assert plain.prompt_compressions == speculative.prompt_compressions == 1
    # long: its 256 kept entries reach 384 twice in 300 tokens; short (~200) reaches it once.
    assert plain.decode_compressions == speculative.decode_compressions == 3
    long_len = len(prompts["long"])
    for name in prompts:
        expected = kept_entries(spec_dump_dir, plain.request_ids[name])
        got = kept_entries(spec_dump_dir, speculative.request_ids[name])
        assert len(got) == len(expected) == len([c for c in plain.compressions if c[0] == name])
        for before, after in zip(expected, got):
            assert_same_selection(before, after, BUDGET)
    assert [c[1:3] for c in plain.compressions if c[0] == "long"] == [
        ("decode", long_len + INTERVAL), ("decode", long_len + 2 * INTERVAL), ("prompt", long_len)
    ]


def test_blocks_stay_within_the_decode_threshold_while_speculating(speculative):
    """Drafts stop before each compression point, so a request never holds more blocks than
    without speculation: those of the decode threshold."""
    assert speculative.max_blocks == {"long": MAX_BLOCKS, "short": MAX_BLOCKS}


def test_preemption_while_drafts_are_pending_reproduces_the_tokens(spec_llm, prompts, plain):
    """Preempted after its first decode compression, in a step that left drafts for the next:
    vLLM drops the drafts, the re-prefill stops at the prompt's end and the decode point, and the
    continuation (speculative again) is the plain one."""
    engine, scheduler = spec_llm.llm_engine, scheduler_of(spec_llm)
    stats = scheduler._snapkv.stats
    pool = scheduler.kv_cache_manager.block_pool
    spec_llm.reset_prefix_cache()
    free_at_start = pool.get_num_free_blocks()
    prompts_before, decodes_before = stats.compressed_requests, stats.decode_compressions
    engine.add_request("preempt-me", as_prompt(prompts["long"]), generation())
    request_id = internal_id(scheduler, "preempt-me")
    request = scheduler.requests[request_id]
    outputs = []
    while not (stats.decode_compressions > decodes_before and request.spec_token_ids):
        outputs += engine.step()
    assert request.num_output_tokens < MAX_TOKENS - 50
    scheduler.running.remove(request)
    scheduler._preempt_request(request, time.monotonic())
    assert not request.spec_token_ids
    while engine.has_unfinished_requests():
        outputs += engine.step()
    (final,) = [output for output in outputs if output.finished]
    assert list(final.outputs[0].token_ids) == plain.tokens["long"]
    # Its prompt and first decode point twice (before and on re-prefill), its second once.
    assert stats.compressed_requests - prompts_before == 2
    assert stats.decode_compressions - decodes_before == 3
    assert pool.get_num_free_blocks() == free_at_start
