"""The engine tests on a CUDA GPU, for each supported GPU attention backend in fp16 and bf16,
with CUDA graphs on (vLLM's default FULL_AND_PIECEWISE) and the V1 model runner the plugin selects.

Skipped where no CUDA device exists (this project's CI machines); ``scripts/gpu-check`` runs them.
Written against the same vLLM 0.32 code paths the FlexAttention harness exercises on CPU
(tests/test_standard_layout_engine.py); see README "Verification levels" for what has run where.
"""

from __future__ import annotations

import pytest
import torch

from conftest import (
    as_prompt,
    close_llm,
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
from vllm_snapkv.adapter.worker import worker_report
from vllm_snapkv.plan import cdiv

pytestmark = [
    pytest.mark.engine,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu-check)"),
]

BLOCK_SIZE, CHUNK, WINDOW, BUDGET = 16, 256, 32, 512  # BUDGET: the server's
SELECTION_BUDGET = 128
BACKENDS = ("FLASH_ATTN", "TRITON_ATTN", "FLASHINFER", "FLEX_ATTENTION")
DTYPES = ("float16", "bfloat16")


@pytest.fixture(scope="module", params=[(b, d) for b in BACKENDS for d in DTYPES],
                ids=lambda p: f"{p[0]}-{p[1]}")
def cuda_llm(request, model_dir, tmp_path_factory):
    backend, dtype = request.param
    if backend == "FLASHINFER":
        pytest.importorskip("flashinfer", reason="FlashInfer backend needs the flashinfer package")
    dump_dir = str(tmp_path_factory.mktemp(f"cuda-{backend}-{dtype}"))
    llm = make_llm(
        model_dir,
        dtype=dtype,
        attention_backend=backend,
        block_size=BLOCK_SIZE,
        max_model_len=4096,
        max_num_batched_tokens=CHUNK,
        kv_cache_memory_bytes=1 << 30,
        gpu_memory_utilization=0.5,
        additional_config=snapkv_config(dump_dir, budget=BUDGET, window_size=WINDOW),
    )
    llm.dump_dir, llm.backend = dump_dir, backend
    yield llm
    close_llm(llm)


def full_cache(max_tokens: int = 16):
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=max_tokens,
                          extra_args={"kv_compression": "none"})


def test_backend_and_runner_are_the_ones_hooked(cuda_llm):
    (report,) = cuda_llm.collective_rpc(worker_report)
    assert report["backends"] == [cuda_llm.backend]
    assert report["v1_runner"] and report["compression"]


def test_blocks_held_follow_the_budget_and_all_return(cuda_llm):
    tokenizer = cuda_llm.get_tokenizer()
    scheduler = scheduler_of(cuda_llm)
    manager = scheduler.kv_cache_manager.coordinator.single_type_managers[0]
    pool = scheduler.kv_cache_manager.block_pool
    cuda_llm.reset_prefix_cache()
    free_at_start = pool.get_num_free_blocks()
    engine = cuda_llm.llm_engine
    prompt_ids = prompt_of_length(tokenizer, 1000, 16180)
    engine.add_request("blocks", as_prompt(prompt_ids), greedy(100, max_tokens=40))
    request_id = internal_id(scheduler, "blocks")
    request = scheduler.requests[request_id]
    while request.num_computed_tokens < len(prompt_ids):
        engine.step()
    assert len(manager.req_to_blocks[request_id]) == cdiv(100, BLOCK_SIZE)
    while engine.has_unfinished_requests():
        engine.step()
    assert pool.get_num_free_blocks() == free_at_start


def test_within_budget_equals_full_cache_and_compression_changes_output(cuda_llm):
    tokenizer = cuda_llm.get_tokenizer()
    short = as_prompt(prompt_of_length(tokenizer, 120, 31415))
    assert token_ids(cuda_llm.generate(short, greedy())) == token_ids(
        cuda_llm.generate(short, full_cache())
    )
    long = as_prompt(prompt_of_length(tokenizer, 1500, 27182))
    assert token_ids(cuda_llm.generate(long, greedy(48, max_tokens=32))) != token_ids(
        cuda_llm.generate(long, full_cache(max_tokens=32))
    )


#: Requests decoding while the late prompt prefills: each takes one token of every step's budget.
NUM_DECODERS = 3


def late_prompt_len(chunk: int = CHUNK, num_decoders: int = NUM_DECODERS) -> int:
    """A prompt whose chunks are ``chunk - num_decoders`` twice and then exactly 1 token: its
    completing step is num_decoders + 1 requests of 1 token each, a uniform-decode batch."""
    return 2 * (chunk - num_decoders) + 1


def run_one_token_final_chunk(llm, key: int, max_tokens: int = 24):
    """Decoders first, then the late prompt. Returns the late request's output and, per step it
    was scheduled in, ``(its tokens, the other requests' tokens)``."""
    engine, scheduler = llm.llm_engine, scheduler_of(llm)
    schedule = scheduler.schedule
    steps: list[tuple[int, list[int]]] = []

    def recording_schedule(*args, **kwargs):
        output = schedule(*args, **kwargs)
        late = [r for r in output.num_scheduled_tokens if r.startswith("late-")]
        if late:
            others = [n for r, n in output.num_scheduled_tokens.items() if r != late[0]]
            steps.append((output.num_scheduled_tokens[late[0]], others))
        return output

    scheduler.schedule = recording_schedule
    try:
        for i in range(NUM_DECODERS):
            engine.add_request(f"decoder-{i}", "Count from one to fifty:", greedy(max_tokens=200))
        for _ in range(3):
            engine.step()
        ids = prompt_of_length(llm.get_tokenizer(), late_prompt_len(), key)
        engine.add_request("late", as_prompt(ids), greedy(256, max_tokens=max_tokens))
        outputs = {}
        while engine.has_unfinished_requests():
            for output in engine.step():
                if output.finished:
                    outputs[output.request_id] = output
    finally:
        del scheduler.schedule
    return outputs["late"], steps


