"""Decode window capture that full CUDA graphs can replay (issue 22, item 2), without an engine:
the worker's step phases on a fake runner, the CUDA-graph dispatch patch, the attention forward
patch writing the ring, and the compaction reading the window back."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch
import pytest
from vllm.config import CUDAGraphMode
from vllm.v1.utils import CpuGpuBuffer

from vllm_snapkv.adapter import worker as worker_module
from vllm_snapkv.adapter.groups import CompressedGroups
from vllm_snapkv.adapter.scheduler import DIRECTIVES_ATTR
from vllm_snapkv.adapter.worker import WorkerCompression
from vllm_snapkv.config import parse_config
from vllm_snapkv.plan import CompressionPlan, StepDirectives, WindowCapture

LAYER = "model.layers.0.self_attn.attn"
WINDOW, BLOCK, HEADS, HEAD_SIZE = 4, 16, 2, 8
MAX_SEQS, MAX_TOKENS = 3, 8
#: Request "a"'s decode point: its window is positions 18..21, ring rows 2, 3, 0, 1 of its slot.
POINT = 22


class FakeRunner:
    """What the worker reads of vLLM's model runner: two requests decoding one token a step."""

    def __init__(self, device: str = "cpu"):
        self.device = torch.device(device)
        self.max_num_reqs, self.max_num_tokens = MAX_SEQS, MAX_TOKENS
        self.impl = SimpleNamespace(num_heads=HEADS, head_size=HEAD_SIZE, scale=HEAD_SIZE**-0.5,
                                    sinks=None, logits_soft_cap=None)
        self.compilation_config = SimpleNamespace(
            static_forward_context={LAYER: SimpleNamespace(impl=self.impl)}
        )
        self.cudagraph_dispatcher = SimpleNamespace()
        self.attn_groups = []
        self.requests = {"a": SimpleNamespace(block_ids=([0, 1],)),
                         "b": SimpleNamespace(block_ids=([2, 3],))}
        self.input_batch = SimpleNamespace(
            req_ids=["a", "b"], num_reqs=2, req_id_to_index={},
            num_computed_tokens_cpu=np.zeros(MAX_SEQS, np.int64),
        )
        self.query_start_loc = SimpleNamespace(np=np.arange(MAX_SEQS + 1, dtype=np.int32))
        self.buffers: list[CpuGpuBuffer] = []

    def _make_buffer(self, *size, dtype, numpy=True):
        buffer = CpuGpuBuffer(*size, dtype=dtype, device=self.device)
        self.buffers.append(buffer)
        return buffer


def make_state(runner: FakeRunner) -> WorkerCompression:
    groups = CompressedGroups(group_ids=(0,), block_size=BLOCK, group_of_layer={LAYER: 0},
                              hybrid=False)
    config = parse_config({"budget": 16, "window_size": WINDOW, "decode_interval": 16})
    state = WorkerCompression(config, groups, query_dtype=torch.float32)
    state.attach(runner)
    return state


def directives_at(position: int) -> StepDirectives:
    """Request "a" decodes the token at ``position``: a capture inside its window, or (the last
    window token) its compaction."""
    if position < POINT - WINDOW or position >= POINT:
        return StepDirectives()
    if position < POINT - 1:
        return StepDirectives(captures={"a": WindowCapture(POINT, WINDOW, phase="decode")})
    plan = CompressionPlan(num_scored=POINT, budget=16, window_size=WINDOW, window_end=POINT,
                           num_output_tokens=0, target_block_ids={0: (4,)}, phase="decode",
                           index=1)
    return StepDirectives(plans={"a": plan})


def step_output(directives: StepDirectives, preempted=()) -> SimpleNamespace:
    return SimpleNamespace(
        finished_req_ids=set(), scheduled_new_reqs=[], preempted_req_ids=set(preempted),
        scheduled_cached_reqs=SimpleNamespace(resumed_req_ids=set()),
        **{DIRECTIVES_ATTR: directives},
    )


def queries_at(position: int, num_rows: int = 2) -> torch.Tensor:
    """The step's flattened queries: "a"'s row holds its position, "b"'s row -1, padding -2."""
    rows = torch.full((num_rows, HEADS * HEAD_SIZE), -2.0)
    rows[0], rows[1] = float(position), -1.0
    return rows


def dispatched_invalid_modes(state: WorkerCompression) -> set:
    seen = []

    def original(self, num_tokens, **kwargs):
        seen.append(kwargs.get("invalid_modes") or set())
        return CUDAGraphMode.FULL, None

    dispatch = worker_module._patch_cudagraph_dispatch(original)
    dispatch(SimpleNamespace(_snapkv=state), 2, uniform_decode=True, invalid_modes=None)
    return seen[0]


