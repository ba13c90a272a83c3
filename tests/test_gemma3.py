"""SnapKV on a real hybrid model: Gemma 3 270M (float32, CPU) through stock vLLM 0.32.

vLLM gives it five sliding-window KV cache groups (window 512) and one full-attention group
(layers 5, 11, 17). SnapKV compresses the full-attention group only; the sliding groups must hold
exactly what they hold for the same request with compression off. The model is built from the
PyPI GGUF packages by ``vllm_snapkv.gemma3_model`` (``scripts/setup --test`` does it once).
"""

from __future__ import annotations

import pytest

from conftest import close_llm, greedy, internal_id, make_llm, scheduler_of, snapkv_config
from vllm_snapkv.plan import cdiv
from vllm_snapkv.tasks import passkey_prompt

pytestmark = pytest.mark.engine

BUDGET = 512
PASSKEYS = ((27182, 0.2), (31415, 0.5), (16180, 0.8))


def test_vllm_serve_compresses_gemma3_through_the_openai_api(tmp_path):
    """`vllm serve <Gemma 3 270M> --kv-compression snapkv`: a 2K passkey completion is answered
    from the compressed cache and counted. Runs before the module's engine starts (memory)."""
    import json
    import urllib.request

    from benchmarks.servers import ServerProcess, demo_server_args, free_port, server_env
    from vllm_snapkv.gemma3_model import build_gemma3_model

    port = free_port()
    args = demo_server_args(
        str(build_gemma3_model()), port, "gemma-3-270m", 512 * 1024 * 1024,
        "--kv-compression", "snapkv", "--snapkv-budget", str(BUDGET), max_model_len=4096,
    )
    server = ServerProcess(args, port, tmp_path / "server.log", server_env())
    try:
        server.wait_healthy(timeout=600)
        key = 27182
        body = {"model": "gemma-3-270m", "prompt": passkey_prompt(2000, key, 0.5),
                "max_tokens": 8, "temperature": 0}
        request = urllib.request.Request(
            server.base + "/v1/completions", json.dumps(body).encode(),
            {"Content-Type": "application/json"},
        )
        reply = json.loads(urllib.request.urlopen(request, timeout=300).read())
        assert str(key) in reply["choices"][0]["text"], reply
        metrics = server.metrics()
        assert metrics["vllm:snapkv_compressed_requests_total"] == 1
        assert metrics["vllm:snapkv_evicted_tokens_total"] == reply["usage"]["prompt_tokens"] - BUDGET
    finally:
        server.stop()


@pytest.fixture(scope="module")
def gemma3_llm(tmp_path_factory):
    from vllm_snapkv.gemma3_model import build_gemma3_model

    llm = make_llm(
        str(build_gemma3_model()),
        max_model_len=4096,
        max_num_batched_tokens=8192,
        enforce_eager=True,
        additional_config=snapkv_config(str(tmp_path_factory.mktemp("dumps")), budget=BUDGET),
    )
    yield llm
    close_llm(llm)


def _held(scheduler, request_id: str) -> list[int]:
    """Blocks the request holds in each KV cache group (a sliding group's null placeholders for
    blocks that left the window are not held)."""
    return [
        sum(not block.is_null for block in manager.req_to_blocks[request_id])
        for manager in scheduler.kv_cache_manager.coordinator.single_type_managers
    ]


def _step_one(llm, name: str, prompt: str, params) -> list[tuple[list[int], int]]:
    """Run one request alone; after each of its first two steps (prefill, first decode): blocks
    held per group and the pool's free count."""
    engine, scheduler = llm.llm_engine, scheduler_of(llm)
    pool = scheduler.kv_cache_manager.block_pool
    engine.add_request(name, prompt, params)
    snapshots = []
    while engine.has_unfinished_requests():
        engine.step()
        request_id = internal_id(scheduler, name) if len(snapshots) < 2 else None
        if request_id is not None and request_id in scheduler.requests:
            snapshots.append((_held(scheduler, request_id), pool.get_num_free_blocks()))
    return snapshots


def test_full_attention_group_holds_the_budget_and_sliding_groups_what_they_hold_uncompressed(
    gemma3_llm,
):
    from vllm import SamplingParams

    scheduler = scheduler_of(gemma3_llm)
    groups = scheduler.kv_cache_config.kv_cache_groups
    kinds = [type(group.kv_cache_spec).__name__ for group in groups]
    assert sorted(kinds) == ["FullAttentionSpec"] + ["SlidingWindowSpec"] * 5
    full = kinds.index("FullAttentionSpec")
    assert [int(name.split(".")[2]) for name in groups[full].layer_names] == [5, 11, 17]
    block_size = groups[full].kv_cache_spec.block_size
    pool = scheduler.kv_cache_manager.block_pool

    prompt = passkey_prompt(2000, 55123, 0.5)
    prompt_len = len(gemma3_llm.get_tokenizer()(prompt).input_ids)
    assert cdiv(prompt_len, block_size) >= 15
    gemma3_llm.reset_prefix_cache()
    free_at_start = pool.get_num_free_blocks()
    off = SamplingParams(temperature=0.0, max_tokens=4, extra_args={"kv_compression": "none"})
    uncompressed = _step_one(gemma3_llm, "off", prompt, off)
    assert pool.get_num_free_blocks() == free_at_start
    gemma3_llm.reset_prefix_cache()  # the compressed run prefills from scratch too
    stats = scheduler._snapkv.stats
    before = stats.compressed_requests
    compressed = _step_one(gemma3_llm, "on", prompt, greedy(BUDGET, max_tokens=4))
    assert stats.compressed_requests == before + 1
    assert pool.get_num_free_blocks() == free_at_start  # nothing leaked

    (off_prefill, _), (off_decode, _) = uncompressed
    (on_prefill, free_after_prefill), (on_decode, _) = compressed
    assert off_prefill[full] == cdiv(prompt_len, block_size)
    assert on_prefill[full] == cdiv(BUDGET, block_size)
    for group in range(len(groups)):
        if group != full:
            assert on_prefill[group] == off_prefill[group], group
            assert on_decode[group] == off_decode[group], group
            assert off_decode[group] < off_prefill[group]  # vLLM dropped what left the window
    assert on_decode[full] == cdiv(BUDGET + 1, block_size)
    # Every evicted block of the full-attention group went back at once.
    assert free_at_start - free_after_prefill == sum(on_prefill)


def test_passkey_at_2k_tokens_answered_at_budget_512(gemma3_llm):
    scheduler = scheduler_of(gemma3_llm)
    pool = scheduler.kv_cache_manager.block_pool
    gemma3_llm.reset_prefix_cache()
    free_at_start = pool.get_num_free_blocks()
    stats = scheduler._snapkv.stats
    before = stats.compressed_requests
    prompts = [passkey_prompt(2000, key, depth) for key, depth in PASSKEYS]
    outputs = gemma3_llm.generate(prompts, greedy(BUDGET, max_tokens=8))
    assert stats.compressed_requests == before + len(prompts)
    for (key, _), output in zip(PASSKEYS, outputs):
        assert str(key) in output.outputs[0].text, output.outputs[0].text
    assert pool.get_num_free_blocks() == free_at_start
