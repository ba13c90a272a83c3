"""Selection rules (vllm_snapkv/scoring.py): the value-aware 'critical' rule against a naive
reference written here (loops, float64, explicit two stages), 'continuation' against loops over
positions (the carry gated by counting tokens for 'snapkv-rare-continuation'), chunked ==
dense for every rule (across span boundaries for 'continuation'),
the generic keep step, and the value metric under a tensor-parallel split of W_o."""

from __future__ import annotations

import math
import random

import pytest
import torch

from test_selection import (
    frequent_and_rare_ids,
    make_inputs,
    random_case,
    reference_window_scores,
)
from vllm_snapkv.scoring import (
    SCORE_NAMES,
    ChunkScore,
    ContinuationScore,
    CriticalScore,
    SnapKVChunkScore,
    keep_by_priority,
    projected_value_norms,
    score_rule,
    value_metric,
)
from vllm_snapkv.selection import (
    compaction_workspace_bytes,
    group_mean,
    pool_scores,
    select_kept_positions,
    select_kept_positions_chunked,
    top_positions,
    window_attention_scores,
)


def reference_group_scores(q_win, keys, scale, kernel_size, pooling):
    """SnapKV's score with loops: window sums, pooled per query head, averaged per KV head."""
    num_window, num_q_heads, _ = q_win.shape
    prompt_len, num_kv_heads, _ = keys.shape
    group, prefix, half = num_q_heads // num_kv_heads, prompt_len - num_window, kernel_size // 2
    totals = reference_window_scores(q_win, keys, scale)
    pooled = torch.zeros_like(totals)
    for head in range(num_q_heads):
        for pos in range(prefix):
            lo, hi = max(0, pos - half), min(prefix, pos + half + 1)
            if pooling == "max":
                pooled[head, pos] = totals[head, lo:hi].max()
            else:
                pooled[head, pos] = totals[head, lo:hi].sum() / kernel_size
    return torch.stack(
        [pooled[h * group : (h + 1) * group].mean(dim=0) for h in range(num_kv_heads)]
    )


def reference_value_norm(value, w_o, query_heads, head_size):
    """RMS over the query heads of ||W_o^q v||_2, W_o^q the head's columns of W_o."""
    squares = [
        (w_o[:, q * head_size : (q + 1) * head_size].double() @ value.double()).norm() ** 2
        for q in query_heads
    ]
    return math.sqrt(sum(squares) / len(squares))


def reference_critical(q_win, keys, values, w_o, budget, scale, kernel_size, pooling):
    """CriticalKV's two stages, written out: stage 1 keeps the SnapKV top of half the budget
    (window counted in it), stage 2 the best of the rest by (attention / W + 1e-4) * norm."""
    num_window, num_q_heads, head_size = q_win.shape
    prompt_len, num_kv_heads, _ = keys.shape
    group, prefix = num_q_heads // num_kv_heads, prompt_len - num_window
    scores = reference_group_scores(q_win, keys, scale, kernel_size, pooling)
    first = min(max(int(budget * 0.5) - num_window, 0), budget - num_window)
    kept = []
    for h in range(num_kv_heads):
        heads = range(h * group, (h + 1) * group)
        attention = scores[h].tolist()
        # sorted() is stable: among equal scores the earlier position comes first.
        stage1 = sorted(range(prefix), key=lambda p: -attention[p])[:first]
        weighted = [
            (attention[p] / num_window + 1e-4) * reference_value_norm(values[p, h], w_o, heads,
                                                                       head_size)
            for p in range(prefix)
        ]
        rest = [p for p in sorted(range(prefix), key=lambda p: -weighted[p]) if p not in stage1]
        chosen = set(stage1) | set(rest[: budget - num_window - first])
        kept.append(sorted(chosen) + list(range(prefix, prompt_len)))
    return torch.tensor(kept)


def critical_inputs(seed, window, q_heads, kv_heads, length, dim=16, hidden=40):
    q, k = make_inputs(seed, window, q_heads, kv_heads, length, dim)
    gen = torch.Generator().manual_seed(seed + 1)
    # Values of very different sizes, so the second stage has something to prefer.
    v = torch.randn(length, kv_heads, dim, generator=gen) * torch.rand(length, kv_heads, 1,
                                                                       generator=gen) * 3
    w_o = torch.randn(hidden, q_heads * dim, generator=gen) / math.sqrt(q_heads * dim)
    metric = value_metric(lambda x: x @ w_o.T, q_heads, kv_heads, dim, torch.float32, "cpu")
    return q, k, v, w_o, metric