def run_step(runner: FakeRunner, state: WorkerCompression, position: int, compacted: list,
             num_query_rows: int = 2) -> set:
    """One decode step of both requests ("a" at ``position``): the worker's phases in vLLM's
    order; returns the modes the dispatch patch excluded."""
    output = step_output(directives_at(position))
    state.before_update_states(runner, output)
    runner.input_batch.num_computed_tokens_cpu[:2] = [position, 1000 + position]
    state.after_prepare_inputs(runner, output, np.array([1, 1]))
    invalid = dispatched_invalid_modes(state)
    forward = worker_module._patch_attention_forward(lambda self, *args, **kwargs: "output")
    layer = SimpleNamespace(layer_name=LAYER, query_quant=None)
    kv_cache = torch.zeros(8, 2, BLOCK, HEAD_SIZE)
    assert forward(runner.impl, layer, queries_at(position, num_query_rows), None, None,
                   kv_cache, object()) == "output"
    if state.jobs:
        state.after_execute_model()
    else:
        state.end_step()
    return invalid


def test_window_captures_keep_full_graphs_only_the_compacting_step_leaves_them(monkeypatch):
    runner = FakeRunner()
    state = make_state(runner)
    runner.impl._snapkv = state
    compacted = []

    def compact(impl, layer, job, window_queries, kv_cache, group_id):
        compacted.append(window_queries.clone())
        return torch.zeros(1, 1, dtype=torch.long)

    monkeypatch.setattr(state, "_compact", compact)
    excluded = {p: run_step(runner, state, p, compacted) for p in range(POINT - WINDOW - 1,
                                                                          POINT + 1)}
    # Before the window, window captures (18, 19, 20), after the compaction: FULL stays allowed.
    for position in (17, 18, 19, 20, 22):
        assert CUDAGraphMode.FULL not in excluded[position], position
    assert CUDAGraphMode.FULL in excluded[POINT - 1]  # the compacting step
    # The compaction scored the window's queries, positions 18..21 in order, though the ring
    # holds them in rows 2, 3, 0, 1 of the request's slot.
    (window,) = compacted
    assert window.shape == (WINDOW, HEADS, HEAD_SIZE)
    assert window[:, 0, 0].tolist() == [18.0, 19.0, 20.0, 21.0]
    assert state.ring.slots_held == 0  # the compaction released the slot


def test_ring_write_is_shape_static_and_replayable_across_steps(monkeypatch):
    """The write every step runs reads persistent tensors only (what a captured graph replays):
    the same ring and destination-row buffer every step, no buffer made per step; rows of tokens
    outside a window, and a graph's padding rows, point at the scratch row."""
    runner = FakeRunner()
    state = make_state(runner)
    runner.impl._snapkv = state
    ring = state.ring
    monkeypatch.setattr(state, "_compact", lambda *args: torch.zeros(1, 1, dtype=torch.long))
    (rows_buffer,) = runner.buffers
    ring_tensor = ring.queries[LAYER].zero_()  # allocated uninitialised
    pointers = (ring_tensor.data_ptr(), rows_buffer.gpu.data_ptr(), rows_buffer.cpu.data_ptr())
    scratch = ring.scratch_row
    assert ring_tensor.shape == (MAX_SEQS * WINDOW + 1, HEADS, HEAD_SIZE)
    assert rows_buffer.gpu.tolist() == [scratch] * MAX_TOKENS

    writes = []
    original_write = ring.write

    def recording_write(layer_name, queries):
        writes.append((ring.rows.gpu[: queries.shape[0]].clone(), queries.shape))
        original_write(layer_name, queries)

    monkeypatch.setattr(ring, "write", recording_write)
    # Padded as a full graph of 4 tokens would be; "a" at 18 and 19: slot 0, rows 2 and 3.
    for position in (18, 19):
        run_step(runner, state, position, [], num_query_rows=4)
        assert runner.buffers == [rows_buffer]  # no buffer made per step
    assert [rows.tolist() for rows, _ in writes] == [
        [2, scratch, scratch, scratch], [3, scratch, scratch, scratch]
    ]
    assert {shape for _, shape in writes} == {(4, HEADS, HEAD_SIZE)}
    assert ring_tensor[2, 0, 0] == 18.0 and ring_tensor[3, 0, 0] == 19.0
    # The (last) layer's write pointed the device rows back at the scratch row: a forward
    # outside the plugin's steps (a dummy batch) writes no request row.
    assert rows_buffer.gpu.tolist() == [scratch] * MAX_TOKENS
    assert ring_tensor[[0, 1, 4, 5]].eq(0).all()  # no other request row was written
    # A step with no window token leaves every device row at the scratch row again, so a
    # replayed graph writes only to it; an eager step then skips the write.
    run_step(runner, state, 30, [], num_query_rows=4)
    assert rows_buffer.gpu.tolist() == [scratch] * MAX_TOKENS
    assert len(writes) == 2
    assert (ring_tensor.data_ptr(), rows_buffer.gpu.data_ptr(),
            rows_buffer.cpu.data_ptr()) == pointers
    assert ring.queries[LAYER] is ring_tensor