def test_one_token_final_chunk_beside_decodes_is_compacted_not_graph_replayed(
    cuda_llm, monkeypatch
):
    # The completing chunk of the long prompt is 1 token, batched with 3 decoding requests: a
    # uniform-decode batch vLLM replays as a full CUDA graph without the dispatch patch. The CPU
    # test of the same geometry (tests/test_gpu_path.py) checks the chunking itself.
    from vllm.config import CUDAGraphMode
    from vllm.v1.cudagraph_dispatcher import CudagraphDispatcher

    dispatched: list[tuple[bool, bool, CUDAGraphMode]] = []
    dispatch = CudagraphDispatcher.dispatch

    def recording_dispatch(self, num_tokens, *args, **kwargs):
        mode, descriptor = dispatch(self, num_tokens, *args, **kwargs)
        active = self._snapkv.step_has_work  # the runner's SnapKV state, on its dispatcher
        dispatched.append((active, bool(kwargs.get("uniform_decode")), mode))
        return mode, descriptor

    monkeypatch.setattr(CudagraphDispatcher, "dispatch", recording_dispatch)
    stats = scheduler_of(cuda_llm)._snapkv.stats
    before = stats.compressed_requests
    late, steps = run_one_token_final_chunk(cuda_llm, 4242)
    assert stats.compressed_requests == before + 1
    assert steps[2] == (1, [1] * NUM_DECODERS)
    # The compacting step was a uniform-decode batch, and it did not replay a full graph ...
    work_steps = [(uniform, mode) for active, uniform, mode in dispatched if active]
    assert any(uniform for uniform, _ in work_steps)
    assert all(mode != CUDAGraphMode.FULL for _, mode in work_steps)
    # ... while plain decode steps did (so the check above could fail).
    assert any(mode == CUDAGraphMode.FULL for active, _, mode in dispatched if not active)
    assert late.outputs[0].token_ids


def test_selection_matches_the_transformers_reference(cuda_llm, model_dir):
    tokenizer = cuda_llm.get_tokenizer()
    prompt_ids = prompt_of_length(tokenizer, 2 * CHUNK + 20, 14142)  # window split over chunks
    cuda_llm.reset_prefix_cache()
    (output,) = cuda_llm.generate(as_prompt(prompt_ids), greedy(SELECTION_BUDGET, max_tokens=4))
    dump = load_dump(cuda_llm.dump_dir, output.request_id)
    reference = reference_kept_positions(model_dir, prompt_ids, SELECTION_BUDGET, WINDOW)
    overlaps = [
        len(set(kept[head].tolist()) & reference[layer][head]) / SELECTION_BUDGET
        for layer, kept in dump["layers"].items()
        for head in range(kept.shape[0])
    ]
    # Half-precision scores against an fp32 reference: near-ties may flip.
    assert sum(overlaps) / len(overlaps) >= 0.95 and min(overlaps) >= 0.8, overlaps


PASSKEYS = ((68413, 0.1), (90271, 0.5), (17342, 0.9))


def test_passkeys_at_2k_answered_with_budget_512(cuda_llm):
    tokenizer = cuda_llm.get_tokenizer()
    prompts = [as_prompt(prompt_of_length(tokenizer, 2000, key, depth)) for key, depth in PASSKEYS]
    outputs = cuda_llm.generate(prompts, greedy(BUDGET, max_tokens=8))
    for (key, _), output in zip(PASSKEYS, outputs):
        assert str(key) in output.outputs[0].text, output.outputs[0].text


@pytest.mark.parametrize("backend", ("FLASH_ATTN", "TRITON_ATTN"))
def test_fp8_cache_scores_dequantised_keys_and_keeps_the_stored_bytes(backend, monkeypatch):
    """fp8 KV cache (e4m3, the platform's fp8 for both backends) on the tiny Llama: every layer's
    selection is the dense reference's on the dequantised stored keys, the kept K/V bytes are
    the stored ones (tests/test_architectures.py's checks, on the GPU's standard layout)."""
    from test_architectures import spy_on_compactions, stored_bytes_unchanged

    from model_zoo import build_tiny_model

    checked = spy_on_compactions(monkeypatch, stored_bytes_unchanged)
    llm = make_llm(
        build_tiny_model("llama"),
        dtype="bfloat16",
        attention_backend=backend,
        kv_cache_dtype="fp8",
        block_size=BLOCK_SIZE,
        max_model_len=2048,
        max_num_batched_tokens=CHUNK,
        kv_cache_memory_bytes=1 << 28,
        gpu_memory_utilization=0.5,
        additional_config={"kv_compression": {"budget": 96, "window_size": 16}},
    )
    try:
        prompt_ids = prompt_of_length(llm.get_tokenizer(), 2 * CHUNK + 10, 13579)
        llm.generate(as_prompt(prompt_ids), greedy(max_tokens=4))
        assert scheduler_of(llm)._snapkv.stats.compressed_requests == 1
    finally:
        close_llm(llm)
    assert len(checked) == 6, checked
