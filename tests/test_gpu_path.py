"""GPU-path decisions that need no GPU: CUDA-graph dispatch on SnapKV steps, model-runner
selection, backend refusal and the per-worker start-up check."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.overrides import TorchFunctionMode
from vllm.config import CUDAGraphMode
from vllm.v1.utils import CpuGpuBuffer
from vllm.v1.worker.gpu_model_runner import GPUModelRunner

from vllm_snapkv.adapter import worker as worker_module
from vllm_snapkv.adapter.attention import UnsupportedAttentionBackend, check_attention_layers
from vllm_snapkv.adapter.engine import V2_RUNNER_ENV, check_worker_reports, select_v1_model_runner


def recorded_dispatch():
    calls = []

    def original(self, num_tokens, **kwargs):
        calls.append(kwargs)
        return CUDAGraphMode.PIECEWISE, None

    return worker_module._patch_cudagraph_dispatch(original), calls


def dispatcher_of_runner_with(jobs: list) -> SimpleNamespace:
    """A runner's dispatcher carrying the runner's SnapKV state (as ``attach`` leaves it)."""
    state = SimpleNamespace(step_has_work=bool(jobs), step_uses_mixed_lengths=False)
    return SimpleNamespace(_snapkv=state)


def test_steps_with_snapkv_work_never_replay_a_full_graph():
    dispatch, calls = recorded_dispatch()
    dispatcher = dispatcher_of_runner_with(jobs=[object()])
    dispatch(dispatcher, 8, uniform_decode=True, invalid_modes=None)
    dispatch(dispatcher, 8, uniform_decode=True, invalid_modes={CUDAGraphMode.PIECEWISE})
    assert calls[0]["invalid_modes"] == {CUDAGraphMode.FULL}
    assert calls[1]["invalid_modes"] == {CUDAGraphMode.FULL, CUDAGraphMode.PIECEWISE}


def test_other_steps_and_other_engines_dispatch_unchanged():
    dispatch, calls = recorded_dispatch()
    dispatch(dispatcher_of_runner_with(jobs=[]), 8, uniform_decode=True, invalid_modes=None)
    # A dispatcher of an engine without SnapKV (or before its KV cache exists) carries no state.
    dispatch(SimpleNamespace(), 8, uniform_decode=True, invalid_modes=None)
    assert calls == [{"uniform_decode": True, "invalid_modes": None}] * 2


def test_vllm_dispatcher_falls_back_to_piecewise_when_full_is_excluded():
    import inspect

    from vllm.forward_context import BatchDescriptor
    from vllm.v1.cudagraph_dispatcher import CudagraphDispatcher

    # vLLM's own dispatch (unpatched), on a dispatcher as a FULL_AND_PIECEWISE runner leaves it
    # after capturing one uniform-decode full graph and one piecewise graph of 8 tokens.
    dispatch = inspect.unwrap(getattr(CudagraphDispatcher.dispatch, "__vllm_snapkv_original__",
                                      CudagraphDispatcher.dispatch))
    dispatcher = CudagraphDispatcher.__new__(CudagraphDispatcher)
    full_key = BatchDescriptor(8, num_reqs=8, uniform=True)
    piecewise_key = BatchDescriptor(8, num_reqs=None, uniform=False)
    dispatcher.__dict__.update(
        compilation_config=SimpleNamespace(max_cudagraph_capture_size=16),
        cudagraph_mode=CUDAGraphMode.FULL_AND_PIECEWISE,
        keys_initialized=True,
        cudagraph_keys={CUDAGraphMode.FULL: {full_key}, CUDAGraphMode.PIECEWISE: {piecewise_key}},
        _create_padded_batch_descriptor=lambda n, uniform, lora, loras: BatchDescriptor(
            n, num_reqs=n if uniform else None, uniform=uniform
        ),
    )
    assert dispatch(dispatcher, 8, uniform_decode=True) == (CUDAGraphMode.FULL, full_key)
    assert dispatch(dispatcher, 8, uniform_decode=True, invalid_modes={CUDAGraphMode.FULL}) == (
        CUDAGraphMode.PIECEWISE,
        piecewise_key,
    )


def test_v1_runner_is_selected_unless_the_user_chose(monkeypatch):
    monkeypatch.delenv(V2_RUNNER_ENV, raising=False)
    select_v1_model_runner()
    import os

    assert os.environ[V2_RUNNER_ENV] == "0"
    monkeypatch.setenv(V2_RUNNER_ENV, "1")
    select_v1_model_runner()
    assert os.environ[V2_RUNNER_ENV] == "1"  # refused later by unsupported_features, named


def test_layers_on_an_unsupported_backend_are_refused_naming_it():
    class RocmAiterImpl:
        pass

    layer = SimpleNamespace(
        impl=RocmAiterImpl(), attn_backend=SimpleNamespace(get_name=lambda: "ROCM_AITER_FA")
    )
    with pytest.raises(UnsupportedAttentionBackend, match="ROCM_AITER_FA .*layer model.layers.0"):
        check_attention_layers({"model.layers.0.self_attn.attn": layer})


def test_kv_sharing_layers_are_refused_naming_the_layer_and_its_target():
    """vLLM puts a KV-sharing layer (Gemma 3n, "fast prefill" variants) in its target's KV cache
    group: both would compact the one cache, each with its own selection."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl

    impl = CPUAttentionBackendImpl.__new__(CPUAttentionBackendImpl)
    impl.alibi_slopes = None
    owner = SimpleNamespace(impl=impl, sliding_window=None, kv_sharing_target_layer_name=None)
    sharing = SimpleNamespace(impl=impl, sliding_window=None,
                              kv_sharing_target_layer_name="model.layers.0.self_attn.attn")
    layers = {"model.layers.0.self_attn.attn": owner, "model.layers.1.self_attn.attn": sharing}
    with pytest.raises(
        UnsupportedAttentionBackend,
        match=r"layer model.layers.1.self_attn.attn uses KV sharing: it reads the KV cache of "
        r"layer model.layers.0.self_attn.attn",
    ):
        check_attention_layers(layers)
    assert set(check_attention_layers({"model.layers.0.self_attn.attn": owner})) == {
        "model.layers.0.self_attn.attn"
    }


