"""Scheduler-side arithmetic shared with the workers (pure, no vLLM)."""

from __future__ import annotations

import pickle
from types import SimpleNamespace

import pytest

from vllm_snapkv.plan import (
    CompressionPlan,
    StepDirectives,
    WindowCapture,
    cdiv,
    frees_blocks,
    prefix_hit_limit,
    speculative_chunk_end,
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
    record = state.record(request)
    assert (record.phase, record.next_point) == ("decode", 384)  # a short prompt: no prompt plan
    captured = []
    for position in range(300, 384):  # one token a step; the point is 384 (nothing evicted)
        directives = StepDirectives()
        plan = _plan_decode(state, request, record, position, position + 1, directives)
        if "r" in directives.captures:
            assert directives.captures["r"] == WindowCapture(384, 32, phase="decode")
            captured.append(position)
        if position + 1 < 384:
            assert plan is None
    assert captured == list(range(352, 383))
    assert (plan.phase, plan.num_scored, plan.window_end, plan.budget) == ("decode", 384, 384, 256)
    assert plan.num_evicted == 128

    assert record.window_captured_from == 352
    state.compressed("r", plan)
    assert (record.evicted, record.index, record.next_point) == (128, 1, 512)
    assert record.window_captured_from is None
    directives = StepDirectives()
    # A 20-token chunk from 500 to 520 (past the point, window [480, 512) not all seen).
    assert _plan_decode(state, request, record, 500, 520, directives) is None
    assert record.next_point == 520 + 32 and "r" in directives.released
    # A re-prefill chunk holding the whole window compresses at its end.
    plan = _plan_decode(state, request, record, 400, 560, StepDirectives())
    assert (plan.window_end, plan.num_scored, plan.index) == (560, 560 - 128, 1)


def planning_state(**config):
    from types import SimpleNamespace

    from vllm_snapkv.adapter.planning import SchedulerCompression
    from vllm_snapkv.config import parse_config

    return SchedulerCompression(
        config=parse_config(config), groups=SimpleNamespace(block_size=128, group_ids=(0,))
    )


def short_request(request_id: str = "r", prompt_len: int = 100):
    from types import SimpleNamespace

    return SimpleNamespace(request_id=request_id, num_prompt_tokens=prompt_len, sampling_params=None)


def test_a_rule_reading_token_ids_leaves_a_request_of_prompt_embeddings_uncompressed():
    """A request sent as prompt embeddings has no token ids: with 'snapkv-rare-continuation'
    it keeps its full cache (logged) rather than being scored by another rule; with token ids,
    or with a rule that reads none, it compresses at its prompt's end."""
    from types import SimpleNamespace

    state = planning_state(budget=256, score="snapkv-rare-continuation")
    embeds = SimpleNamespace(request_id="e", num_prompt_tokens=1000, sampling_params=None,
                             prompt_token_ids=None)
    assert state.settings_for(embeds) == (None, "snapkv-rare-continuation")
    assert state.record(embeds).next_point is None
    ids = SimpleNamespace(request_id="i", num_prompt_tokens=1000, sampling_params=None,
                          prompt_token_ids=list(range(1000)))
    assert (state.record(ids).phase, state.record(ids).next_point) == ("prompt", 1000)
    assert planning_state(budget=256).settings_for(embeds) == (256, "snapkv")


def test_prefix_hit_of_a_short_prompt_stops_before_its_first_decode_window():
    """A prompt that is not compressed (L <= budget) with decode compression on: a (resumed)
    request's hit may not cover the window of its first decode point (384: [352, 384)), or it
    would compress elsewhere than it did before its preemption. Without a next point, no cap."""
    state = planning_state(budget=256, decode_interval=128)
    assert state.prefix_hit_limit(short_request()) == 256  # (384 - 32) // 128 * 128
    assert planning_state(budget=256).prefix_hit_limit(short_request()) is None
    opted_out = short_request("o")
    opted_out.sampling_params = SimpleNamespace(extra_args={"kv_compression": "none"})
    assert state.prefix_hit_limit(opted_out) is None
    # A compressed prompt: capped at its own window, as before.
    assert state.prefix_hit_limit(short_request("long", 1000)) == 896


def test_request_record_changes_only_through_its_transitions():
    """Prompt compression, a skipped decode compression (tried an interval later), a compressed
    one, and forgetting (a preempted request starts again from a fresh record)."""
    from vllm_snapkv.plan import CompressionPlan

    state = planning_state(budget=256, decode_interval=128)
    request = short_request("r", 1000)
    record = state.record(request)
    assert (record.phase, record.next_point, record.evicted, record.index) == ("prompt", 1000, 0, 0)
    assert state.next_compression_point(request) == 1000
    prompt = CompressionPlan(1000, 256, 32, 1000, 0, {})
    state.compressed("r", prompt)
    assert (record.phase, record.evicted, record.index, record.next_point) == (
        "decode", 744, 1, 744 + 384
    )
    assert state.evicted_of("r") == 744 and state.evicted == {"r": 744}
    decode = CompressionPlan(384, 256, 32, 1128, 0, {}, phase="decode", index=1)
    state.skipped("r", decode)
    assert (record.evicted, record.index, record.next_point) == (744, 1, 1128 + 128)
    state.compressed("r", decode)
    assert (record.evicted, record.index, record.next_point) == (872, 2, 872 + 384)
    state.forgotten("r")
    assert state.evicted_of("r") == 0 and not state.requests
    assert state.record(request).next_point == 1000  # fresh


def test_skipped_prompt_compression_never_compresses_the_request_again():
    from vllm_snapkv.plan import CompressionPlan

    state = planning_state(budget=256, decode_interval=128)
    record = state.record(short_request("r", 1000))
    state.skipped("r", CompressionPlan(1000, 256, 32, 1000, 0, {}))
    assert (record.phase, record.next_point, record.evicted) == ("decode", None, 0)


def test_adapter_modules_import_each_other_without_a_circle():
    """Every import between adapter modules (at module level, inside functions or under
    TYPE_CHECKING) points one way: no module reaches itself."""
    import ast
    from pathlib import Path

    root = Path(__file__).parents[1] / "vllm_snapkv" / "adapter"
    package = "vllm_snapkv.adapter"

    def module_name(path: Path) -> str:
        parts = path.relative_to(root).with_suffix("").parts
        return ".".join([package, *[p for p in parts if p != "__init__"]])

    edges: dict[str, set[str]] = {}
    modules = {module_name(path): path for path in root.rglob("*.py")}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module == package:
                    targets |= {f"{package}.{alias.name}" for alias in node.names}
                targets.add(node.module)
            elif isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
        edges[name] = {t for t in targets if t in modules and t != name and t != package}
    assert f"{package}.planning" in edges and f"{package}.block_accounting" in edges

    def cycle_from(start: str, path: list[str]) -> list[str] | None:
        for target in sorted(edges[start]):
            if target in path:
                return path[path.index(target):] + [target]
            found = cycle_from(target, path + [target])
            if found:
                return found
        return None

    for name in sorted(edges):
        assert cycle_from(name, [name]) is None, cycle_from(name, [name])


@pytest.mark.parametrize(
    "point,num_known,chunk,expected_end",
    [
        (400, 351, (350, 354), 354),  # drafts 351..353 well before the point
        (400, 397, (396, 400), 399),  # a draft would lie at 399 = point - 1: stop before it
        (400, 398, (397, 401), 399),  # ... and past the point
        (400, 399, (398, 402), 399),  # 398 known, the draft at 399 is cut: [398, 399)
        (400, 400, (399, 403), 400),  # 399 known: [399, 400), the compressing step, no drafts
        (400, 500, (390, 420), 420),  # no drafts (a re-prefill): the prompt-end split applies
        (400, 402, (401, 405), 405),  # the point is behind the chunk
    ],
)
def test_drafts_stop_before_the_last_position_of_a_compression_point(
    point, num_known, chunk, expected_end
):
    assert speculative_chunk_end(point, num_known, *chunk) == expected_end