@pytest.mark.parametrize("pooling", ["max", "avg"])
@pytest.mark.parametrize("kernel_size", [1, 7])
@pytest.mark.parametrize("q_heads,kv_heads", [(4, 4), (6, 2), (9, 3)])
@pytest.mark.parametrize("budget", [6, 20, 41])  # first stage empty, small, most of the budget
def test_critical_matches_the_naive_two_stage_reference(pooling, kernel_size, q_heads, kv_heads,
                                                        budget):
    window, length = 5, 60
    q, k, v, w_o, metric = critical_inputs(kernel_size * 10 + q_heads + budget, window, q_heads,
                                           kv_heads, length)
    scale = 1 / math.sqrt(q.shape[-1])
    got = select_kept_positions(q, k, budget, scale, kernel_size, pooling, score="critical",
                                values=v, value_metric=metric)
    want = reference_critical(q, k, v, w_o, budget, scale, kernel_size, pooling)
    assert got.shape == (kv_heads, budget) and got.dtype == torch.long
    assert torch.equal(got, want)
    # The rule is not SnapKV in disguise: the value stage changes what is kept.
    snapkv = select_kept_positions(q, k, budget, scale, kernel_size, pooling)
    if budget - window - max(int(budget * 0.5) - window, 0) > 2:
        assert not torch.equal(got, snapkv)


def reference_chunk(q_win, keys, budget, scale, kernel_size, pooling, chunk, singles=0):
    """ChunkKV's rule, written out: aligned chunks of the prefix ranked by their mean SnapKV
    score (ties: the earlier chunk), taken whole in that order until ``budget - W`` positions,
    the last one cut to its first positions. With ``singles``, the SnapKV top ``singles``
    positions (ties: the earlier) are kept first and the chunks fill the rest, skipping kept
    positions."""
    num_window = q_win.shape[0]
    prompt_len, num_kv_heads, _ = keys.shape
    prefix = prompt_len - num_window
    scores = reference_group_scores(q_win, keys, scale, kernel_size, pooling)
    kept = []
    for h in range(num_kv_heads):
        by_score = sorted(range(prefix), key=lambda p: -scores[h, p].item())
        chosen = by_score[:singles]
        chunks = [list(range(start, min(start + chunk, prefix)))
                  for start in range(0, prefix, chunk)]
        means = [sum(scores[h, p].item() for p in c) / len(c) for c in chunks]
        order = sorted(range(len(chunks)), key=lambda i: -means[i])
        chosen += [p for i in order for p in chunks[i] if p not in chosen]
        kept.append(sorted(chosen[: budget - num_window]) + list(range(prefix, prompt_len)))
    return torch.tensor(kept)


