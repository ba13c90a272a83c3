"""Speculative decoding with a draft model and SnapKV: lossless, the drafter's cache compressed
with the target's, bounded, preemptible.

One engine: the demo model drafts for itself (``method: draft_model``, 3 drafts a step), SnapKV
budget 256, window 32, decode_interval 128, block size 128, chunks of 512 tokens. vLLM puts the
drafter's 30 attention layers into the target's KV cache group, so every block holds both
models' layers and a compression compacts both (``vllm_snapkv.adapter.drafter``: each drafter
layer keeps the entries its target layer kept). With the target as its own drafter, the drafter's
cache must then hold exactly the target's entries (the same tokens at the same positions, the
same kept entries), which checks its compaction and its physical slots; its drafts are the
target's own greedy tokens, so nearly all are accepted.

The non-speculative reference runs on the same engine with the drafts dropped before they reach
the scheduler (the drafter still runs and writes its cache each step, unread by the target).
"""

from __future__ import annotations

import time

import pytest

from conftest import (
    as_prompt,
    assert_same_selection,
    close_llm,
    internal_id,
    make_llm,
    scheduler_of,
    snapkv_config,
)
from speculation import Run, generation, kept_entries, repetitive_prompt
from vllm_snapkv.adapter.layouts import PagedTokens
from vllm_snapkv.plan import cdiv, decode_threshold

pytestmark = pytest.mark.engine

BUDGET, WINDOW, INTERVAL, BLOCK, CHUNK = 256, 32, 128, 128, 512
NUM_DRAFTS = 3
THRESHOLD = decode_threshold(BUDGET, INTERVAL, BLOCK)
#: vLLM reserves ``num_speculative_tokens`` lookahead slots past a model drafter's chunk (its
#: drafts' KV; ``VllmConfig.num_lookahead_tokens``), with or without compression: a request
#: holds at most the blocks of the decode threshold plus those slots (4 here; n-gram: 3).
MAX_BLOCKS = cdiv(THRESHOLD + NUM_DRAFTS, BLOCK)
#: long (~970 tokens): a prompt compression, then a decode compression 128 tokens on; short
#: (~190): a decode compression when its entries reach the threshold (384), ~195 tokens on.
MAX_TOKENS = 220
#: Largest |drafter key - target key| / max |target key| of a layer the drafter cache may show
#: (float32; the two models run the same weights on batches of other shapes).
KEY_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def draft_dump_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("speculative-draft"))


@pytest.fixture(scope="module")
def draft_llm(model_dir: str, draft_dump_dir: str):
    llm = make_llm(
        model_dir,
        enforce_eager=True,
        max_model_len=2048,  # both models' layers share each block: half the blocks of a model
        max_num_batched_tokens=CHUNK,
        speculative_config={
            "method": "draft_model",
            "model": model_dir,
            "num_speculative_tokens": NUM_DRAFTS,
        },
        additional_config=snapkv_config(
            draft_dump_dir, budget=BUDGET, window_size=WINDOW, decode_interval=INTERVAL
        ),
    )
    yield llm
    close_llm(llm)


@pytest.fixture(scope="module")
def prompts(draft_llm) -> dict[str, list[int]]:
    tokenizer = draft_llm.get_tokenizer()
    cases = {"long": repetitive_prompt(tokenizer, 48), "short": repetitive_prompt(tokenizer, 9)}
    assert len(cases["long"]) > 2 * BUDGET and len(cases["short"]) < BUDGET
    return cases


def runner_of(llm):
    return llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner


class DrafterCacheCheck:
    """After each step, compare every drafter layer's stored keys of each decoding request with
    those of the target layer whose selection it shares (skipped while a block swap is pending:
    the compacted entries are in blocks the request's list holds from the next step)."""

    def __init__(self, llm):
        self.llm = llm
        self.worst = 0.0
        #: (request name, evicted tokens) of every compared step.
        self.compared: set[tuple[str, int]] = set()

    def __call__(self, ids: dict[str, str]) -> None:
        runner, scheduler = runner_of(self.llm), scheduler_of(self.llm)
        state = runner._snapkv
        for name, request_id in ids.items():
            request = scheduler.requests.get(request_id)
            if request is None or not request.num_output_tokens or request_id in state.pending_swaps:
                continue
            record = scheduler._snapkv.requests.get(request_id)
            evicted = record.evicted if record is not None else 0
            stored = PagedTokens.of(
                runner.requests[request_id].block_ids[0], BLOCK,
                request.num_computed_tokens - evicted, "cpu",
            )
            for drafter_name, shared in state.drafter.shares.items():
                target = state.forward_context[f"model.layers.{shared}.self_attn.attn"]
                drafter = state.forward_context[drafter_name]
                target_keys = state._layout(target.impl, target).read_keys(target.kv_cache, stored)
                drafter_keys = state._layout(drafter.impl, drafter).read_keys(
                    drafter.kv_cache, stored
                )
                gap = (target_keys.float() - drafter_keys.float()).abs().max()
                self.worst = max(self.worst, float(gap / target_keys.float().abs().max()))
            self.compared.add((name, evicted))


@pytest.fixture(scope="module")
def plain(draft_llm, prompts) -> Run:
    return Run(draft_llm, prompts, speculate=False, max_tokens=MAX_TOKENS)


@pytest.fixture(scope="module")
def drafter_check(draft_llm) -> DrafterCacheCheck:
    return DrafterCacheCheck(draft_llm)


@pytest.fixture(scope="module")
def speculative(draft_llm, prompts, drafter_check) -> Run:
    return Run(
        draft_llm, prompts, speculate=True, max_tokens=MAX_TOKENS, after_step=drafter_check
    )


def test_draft_model_greedy_tokens_equal_plain_greedy_with_the_same_compression(
    plain, speculative, prompts, draft_dump_dir
):
    """Prompt compression (``long``) and decode compressions (both): the same compressions,
    the same kept entries, the same tokens; the drafts were accepted."""
    assert plain.accepted == {"long": 0, "short": 0}
    for name in prompts:
        # The target drafting for itself: ~3 of 3 drafts a step (not 3: steps cut before points).
        assert speculative.accepted[name] >= MAX_TOKENS // 2, (name, speculative.accepted)
    assert speculative.drafts_when_compressing == 0
    assert speculative.drafts_when_capturing > 0
    assert speculative.compressions == plain.compressions
    assert speculative.tokens == plain.tokens
    assert plain.prompt_compressions == speculative.prompt_compressions == 1
    assert plain.decode_compressions == speculative.decode_compressions == 2
    for name in prompts:
        expected = kept_entries(draft_dump_dir, plain.request_ids[name])
        got = kept_entries(draft_dump_dir, speculative.request_ids[name])
        assert len(got) == len(expected) == len([c for c in plain.compressions if c[0] == name])
        for before, after in zip(expected, got):
            assert_same_selection(before, after, BUDGET)


def test_drafter_cache_holds_the_target_entries_across_compressions(
    speculative, drafter_check, prompts
):
    """The drafter (here the target itself) stores the target's entries in every step: before
    and after the prompt compression and each decode compression (its layers compacted with the
    target's, its slots written at ``position - evicted``)."""
    evicted = {name: {e for n, e in drafter_check.compared if n == name} for name in prompts}
    assert len(evicted["long"]) >= 2 and 0 not in evicted["long"], evicted  # prompt + decode
    assert len(evicted["short"]) >= 2 and 0 in evicted["short"], evicted  # before + after
    assert drafter_check.worst <= KEY_TOLERANCE, drafter_check.worst


