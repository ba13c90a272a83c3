"""Per-request features on a compressing engine, each checked against what it must equal.

What "correct" means under compression, feature by feature:
- ``prompt_logprobs`` are computed in the prefill, before the compaction: equal to the full-cache
  engine's. So is the first generated token and its logprobs (prefill logits).
- ``logprobs`` of later tokens come from the compressed cache: asking for them must not change the
  tokens, and each greedy token is the top entry of its own logprobs.
- ``n=2``: each child is a request of its own (vLLM fans it out, child i seeded ``seed + i``), so
  it compresses on its own and equals the same request sent alone with that seed.
- stop strings, ``stop_token_ids`` and ``min_tokens`` act on the tokens actually generated: the
  output is the compressed unconstrained output cut where vLLM's rules cut it.
- structured output masks logits only: the output matches its regex or JSON schema while the
  cache is compressed, and a constraint the unconstrained output already meets changes nothing.
- beam search (``LLM.beam_search``) sends one ``max_tokens=1`` request per beam and step, with
  prompts that share prefixes: every token it scores comes from a prefill, so it equals the
  full-cache engine's beam search, through the prefix cache the compressed requests share.
- multimodal models are refused at start (not verified here), named.

All on the session engines (``snap_llm``: server budget 512; ``dense_llm``: compression off).
"""

from __future__ import annotations

import json
import math
import re

import pytest
from vllm import SamplingParams
from vllm.sampling_params import BeamSearchParams, StructuredOutputsParams

from conftest import greedy, scheduler_of, token_ids
from vllm_snapkv.tasks import passkey_prompt

pytestmark = pytest.mark.engine

#: Long enough to compress at the server budget (512): ~1,500 tokens.
FILLER_TOKENS = 1500
#: float32 on the same kernels; the plugin's window capture must not change the prefill's math.
LOGPROB_TOLERANCE = 1e-4


def compressions(llm) -> int:
    return scheduler_of(llm)._snapkv.stats.compressed_requests


def assert_same_logprobs(expected: dict, got: dict) -> None:
    """Two positions' logprob dicts hold the same token ids with the same logprobs and ranks."""
    assert sorted(got) == sorted(expected)
    for token, logprob in expected.items():
        assert math.isclose(got[token].logprob, logprob.logprob, abs_tol=LOGPROB_TOLERANCE)
        assert got[token].rank == logprob.rank


def test_prompt_logprobs_and_first_token_equal_the_full_cache(snap_llm, dense_llm):
    prompt = passkey_prompt(FILLER_TOKENS, 61027, 0.4)
    params = SamplingParams(temperature=0.0, max_tokens=12, logprobs=5, prompt_logprobs=3)
    before = compressions(snap_llm)
    (snap,) = snap_llm.generate([prompt], params)
    assert compressions(snap_llm) == before + 1
    (dense,) = dense_llm.generate([prompt], params)

    assert len(snap.prompt_logprobs) == len(snap.prompt_token_ids) > 1000
    assert snap.prompt_logprobs[0] is None and dense.prompt_logprobs[0] is None
    for expected, got in zip(dense.prompt_logprobs[1:], snap.prompt_logprobs[1:], strict=True):
        assert_same_logprobs(expected, got)

    snap_out, dense_out = snap.outputs[0], dense.outputs[0]
    assert snap_out.token_ids[0] == dense_out.token_ids[0]
    assert_same_logprobs(dense_out.logprobs[0], snap_out.logprobs[0])

    # Later tokens decode from the compressed cache: logprobs do not change them, and each greedy
    # token is its position's best.
    (plain,) = token_ids(snap_llm.generate([prompt], greedy(max_tokens=12)))
    assert list(snap_out.token_ids) == plain
    assert len(snap_out.logprobs) == len(plain)
    for token, position in zip(plain, snap_out.logprobs, strict=True):
        assert position[token].rank == 1
        assert position[token].logprob == max(entry.logprob for entry in position.values())
    assert math.isclose(
        snap_out.cumulative_logprob,
        sum(position[token].logprob for token, position in zip(plain, snap_out.logprobs)),
        abs_tol=1e-3,
    )


