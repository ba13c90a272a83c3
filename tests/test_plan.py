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