@pytest.mark.parametrize("pooling", ["max", "avg"])
@pytest.mark.parametrize("kernel_size", [1, 7])
@pytest.mark.parametrize("q_heads,kv_heads", [(4, 4), (9, 3)])
@pytest.mark.parametrize("budget,length", [(6, 60), (27, 60), (44, 97)])  # 1, 2.2, 3.9 chunks
def test_chunk_matches_the_naive_whole_chunk_reference(pooling, kernel_size, q_heads, kv_heads,
                                                       budget, length):
    window, chunk = 5, ChunkScore.chunk_size
    q, k = make_inputs(kernel_size * 10 + q_heads + budget, window, q_heads, kv_heads, length)
    scale = 1 / math.sqrt(q.shape[-1])
    got = select_kept_positions(q, k, budget, scale, kernel_size, pooling, score="chunk")
    want = reference_chunk(q, k, budget, scale, kernel_size, pooling, chunk)
    assert got.shape == (kv_heads, budget) and got.dtype == torch.long
    assert torch.equal(got, want)
    # Whole aligned chunks, except one cut chunk per head that keeps its first positions.
    for row in got[:, : budget - window].tolist():
        per_chunk = {}
        for position in row:
            per_chunk.setdefault(position // chunk, []).append(position)
        partial = [c for c, kept in per_chunk.items()
                   if len(kept) < min(chunk, length - window - c * chunk)]
        assert len(partial) <= 1
        for c, kept in per_chunk.items():
            assert kept == list(range(c * chunk, c * chunk + len(kept)))
    if budget - window > chunk:
        assert not torch.equal(got, select_kept_positions(q, k, budget, scale, kernel_size,
                                                          pooling))


@pytest.mark.parametrize("pooling", ["max", "avg"])
@pytest.mark.parametrize("q_heads,kv_heads", [(4, 4), (9, 3)])
@pytest.mark.parametrize("budget,length", [(6, 60), (27, 60), (44, 97), (70, 97)])
def test_snapkv_chunk_keeps_the_snapkv_top_then_fills_with_whole_chunks(pooling, q_heads,
                                                                         kv_heads, budget, length):
    window, chunk = 5, SnapKVChunkScore.chunk_size
    q, k = make_inputs(3 * q_heads + budget, window, q_heads, kv_heads, length)
    scale = 1 / math.sqrt(q.shape[-1])
    got = select_kept_positions(q, k, budget, scale, 7, pooling, score="snapkv-chunk")
    singles = (budget - window) // 2
    want = reference_chunk(q, k, budget, scale, 7, pooling, chunk, singles=singles)
    assert got.shape == (kv_heads, budget) and torch.equal(got, want)
    # Its first half is SnapKV's own top; the rest differs from SnapKV's once chunks fill it.
    if singles:
        snapkv = select_kept_positions(q, k, singles + window, scale, 7, pooling)
        for row, top in zip(got.tolist(), snapkv[:, :singles].tolist()):
            assert set(top) <= set(row)
    if budget - window - singles >= chunk:
        assert not torch.equal(got, select_kept_positions(q, k, budget, scale, 7, pooling))


@pytest.mark.parametrize("score", ["continuation", "snapkv-continuation",
                                   "snapkv-scaled-continuation", "snapkv-rare-continuation",
                                   "snapkv-rare-long-continuation",
                                   "snapkv-rare-step-continuation",
                                   "snapkv-rare-tail-continuation",
                                   "snapkv-rare-path-continuation"])
@pytest.mark.parametrize("q_heads,kv_heads", [(4, 4), (9, 3)])
@pytest.mark.parametrize("budget,length", [(6, 60), (27, 60), (44, 97), (90, 97), (300, 400)])
def test_continuation_matches_the_naive_reference(score, q_heads, kv_heads, budget, length):
    """Loops over positions and distances on SnapKV's own float32 score: a position scores the
    largest ``score[p - d] * decay ** d``, ``d <= reach``; the top ``budget - W``, ties to the
    earlier position. 'snapkv-continuation': SnapKV's own top of half the prefix budget first,
    then that order's positions not kept yet. 'snapkv-scaled-continuation': the same with
    ``reach`` = the prefix budget // 32, between 1 and 24 (here 1, 1, 1, 2 and 9).
    'snapkv-rare-continuation': that, with ``d >= 1`` only from positions whose token id occurs
    at most 16 times in the prompt (these prompts are shorter than 4096);
    'snapkv-rare-long-continuation' that with ``reach`` = the prefix budget // 16 (1, 1, 2, 5
    and 18); 'snapkv-rare-step-continuation' that, carried from ``p - d`` only while positions
    ``p - d + 1 .. p`` hold at most the prefix budget // 32 rare tokens (1, 1, 1, 2 and 9);
    'snapkv-rare-tail-continuation' that, times ``0.8 ** (d - n)`` where ``d`` passes that
    number ``n``; 'snapkv-rare-path-continuation' the step rule with no rare token in those
    positions where ``d`` passes ``n``."""
    window, rule = 5, ContinuationScore()
    reach = rule.reach
    if score in ("snapkv-scaled-continuation", "snapkv-rare-continuation"):
        reach = max(1, min(24, (budget - window) // 32))
    elif score.startswith("snapkv-rare-") and score != "snapkv-rare-continuation":
        reach = max(1, min(24, (budget - window) // 16))
    stepped = score in ("snapkv-rare-step-continuation", "snapkv-rare-tail-continuation",
                        "snapkv-rare-path-continuation")
    rare_steps = max(1, min(24, (budget - window) // 32)) if stepped else length
    tail = 0.8 if score == "snapkv-rare-tail-continuation" else 1.0
    path = score == "snapkv-rare-path-continuation"
    q, k = make_inputs(7 * q_heads + budget, window, q_heads, kv_heads, length)
    token_ids = frequent_and_rare_ids(length, budget)
    occurrences = {t: token_ids.tolist().count(t) for t in set(token_ids.tolist())}
    carries = [not score.startswith("snapkv-rare-") or occurrences[t] <= 16
               for t in token_ids.tolist()]
    scale = 1 / math.sqrt(q.shape[-1])
    attention = group_mean(pool_scores(window_attention_scores(q, k, scale), 7, "max"), kv_heads)
    prefix = length - window
    want = []
    for head in range(kv_heads):
        carried = []
        for position in range(prefix):
            carried.append(max(
                (attention[head, position - d] * rule.decay**d
                 * tail ** max(0, d - rare_steps)).item()
                for d in range(min(reach, position) + 1)
                if d == 0 or (carries[position - d]
                              and sum(carries[position - d + 1 : position + 1])
                              <= (0 if path and d > rare_steps else rare_steps))
            ))
        singles = (budget - window) // 2 if score.startswith("snapkv-") else 0
        kept = sorted(range(prefix), key=lambda p: (-attention[head, p].item(), p))[:singles]
        order = [p for p in sorted(range(prefix), key=lambda p: (-carried[p], p))
                 if p not in kept]
        kept += order[: budget - window - singles]
        want.append(sorted(kept) + list(range(prefix, length)))
    got = select_kept_positions(q, k, budget, scale, 7, "max", score=score, token_ids=token_ids)
    assert got.tolist() == want


def test_rare_continuation_carries_from_rare_tokens_only():
    """Two equal peaks, one on a token the prompt repeats (a list's numbering), one on a token
    it holds once: the carried track runs on after the rare one only; the frequent one keeps
    its own score. Up to 4096 tokens the limit is 16 occurrences, beyond one in 256."""
    rule = score_rule("snapkv-rare-continuation")
    token_ids = torch.arange(400) + 100
    token_ids[0:400:20] = 7  # 20 occurrences: frequent
    attention = torch.full((1, 400), 0.001)
    attention[0, 100] = attention[0, 310] = 1.0  # token 7 at 100; token 410 (once) at 310
    rare = rule.token_features(token_ids)
    assert not rare[100] and rare[310] and rare.sum() == 380
    carried = rule.score(attention, 32, 256, token_features=rare)[1, 0]
    assert carried[100] == 1.0 and (carried[101:108] == 0.001).all()
    assert (carried[310:318] > 0.5).all() and carried[318] == 0.001
    # 'snapkv-rare-long-continuation': the same gate, twice the reach (224 // 16 = 14).
    long_rule = score_rule("snapkv-rare-long-continuation")
    carried = long_rule.score(attention, 32, 256, token_features=rare)[1, 0]
    assert (carried[101:108] == 0.001).all()
    assert (carried[310:325] > 0.45).all() and carried[325] == 0.001
    # The limit grows with the prompt: 20 occurrences are rare in 8192 tokens (limit 32).
    long_ids = torch.arange(8192) + 100
    long_ids[0:400:20] = 7
    assert rule.token_features(long_ids).all()
    long_ids[0:33 * 20:20] = 7  # 33 occurrences
    assert not rule.token_features(long_ids)[0]


def test_rare_step_continuation_runs_far_through_frequent_tokens_only():
    """At 1/16 of a 4K prompt's shape (prefix budget 224): a run may span 14 positions but pass
    at most 7 rare tokens. From a rare peak followed by a frequent token (30 occurrences) it
    runs all 14; from one followed by rare tokens it stops after 7, where the long rule runs
    on."""
    rule = score_rule("snapkv-rare-step-continuation")
    token_ids = torch.arange(400) + 100
    token_ids[101:131] = 7
    attention = torch.full((1, 400), 0.001)
    attention[0, 100] = attention[0, 300] = 1.0
    rare = rule.token_features(token_ids)
    assert rare[100] and not rare[101:131].any() and rare[300:].all()
    carried = rule.score(attention, 32, 256, token_features=rare)[1, 0]
    assert (carried[101:115] > 0.45).all() and carried[115] == 0.001
    assert (carried[301:308] > 0.65).all() and (carried[308:] == 0.001).all()
    long_carried = score_rule("snapkv-rare-long-continuation").score(
        attention, 32, 256, token_features=rare)[1, 0]
    assert (long_carried[301:315] > 0.45).all()
    # At 1/8 (prefix budget 480): reach 24, 15 rare tokens.
    carried = rule.score(attention, 32, 512, token_features=rare)[1, 0]
    assert (carried[101:125] > 0.29).all() and carried[125] == 0.001
    assert (carried[301:316] > 0.46).all() and carried[316] == 0.001
    # 'snapkv-rare-tail-continuation': the same runs, 0.8 less per position past the 7th.
    tail_carried = score_rule("snapkv-rare-tail-continuation").score(
        attention, 32, 256, token_features=rare)[1, 0]
    want = torch.tensor([0.95**d * 0.8 ** max(0, d - 7) for d in range(1, 15)])
    torch.testing.assert_close(tail_carried[101:115], want)
    assert tail_carried[115] == 0.001 and torch.equal(tail_carried[301:308], carried[301:308])


def test_rare_path_continuation_runs_far_only_where_no_rare_token_is_passed():
    """At 1/16 of a 4K prompt's shape (short reach 7, long 14): from a rare peak followed only
    by frequent tokens the run spans all 14 positions, as the step rule's; from one followed by
    two rare tokens and then frequent ones it stops at 7, where the step rule (up to 7 rare
    tokens passed) runs on to 14."""
    token_ids = torch.arange(400) + 100
    token_ids[101:131] = 7
    token_ids[303:331] = 8
    attention = torch.full((1, 400), 0.001)
    attention[0, 100] = attention[0, 300] = 1.0
    rule = score_rule("snapkv-rare-path-continuation")
    rare = rule.token_features(token_ids)
    assert rare[300:303].all() and not rare[303:331].any()
    carried = rule.score(attention, 32, 256, token_features=rare)[1, 0]
    want = torch.tensor([0.95**d for d in range(1, 15)])
    torch.testing.assert_close(carried[101:115], want)
    assert carried[115] == 0.001
    torch.testing.assert_close(carried[301:308], want[:7])
    assert (carried[308:] == 0.001).all()
    stepped = score_rule("snapkv-rare-step-continuation").score(
        attention, 32, 256, token_features=rare)[1, 0]
    torch.testing.assert_close(stepped[301:315], want)


def test_rules_that_read_token_ids_refuse_to_run_without_them():
    q, k = make_inputs(1, 4, 4, 2, 50)
    rule = score_rule("snapkv-rare-continuation")
    with pytest.raises(ValueError, match="needs the prompt's 50 token ids"):
        select_kept_positions(q, k, 20, 0.25, score=rule)
    with pytest.raises(ValueError, match="needs the prompt's 50 token ids"):
        select_kept_positions(q, k, 20, 0.25, score=rule, token_ids=torch.zeros(49))
    with pytest.raises(ValueError, match="needs token_features of the 50 prompt positions"):
        select_kept_positions_chunked(q, lambda s, e: k[s:e], 50, 20, 0.25, score=rule)


def test_continuation_keeps_what_follows_an_attended_position():
    """One strongly attended position among weaker scattered ones: SnapKV's top holds the
    scattered ones, 'continuation' the attended position and the positions right after it (a
    fact the window points at is read on from there), none before it."""
    attention = torch.full((1, 200), 0.01)
    attention[0, 120] = 1.0
    attention[0, 10:110:10] = 0.5
    snapkv = attention.sort(descending=True, stable=True).indices[0, :8].sort().values
    assert snapkv.tolist() == [10, 20, 30, 40, 50, 60, 70, 120]
    carried = ContinuationScore().score(attention, 4, 12)[0]
    top = carried.sort(descending=True, stable=True).indices[0, :8].sort().values
    assert top.tolist() == list(range(120, 128))


def test_scaled_continuation_carries_a_score_a_share_of_the_prefix_budget():
    """1/4, 1/8 and 1/16 of a 4K prompt with the default window of 32: reaches 24 (the
    ``continuation`` rule's), 15 and 7; at least 1 at a tiny budget. A run after one dominant
    position is that long and no longer."""
    rule = score_rule("snapkv-scaled-continuation")
    assert [rule.reach_for(4096 // d - 32) for d in (4, 8, 16)] == [24, 15, 7]
    assert rule.reach_for(3) == 1
    attention = torch.full((1, 400), 0.001)
    attention[0, 100] = 1.0
    carried = rule.score(attention, 32, 256)[1, 0]  # track 1: the carried order
    assert (carried[100:108] > 0.5).all() and carried[108] == 0.001


@pytest.mark.parametrize("span", [16, 32, 48])
def test_chunked_continuation_reads_the_scores_before_each_range(span):
    """A peak in the last positions of a span: the next range's first positions carry its score
    only if the chunked path hands ``score`` the previous range's last ``lookback`` scores.
    Without them (a rule with the same score and no lookback) the selection differs, so this
    test can fail."""
    window, budget, length = 4, 24, 200
    q, k = make_inputs(11, window, 4, 2, length)
    # The window attends to a key whose pooled plateau (+-3) ends just inside a range (ranges
    # end a pooling halo, 3, before the span's end): what follows it lies in the next range.
    k[span - 8] = q[-1].view(2, 2, -1).mean(1) * 8

    class NoLookback(ContinuationScore):
        lookback = 0

    dense = select_kept_positions(q, k, budget, 0.25, 7, "max", score="continuation")
    for rule, equal in ((ContinuationScore(), True), (NoLookback(), False)):
        got = select_kept_positions_chunked(q, lambda s, e: k[s:e], length, budget, 0.25,
                                            chunk_size=span, score=rule)
        assert torch.equal(got, dense) == equal, rule.lookback
    # The workspace bound covers the joined scores of a range and its lookback.
    assert compaction_workspace_bytes(4, 2, 16, window, budget, chunk_size=span,
                                      score="continuation") > compaction_workspace_bytes(
        4, 2, 16, window, budget, chunk_size=span)


@pytest.mark.parametrize("seed", range(6))
def test_chunked_ranges_of_an_aligned_rule_start_and_end_on_its_chunks(seed):
    """The chunked path hands ``score`` ranges on chunk boundaries (the last may end at the
    prefix's end), whatever the span and block sizes: a range never splits a chunk."""
    case = random_case(seed)
    chunk_size, block_size = case.pop("chunk_size"), case.pop("block_size")
    keys = case["keys"]
    prefix = keys.shape[0] - case["window_queries"].shape[0]
    ranges = []

    class RecordingChunkScore(ChunkScore):
        def score(self, attention, window, budget, values=None, metric=None,
                  token_features=None):
            ranges.append(attention.shape[1])
            return super().score(attention, window, budget, values, metric, token_features)

    select_kept_positions_chunked(
        case["window_queries"], lambda s, e: keys[s:e], keys.shape[0], case["budget"],
        case["scale"], case["kernel_size"], case["pooling"], case["sinks"], case["soft_cap"],
        chunk_size, block_size, score=RecordingChunkScore(),
    )
    assert sum(ranges) == prefix
    assert all(n % ChunkScore.chunk_size == 0 for n in ranges[:-1])


def test_projected_value_norms_are_the_rms_of_per_head_projections():
    q, k, v, w_o, metric = critical_inputs(3, 4, 6, 2, 30, dim=8, hidden=24)
    got = projected_value_norms(v, metric)
    assert got.shape == (2, 30) and got.dtype == torch.float32
    for h in range(2):
        for p in range(30):
            want = reference_value_norm(v[p, h], w_o, range(3 * h, 3 * h + 3), 8)
            assert got[h, p].item() == pytest.approx(want, rel=1e-4)


def test_value_metric_of_a_tensor_parallel_rank_is_its_slice_of_the_whole():
    """o_proj is row parallel: rank r holds the columns [r * H_q/tp * D, (r+1) * H_q/tp * D) of
    W_o (``RowParallelLinear.weight_loader`` narrows the input dim by the rank), the output
    dimension whole, and its local query heads are the same contiguous range. Each rank's metric,
    from its own columns only, equals its KV heads' rows of the unsharded metric."""
    q_heads, kv_heads, dim, hidden, tp = 8, 4, 16, 48, 2
    gen = torch.Generator().manual_seed(5)
    w_o = torch.randn(hidden, q_heads * dim, generator=gen)
    whole = value_metric(lambda x: x @ w_o.T, q_heads, kv_heads, dim, torch.float32, "cpu")
    shard = q_heads * dim // tp
    for rank in range(tp):
        local = w_o.narrow(1, rank * shard, shard)  # what the rank loads
        metric = value_metric(lambda x: x @ local.T, q_heads // tp, kv_heads // tp, dim,
                              torch.float32, "cpu")
        per_rank = kv_heads // tp
        torch.testing.assert_close(metric, whole[rank * per_rank : (rank + 1) * per_rank])


def test_value_metric_reads_the_projection_through_its_forward_in_bfloat16():
    """The CPU build drops ``o_proj.weight`` after repacking; the metric comes from applying the
    projection to unit rows (here a bfloat16 ``nn.Linear``), exact for unit rows."""
    gen = torch.Generator().manual_seed(8)
    w_o = torch.randn(32, 4 * 8, generator=gen).bfloat16()
    linear = torch.nn.Linear(32, 32, bias=False).bfloat16()
    linear.weight.data = w_o
    got = value_metric(linear, 4, 2, 8, torch.bfloat16, "cpu")
    want = value_metric(lambda x: x.float() @ w_o.float().T, 4, 2, 8, torch.float32, "cpu")
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("seed", range(24))
def test_chunked_selection_equals_the_dense_one_for_every_rule(seed):
    case = random_case(seed)
    chunk_size, block_size = case.pop("chunk_size"), case.pop("block_size")
    keys = case["keys"]
    length, kv_heads, dim = keys.shape
    q_heads = case["window_queries"].shape[1]
    gen = torch.Generator().manual_seed(1000 + seed)
    values = (torch.randn(length, kv_heads, dim, generator=gen) * 2).to(keys.dtype)
    w_o = torch.randn(24, q_heads * dim, generator=gen)
    metric = value_metric(lambda x: x @ w_o.T, q_heads, kv_heads, dim, torch.float32, "cpu")
    value_reads = []

    def read_values(start, end):
        value_reads.append((start, end))
        return values[start:end]

    token_ids = frequent_and_rare_ids(length, seed)
    for score in SCORE_NAMES:
        value_reads.clear()
        rule = score_rule(score)
        want = select_kept_positions(**case, score=score, values=values, value_metric=metric,
                                     token_ids=token_ids)
        got = select_kept_positions_chunked(
            case["window_queries"], lambda s, e: keys[s:e], length, case["budget"],
            case["scale"], case["kernel_size"], case["pooling"], case["sinks"], case["soft_cap"],
            chunk_size, block_size, score=score, read_values=read_values, value_metric=metric,
            token_features=rule.token_features(token_ids) if rule.needs_token_ids else None,
        )
        assert torch.equal(got, want), score
        if score_rule(score).needs_values:
            # The prefix read once, in consecutive ranges; never the window.
            prefix = length - case["window_queries"].shape[0]
            assert value_reads[0][0] == 0 and value_reads[-1][1] == prefix
            assert all(a[1] == b[0] for a, b in zip(value_reads, value_reads[1:]))
        else:
            assert value_reads == []


def test_default_rule_is_the_paper_rule_unchanged():
    q, k = make_inputs(4, 8, 6, 2, 300)
    default = select_kept_positions(q, k, 100, 0.25, 7, "max")
    assert torch.equal(select_kept_positions(q, k, 100, 0.25, 7, "max", score="snapkv"), default)
    scores = group_mean(pool_scores(window_attention_scores(q, k, 0.25), 7, "max"), 2)
    assert torch.equal(default[:, :92], top_positions(scores, 92))


def test_every_rule_keeps_exactly_the_budget_per_head():
    q, k, v, w_o, metric = critical_inputs(6, 8, 6, 2, 400)
    for budget in (9, 16, 17, 100, 399):
        for score in SCORE_NAMES:
            kept = select_kept_positions(q, k, budget, 0.25, 7, "max", score=score, values=v,
                                         value_metric=metric,
                                         token_ids=frequent_and_rare_ids(400, budget))
            assert kept.shape == (2, budget)
            assert all(len(set(row.tolist())) == budget for row in kept)


def test_unknown_rule_and_missing_values_are_refused():
    q, k = make_inputs(1, 4, 4, 2, 50)
    with pytest.raises(ValueError,
                       match="score must be one of snapkv, critical, chunk, snapkv-chunk, continuation, snapkv-continuation, snapkv-scaled-continuation, snapkv-rare-continuation, snapkv-rare-long-continuation, snapkv-rare-step-continuation, snapkv-rare-tail-continuation, snapkv-rare-path-continuation; got"):
        select_kept_positions(q, k, 20, 0.25, score="h2o")
    with pytest.raises(ValueError, match="'critical' score needs values and value_metric"):
        select_kept_positions(q, k, 20, 0.25, score="critical")
    with pytest.raises(ValueError, match="needs read_values and value_metric"):
        select_kept_positions_chunked(q, lambda s, e: k[s:e], 50, 20, 0.25, score="critical")


def test_critical_priorities_count_the_window_in_the_first_stage():
    rule = CriticalScore()
    assert rule.priorities(512, 32) == (224, 256)  # kvpress: int(0.5 * 512) with the window in
    assert rule.priorities(40, 32) == (0, 8)
    assert sum(rule.priorities(1000, 7)) == 993


@pytest.mark.parametrize("seed", range(30))
def test_keep_by_priority_against_a_naive_merge(seed):
    rng = random.Random(seed)
    heads, length = rng.randint(1, 4), rng.randint(5, 80)
    counts = tuple(rng.randint(0, length // 3) for _ in range(rng.randint(1, 3)))
    if sum(counts) == 0:
        counts = (1,)
    gen = torch.Generator().manual_seed(seed)
    # Few distinct values: ties between and inside tracks.
    tracks = torch.randint(0, 5, (len(counts), heads, length), generator=gen).float()
    candidates = [
        torch.sort(track, dim=-1, descending=True, stable=True).indices for track in tracks
    ]
    got = keep_by_priority(candidates, counts)
    for h in range(heads):
        kept: list[int] = []
        for t, count in enumerate(counts):
            order = sorted(range(length), key=lambda p: -tracks[t, h, p].item())
            kept += [p for p in order if p not in kept][:count]
        assert got[h].tolist() == sorted(kept)


def test_a_model_without_a_readable_output_projection_refuses_only_a_value_aware_default():
    """The worker looks up ``<attention module>.o_proj`` for every compressed layer at start.
    Here it is a plain ``nn.Linear`` (not vLLM's row-parallel layer): the reason is kept; a
    server whose default rule reads values refuses to start, naming it; a SnapKV server starts
    (a request asking for 'critical' there is scored with 'snapkv', logged)."""
    from types import SimpleNamespace

    from vllm_snapkv.adapter.groups import CompressedGroups
    from vllm_snapkv.adapter.worker import WorkerCompression
    from vllm_snapkv.config import parse_config

    layer_name = "model.layers.0.self_attn.attn"
    model = torch.nn.Module()
    model.model = torch.nn.Module()
    model.model.layers = torch.nn.ModuleList([torch.nn.Module()])
    model.model.layers[0].self_attn = torch.nn.Module()
    model.model.layers[0].self_attn.o_proj = torch.nn.Linear(64, 64)
    impl = SimpleNamespace(num_heads=4, head_size=16)
    runner = SimpleNamespace(
        get_model=lambda: model,
        compilation_config=SimpleNamespace(
            static_forward_context={layer_name: SimpleNamespace(impl=impl)}
        ),
    )
    groups = CompressedGroups(group_ids=(0,), block_size=16, group_of_layer={layer_name: 0},
                              hybrid=False)
    state = WorkerCompression(parse_config({}), groups)
    state.find_output_projections(runner)
    assert state.output_projections == {}
    assert "model.layers.0.self_attn (Module) has no RowParallelLinear o_proj" in (
        state.value_rules_unavailable
    )
    critical = WorkerCompression(parse_config({"score": "critical"}), groups)
    with pytest.raises(RuntimeError, match="score='critical' needs each attention layer's output "
                       "projection, but model.layers.0.self_attn"):
        critical.find_output_projections(runner)