def test_n2_children_each_compress_and_equal_their_seeded_request_alone(snap_llm):
    prompt = passkey_prompt(FILLER_TOKENS, 50321, 0.6)
    seed = 1234

    def sampled(n: int, seed: int) -> SamplingParams:
        return SamplingParams(n=n, temperature=1.0, top_k=50, seed=seed, max_tokens=16)

    scheduler = scheduler_of(snap_llm)
    manager = scheduler.kv_cache_manager
    lookup = manager.get_computed_blocks
    hits: dict[str, int] = {}

    def spy(request, *args, **kwargs):
        found = lookup(request, *args, **kwargs)  # (blocks, hit tokens, ...)
        hits.setdefault(request.request_id, found[1])
        return found

    snap_llm.reset_prefix_cache()
    before = compressions(snap_llm)
    manager.get_computed_blocks = spy
    try:
        (parent,) = snap_llm.generate([prompt], sampled(2, seed))
    finally:
        del manager.get_computed_blocks
    assert compressions(snap_llm) == before + 2  # each child compressed its own cache
    # The children share the prompt's prefix: one prefills it, the other hits the prefix cache
    # up to the block boundary before its observation window (queries are not cached).
    assert len(hits) == 2 and sorted(hits.values())[0] == 0 and sorted(hits.values())[1] > 0
    children = [list(c.token_ids) for c in sorted(parent.outputs, key=lambda c: c.index)]
    alone = [token_ids(snap_llm.generate([prompt], sampled(1, seed + i)))[0] for i in range(2)]
    assert compressions(snap_llm) == before + 4
    assert children == alone


def test_stop_strings_and_stop_tokens_cut_the_compressed_output(snap_llm):
    prompt = passkey_prompt(FILLER_TOKENS, 72816, 0.5)
    (full,) = snap_llm.generate([prompt], greedy(max_tokens=24))
    text, tokens = full.outputs[0].text, list(full.outputs[0].token_ids)
    # A stop string the compressed output reaches after its first token (decoded from the
    # compressed cache), cut out of that output itself.
    first_text = snap_llm.get_tokenizer().decode(tokens[:1])
    stop = text[len(first_text) + 3 : len(first_text) + 6]
    assert len(stop) == 3 and stop.strip(), text
    cut = text.index(stop)

    before = compressions(snap_llm)
    for include in (False, True):
        params = SamplingParams(temperature=0.0, max_tokens=24, stop=[stop],
                                include_stop_str_in_output=include)
        (out,) = snap_llm.generate([prompt], params)
        assert out.outputs[0].text == text[: cut + (len(stop) if include else 0)]
        assert out.outputs[0].finish_reason == "stop" and out.outputs[0].stop_reason == stop
    assert compressions(snap_llm) == before + 2

    stop_token = tokens[5]
    params = SamplingParams(temperature=0.0, max_tokens=24, stop_token_ids=[stop_token])
    (out,) = snap_llm.generate([prompt], params)
    assert list(out.outputs[0].token_ids) == tokens[: tokens.index(stop_token) + 1]
    assert out.outputs[0].stop_reason == stop_token


def test_min_tokens_holds_back_stop_tokens_under_compression(snap_llm):
    prompt = passkey_prompt(FILLER_TOKENS, 38219, 0.5)
    (plain,) = token_ids(snap_llm.generate([prompt], greedy(max_tokens=24)))
    stop_token = plain[2]  # without min_tokens the request stops at its third token
    min_tokens = 10
    params = SamplingParams(temperature=0.0, max_tokens=24, min_tokens=min_tokens,
                            stop_token_ids=[stop_token], logprobs=2)
    before = compressions(snap_llm)
    (out,) = snap_llm.generate([prompt], params)
    assert compressions(snap_llm) == before + 1
    got = list(out.outputs[0].token_ids)
    assert got[:2] == plain[:2]
    assert len(got) >= min_tokens and stop_token not in got[:min_tokens]
    # Where the stop token was best, the runner-up was taken (logprobs are the raw ones).
    ranked = sorted(out.outputs[0].logprobs[2].items(), key=lambda item: item[1].rank)
    assert ranked[0][0] == stop_token and got[2] == ranked[1][0]
    if stop_token in got:  # after min_tokens it stops the request again
        assert got.index(stop_token) == len(got) - 1
    else:
        assert len(got) == 24


