"""Shared benchmark plumbing: an in-process vLLM engine on the demo model, tables, progress."""

from __future__ import annotations

import argparse
import csv
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

# In-process engine core: the benchmarks read vLLM's block pool and the worker's timers.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def make_llm(
    model_dir: str, budget: int, window_size: int = 32, kernel_size: int = 7, **overrides
):
    from vllm import LLM

    options = dict(
        dtype="float32",
        max_model_len=8192,
        max_num_batched_tokens=8192,
        gpu_memory_utilization=0.3,
        kv_cache_memory_bytes=1 << 30,
        seed=0,
        additional_config={"kv_compression": {
            "method": "snapkv", "budget": budget, "window_size": window_size,
            "kernel_size": kernel_size,
        }},
    )
    options.update(overrides)
    return LLM(model_dir, **options)


def demo_llm(budget: int, **overrides):
    """``make_llm`` on the demo model (converted on first use)."""
    from vllm_snapkv.demo_model import build_demo_model

    return make_llm(str(build_demo_model()), budget, **overrides)


def sweep_llm(args: argparse.Namespace, **overrides):
    """The engine a length sweep asked for: the demo model on the CPU by default, or
    ``--model``/``--dtype``/``--max-model-len``/``--kv-cache-gib`` (e.g. an 8B model on a GPU)."""
    overrides.setdefault("dtype", args.dtype)
    overrides.setdefault("max_model_len", args.max_model_len)
    overrides.setdefault("max_num_batched_tokens", args.max_model_len)
    overrides.setdefault("kv_cache_memory_bytes", int(args.kv_cache_gib * 2**30))
    if args.model is None:
        return demo_llm(args.budget, **overrides)
    overrides.setdefault("gpu_memory_utilization", 0.9)
    return make_llm(args.model, args.budget, **overrides)


def length_sweep_parser(doc: str, lengths: str, out: str) -> argparse.ArgumentParser:
    """The options every prompt-length sweep shares; a script adds its own before parsing."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--lengths", default=lengths, help="filler tokens, comma-separated")
    parser.add_argument("--budget", type=int, default=512)
    parser.add_argument("--out", type=Path, default=Path(out))
    parser.add_argument("--smoke", action="store_true", help="tiny sizes for the test suite")
    add_model_options(parser)
    return parser


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="default: the embedded demo model")
    parser.add_argument("--dtype", default="float32", help="float32 for the demo model on CPU")
    parser.add_argument("--max-model-len", type=int, default=8192)
    parser.add_argument("--kv-cache-gib", type=float, default=1.0)


def scheduler_of(llm):
    return llm.llm_engine.engine_core.engine_core.scheduler


def worker_state_of(llm):
    """The in-process worker's SnapKV state (timers), or None."""
    executor = llm.llm_engine.engine_core.engine_core.model_executor
    return executor.driver_worker.worker.model_runner.__dict__.get("_snapkv")


def sampling(budget: int | None, max_tokens: int):
    """Greedy; ``budget=None`` = full cache (the request opts out)."""
    from vllm import SamplingParams

    extra = {"kv_compression": "none"} if budget is None else {"snapkv_budget": budget}
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, extra_args=extra)


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}, " + (
        datetime.now(timezone.utc).strftime("%Y-%m-%d")
    )


def write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def markdown_table(rows: list[dict], columns: list[str] | None = None) -> str:
    columns = columns or list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row[c]) for c in columns) + " |")
    return "\n".join(lines)


def _cell(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def plot_full_vs_snapkv(
    rows: list[dict], full_key: str, snapkv_key: str, ylabel: str, path: Path,
    reference: tuple[float, str] | None = None,
) -> None:
    """One line per mode against the prompt length (+ an optional horizontal reference)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r["prompt_tokens"] for r in rows]
    fig, axis = plt.subplots(figsize=(5, 3.5))
    axis.plot(xs, [r[full_key] for r in rows], "o-", label="full cache")
    axis.plot(xs, [r[snapkv_key] for r in rows], "s-", label=f"SnapKV C={rows[0]['budget']}")
    if reference is not None:
        axis.axhline(reference[0], color="gray", ls="--", label=reference[1])
    axis.set_xlabel("prompt tokens")
    axis.set_ylabel(ylabel)
    axis.set_ylim(bottom=0)
    axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
