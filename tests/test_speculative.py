"""Speculative decoding (n-gram) with SnapKV: lossless, bounded, preemptible.

One engine: n-gram speculation with 3 draft tokens a step, SnapKV budget 256, window 32,
decode_interval 128, block size 128, chunks of 512 tokens (the decode threshold is 384 entries,
so a request holds at most 3 blocks while it generates). It needs its own engine: speculation is
an engine setting, and no other module's engine speculates.

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

import glob
import os

import torch

from conftest import (
    as_prompt,
    assert_same_selection,
    close_llm,
    internal_id,
    make_llm,
    scheduler_of,
    snapkv_config,
)
from vllm_snapkv.adapter.scheduler import DIRECTIVES_ATTR
from vllm_snapkv.plan import cdiv, decode_threshold

pytestmark = pytest.mark.engine

BUDGET, WINDOW, INTERVAL, BLOCK, CHUNK = 256, 32, 128, 128, 512
NUM_DRAFTS = 3
THRESHOLD = decode_threshold(BUDGET, INTERVAL, BLOCK)
MAX_BLOCKS = cdiv(THRESHOLD, BLOCK)
MAX_TOKENS = 300

#: Text the model continues by repeating it: n-gram drafts from the prompt are accepted.
VERSE = "The quick brown fox jumps over the lazy dog, and the dog sleeps in the warm sun. "


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


def repetitive_prompt(tokenizer, num_verses: int) -> list[int]:
    return tokenizer("Copy this text exactly, again and again:\n" + VERSE * num_verses).input_ids


@pytest.fixture(scope="module")
def prompts(spec_llm) -> dict[str, list[int]]:
    """``long``: ~1000 tokens, compressed at its prompt's end, then at 128-token intervals;
    ``short``: ~200 tokens (under the budget), compressed only while decoding."""
    tokenizer = spec_llm.get_tokenizer()
    cases = {"long": repetitive_prompt(tokenizer, 48), "short": repetitive_prompt(tokenizer, 9)}
    assert len(cases["long"]) > 2 * BUDGET and len(cases["short"]) < BUDGET
    return cases


def generation():
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)


def kept_entries(dump_dir: str, request_id: str) -> list[dict]:
    """Every compression's kept entries of one request, in order: its prompt compression's
    dump (if any), then its decode compressions'."""
    prompt = glob.glob(os.path.join(dump_dir, f"{request_id}.pt"))
    decode = sorted(
        glob.glob(os.path.join(dump_dir, "decode", f"{request_id}.*.pt")),
        key=lambda path: int(path.rsplit(".", 2)[-2]),
    )
    return [torch.load(path)["layers"] for path in prompt + decode]


class Run:
    """One batch generated step by step: the tokens, how many each step added (more than one:
    accepted drafts), the most blocks each request held in the compressed group while decoding,
    compressions."""

    SUFFIX = {False: "-plain", True: "-speculative"}

    def __init__(self, llm, prompts: dict[str, list[int]], speculate: bool):
        scheduler = scheduler_of(llm)
        manager = scheduler.kv_cache_manager.coordinator.single_type_managers[0]
        pool = scheduler.kv_cache_manager.block_pool
        stats = scheduler._snapkv.stats
        engine = llm.llm_engine
        llm.reset_prefix_cache()
        free_at_start = pool.get_num_free_blocks()
        prompts_before, decodes_before = stats.compressed_requests, stats.decode_compressions
        if not speculate:
            # Drafts never reach the scheduler: one token a step, as without speculation.
            scheduler.update_draft_token_ids = lambda draft_token_ids: None
        #: (request, phase, window end, entries scored) of every compression, as planned.
        self.compressions: list[tuple[str, str, int, int]] = []
        names: dict[str, str] = {}
        state = scheduler._snapkv
        record_compression = state.compressed

        def compressed(request_id, plan):
            self.compressions.append(
                (names[request_id], plan.phase, plan.window_end, plan.num_scored)
            )
            return record_compression(request_id, plan)

        state.compressed = compressed
        #: Draft tokens scheduled beside a compression of the same request (must stay 0), and
        #: beside a window capture (speculation goes on up to the point).
        self.drafts_when_compressing = self.drafts_when_capturing = 0
        update_after_schedule = scheduler._update_after_schedule

        def count_drafts(output):
            update_after_schedule(output)
            directives = getattr(output, DIRECTIVES_ATTR)
            for request_id, drafts in output.scheduled_spec_decode_tokens.items():
                if request_id in directives.plans:
                    self.drafts_when_compressing += len(drafts)
                if request_id in directives.captures:
                    self.drafts_when_capturing += len(drafts)

        scheduler._update_after_schedule = count_drafts
        self.request_ids: dict[str, str] = {}
        try:
            for name, ids in prompts.items():
                engine.add_request(name + self.SUFFIX[speculate], as_prompt(ids), generation())
            ids = {
                name: internal_id(scheduler, name + self.SUFFIX[speculate]) for name in prompts
            }
            self.request_ids = ids
            names.update({request_id: name for name, request_id in ids.items()})
            self.tokens: dict[str, list[int]] = {}
            self.accepted = {name: 0 for name in prompts}
            self.max_blocks = {name: 0 for name in prompts}
            lengths = {name: 0 for name in prompts}
            while engine.has_unfinished_requests():
                for output in engine.step():
                    name = output.request_id.removesuffix(self.SUFFIX[speculate])
                    tokens = list(output.outputs[0].token_ids)
                    if lengths[name]:  # not the prompt's step
                        self.accepted[name] += len(tokens) - lengths[name] - 1
                    lengths[name] = len(tokens)
                    if output.finished:
                        self.tokens[name] = tokens
                for name, request_id in ids.items():
                    request = scheduler.requests.get(request_id)
                    if request is not None and request.num_output_tokens:  # decoding
                        held = len(manager.req_to_blocks[request_id])
                        self.max_blocks[name] = max(self.max_blocks[name], held)
        finally:
            scheduler.__dict__.pop("update_draft_token_ids", None)
            scheduler.__dict__.pop("_update_after_schedule", None)
            state.__dict__.pop("compressed", None)
        self.compressions.sort()
        self.prompt_compressions = stats.compressed_requests - prompts_before
        self.decode_compressions = stats.decode_compressions - decodes_before
        assert pool.get_num_free_blocks() == free_at_start
        assert not scheduler._snapkv.requests


@pytest.fixture(scope="module")
def plain(spec_llm, prompts) -> Run:
    return Run(spec_llm, prompts, speculate=False)


@pytest.fixture(scope="module")
def speculative(spec_llm, prompts) -> Run:
    return Run(spec_llm, prompts, speculate=True)


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
