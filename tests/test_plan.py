"""Scheduler-side arithmetic shared with the workers (pure, no vLLM)."""

from __future__ import annotations

import pickle

import pytest

from vllm_snapkv.plan import (
    CompressionPlan,
    StepDirectives,
    WindowCapture,
    cdiv,
    frees_blocks,
    prefix_hit_limit,
)


@pytest.mark.parametrize(
    "prompt_len,budget,outputs,expected",
    [
        (1000, 1024, 0, False),  # nothing to evict
        (1024, 1024, 0, False),
        (1020, 1000, 0, False),  # 8 blocks either way with block size 128
        (1030, 1000, 0, True),  # 9 -> 8 blocks
        (1200, 1024, 0, True),  # 10 -> 8 blocks
        (300, 256, 0, True),  # 3 -> 2 blocks
        (300, 200, 0, True),
        (250, 200, 0, False),  # 2 -> 2 blocks
        (300, 256, 100, True),  # resumed: 400 held -> 356 kept: 4 -> 3 blocks
    ],
)
def test_compress_only_when_a_block_is_freed(prompt_len, budget, outputs, expected):
    assert frees_blocks(prompt_len, budget, outputs, 128) is expected


def test_prefix_hits_stop_before_the_window_on_a_block_boundary():
    assert prefix_hit_limit(2000, 32, 128) == 1920
    assert prefix_hit_limit(1952, 32, 128) == 1920
    assert prefix_hit_limit(1951, 32, 128) == 1792
    assert prefix_hit_limit(20, 32, 128) == 0


def test_plan_arithmetic_for_a_resumed_request():
    plan = CompressionPlan(
        num_scored=1500,
        budget=256,
        window_size=32,
        window_end=1500,
        num_output_tokens=40,
        target_block_ids={0: (7, 9, 4), 5: (2, 8, 11)},
    )
    assert plan.num_sources == 1540
    assert plan.num_kept == 296
    assert plan.num_evicted == 1244
    assert all(cdiv(plan.num_kept, 128) == len(t) for t in plan.target_block_ids.values())


def test_directives_survive_pickling():
    # vLLM ships SchedulerOutput to worker processes with pickle.
    directives = StepDirectives(
        plans={
            "a": CompressionPlan(900, 256, 32, 900, 0, {0: (3, 4), 2: (5, 6)}, frozenset({4})),
            "e": CompressionPlan(384, 256, 32, 1100, 0, {0: (8, 1)}, phase="decode", index=2),
        },
        captures={"b": WindowCapture(700, 32)},
        released={"c"},
        evicted={"d": 1000},
    )
    assert pickle.loads(pickle.dumps(directives)) == directives
    assert directives.has_work() and not StepDirectives().has_work()


def test_decode_threshold_frees_a_block():
    from vllm_snapkv.plan import decode_threshold

    assert decode_threshold(256, 128, 128) == 384
    assert decode_threshold(300, 32, 128) == 385  # 332 entries would still fit 3 blocks
    assert decode_threshold(1024, 512, 16) == 1536


def test_decode_points_capture_the_window_then_compress_or_move():
    """The scheduler's decode planning for one request (budget 256, interval 128, window 32):
    captures in the 32 single-token steps before its point, the plan at the point; a chunk
    that runs past the point without the whole window in view moves the point a window on."""
    from types import SimpleNamespace

    from vllm_snapkv.adapter.planning import SchedulerCompression, _plan_decode
    from vllm_snapkv.config import parse_config

    state = SchedulerCompression(
        config=parse_config({"budget": 256, "decode_interval": 128}),
        groups=SimpleNamespace(block_size=128, group_ids=(0,)),
    )
    request = SimpleNamespace(request_id="r", num_prompt_tokens=100, sampling_params=None)
    captured = []
    for position in range(300, 384):  # one token a step; the point is 384 (nothing evicted)
        directives = StepDirectives()
        plan = _plan_decode(state, request, position, position + 1, directives)
        if "r" in directives.captures:
            assert directives.captures["r"] == WindowCapture(384, 32)
            captured.append(position)
        if position + 1 < 384:
            assert plan is None
    assert captured == list(range(352, 383))
    assert (plan.phase, plan.num_scored, plan.window_end, plan.budget) == ("decode", 384, 384, 256)
    assert plan.num_evicted == 128

    state.evicted["r"] = 128
    state.decode_points.pop("r")
    assert state.decode_point(request) == 512
    directives = StepDirectives()
    # A 20-token chunk from 500 to 520 (past the point, window [480, 512) not all seen).
    assert _plan_decode(state, request, 500, 520, directives) is None
    assert state.decode_points["r"] == 520 + 32 and "r" in directives.released
    # A re-prefill chunk holding the whole window compresses at its end.
    plan = _plan_decode(state, request, 400, 560, StepDirectives())
    assert (plan.window_end, plan.num_scored) == (560, 560 - 128)
