"""Selection against a deliberately naive dense reference (loops, per query head, no vLLM)."""

from __future__ import annotations

import math
import random
from types import SimpleNamespace

import pytest
import torch

from vllm_snapkv.selection import (
    ChunkedWindowScores,
    chunk_positions,
    group_mean,
    merge_top,
    pool_scores,
    select_kept_positions,
    select_kept_positions_chunked,
    top_positions,
    window_attention_scores,
)


def reference_window_scores(q_win, keys, scale, sinks=None, soft_cap=None):
    """Rules 2-4: per query head, window query i sees the prefix and window keys up to itself.
    A sink adds one logit to each row's softmax (gpt-oss); soft-capping bounds the logits."""
    num_window, num_q_heads, _ = q_win.shape
    prompt_len, num_kv_heads, _ = keys.shape
    group = num_q_heads // num_kv_heads
    prefix = prompt_len - num_window
    totals = torch.zeros(num_q_heads, prefix, dtype=torch.float64)
    for head in range(num_q_heads):
        k = keys[:, head // group].double()
        for i in range(num_window):
            visible = prefix + i + 1
            logits = (k[:visible] @ q_win[i, head].double()) * scale
            if soft_cap:
                logits = soft_cap * torch.tanh(logits / soft_cap)
            if sinks is not None:
                logits = torch.cat([logits, sinks[head : head + 1].double()])
            totals[head] += torch.softmax(logits, dim=0)[:prefix]
    return totals


def reference_selection(q_win, keys, budget, scale, kernel_size, pooling, sinks=None, soft_cap=None):
    """Rules 5-7 on top of the reference scores, with explicit loops."""
    num_window, num_q_heads, _ = q_win.shape
    prompt_len, num_kv_heads, _ = keys.shape
    group = num_q_heads // num_kv_heads
    prefix = prompt_len - num_window
    totals = reference_window_scores(q_win, keys, scale, sinks, soft_cap)
    pooled = torch.zeros_like(totals)
    half = kernel_size // 2
    for head in range(num_q_heads):
        for pos in range(prefix):
            lo, hi = max(0, pos - half), min(prefix, pos + half + 1)
            if pooling == "max":
                pooled[head, pos] = totals[head, lo:hi].max()
            else:  # zero padding counted, as torch's avg_pool1d default
                pooled[head, pos] = totals[head, lo:hi].sum() / kernel_size
    kept = []
    for kv in range(num_kv_heads):
        scores = pooled[kv * group : (kv + 1) * group].mean(dim=0)
        order = sorted(range(prefix), key=lambda p: -scores[p].item())[: budget - num_window]
        kept.append(sorted(order) + list(range(prefix, prompt_len)))
    return torch.tensor(kept)


def frequent_and_rare_ids(length: int, seed: int) -> torch.Tensor:
    """Token ids: about half the positions one token (frequent beyond 16 occurrences from ~40
    positions on), the rest drawn from 50,000 (rare)."""
    gen = torch.Generator().manual_seed(seed)
    rare = torch.randint(1, 50_000, (length,), generator=gen)
    return torch.where(torch.rand(length, generator=gen) < 0.5, 0, rare)


def make_inputs(seed, window, q_heads, kv_heads, length, dim=16):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(window, q_heads, dim, generator=gen) * 2
    k = torch.randn(length, kv_heads, dim, generator=gen) * 2
    return q, k


@pytest.mark.parametrize("pooling", ["max", "avg"])
@pytest.mark.parametrize("kernel_size", [1, 3, 7])
@pytest.mark.parametrize("q_heads,kv_heads", [(4, 4), (6, 2), (9, 3)])
def test_matches_dense_reference(pooling, kernel_size, q_heads, kv_heads):
    window, length, budget = 5, 60, 20
    q, k = make_inputs(kernel_size * 100 + q_heads, window, q_heads, kv_heads, length)
    scale = 1 / math.sqrt(q.shape[-1])
    got = select_kept_positions(q, k, budget, scale, kernel_size, pooling)
    want = reference_selection(q, k, budget, scale, kernel_size, pooling)
    assert got.shape == (kv_heads, budget)
    assert got.dtype == torch.long
    assert torch.equal(got, want)


def test_window_always_kept_and_rows_ascending():
    q, k = make_inputs(1, 8, 6, 3, 100)
    kept = select_kept_positions(q, k, 24, 0.25, 7, "max")
    for row in kept:
        assert torch.all(row[1:] > row[:-1]), "ascending, no duplicates"
        assert set(range(92, 100)) <= set(row.tolist())


def test_heads_choose_independently():
    q, k = make_inputs(2, 4, 2, 2, 200)
    # Make head 0's window attend to position 10 and head 1's to position 150.
    k[10, 0] = q[:, 0].mean(0) * 20
    k[150, 1] = q[:, 1].mean(0) * 20
    kept = select_kept_positions(q, k, 8, 1.0, 1, "max")
    assert 10 in kept[0].tolist() and 10 not in kept[1].tolist()
    assert 150 in kept[1].tolist() and 150 not in kept[0].tolist()


def test_pooling_keeps_neighbours_of_a_strong_position():
    q, k = make_inputs(3, 4, 1, 1, 300)
    k[100, 0] = q[:, 0].mean(0) * 30
    kept = select_kept_positions(q, k, 4 + 7, 1.0, 7, "max")[0].tolist()
    assert set(range(97, 104)) <= set(kept)


def test_scores_equal_reference_causal_inside_window():
    q, k = make_inputs(4, 6, 4, 2, 40)
    got = window_attention_scores(q, k, 0.3)
    assert torch.allclose(got.double(), reference_window_scores(q, k, 0.3), atol=1e-5)
    # Making a window key huge changes only the queries allowed to see it.
    k[39] = 1e3
    changed = window_attention_scores(q, k, 0.3)
    assert not torch.allclose(got, changed)
    assert torch.allclose(changed.double(), reference_window_scores(q, k, 0.3), atol=1e-5)


def test_softmax_runs_in_float32_for_half_inputs():
    q, k = make_inputs(5, 4, 2, 1, 50)
    scores = window_attention_scores(q.half(), k.half(), 0.25)
    assert scores.dtype == torch.float32
    assert torch.isfinite(scores).all()


@pytest.mark.parametrize("budget,length", [(10, 10), (12, 10), (4, 10)])
def test_rejects_budgets_that_evict_nothing_or_eat_the_window(budget, length):
    q, k = make_inputs(6, 4, 2, 2, length)
    with pytest.raises(ValueError, match="budget"):
        select_kept_positions(q, k, budget, 1.0)


def test_even_kernel_rejected():
    with pytest.raises(ValueError, match="odd"):
        pool_scores(torch.zeros(1, 10), 4, "max")


def test_top_positions_breaks_ties_towards_earlier_positions():
    scores = torch.tensor([[1.0, 3.0, 3.0, 3.0, 2.0, 3.0], [5.0, 0.0, 5.0, 5.0, 4.0, 4.0]])
    assert top_positions(scores, 2).tolist() == [[1, 2], [0, 2]]
    assert top_positions(scores, 4).tolist() == [[1, 2, 3, 5], [0, 2, 3, 4]]
    assert top_positions(scores, 6).tolist() == [list(range(6))] * 2


def test_sinks_and_soft_cap_normalise_as_the_layer_does():
    q_win, keys = make_inputs(5, window=4, q_heads=4, kv_heads=2, length=40)
    q_win = q_win * 3  # peaked logits, so the cap bites
    sinks = torch.tensor([4.0, -1.0, 2.5, 0.0])
    got = window_attention_scores(q_win, keys, 0.25, sinks=sinks, soft_cap=5.0)
    expected = reference_window_scores(q_win, keys, 0.25, sinks, 5.0)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    # Each sink takes its share: with a large sink a head's total mass over the prefix drops.
    plain = window_attention_scores(q_win, keys, 0.25)
    assert (got.sum(-1) < plain.sum(-1)).all()
    kept = select_kept_positions(q_win, keys, 20, 0.25, 3, "max", sinks=sinks, soft_cap=5.0)
    assert torch.equal(kept, reference_selection(q_win, keys, 20, 0.25, 3, "max", sinks, 5.0))


def test_compaction_clock_sums_the_cpu_intervals_it_measures(monkeypatch):
    """On the CPU the clock adds up exactly the host-timer intervals between each start and its
    stop (not the gaps between them), and settling without CUDA events changes nothing."""
    from vllm_snapkv import timing

    readings = iter([10.0, 10.25, 11.0, 11.5])  # two intervals, 0.25 s and 0.5 s, a gap between
    monkeypatch.setattr(timing, "time", SimpleNamespace(perf_counter=lambda: next(readings)))
    clock = timing.CompactionClock()
    for _ in range(2):
        started = clock.start(torch.device("cpu"))
        clock.stop(started, torch.device("cpu"))
    clock.settle()
    assert clock.seconds == 0.75


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu-check)")
def test_chunked_selection_on_cuda_equals_the_dense_one():
    for seed in range(0, 120, 11):
        case = random_case(seed)
        chunk_size, block_size = case.pop("chunk_size"), case.pop("block_size")
        case = {name: value.cuda() if isinstance(value, torch.Tensor) else value
                for name, value in case.items()}
        got, _ = chunked(**case, chunk_size=chunk_size, block_size=block_size)
        assert got.is_cuda
        assert torch.equal(got, select_kept_positions(**case)), seed


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu-check)")
def test_selection_and_its_timing_never_wait_for_the_gpu():
    """No host sync inside a layer's selection (was: ``nonzero`` per layer); the clock reads its
    CUDA events once, in ``settle``."""
    from vllm_snapkv.timing import CompactionClock

    q_win, keys = (t.cuda() for t in make_inputs(3, window=8, q_heads=8, kv_heads=2, length=4096))
    clock = CompactionClock()
    torch.cuda.set_sync_debug_mode("error")
    try:
        started = clock.start(keys.device)
        select_kept_positions(q_win, keys, 512, 0.125, 7, "max")
        # The worker's path: spans read through a callback, merged into a running top.
        select_kept_positions_chunked(q_win, lambda s, e: keys[s:e], 4096, 512, 0.125, 7, "max",
                                      chunk_size=1000, block_size=16)
        clock.stop(started, keys.device)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    clock.settle()
    assert clock.seconds > 0


