"""End to end on the real SmolLM2-135M-Instruct (float32, CPU) through stock vLLM 0.32.

Engines run in-process (conftest) so the tests read vLLM's own scheduler and block pool.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from vllm import SamplingParams

from benchmarks.quality.reference import post_rope_capture, queries_and_keys
from conftest import (
    SERVER_BUDGET,
    decode_checking_physical_blocks,
    greedy,
    internal_id,
    load_dump,
    reference_kept_positions,
    scheduler_of,
    token_ids,
)
from vllm_snapkv.plan import cdiv
from vllm_snapkv.scoring import ChunkScore, ContinuationScore
from vllm_snapkv.tasks import passkey_prompt

WINDOW = 32
CHUNK = ChunkScore.chunk_size

pytestmark = pytest.mark.engine

BLOCK_SIZE = 128  # vLLM's CPU block size; asserted in test_block_size_is_what_the_tests_assume


def test_block_size_is_what_the_tests_assume(snap_llm):
    manager = scheduler_of(snap_llm).kv_cache_manager.coordinator.single_type_managers[0]
    assert manager.block_size == BLOCK_SIZE


def test_prompts_within_budget_generate_exactly_as_without_plugin(snap_llm, dense_llm):
    prompts = [passkey_prompt(n, 4242 + n, 0.5) for n in (100, 300)]
    prompts.append("The capital of France is")
    before = scheduler_of(snap_llm)._snapkv.stats.compressed_requests
    assert token_ids(snap_llm.generate(prompts, greedy())) == token_ids(
        dense_llm.generate(prompts, greedy())
    )
    assert scheduler_of(snap_llm)._snapkv.stats.compressed_requests == before


def test_request_opting_out_generates_exactly_as_without_plugin(snap_llm, dense_llm):
    prompt = passkey_prompt(1500, 77123, 0.3)
    opted_out = SamplingParams(
        temperature=0.0, max_tokens=16, extra_args={"kv_compression": "none"}
    )
    before = scheduler_of(snap_llm)._snapkv.stats.compressed_requests
    assert token_ids(snap_llm.generate([prompt], opted_out)) == token_ids(
        dense_llm.generate([prompt], greedy())
    )
    assert scheduler_of(snap_llm)._snapkv.stats.compressed_requests == before


def test_compressed_request_holds_budget_blocks_and_returns_the_rest(snap_llm):
    budget = 256
    engine = snap_llm.llm_engine
    scheduler = scheduler_of(snap_llm)
    manager = scheduler.kv_cache_manager.coordinator.single_type_managers[0]
    pool = scheduler.kv_cache_manager.block_pool
    snap_llm.reset_prefix_cache()
    free_at_start = pool.get_num_free_blocks()

    prompt = passkey_prompt(1900, 55123, 0.5)
    prompt_len = len(snap_llm.get_tokenizer()(prompt).input_ids)
    assert cdiv(prompt_len, BLOCK_SIZE) >= 15
    engine.add_request("blocks", prompt, greedy(budget, max_tokens=200))
    engine.step()  # the whole prompt prefills in this step and is compacted
    request_id = internal_id(scheduler, "blocks")
    request = scheduler.requests[request_id]
    assert request.num_computed_tokens == prompt_len
    assert len(manager.req_to_blocks[request_id]) == cdiv(budget, BLOCK_SIZE)
    # Every source block went back; only the targets are held.
    assert pool.get_num_free_blocks() == free_at_start - cdiv(budget, BLOCK_SIZE)

    decode_checking_physical_blocks(engine, scheduler, request_id, prompt_len, budget)
    assert request.num_output_tokens == 200
    assert pool.get_num_free_blocks() == free_at_start


def test_request_finishing_in_its_compaction_step_leaks_nothing(snap_llm):
    pool = scheduler_of(snap_llm).kv_cache_manager.block_pool
    snap_llm.reset_prefix_cache()
    free_at_start = pool.get_num_free_blocks()
    stats = scheduler_of(snap_llm)._snapkv.stats
    before = stats.compressed_requests
    snap_llm.generate([passkey_prompt(1500, 99881, 0.5)], greedy(256, max_tokens=1))
    assert stats.compressed_requests == before + 1
    snap_llm.generate(["Hello"], greedy(max_tokens=2))  # the worker learns of it one step late
    assert pool.get_num_free_blocks() == free_at_start


def test_aborted_compressed_request_releases_every_block(snap_llm):
    engine = snap_llm.llm_engine
    scheduler = scheduler_of(snap_llm)
    pool = scheduler.kv_cache_manager.block_pool
    snap_llm.reset_prefix_cache()
    free_at_start = pool.get_num_free_blocks()
    engine.add_request("to-abort", passkey_prompt(1500, 12121, 0.5), greedy(256, max_tokens=100))
    engine.step()
    engine.step()
    internal = internal_id(scheduler, "to-abort")
    assert scheduler._snapkv.evicted[internal] > 0
    engine.abort_request(["to-abort"])
    engine.step()
    assert not engine.has_unfinished_requests()
    assert internal not in scheduler._snapkv.evicted
    assert pool.get_num_free_blocks() == free_at_start


def test_kv_cache_usage_follows_physical_length(snap_llm, dense_llm):
    prompt = passkey_prompt(3000, 31337, 0.5)
    usage = {}
    for name, llm, params in (
        ("snapkv", snap_llm, greedy(256, max_tokens=4)),
        ("dense", dense_llm, greedy(max_tokens=4)),
    ):
        llm.reset_prefix_cache()
        manager = scheduler_of(llm).kv_cache_manager
        llm.llm_engine.add_request(name, prompt, params)
        llm.llm_engine.step()
        llm.llm_engine.step()
        usage[name] = manager.usage
        while llm.llm_engine.has_unfinished_requests():
            llm.llm_engine.step()
    assert 0 < usage["snapkv"] < usage["dense"] / 5


@pytest.fixture(scope="module")
def passkey_outputs(snap_llm):
    prompts = [passkey_prompt(2000, key, depth) for key, depth in PASSKEYS]
    return snap_llm.generate(prompts, greedy(512, max_tokens=8))


PASSKEYS = ((68413, 0.1), (90271, 0.5), (17342, 0.9))


def test_passkeys_at_2k_answered_with_budget_512(passkey_outputs):
    for (key, _), output in zip(PASSKEYS, passkey_outputs):
        assert str(key) in output.outputs[0].text, output.outputs[0].text


def test_compression_changes_generation_versus_full_cache(snap_llm, dense_llm):
    # Guards the equality tests above against a plugin that silently does nothing.
    prompt = passkey_prompt(2500, 11111, 0.5)
    compressed = token_ids(snap_llm.generate([prompt], greedy(64, max_tokens=48)))
    full = token_ids(dense_llm.generate([prompt], greedy(max_tokens=48)))
    assert compressed != full


def test_kept_positions_match_dense_transformers_reference(
    snap_llm, passkey_outputs, dump_dir, model_dir
):
    output = passkey_outputs[1]
    dump = load_dump(dump_dir, output.request_id)
    prompt_ids = list(output.prompt_token_ids)
    assert dump["prompt_len"] == len(prompt_ids)
    assert dump["budget"] == 512
    assert sorted(dump["layers"]) == list(range(30))
    reference = reference_kept_positions(model_dir, prompt_ids, 512, WINDOW)
    for layer, kept in dump["layers"].items():
        assert kept.shape == (3, 512) and kept.dtype == torch.long
        assert torch.all(kept[:, 1:] > kept[:, :-1]), "ascending"
        for head in range(3):
            overlap = len(set(kept[head].tolist()) & reference[layer][head]) / 512
            assert overlap >= 0.99, (layer, head, overlap)


def carried_order(
    row: torch.Tensor, reach: int, decay: float, rare: torch.Tensor | None = None,
    rare_steps: int | None = None, tail: float = 1.0, path: bool = False,
) -> list[int]:
    """Positions of one head by ``max over d <= reach of decay**d * row[p - d]`` (zero before
    the prompt), best first, ties to the earlier position: the continuation rules' order.
    ``rare`` (bool per position): carried only from positions where it holds (``d = 0``
    always counts); with ``rare_steps``, only while ``p - d + 1 .. p`` hold at most that many
    rare positions (with ``path``, none past that distance), and ``tail ** (d - rare_steps)``
    less past it."""
    source = row if rare is None else row * rare

    def passable(d: int) -> torch.Tensor:
        if rare_steps is None:
            return row.new_ones(len(row))
        held = torch.nn.functional.conv1d(rare[None, None], rare.new_ones(1, 1, d))[0, 0]
        allowed = 0 if path and d > rare_steps else rare_steps
        return torch.cat([row.new_ones(d - 1), (held <= allowed).to(row.dtype)])

    shifted = [row] + [torch.cat([row.new_zeros(d), source[: len(row) - d]]) * decay**d
                       * tail ** max(0, d - (rare_steps or d)) * passable(d)
                       for d in range(1, reach + 1)]
    continued = torch.stack(shifted).max(dim=0).values
    return continued.sort(descending=True, stable=True).indices.tolist()


def two_track_keep(first: list[int], order: list[int], count: int) -> set[int]:
    """The two-track keep: ``first`` (SnapKV's singles, CriticalKV's stage 1) first, then
    ``order``'s positions not kept yet, ``count`` in all."""
    taken = set(first)
    return set((first + [p for p in order if p not in taken])[:count])