def report(rank, v1_runner=True, compression=True):
    return {"rank": rank, "runner": "GPUModelRunner" if v1_runner else "GPUModelRunnerV2",
            "v1_runner": v1_runner, "compression": compression, "backends": ["FLASH_ATTN"]}


def test_every_rank_must_run_the_plugin_worker_side():
    check_worker_reports([report(0), report(1)])
    with pytest.raises(RuntimeError, match=r"rank 1 has no SnapKV worker state.*Failed to load"):
        check_worker_reports([report(0), report(1, compression=False)])
    with pytest.raises(RuntimeError, match="rank 0 runs GPUModelRunnerV2"):
        check_worker_reports([report(0, v1_runner=False)])


def test_standalone_compaction_benchmark_runs_without_vllm(tmp_path):
    # What a GPU owner times with only torch installed: any vLLM import fails in this process.
    import subprocess
    import sys
    from pathlib import Path

    script = (
        "import runpy, sys; sys.modules['vllm'] = None; "
        f"sys.argv = ['x', '--smoke', '--device', 'cpu', '--out', {str(tmp_path)!r}]; "
        "runpy.run_module('benchmarks.gpu.compaction', run_name='__main__')"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).parents[1],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| 300 | 64 |" in (tmp_path / "table.md").read_text()


def test_cuda_graph_test_geometry_really_ends_in_a_one_token_chunk_beside_decodes():
    """The CUDA engine test of the dispatch patch relies on its geometry: the late prompt's
    completing chunk is 1 token, scheduled with one token of each decoding request (a
    uniform-decode batch). Same scheduler and budget on the CPU build (tiny Llama)."""
    from test_architectures import tiny_llm
    from test_cuda_engine import CHUNK, NUM_DECODERS, run_one_token_final_chunk

    from conftest import close_llm, scheduler_of
    from model_zoo import build_tiny_model

    llm = tiny_llm(
        build_tiny_model("llama"), "float32", max_num_batched_tokens=CHUNK,
        additional_config={"kv_compression": {"budget": 256}},
    )
    try:
        _, steps = run_one_token_final_chunk(llm, 4242, max_tokens=4)
        assert scheduler_of(llm)._snapkv.stats.compressed_requests == 1
    finally:
        close_llm(llm)
    chunk = CHUNK - NUM_DECODERS
    assert steps[:3] == [(chunk, [1] * NUM_DECODERS)] * 2 + [(1, [1] * NUM_DECODERS)]


class FakeCudaTimeline:
    """A stand-in for CUDA events on one stream: events complete when the "device" reaches them
    (``run_until``); ``synchronize`` (a host wait) is counted and completes the device's work up
    to that event; ``elapsed_time`` refuses events still in flight, as CUDA does."""

    def __init__(self) -> None:
        self.recorded = 0  # events enqueued so far
        self.completed = 0  # events the device has reached
        self.synchronizations = 0
        timeline = self

        class Event:
            def __init__(self, enable_timing: bool = False) -> None:
                assert enable_timing
                self.index: int | None = None

            def record(self) -> None:
                timeline.recorded += 1
                self.index = timeline.recorded

            def query(self) -> bool:
                return timeline.completed >= self.index

            def synchronize(self) -> None:
                timeline.synchronizations += 1
                timeline.completed = max(timeline.completed, self.index)

            def elapsed_time(self, end: "Event") -> float:
                assert self.query() and end.query(), "CUDA: cudaErrorNotReady"
                return 10.0 * (end.index - self.index)  # 10 ms between consecutive events

        self.Event = Event

    def run_until_idle(self) -> None:
        self.completed = self.recorded


