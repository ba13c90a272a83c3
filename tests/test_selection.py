"""Selection against a deliberately naive dense reference (loops, per query head, no vLLM)."""

from __future__ import annotations

import math

import pytest
import torch

from vllm_snapkv.selection import (
    pool_scores,
    select_kept_positions,
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


def test_compaction_clock_sums_cpu_wall_time():
    import time

    from vllm_snapkv.timing import CompactionClock

    clock = CompactionClock()
    for _ in range(2):
        started = clock.start(torch.device("cpu"))
        time.sleep(0.01)
        clock.stop(started, torch.device("cpu"))
    clock.settle()
    assert 0.02 <= clock.seconds < 1.0


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
        clock.stop(started, keys.device)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    clock.settle()
    assert clock.seconds > 0