# --- The chunked selection the worker runs (bounded memory) against the dense functions above,
# --- which are today's definition.


def chunked(window_queries, keys, budget, scale, kernel_size=7, pooling="max", sinks=None,
            soft_cap=None, chunk_size=16, block_size=1):
    reads = []

    def read(start, end):
        reads.append((start, end))
        return keys[start:end]

    kept = select_kept_positions_chunked(
        window_queries, read, keys.shape[0], budget, scale, kernel_size, pooling, sinks, soft_cap,
        chunk_size=chunk_size, block_size=block_size,
    )
    return kept, reads


def dense_scores(q_win, keys, scale, kernel_size, pooling, sinks=None, soft_cap=None):
    scores = window_attention_scores(q_win, keys, scale, sinks, soft_cap)
    return group_mean(pool_scores(scores, kernel_size, pooling), keys.shape[1])


def random_case(seed):
    """A random shape and setting: chunk boundaries anywhere (inside the window, inside the
    pooling halo, spans shorter than the halo), GQA or not, sinks, soft-cap, half inputs."""
    rng = random.Random(seed)
    q_heads, kv_heads = rng.choice([(4, 4), (6, 2), (9, 3), (8, 1), (2, 1)])
    window = rng.choice([1, 2, 5, 8, 13])
    length = rng.randint(window + 3, 420)
    budget = rng.randint(window + 1, length - 1)
    gen = torch.Generator().manual_seed(seed)
    dtype = rng.choice([torch.float32, torch.float16, torch.bfloat16])
    q = (torch.randn(window, q_heads, 16, generator=gen) * rng.choice([1.0, 2.0, 4.0])).to(dtype)
    k = (torch.randn(length, kv_heads, 16, generator=gen) * 2).to(dtype)
    return dict(
        window_queries=q,
        keys=k,
        budget=budget,
        scale=rng.choice([0.25, 1 / math.sqrt(16), 0.5]),
        kernel_size=rng.choice([1, 3, 7]),
        pooling=rng.choice(["max", "avg"]),
        sinks=(torch.randn(q_heads, generator=gen) * 3).to(dtype) if rng.random() < 0.3 else None,
        soft_cap=rng.choice([None, None, 5.0, 30.0]),
        chunk_size=rng.choice([1, 2, 3, 5, 7, 16, 31, 64, 100, 1000]),
        block_size=rng.choice([1, 2, 4, 16]),
    )


