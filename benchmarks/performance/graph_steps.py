"""Steps that may replay a FULL CUDA graph under decode compression, counted on the CPU
scheduler's geometry of the long-generation throughput workload (issue 22, item 2).

    python -m benchmarks.performance.graph_steps [--smoke] [--cuda-graphs]

The dispatch patch (``adapter/worker.py``) excludes FULL from every step with a SnapKV job: a
compaction of any request in the batch, or a prompt's window capture. Decode window captures are
written by a capturable op into a persistent ring (``adapter/window_ring.py``) and keep FULL;
before that change they excluded it too (``before_fraction_of_steps``: that rule, same
schedule).
Under vLLM's default FULL_AND_PIECEWISE, full graphs exist only for uniform-decode batches (every
request one token); FULL_DECODE_ONLY runs every other step eagerly. So a step may keep FULL when
it is a uniform-decode batch without SnapKV jobs. The schedule is the engine core's own (the workload of
``long_generation`` part 2, decode compression on), recorded from each ``SchedulerOutput`` and
its SnapKV directives: the same on a GPU for the same budget of KV blocks, since the scheduler
and the plugin's planning are device-independent (async scheduling is off with the plugin).
With ``--cuda-graphs`` (a GPU: ``scripts/gpu-check``) the engine captures CUDA graphs and the
runtime mode vLLM's dispatcher chose for each forward is counted as well (graph replays).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import machine, markdown_table, progress, scheduler_of


@dataclass(frozen=True)
class StepGeometry:
    num_reqs: int
    #: Every scheduled request runs one token (the batches vLLM captures full graphs for).
    uniform_decode: bool
    #: A compaction or a prompt's window capture in the step: FULL is excluded by the dispatch
    #: patch.
    snapkv_jobs: bool
    #: A decode window capture in the step (graph-safe now; excluded FULL before).
    decode_captures: bool = False


def step_geometry(scheduler_output: Any) -> StepGeometry | None:
    """The step's geometry, or None when it schedules nothing."""
    from vllm_snapkv.adapter.scheduler import DIRECTIVES_ATTR

    tokens = list(scheduler_output.num_scheduled_tokens.values())
    if not tokens:
        return None
    directives = getattr(scheduler_output, DIRECTIVES_ATTR, None)
    if directives is None:
        return StepGeometry(len(tokens), all(n == 1 for n in tokens), False)
    phases = [capture.phase for capture in directives.captures.values()]
    jobs = bool(directives.plans) or "prompt" in phases
    return StepGeometry(len(tokens), all(n == 1 for n in tokens), jobs, "decode" in phases)


def record_step_geometry(scheduler: Any) -> list[StepGeometry]:
    """Record every later ``scheduler.schedule()`` (the engine core's, in process)."""
    steps: list[StepGeometry] = []
    schedule = scheduler.schedule

    def recording_schedule(*args: Any, **kwargs: Any):
        output = schedule(*args, **kwargs)
        geometry = step_geometry(output)
        if geometry is not None:
            steps.append(geometry)
        return output

    scheduler.schedule = recording_schedule
    return steps


def record_dispatched_modes(llm: Any) -> list[str]:
    """Record the CUDA-graph mode of every later forward of the in-process runner."""
    executor = llm.llm_engine.engine_core.engine_core.model_executor
    dispatcher = executor.driver_worker.worker.model_runner.cudagraph_dispatcher
    modes: list[str] = []
    dispatch = dispatcher.dispatch

    def recording_dispatch(*args: Any, **kwargs: Any):
        mode, descriptor = dispatch(*args, **kwargs)
        modes.append(mode.name)
        return mode, descriptor

    dispatcher.dispatch = recording_dispatch
    return modes


def full_graph_counts(steps: list[StepGeometry]) -> dict:
    uniform = [s for s in steps if s.uniform_decode]
    may_keep_full = [s for s in uniform if not s.snapkv_jobs]
    kept_full_before = [s for s in may_keep_full if not s.decode_captures]
    return {
        "steps": len(steps),
        "uniform_decode_steps": len(uniform),
        "steps_with_snapkv_jobs": sum(s.snapkv_jobs for s in steps),
        "steps_with_decode_captures": sum(s.decode_captures for s in steps),
        "may_keep_full": len(may_keep_full),
        "fraction_of_steps": len(may_keep_full) / max(len(steps), 1),
        "fraction_of_uniform_decode": len(may_keep_full) / max(len(uniform), 1),
        "before_fraction_of_steps": len(kept_full_before) / max(len(steps), 1),
    }


def main(argv: list[str] | None = None) -> None:
    from benchmarks.common import make_llm
    from benchmarks.performance.long_generation import params, prompt_ids
    from vllm_snapkv.demo_model import build_demo_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=100)
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--kv-blocks", type=int, default=64)
    parser.add_argument("--budget", type=int, default=256)
    parser.add_argument("--decode-interval", type=int, default=256)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/long-generation"))
    parser.add_argument("--smoke", action="store_true", help="tiny sizes for a quick check")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="capture CUDA graphs (a GPU) and count the modes dispatched")
    args = parser.parse_args(argv)
    if args.smoke:
        args.requests, args.tokens, args.kv_blocks = 3, 300, 12
        args.budget, args.decode_interval = 256, 128
    # As long_generation.engine (SmolLM2 float32, KV memory of kv_blocks 128-token blocks).
    block_bytes = 30 * 3 * 64 * 2 * 4 * 128
    config = {"method": "snapkv", "budget": args.budget, "window_size": 32,
              "decode_interval": args.decode_interval}
    llm = make_llm(
        str(build_demo_model()), args.budget,
        max_model_len=args.prompt + args.requests + args.tokens, max_num_batched_tokens=2048,
        kv_cache_memory_bytes=args.kv_blocks * block_bytes, enforce_eager=not args.cuda_graphs,
        additional_config={"kv_compression": config},
    )
    steps = record_step_geometry(scheduler_of(llm))
    modes = record_dispatched_modes(llm) if args.cuda_graphs else []
    for index in range(args.requests):
        llm.llm_engine.add_request(f"graph-{index}",
                                   {"prompt_token_ids": prompt_ids(llm, args.prompt + index)},
                                   params(args.tokens))
    while llm.llm_engine.has_unfinished_requests():
        llm.llm_engine.step()
    llm.llm_engine.engine_core.shutdown()
    counts = full_graph_counts(steps)
    for mode in sorted(set(modes)):
        counts[f"dispatched_{mode}"] = modes.count(mode)
    progress(f"{counts}")
    text = (
        f"Machine: {machine()}. Steps that may keep a FULL CUDA graph under decode compression "
        f"(`python -m benchmarks.performance.graph_steps`): the CPU scheduler's schedule of "
        f"{args.requests} requests ({args.prompt}-token prompts, {args.tokens} output tokens "
        f"each), KV cache of {args.kv_blocks} blocks, budget {args.budget}, window 32, "
        f"decode_interval {args.decode_interval}. A step may keep FULL when it is a "
        "uniform-decode batch with no compaction and no prompt window capture (decode window "
        "captures are graph-safe); `before_fraction_of_steps`: decode window captures excluding "
        "FULL too, as before the capture ring.\n\n"
        + markdown_table([counts]) + "\n"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    name = "graph-steps" + ("-cuda" if args.cuda_graphs else "") + ("-smoke" if args.smoke else "")
    (args.out / f"{name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