def test_regex_output_under_compression_equals_the_unconstrained_output_it_allows(snap_llm):
    prompt = passkey_prompt(FILLER_TOKENS, 43917, 0.5)
    (free,) = snap_llm.generate([prompt], greedy(max_tokens=12))
    regex = r" [0-9]{5}"
    match = re.match(regex, free.outputs[0].text)
    assert match, free.outputs[0].text  # the compressed engine answers with five digits

    params = SamplingParams(temperature=0.0, max_tokens=12,
                            structured_outputs=StructuredOutputsParams(regex=regex))
    before = compressions(snap_llm)
    (out,) = snap_llm.generate([prompt], params)
    assert compressions(snap_llm) == before + 1
    assert re.fullmatch(regex, out.outputs[0].text)
    # Every unconstrained token was allowed, so the grammar only ends the output after them.
    assert out.outputs[0].text == match.group(0)


def test_json_schema_output_under_compression_follows_the_schema(snap_llm):
    prompt = passkey_prompt(FILLER_TOKENS, 43917, 0.5) + " (answer in JSON)"
    schema = {
        "type": "object",
        "properties": {"pass_key": {"type": "string", "pattern": "^[0-9]{5}$"}},
        "required": ["pass_key"],
        "additionalProperties": False,
    }
    params = SamplingParams(
        temperature=0.0, max_tokens=40,
        structured_outputs=StructuredOutputsParams(json=schema, disable_any_whitespace=True),
    )
    before = compressions(snap_llm)
    (out,) = snap_llm.generate([prompt], params)
    assert compressions(snap_llm) == before + 1
    assert out.outputs[0].finish_reason == "stop", out.outputs[0].text
    answer = json.loads(out.outputs[0].text)
    assert list(answer) == ["pass_key"] and re.fullmatch("[0-9]{5}", answer["pass_key"])
    assert len(out.outputs[0].token_ids) > 4  # decoded past the prefill, from the compressed cache


def test_beam_search_equals_the_full_cache(snap_llm, dense_llm):
    prompt = passkey_prompt(FILLER_TOKENS, 29563, 0.5)
    params = BeamSearchParams(beam_width=3, max_tokens=6)
    for llm in (snap_llm, dense_llm):
        llm.reset_prefix_cache()
    engine = snap_llm.llm_engine
    add_request = engine.add_request
    sent: list[str] = []

    def counting(request_id, *args, **kwargs):
        sent.append(request_id)
        return add_request(request_id, *args, **kwargs)

    before = compressions(snap_llm)
    engine.add_request = counting
    try:
        (snap,) = snap_llm.beam_search([{"prompt": prompt}], params)
    finally:
        del engine.add_request
    (dense,) = dense_llm.beam_search([{"prompt": prompt}], params)
    assert [s.tokens for s in snap.sequences] == [s.tokens for s in dense.sequences]
    for got, expected in zip(snap.sequences, dense.sequences):
        assert math.isclose(got.cum_logprob, expected.cum_logprob, abs_tol=1e-3)
    # One max_tokens=1 request per beam and step (1 + 3 per later step), each with a long prompt:
    # each compressed at its prefill's end, the step it finishes in.
    assert len(sent) > params.max_tokens
    assert compressions(snap_llm) - before == len(sent)


def test_multimodal_model_is_refused_at_start_naming_it(model_dir, tmp_path):
    """A multimodal architecture (PaliGemma; a config only, nothing loads) stops at config
    time. (LLaVA, Gemma 3 and the Qwen2-VL family, M-RoPE included, cannot even be inspected
    here: their vLLM modules import torchvision, which the CPU environment does not have.)"""
    import shutil

    from vllm.engine.arg_utils import EngineArgs

    text = {"model_type": "gemma", "hidden_size": 256, "intermediate_size": 512,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "head_dim": 64, "vocab_size": 49152, "max_position_embeddings": 8192}
    vision = {"model_type": "siglip_vision_model", "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 56,
              "patch_size": 14}
    config = {"architectures": ["PaliGemmaForConditionalGeneration"], "model_type": "paligemma",
              "text_config": text, "vision_config": vision, "image_token_index": 49151,
              "projection_dim": 256, "torch_dtype": "float32"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{model_dir}/{name}", tmp_path / name)
    args = EngineArgs(str(tmp_path), dtype="float32", max_model_len=2048, enforce_eager=True,
                      additional_config={"kv_compression": {"method": "snapkv"}})
    with pytest.raises(ValueError, match="multimodal models.*PaliGemmaForConditionalGeneration"):
        args.create_engine_config()
    # Compression off: the same configuration builds (the refusal is SnapKV's, not vLLM's).
    EngineArgs(str(tmp_path), dtype="float32", max_model_len=2048,
               enforce_eager=True).create_engine_config()