def test_blocks_stay_within_the_decode_threshold_with_a_drafter(speculative, draft_llm):
    """The drafter adds layers to each block (one KV cache group), never blocks of its own: a
    request holds the blocks of the decode threshold and vLLM's lookahead slots, whatever its
    length (~1190 tokens for ``long``, 10 blocks uncompressed)."""
    config = scheduler_of(draft_llm).kv_cache_config
    (group,) = config.kv_cache_groups
    assert sum(name.startswith("draft_model.") for name in group.layer_names) == 30
    assert speculative.max_blocks == {"long": MAX_BLOCKS, "short": MAX_BLOCKS}


def test_preemption_while_drafts_are_pending_reproduces_the_tokens(draft_llm, prompts, plain):
    """Preempted after its first decode compression with drafts pending: the re-prefill
    compresses the target's and the drafter's layers again, and the continuation is the plain
    one."""
    engine, scheduler = draft_llm.llm_engine, scheduler_of(draft_llm)
    stats = scheduler._snapkv.stats
    pool = scheduler.kv_cache_manager.block_pool
    draft_llm.reset_prefix_cache()
    free_at_start = pool.get_num_free_blocks()
    prompts_before, decodes_before = stats.compressed_requests, stats.decode_compressions
    engine.add_request("preempt-me", as_prompt(prompts["long"]), generation(MAX_TOKENS))
    request_id = internal_id(scheduler, "preempt-me")
    request = scheduler.requests[request_id]
    outputs = []
    while not (stats.decode_compressions > decodes_before and request.spec_token_ids):
        outputs += engine.step()
    assert request.num_output_tokens < MAX_TOKENS - 30
    scheduler.running.remove(request)
    scheduler._preempt_request(request, time.monotonic())
    assert not request.spec_token_ids
    accepted_before = request.num_output_tokens
    steps = 0
    while engine.has_unfinished_requests():
        outputs += engine.step()
        steps += 1
    (final,) = [output for output in outputs if output.finished]
    assert list(final.outputs[0].token_ids) == plain.tokens["long"]
    # Drafting went on after the re-prefill: fewer steps than tokens left.
    assert steps < MAX_TOKENS - accepted_before
    # Its prompt and decode point twice (before and on re-prefill).
    assert stats.compressed_requests - prompts_before == 2
    assert stats.decode_compressions - decodes_before == 2
    assert pool.get_num_free_blocks() == free_at_start


def test_drafter_layers_outside_a_compressed_group_are_refused():
    from vllm_snapkv.adapter.drafter import DrafterLayers, UnsupportedDrafter

    groups = {f"model.layers.{i}.self_attn.attn": 0 for i in range(4)}
    drafter = {f"draft_model.model.layers.{i}.self_attn.attn" for i in range(2)}
    with pytest.raises(UnsupportedDrafter, match=r"draft_model\.model\.layers\.0\.self_attn"):
        DrafterLayers.of(drafter, groups, list(groups))
    both = {**groups, **{name: 0 for name in drafter}}
    layers = DrafterLayers.of(drafter, both, list(groups))
    # Two drafter layers over four target layers: depths 0 and 2.
    assert layers.shares == {
        "draft_model.model.layers.0.self_attn.attn": 0,
        "draft_model.model.layers.1.self_attn.attn": 2,
    }
    assert set(layers.group_of.values()) == {0}
    assert DrafterLayers.of(set(), groups, list(groups)) is None
    # A drafter layer with other KV heads than its target layer (a group of its own).
    from types import SimpleNamespace

    def layer(num_kv_heads):
        return SimpleNamespace(impl=SimpleNamespace(num_kv_heads=num_kv_heads, head_size=64))

    context = {**{name: layer(3) for name in groups}, **{name: layer(3) for name in drafter}}
    targets = {i: f"model.layers.{i}.self_attn.attn" for i in range(4)}
    layers.check_heads(context, targets)
    context["draft_model.model.layers.1.self_attn.attn"] = layer(1)
    with pytest.raises(UnsupportedDrafter, match=r"layers\.1\.self_attn\.attn has 1 KV heads"):
        layers.check_heads(context, targets)
