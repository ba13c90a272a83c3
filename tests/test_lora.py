"""LoRA adapters with SnapKV, on the CPU build: a request with an adapter compresses with the
adapter's queries and keys, and prefix caching stays per adapter.

vLLM adds an adapter's ``B @ A`` to the projection outputs (its ``qkv_proj`` wrapper) before RoPE
and attention, so the queries the plugin's attention hook scores with and the keys in the KV cache
are the adapted ones; block hashes carry the adapter's name and path
(``_gen_lora_extra_hash_keys``), so a prefix-cache hit never crosses adapters. Both facts are
checked here end to end, and by source in tests/test_contract_sources.py.

One engine for the module: a tiny random-weight Llama (tests/model_zoo.py) with two random-weight
peft adapters (rank 8 on q/k/v/o), float32, so the selections equal the transformers+peft
reference exactly. The demo model's adapter is served by ``vllm serve --enable-lora
--lora-modules`` in tests/test_server.py.
"""

from __future__ import annotations

import glob
import os

import pytest
import torch
from vllm import SamplingParams
from vllm.lora.request import LoRARequest

from benchmarks.quality.decode_reference import DecodeSnapKVReference
from conftest import as_prompt, close_llm, load_dump, make_llm, prompt_of_length, scheduler_of
from model_zoo import LORA_RANK, build_lora_adapter, build_tiny_model, reference_kept_positions_for
from vllm_snapkv.plan import prefix_hit_limit

pytestmark = pytest.mark.engine

BUDGET, WINDOW, INTERVAL, BLOCK, CHUNK = 256, 16, 64, 32, 256
#: Two full chunks and 10 tokens: the window spans the last two prefill chunks.
PROMPT_LEN = 2 * CHUNK + 10
#: Past two decode compressions (stored entries reach budget + interval at 320 and 384).
MAX_TOKENS = 150
NUM_LAYERS, NUM_KV_HEADS = 6, 2


@pytest.fixture(scope="module")
def base_dir() -> str:
    return build_tiny_model("llama")


@pytest.fixture(scope="module")
def adapters(base_dir: str) -> dict[str, LoRARequest]:
    """Two adapters of the tiny Llama, as vLLM requests them (name, id, path)."""
    return {
        name: LoRARequest(name, lora_id, build_lora_adapter(base_dir, seed=lora_id))
        for lora_id, name in enumerate(("alpha", "beta"), start=1)
    }


@pytest.fixture(scope="module")
def lora_dump_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("lora-selections"))


@pytest.fixture(scope="module")
def lora_llm(base_dir: str, lora_dump_dir: str):
    llm = make_llm(
        base_dir,
        enforce_eager=True,
        block_size=BLOCK,
        max_model_len=2048,
        max_num_batched_tokens=CHUNK,
        kv_cache_memory_bytes=64 * 1024 * 1024,
        enable_lora=True,
        max_lora_rank=LORA_RANK,
        max_loras=2,
        additional_config={"kv_compression": {
            "method": "snapkv", "budget": BUDGET, "window_size": WINDOW,
            "decode_interval": INTERVAL, "dump_selections_to": lora_dump_dir,
        }},
    )
    yield llm
    close_llm(llm)


def long_generation() -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)


def plugin_compressions(dump_dir: str, request_id: str, prompt_len: int):
    """The request's compressions as ``(window_end, {layer: logical positions [H_kv, budget]})``:
    the prompt's dump, then each decode dump's stored-entry indices mapped through the positions
    those entries held."""
    logical = load_dump(dump_dir, request_id)["layers"]
    compressions, end = [(prompt_len, logical)], prompt_len
    paths = glob.glob(os.path.join(dump_dir, "decode", f"{request_id}-*.pt"))
    for path in sorted(paths, key=lambda p: int(p.rsplit(".", 2)[-2])):
        dump = torch.load(path)
        mapped = {}
        for layer, kept in dump["layers"].items():
            generated = torch.arange(end, dump["window_end"]).expand(kept.shape[0], -1)
            mapped[layer] = torch.cat([logical[layer], generated], 1).gather(1, kept)
        logical, end = mapped, dump["window_end"]
        compressions.append((end, mapped))
    return compressions