def test_compaction_timing_never_waits_for_the_gpu_on_a_compacting_step(monkeypatch):
    """Issue 22 item 4: the step that compacts records events and returns; its events are read
    by a later step once the device has passed them (no sync), and only a reader of ``seconds``
    (a benchmark) waits."""
    from vllm_snapkv.timing import CompactionClock

    timeline = FakeCudaTimeline()
    monkeypatch.setattr(torch.cuda, "Event", timeline.Event)
    cuda = torch.device("cuda", 0)
    clock = CompactionClock()

    def compacting_step(layers: int) -> None:
        for _ in range(layers):
            clock.stop(clock.start(cuda), cuda)
        clock.settle()  # the worker's end of step

    compacting_step(3)  # the device has not reached these events yet
    assert timeline.synchronizations == 0
    timeline.run_until_idle()
    compacting_step(2)  # reads step 1's pairs (done), keeps its own (in flight)
    assert timeline.synchronizations == 0
    compacting_step(0)
    assert timeline.synchronizations == 0
    assert clock.seconds == pytest.approx(5 * 0.010)  # asked: waits once for step 2's pairs
    assert timeline.synchronizations == 1
    assert clock.seconds == pytest.approx(5 * 0.010) and timeline.synchronizations == 1


class OffsetsRunner:
    """The model-runner buffers ``make_lengths_physical`` reads and writes (CPU build shapes),
    with the runner's own ``_make_buffer``; the slot mapping records the positions it is given."""

    _make_buffer = GPUModelRunner._make_buffer

    def __init__(self, device: str = "cpu", max_num_reqs: int = 8, max_num_tokens: int = 32):
        device = torch.device(device)
        self.device, self.max_num_reqs = device, max_num_reqs
        self.optimistic_seq_lens_cpu = torch.zeros(max_num_reqs, dtype=torch.int32)
        self.seq_lens = torch.zeros(max_num_reqs, dtype=torch.int32, device=device)
        self.positions = torch.zeros(max_num_tokens, dtype=torch.int64, device=device)
        self.req_indices = CpuGpuBuffer(max_num_tokens, dtype=torch.int64, device=device)
        self.query_start_loc = CpuGpuBuffer(max_num_reqs + 1, dtype=torch.int32, device=device)
        self.slot_positions: list[torch.Tensor] = []  # on the device: reading them would sync
        table = SimpleNamespace(compute_slot_mapping=lambda num_reqs, query_start, positions:
                                self.slot_positions.append(positions.clone()))
        self.input_batch = SimpleNamespace(block_table=[table])

    def decode_step(self, seq_lens: list[int]) -> SimpleNamespace:
        """One token per request, at logical position seq_len - 1; returns the scheduler output."""
        num_reqs = len(seq_lens)
        self.seq_lens[:num_reqs] = torch.tensor(seq_lens)
        self.optimistic_seq_lens_cpu[:num_reqs] = torch.tensor(seq_lens)
        self.positions[:num_reqs] = torch.tensor(seq_lens) - 1
        self.req_indices.gpu[:num_reqs] = torch.arange(num_reqs)
        self.query_start_loc.gpu[: num_reqs + 1] = torch.arange(num_reqs + 1)
        return SimpleNamespace(total_num_scheduled_tokens=num_reqs)