def reference_rule_kept_positions(
    model_dir: str, prompt_ids: list[int], budget: int, window: int, kernel_size: int = 7
) -> dict[str, dict]:
    """The 'critical' and 'chunk' rules from transformers' eager forward of the same weights,
    written out here: post-RoPE Q/K, V (the v_proj outputs) and each layer's o_proj weight
    captured from the HF Llama layers; SnapKV's pooled group-mean window attention. 'critical':
    per KV head the RMS over its query heads of ||W_o^q v||; stage 1 the attention top of
    budget / 2 (window counted), stage 2 the rest by (attention / W + 1e-4) * norm. 'chunk':
    aligned chunks of ``ChunkScore.chunk_size`` prefix positions ranked by their mean attention,
    taken whole. 'snapkv-chunk': the attention top of half the prefix budget, then the positions
    of the ranked chunks not kept yet. 'continuation': each position scores the largest of
    ``decay ** d`` times the attention ``d`` positions before it (``d <= reach``), then the top;
    'snapkv-continuation': the attention top of half the prefix budget, then that order;
    'snapkv-scaled-continuation' the same with ``reach`` = the prefix budget // 32 (1 to 24);
    'snapkv-rare-continuation' that, carried only from positions whose token id occurs at most
    ``max(16, L // 256)`` times in the prompt; 'snapkv-rare-long-continuation' that with
    ``reach`` = the prefix budget // 16; 'snapkv-rare-step-continuation' that, carried only
    while the positions passed hold at most the prefix budget // 32 rare tokens;
    'snapkv-rare-tail-continuation' that, times 0.8 per position past that count;
    'snapkv-rare-path-continuation' the step rule passing no rare token past that count."""
    import math

    import transformers.models.llama.modeling_llama as llama
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager"
    )
    values = []
    hooks = [
        layer.self_attn.v_proj.register_forward_hook(
            lambda module, args, out: values.append(out[0].detach())  # [L, H_kv * D]
        )
        for layer in model.model.layers
    ]
    try:
        with post_rope_capture(llama, queries_and_keys) as captured, torch.no_grad():
            model(torch.tensor([prompt_ids]))
    finally:
        for hook in hooks:
            hook.remove()

    critical, chunk, mixed, carried, mixed_carried, mixed_scaled = {}, {}, {}, {}, {}, {}
    mixed_rare, mixed_rare_long, mixed_rare_step, mixed_rare_tail = {}, {}, {}, {}
    mixed_rare_path: dict = {}
    decay, reach = ContinuationScore.decay, ContinuationScore.reach
    scaled_reach = max(1, min(reach, (budget - window) // 32))
    long_reach = max(1, min(reach, (budget - window) // 16))
    occurrences = Counter(prompt_ids)
    limit = max(16, len(prompt_ids) // 256)
    rare = torch.tensor([occurrences[t] <= limit for t in prompt_ids], dtype=torch.float64)
    for layer, ((q, k), v) in enumerate(zip(captured, values)):
        num_q_heads, length, dim = q.shape
        num_kv_heads = k.shape[0]
        group, prefix = num_q_heads // num_kv_heads, length - window
        logits = q[:, -window:] @ k.repeat_interleave(group, dim=0).transpose(1, 2) / math.sqrt(dim)
        future = torch.arange(length)[None, :] > (prefix + torch.arange(window))[:, None]
        probs = logits.masked_fill(future, float("-inf")).softmax(-1)[..., :prefix].sum(1)
        pooled = torch.nn.functional.max_pool1d(probs[:, None], kernel_size, 1, kernel_size // 2)
        attention = pooled[:, 0].view(num_kv_heads, group, prefix).mean(1).double()
        w_o = model.model.layers[layer].self_attn.o_proj.weight.double()  # [hidden, H_q * D]
        v = v.view(length, num_kv_heads, dim)[:prefix].double()
        first = max(budget // 2 - window, 0)
        critical[layer], chunk[layer], mixed[layer] = [], [], []
        carried[layer], mixed_carried[layer], mixed_scaled[layer] = [], [], []
        mixed_rare[layer], mixed_rare_long[layer] = [], []
        mixed_rare_step[layer], mixed_rare_tail[layer], mixed_rare_path[layer] = [], [], []
        tail = set(range(prefix, length))  # the window, kept by every rule
        for h in range(num_kv_heads):
            squares = [
                (v[:, h] @ w_o[:, qh * dim : (qh + 1) * dim].T).norm(dim=-1) ** 2
                for qh in range(h * group, (h + 1) * group)
            ]
            norms = torch.stack(squares).mean(0).sqrt()
            stage1 = attention[h].sort(descending=True, stable=True).indices[:first].tolist()
            weighted = (attention[h] / window + 1e-4) * norms
            order = weighted.sort(descending=True, stable=True).indices.tolist()
            critical[layer].append(two_track_keep(stage1, order, budget - window) | tail)
            chunks = [range(start, min(start + CHUNK, prefix)) for start in range(0, prefix, CHUNK)]
            means = [attention[h, c.start : c.stop].mean().item() for c in chunks]
            ranked = sorted(range(len(chunks)), key=lambda i: -means[i])
            chunk_order = [p for i in ranked for p in chunks[i]]
            chunk[layer].append(set(chunk_order[: budget - window]) | tail)
            singles = attention[h].sort(descending=True, stable=True).indices
            singles = singles[: (budget - window) // 2].tolist()
            mixed[layer].append(two_track_keep(singles, chunk_order, budget - window) | tail)
            order = carried_order(attention[h], reach, decay)
            carried[layer].append(set(order[: budget - window]) | tail)
            mixed_carried[layer].append(two_track_keep(singles, order, budget - window) | tail)
            order = carried_order(attention[h], scaled_reach, decay)
            mixed_scaled[layer].append(two_track_keep(singles, order, budget - window) | tail)
            order = carried_order(attention[h], scaled_reach, decay, rare[:prefix])
            mixed_rare[layer].append(two_track_keep(singles, order, budget - window) | tail)
            order = carried_order(attention[h], long_reach, decay, rare[:prefix])
            mixed_rare_long[layer].append(two_track_keep(singles, order, budget - window) | tail)
            order = carried_order(attention[h], long_reach, decay, rare[:prefix], scaled_reach)
            mixed_rare_step[layer].append(two_track_keep(singles, order, budget - window) | tail)
            order = carried_order(attention[h], long_reach, decay, rare[:prefix], scaled_reach, 0.8)
            mixed_rare_tail[layer].append(two_track_keep(singles, order, budget - window) | tail)
            order = carried_order(attention[h], long_reach, decay, rare[:prefix], scaled_reach,
                                  path=True)
            mixed_rare_path[layer].append(two_track_keep(singles, order, budget - window) | tail)
    return {"critical": critical, "chunk": chunk, "snapkv-chunk": mixed, "continuation": carried,
            "snapkv-continuation": mixed_carried, "snapkv-scaled-continuation": mixed_scaled,
            "snapkv-rare-continuation": mixed_rare,
            "snapkv-rare-long-continuation": mixed_rare_long,
            "snapkv-rare-step-continuation": mixed_rare_step,
            "snapkv-rare-tail-continuation": mixed_rare_tail,
            "snapkv-rare-path-continuation": mixed_rare_path}


def test_other_rules_per_request_keep_budget_blocks_and_match_their_references(
    snap_llm, dump_dir, model_dir
):
    """``snapkv_score: critical``, ``chunk``, ``snapkv-chunk``, ``continuation``,
    ``snapkv-continuation``, ``snapkv-scaled-continuation`` and the five
    ``snapkv-rare-*-continuation`` rules (the prompt's token ids reached the worker) through
    ``extra_args`` on the shared SnapKV engine, the same prompt: each request holds ceil(C / bs) blocks like any SnapKV request, its dump names the
    rule, and every layer's kept positions match the rule computed from transformers' forward
    (for 'critical', the worker found o_proj through vLLM's CPU-repacked linear and read V from
    the packed cache). 'chunk' keeps whole aligned chunks but for one cut chunk per head; it
    (and 'snapkv-chunk') may differ from the float64 reference by one chunk at the cut
    (near-equal chunk means round either way), hence 95 % there; the 'continuation' rules
    likewise at the budget's edge, where carried scores nearly tie."""
    budget = 256
    engine = snap_llm.llm_engine
    scheduler = scheduler_of(snap_llm)
    manager = scheduler.kv_cache_manager.coordinator.single_type_managers[0]
    pool = scheduler.kv_cache_manager.block_pool
    prompt = passkey_prompt(1900, 31337, 0.4)
    prompt_ids = snap_llm.get_tokenizer()(prompt).input_ids
    for rule in ("critical", "chunk", "snapkv-chunk", "continuation", "snapkv-continuation",
                 "snapkv-scaled-continuation", "snapkv-rare-continuation",
                 "snapkv-rare-long-continuation", "snapkv-rare-step-continuation",
                 "snapkv-rare-tail-continuation", "snapkv-rare-path-continuation"):
        snap_llm.reset_prefix_cache()
        free_at_start = pool.get_num_free_blocks()
        params = SamplingParams(temperature=0.0, max_tokens=8,
                                extra_args={"snapkv_budget": budget, "snapkv_score": rule})
        engine.add_request(rule, prompt, params)
        engine.step()  # the whole prompt prefills in this step and is compacted
        request_id = internal_id(scheduler, rule)
        assert scheduler.requests[request_id].num_computed_tokens == len(prompt_ids)
        assert len(manager.req_to_blocks[request_id]) == cdiv(budget, BLOCK_SIZE)
        assert pool.get_num_free_blocks() == free_at_start - cdiv(budget, BLOCK_SIZE)
        while engine.has_unfinished_requests():
            engine.step()
        assert pool.get_num_free_blocks() == free_at_start

    references = reference_rule_kept_positions(model_dir, prompt_ids, budget, WINDOW)
    snapkv = reference_kept_positions(model_dir, prompt_ids, budget, WINDOW)
    prefix = len(prompt_ids) - WINDOW
    for rule, least_overlap in (("critical", 0.99), ("chunk", 0.95), ("snapkv-chunk", 0.95),
                                ("continuation", 0.95), ("snapkv-continuation", 0.95),
                                ("snapkv-scaled-continuation", 0.95),
                                ("snapkv-rare-continuation", 0.95),
                                ("snapkv-rare-long-continuation", 0.95),
                                ("snapkv-rare-step-continuation", 0.95),
                                ("snapkv-rare-tail-continuation", 0.95),
                                ("snapkv-rare-path-continuation", 0.95)):
        dump = load_dump(dump_dir, rule)
        assert dump["score"] == rule and dump["budget"] == budget
        assert sorted(dump["layers"]) == list(range(30))
        differs = 0
        for layer, kept in dump["layers"].items():
            assert kept.shape == (3, budget)
            for head in range(3):
                chosen = set(kept[head].tolist())
                overlap = len(chosen & references[rule][layer][head]) / budget
                assert overlap >= least_overlap, (rule, layer, head, overlap)
                differs += chosen != snapkv[layer][head]
                if rule == "chunk":
                    cut = [start for start in range(0, prefix, CHUNK)
                           if 0 < len(chosen & set(range(start, min(start + CHUNK, prefix))))
                           < min(CHUNK, prefix - start)]
                    assert len(cut) <= 1, (layer, head, cut)
        assert differs > 0  # the rule really changed the selection somewhere
    # Each rule's own setting reached the worker: its selection differs somewhere from the one
    # of the rule it refines (the scaled reach, 7 here, not 24; the rare-token gate, as the
    # passkey filler repeats; the reach 14, not 7; at most 7 rare tokens passed; the tail; no
    # rare token passed past 7).
    chain = ("snapkv-continuation", "snapkv-scaled-continuation", "snapkv-rare-continuation",
             "snapkv-rare-long-continuation", "snapkv-rare-step-continuation",
             "snapkv-rare-tail-continuation")
    refinements = [*zip(chain, chain[1:]),
                   ("snapkv-rare-step-continuation", "snapkv-rare-path-continuation")]
    for base, refined in refinements:
        first, second = load_dump(dump_dir, base), load_dump(dump_dir, refined)
        assert any(not torch.equal(first["layers"][layer], second["layers"][layer])
                   for layer in range(30)), (base, refined)


def test_bad_request_budget_is_refused_naming_the_field(snap_llm):
    prompt = passkey_prompt(1200, 24680, 0.5)
    with pytest.raises(ValueError, match="snapkv_budget"):
        snap_llm.generate([prompt], greedy(SERVER_BUDGET * 4))
    # The engine keeps serving.
    assert snap_llm.generate([prompt], greedy(256))[0].outputs[0].text
