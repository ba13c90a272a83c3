"""GPU-path decisions that need no GPU: CUDA-graph dispatch on SnapKV steps, model-runner
selection, backend refusal and the per-worker start-up check."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from vllm.config import CUDAGraphMode

from vllm_snapkv.adapter import worker as worker_module
from vllm_snapkv.adapter.attention import UnsupportedAttentionBackend, check_attention_layers
from vllm_snapkv.adapter.engine import V2_RUNNER_ENV, check_worker_reports, select_v1_model_runner


def recorded_dispatch():
    calls = []

    def original(self, num_tokens, **kwargs):
        calls.append(kwargs)
        return CUDAGraphMode.PIECEWISE, None

    return worker_module._patch_cudagraph_dispatch(original), calls


def test_steps_with_snapkv_work_never_replay_a_full_graph(monkeypatch):
    dispatch, calls = recorded_dispatch()
    monkeypatch.setattr(worker_module, "_ACTIVE_STEP", object())
    dispatch(None, 8, uniform_decode=True, invalid_modes=None)
    dispatch(None, 8, uniform_decode=True, invalid_modes={CUDAGraphMode.PIECEWISE})
    assert calls[0]["invalid_modes"] == {CUDAGraphMode.FULL}
    assert calls[1]["invalid_modes"] == {CUDAGraphMode.FULL, CUDAGraphMode.PIECEWISE}


def test_other_steps_dispatch_unchanged(monkeypatch):
    dispatch, calls = recorded_dispatch()
    monkeypatch.setattr(worker_module, "_ACTIVE_STEP", None)
    dispatch(None, 8, uniform_decode=True, invalid_modes=None)
    assert calls == [{"uniform_decode": True, "invalid_modes": None}]


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