def test_preempted_released_and_finished_requests_free_their_window_slot():
    runner = FakeRunner()
    state = make_state(runner)
    runner.impl._snapkv = state
    run_step(runner, state, 18, [])
    assert state.ring.slots_held == 1
    state.before_update_states(runner, step_output(StepDirectives(), preempted=["a"]))
    assert state.ring.slots_held == 0
    run_step(runner, state, 18, [])
    state.before_update_states(runner, step_output(StepDirectives(released={"a"})))
    assert state.ring.slots_held == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu-check)")
def test_a_captured_cuda_graph_replays_the_ring_write_with_each_steps_rows():
    """On a GPU: the write captured once into a CUDA graph (as vLLM captures a full decode
    graph, padded to 4 tokens) and replayed over three capture steps puts each step's window
    query into its ring row and nothing into other requests' rows."""
    runner = FakeRunner("cuda")
    state = make_state(runner)
    layer = SimpleNamespace(layer_name=LAYER, query_quant=None)
    state.ring.queries[LAYER].zero_()
    static_queries = torch.zeros(4, HEADS * HEAD_SIZE, device="cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        state.write_window_ring(layer, static_queries)
    replays = 0
    for position in (18, 19, 20):
        output = step_output(directives_at(position))
        state.before_update_states(runner, output)
        runner.input_batch.num_computed_tokens_cpu[:2] = [position, 1000 + position]
        state.after_prepare_inputs(runner, output, np.array([1, 1]))
        static_queries.copy_(queries_at(position, 4))
        graph.replay()
        replays += 1
        state.end_step()
    torch.cuda.synchronize()
    ring = state.ring.queries[LAYER]
    assert replays == 3
    assert ring[[2, 3, 0], 0, 0].tolist() == [18.0, 19.0, 20.0]
    assert ring[[1, *range(WINDOW, MAX_SEQS * WINDOW)]].eq(0).all()


def test_a_window_with_a_position_never_captured_is_refused():
    """Scoring with a ring row no capture wrote (stale or uninitialised) fails loudly, as the
    list buffer's row count did."""
    runner = FakeRunner()
    state = make_state(runner)
    runner.impl._snapkv = state

    run_step(runner, state, 18, [])
    # 19 skipped: the worker never saw it; 20 starts a new range.
    run_step(runner, state, 20, [])
    with pytest.raises(RuntimeError, match=r"window positions \[18, 21\) but only \[20, 21\)"):
        run_step(runner, state, 21, [])


def test_rolled_back_draft_positions_are_rewritten_by_their_recomputation():
    """Speculative decoding: a verification step writes queries of draft positions; rejected
    drafts roll back, and the next step recomputes those positions. The capture continues the
    window (no gap) and the ring holds the recomputed queries, not the rejected ones."""
    from vllm_snapkv.adapter.window_ring import WindowQueryRing

    ring = WindowQueryRing(WINDOW, MAX_SEQS, CpuGpuBuffer(MAX_TOKENS, dtype=torch.int64,
                                                          device="cpu"))
    ring.add_layer(LAYER, HEADS, HEAD_SIZE, torch.float32, "cpu")

    def verify(first_position: int, values: list[float]) -> None:
        ring.begin_step()
        ring.capture("a", 0, first_position, len(values))
        ring.end_step()
        rows = torch.tensor(values).view(-1, 1, 1).expand(-1, HEADS, HEAD_SIZE)
        ring.write(LAYER, rows)

    verify(18, [18.0, 19.0, 20.0])  # 18 known, drafts at 19 and 20
    verify(19, [119.0, 120.0, 121.0])  # the draft at 19 was rejected: 19.. recomputed
    assert ring.captured("a") == (18, 22)
    read = ring.read(LAYER, ring.window_rows("a", 18, 22, "cpu"))
    assert read[:, 0, 0].tolist() == [18.0, 119.0, 120.0, 121.0]