@pytest.mark.parametrize("seed", range(120))
def test_chunked_selection_equals_the_dense_one(seed):
    case = random_case(seed)
    chunk_size, block_size = case.pop("chunk_size"), case.pop("block_size")
    want = select_kept_positions(**case)
    got, reads = chunked(**case, chunk_size=chunk_size, block_size=block_size)
    assert torch.equal(got, want)
    # Whole spans from block boundaries, each read once per pass: nothing else is read.
    span = chunk_positions(chunk_size, block_size)
    length, prefix = case["keys"].shape[0], case["keys"].shape[0] - case["window_queries"].shape[0]
    assert reads == [(a, min(a + span, length)) for a in range(0, length, span)] + [
        (a, min(a + span, prefix)) for a in range(0, prefix, span)
    ]


@pytest.mark.parametrize("pooling", ["max", "avg"])
def test_chunked_selection_equals_the_dense_one_at_real_span_sizes(pooling):
    """Spans of thousands of positions in 16-token blocks (the worker's geometry), a prompt
    that is no multiple of them, GQA 4:1, window 32, budget 1024, bf16."""
    gen = torch.Generator().manual_seed(11)
    q_win = torch.randn(32, 8, 64, generator=gen).bfloat16()
    keys = (torch.randn(12_345, 2, 64, generator=gen) * 1.5).bfloat16()
    want = select_kept_positions(q_win, keys, 1024, 0.125, 7, pooling)
    for chunk_size in (4096, 3000):
        got, reads = chunked(q_win, keys, 1024, 0.125, 7, pooling, chunk_size=chunk_size,
                             block_size=16)
        assert torch.equal(got, want)
        assert max(end - start for start, end in reads) == chunk_positions(chunk_size, 16)


