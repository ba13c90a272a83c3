"""Speculative decoding runs shared by the n-gram (test_speculative.py) and draft-model
(test_speculative_draft.py) modules: a repetitive prompt the demo model copies, and one batch
generated step by step with or without drafts on the same engine."""

from __future__ import annotations

import glob
import os
from collections.abc import Callable

import torch

from conftest import as_prompt, internal_id, scheduler_of
from vllm_snapkv.adapter.scheduler import DIRECTIVES_ATTR

#: Text the model continues by repeating it: drafts from the prompt (or a model) are accepted.
VERSE = "The quick brown fox jumps over the lazy dog, and the dog sleeps in the warm sun. "


def repetitive_prompt(tokenizer, num_verses: int) -> list[int]:
    return tokenizer("Copy this text exactly, again and again:\n" + VERSE * num_verses).input_ids


def generation(max_tokens: int):
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


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

    def __init__(
        self,
        llm,
        prompts: dict[str, list[int]],
        speculate: bool,
        max_tokens: int,
        after_step: Callable[[dict[str, str]], None] | None = None,
    ):
        """``after_step(request ids by name)``: called after every engine step."""
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
                engine.add_request(
                    name + self.SUFFIX[speculate], as_prompt(ids), generation(max_tokens)
                )
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
                if after_step is not None:
                    after_step(ids)
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