def test_lora_requests_compress_with_their_adapters_queries_and_keys(
    lora_llm, adapters, base_dir, lora_dump_dir
):
    """The same prompt under two adapters in one batch (and so, here, one after the other in
    the prefill chunks, the second looking the first's blocks up): each request's prompt and
    decode compressions keep exactly the positions the transformers+peft reference of its own
    adapter keeps, and its tokens are that reference's greedy tokens. The base model keeps other
    positions, so a plugin scoring with the base projections would fail here."""
    prompt = prompt_of_length(lora_llm.get_tokenizer(), PROMPT_LEN, 24680)
    lora_llm.reset_prefix_cache()
    stats = scheduler_of(lora_llm)._snapkv.stats
    before = (stats.compressed_requests, stats.decode_compressions)
    requests = list(adapters.values())
    outputs = lora_llm.generate(
        [as_prompt(prompt)] * len(requests), long_generation(), lora_request=requests
    )
    assert (stats.compressed_requests, stats.decode_compressions) == (
        before[0] + 2, before[1] + 4
    )
    assert all(output.num_cached_tokens == 0 for output in outputs), "no hit across adapters"
    tokens = [list(output.outputs[0].token_ids) for output in outputs]
    assert tokens[0] != tokens[1], "the adapters change the generation"

    base_prompt_kept = reference_kept_positions_for(base_dir, prompt, BUDGET, WINDOW)
    for lora_request, output in zip(requests, outputs):
        reference = DecodeSnapKVReference(
            base_dir, BUDGET, WINDOW, INTERVAL, 7, BLOCK, lora_dir=lora_request.lora_path
        ).run(prompt, MAX_TOKENS)
        assert list(output.outputs[0].token_ids) == reference.tokens, lora_request.lora_name
        got = plugin_compressions(lora_dump_dir, output.request_id, PROMPT_LEN)
        assert [end for end, _ in got] == [c.window_end for c in reference.compressions] == [
            PROMPT_LEN, 586, 650
        ]
        for (end, kept), expected in zip(got, reference.compressions):
            assert sorted(kept) == list(range(NUM_LAYERS))
            for layer, positions in kept.items():
                assert positions.shape == (NUM_KV_HEADS, BUDGET)
                for head in range(NUM_KV_HEADS):  # float32 on both sides: every position
                    assert positions[head].tolist() == sorted(
                        expected.kept[layer][head].tolist()
                    ), (lora_request.lora_name, end, layer, head)
        prompt_kept = got[0][1]
        differs = [
            (layer, head)
            for layer in range(NUM_LAYERS)
            for head in range(NUM_KV_HEADS)
            if set(prompt_kept[layer][head].tolist()) != base_prompt_kept[layer][head]
        ]
        assert len(differs) >= NUM_LAYERS, (lora_request.lora_name, differs)


def test_prefix_cache_hits_stay_within_one_adapter(lora_llm, adapters):
    """The same compressed prompt with adapter alpha, beta, none, then alpha and beta again: the
    first three prefill everything (a block computed under one adapter is never another's, nor
    the base model's), the repeats hit their own adapter's blocks up to the window and generate
    as the first time."""
    prompt = prompt_of_length(lora_llm.get_tokenizer(), PROMPT_LEN, 13579)
    alpha, beta = adapters["alpha"], adapters["beta"]
    lora_llm.reset_prefix_cache()
    stats = scheduler_of(lora_llm)._snapkv.stats
    before = stats.compressed_requests
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    runs = [
        lora_llm.generate(as_prompt(prompt), params, lora_request=lora_request)[0]
        for lora_request in (alpha, beta, None, alpha, beta)
    ]
    assert stats.compressed_requests == before + 5
    cached = [run.num_cached_tokens for run in runs]
    hit = prefix_hit_limit(PROMPT_LEN, WINDOW, BLOCK)
    assert hit > 0
    assert cached == [0, 0, 0, hit, hit]
    tokens = [list(run.outputs[0].token_ids) for run in runs]
    assert tokens[3] == tokens[0] and tokens[4] == tokens[1]
    assert len({tuple(t) for t in tokens[:3]}) == 3, "each adapter (and none) generates its own"
