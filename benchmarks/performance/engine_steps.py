"""Step-level measurements on an in-process engine (memory, decode time, overhead)."""

from __future__ import annotations

import time

from benchmarks.common import sampling, scheduler_of


def run_one(llm, prompt: str, budget: int | None, max_tokens: int) -> dict:
    """Run one request alone, step by step. Returns the blocks it held right after its prefill,
    the prefill step's wall time, the mean decode-step time and the prompt length."""
    engine = llm.llm_engine
    scheduler = scheduler_of(llm)
    manager = scheduler.kv_cache_manager.coordinator.single_type_managers[0]
    llm.reset_prefix_cache()
    request_id = f"bench-{time.monotonic_ns()}"
    engine.add_request(request_id, prompt, sampling(budget, max_tokens))
    prompt_len = len(llm.get_tokenizer()(prompt).input_ids)
    step_times, blocks_after_prefill = [], None
    while engine.has_unfinished_requests():
        started = time.perf_counter()
        engine.step()
        step_times.append(time.perf_counter() - started)
        if blocks_after_prefill is None:
            (internal,) = [r for r in scheduler.requests if r.startswith(request_id)] or [None]
            if internal is not None:
                blocks_after_prefill = len(manager.req_to_blocks[internal])
    decode = step_times[2:]  # step 1 prefills; step 2 applies the block swap
    return {
        "prompt_tokens": prompt_len,
        "blocks": blocks_after_prefill,
        "prefill_s": step_times[0],
        "decode_ms_per_token": 1000 * sum(decode) / max(len(decode), 1),
    }