@pytest.mark.parametrize("seed", range(0, 120, 7))
def test_chunked_scores_equal_the_dense_scores(seed):
    case = random_case(seed)
    q_win, keys = case["window_queries"], case["keys"]
    scorer = ChunkedWindowScores(
        q_win, lambda s, e: keys[s:e], keys.shape[0], case["scale"], case["kernel_size"],
        case["pooling"], case["sinks"], case["soft_cap"], case["chunk_size"], case["block_size"],
    )
    ranges = list(scorer)
    ends = [start + scores.shape[1] for start, scores in ranges]
    assert [start for start, _ in ranges] == [0] + ends[:-1]  # consecutive, the prefix once
    assert ends[-1] == keys.shape[0] - q_win.shape[0]
    got = torch.cat([scores for _, scores in ranges], dim=1)
    want = dense_scores(q_win, keys, case["scale"], case["kernel_size"], case["pooling"],
                        case["sinks"], case["soft_cap"])
    assert got.dtype == torch.float32
    # Equal to float32 rounding: logits here reach ~50, where one rounding step of a logit
    # (4e-6) is the relative change of its exponential; the matmuls differ in shape.
    torch.testing.assert_close(got, want, rtol=5e-5, atol=1e-9)


@pytest.mark.parametrize("pooling", ["max", "avg"])
@pytest.mark.parametrize("kernel_size", [1, 3, 7])
@pytest.mark.parametrize("chunk_size", [1, 4, 9, 24])
def test_ties_across_chunk_boundaries_go_to_the_earlier_position(pooling, kernel_size, chunk_size):
    """Plateaus of exactly equal scores (zero keys: every logit exactly 0) that span chunk
    boundaries, with the budget ending inside them: the chunked merge must keep the same
    earliest positions as the dense stable sort."""
    q_win, keys = make_inputs(9, window=4, q_heads=6, kv_heads=2, length=120)
    direction = q_win.mean(dim=(0, 1))
    # Weak everywhere (distinct scores), a plateau of zero keys across several chunks, and a few
    # strong positions (each a plateau of k equal pooled maxima under max pooling).
    keys = -direction.abs().sum() * 0.1 * (1 + torch.rand(120, 2, 1, generator=torch.Generator()
                                                           .manual_seed(1))) * direction / 4
    keys[20:70] = 0.0
    keys[[5, 90, 100]] = 3 * direction
    for budget in (4 + 3, 4 + 10, 4 + 30, 4 + 60):
        want = select_kept_positions(q_win, keys, budget, 0.5, kernel_size, pooling)
        got, _ = chunked(q_win, keys, budget, 0.5, kernel_size, pooling, chunk_size=chunk_size)
        assert torch.equal(got, want), budget
    # The plateau is really tied and really cut by the budget.
    scores = dense_scores(q_win, keys, 0.5, kernel_size, pooling)
    assert (scores[:, 30:60] == scores[:, 30:31]).all()


def test_merge_top_equals_top_positions_with_many_ties():
    gen = torch.Generator().manual_seed(3)
    scores = torch.randint(0, 4, (3, 200), generator=gen).float()  # four values: ties galore
    for count in (1, 7, 50, 199):
        for step in (1, 3, 16, 64, 200):
            top_scores = top = None
            for start in range(0, 200, step):
                top_scores, top = merge_top(top_scores, top, scores[:, start : start + step],
                                            start, count)
            assert torch.equal(top.sort(dim=-1).values, top_positions(scores, count))


def test_chunked_rejects_what_the_dense_rejects():
    q, k = make_inputs(6, 4, 2, 2, 10)
    for budget in (10, 12, 4):
        with pytest.raises(ValueError, match="budget"):
            chunked(q, k, budget, 1.0)
    with pytest.raises(ValueError, match="odd"):
        chunked(make_inputs(6, 4, 2, 2, 40)[0], make_inputs(6, 4, 2, 2, 40)[1], 20, 1.0, 4)
    with pytest.raises(ValueError, match="read_keys"):
        select_kept_positions_chunked(q, lambda s, e: k[s : e + 1], 10, 8, 1.0)