class TorchCalls(TorchFunctionMode):
    """Every torch function and tensor method called, with its arguments."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, tuple, dict]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.calls.append((getattr(func, "__name__", str(func)), args, kwargs))
        return func(*args, **kwargs)


def test_evicted_offsets_reach_the_device_from_one_persistent_buffer_without_a_sync():
    """Issue 22 item 1: every step writes the per-row offsets into the runner's persistent host
    buffer (pinned wherever vLLM pins) and copies it with ``non_blocking=True`` into the same
    device buffer; no host tensor is made per step and nothing is moved with ``.to`` (from
    pageable memory that copy waits for the device)."""
    from vllm.utils.platform_utils import is_pin_memory_available

    from vllm_snapkv.adapter.groups import CompressedGroups
    from vllm_snapkv.adapter.physical import make_lengths_physical

    groups = CompressedGroups(group_ids=(0,), block_size=16, group_of_layer={}, hybrid=False)
    runner = OffsetsRunner()
    request_ids = ["a", "b", "c"]
    copies = []
    for evicted, seq_lens in [({"a": 100, "c": 7}, [300, 50, 120]), ({"a": 100}, [301, 51, 121])]:
        output = runner.decode_step(seq_lens)
        with TorchCalls() as recorded:
            make_lengths_physical(runner, output, request_ids, evicted, groups)
        names = [name for name, _, _ in recorded.calls]
        assert not {"tensor", "as_tensor", "to", "cuda"} & set(names), names
        (copy,) = [(args, kwargs) for name, args, kwargs in recorded.calls if name == "copy_"]
        (destination, source), kwargs = copy
        assert kwargs.get("non_blocking") is True
        copies.append((destination.untyped_storage().data_ptr(),
                       source.untyped_storage().data_ptr()))
        physical = [n - evicted.get(r, 0) for r, n in zip(request_ids, seq_lens)]
        assert runner.seq_lens[:3].tolist() == physical
        assert runner.optimistic_seq_lens_cpu[:3].tolist() == physical
        assert runner.slot_positions[-1].tolist() == [n - 1 for n in physical]
    assert copies[0] == copies[1]  # the same host and device storage every step
    from vllm_snapkv.adapter.physical import evicted_offsets_buffer

    buffer = evicted_offsets_buffer(runner)
    assert copies[0] == (buffer.gpu.untyped_storage().data_ptr(),
                         buffer.cpu.untyped_storage().data_ptr())
    assert buffer.cpu.is_pinned() == is_pin_memory_available()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu-check)")
def test_decode_steps_with_compressed_requests_never_sync_the_host_on_cuda():
    """A decode loop of the plugin's per-step work on a GPU (lengths and slots made physical,
    compaction timed and settled) under ``torch.cuda.set_sync_debug_mode("error")``: any host
    wait raises. The inputs are written outside the checked part (the runner's job)."""
    from vllm_snapkv.adapter.groups import CompressedGroups
    from vllm_snapkv.adapter.physical import make_lengths_physical
    from vllm_snapkv.timing import CompactionClock

    groups = CompressedGroups(group_ids=(0,), block_size=16, group_of_layer={}, hybrid=False)
    runner = OffsetsRunner("cuda")
    clock = CompactionClock()
    request_ids, evicted = ["a", "b", "c"], {"a": 100, "c": 7}
    for step in range(50):
        seq_lens = [300 + step, 50 + step, 120 + step]
        output = runner.decode_step(seq_lens)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            make_lengths_physical(runner, output, request_ids, evicted, groups)
            started = clock.start(runner.device)
            torch.cumsum(runner.positions, 0)  # device work being timed
            clock.stop(started, runner.device)
            clock.settle()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        physical = [n - evicted.get(r, 0) for r, n in zip(request_ids, seq_lens)]
        assert runner.seq_lens[:3].tolist() == physical
        assert runner.slot_positions[-1].tolist() == [n - 1 for n in physical]
    assert clock.seconds > 0


def test_steps_that_may_keep_full_graphs_are_uniform_decodes_without_snapkv_jobs():
    """The counting behind the README's figure (``benchmarks/performance/graph_steps.py``)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1]))  # the repository root: benchmarks/
    from benchmarks.performance.graph_steps import full_graph_counts, step_geometry

    from vllm_snapkv.adapter.scheduler import DIRECTIVES_ATTR

    def output(tokens: dict[str, int], plans=(), captures=(), evicted=()) -> SimpleNamespace:
        captures = {r: SimpleNamespace(phase=phase) for r, phase in dict(captures).items()}
        directives = SimpleNamespace(plans=dict.fromkeys(plans), captures=captures,
                                     evicted=dict.fromkeys(evicted, 10))
        return SimpleNamespace(num_scheduled_tokens=tokens, **{DIRECTIVES_ATTR: directives})

    steps = [step_geometry(o) for o in [
        output({"a": 100, "b": 101}),  # prefill: no full graph under FULL_AND_PIECEWISE
        output({"a": 1, "b": 1}, captures={"a": "decode"}),  # a decode window capture: graph-safe
        output({"a": 1, "b": 1}, captures={"a": "prompt"}),  # a prompt's capture: FULL excluded
        output({"a": 1, "b": 1}, plans=["a"], evicted=["b"]),  # a compaction
        output({"a": 1, "b": 1}, evicted=["a", "b"]),  # compressed requests only decoding
        output({"a": 1, "b": 1}),
    ]]
    assert step_geometry(SimpleNamespace(num_scheduled_tokens={})) is None
    counts = full_graph_counts(steps)
    assert (counts["steps"], counts["uniform_decode_steps"], counts["may_keep_full"]) == (6, 5, 3)
    assert counts["fraction_of_uniform_decode"] == 0.6
    assert counts["before_fraction_of_steps"] == 2 / 6  # decode captures excluded FULL too
