"""Gemma 3 270M, a hybrid model (5 sliding-window KV cache groups + 1 full-attention group):
KV blocks per group, retrieval accuracy and plugin = reference with SnapKV.

    python -m benchmarks.hybrid.gemma3                      # the published run
    python -m benchmarks.hybrid.gemma3 --smoke              # tiny sizes for the test suite
    python -m benchmarks.hybrid.gemma3 --full-only          # full cache only, plugin inert

SnapKV compresses the full-attention group (layers 5, 11, 17); vLLM manages the sliding-window
groups (window 512) as it does without the plugin. Three parts (``--parts``):

- ``memory``: one request alone, stepped by hand, for each prompt length; the blocks it holds in
  each KV cache group (vLLM's ``req_to_blocks``, the sliding groups' null placeholders not
  counted) and vLLM's ``kv_cache_manager.usage``, right after the prefill step and after the first
  decode step (vLLM frees the sliding groups' blocks that left the window when it next allocates
  for the request). Full cache (the request opts out) vs SnapKV at ``--budget``.
- ``quality``: passkey and multi-key retrieval (``vllm_snapkv.tasks``), full cache vs SnapKV
  budgets; correct answers out of the depths. Each pass starts from an empty prefix cache.
- ``reference``: the positions the plugin kept (its selection dump) in the full-attention layers
  of one prompt, against the dense transformers reference of ``tests/model_zoo.py``.

Writes ``memory.csv``, ``memory.png``, ``quality.csv``, ``quality_rows.csv``, ``quality.png``,
``reference.csv`` and ``table.md`` into ``--out`` and prints the tables.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import (
    machine,
    make_llm,
    markdown_table,
    progress,
    sampling,
    scheduler_of,
    write_csv,
)
from vllm_snapkv.tasks import make_task, passkey_prompt

ROOT = Path(__file__).resolve().parents[2]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="memory,quality,reference")
    parser.add_argument("--lengths", default="2000,4000,8000,16000",
                        help="memory: filler tokens, comma-separated (~ prompt tokens for Gemma)")
    parser.add_argument("--budget", type=int, default=512, help="memory and reference budget")
    parser.add_argument("--tasks", default="passkey,multikey")
    parser.add_argument("--quality-lengths", default="2000,4000", help="filler tokens")
    parser.add_argument("--depths", default="0.2,0.5,0.8")
    parser.add_argument("--budgets", default="256,512,1024,2048", help="quality budgets")
    parser.add_argument("--reference-length", type=int, default=2000, help="filler tokens")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--window-size", type=int, default=32)
    parser.add_argument("--kernel-size", type=int, default=7)
    parser.add_argument("--max-model-len", type=int, default=32768)
    parser.add_argument("--kv-cache-gib", type=float, default=2.0)
    parser.add_argument("--full-only", action="store_true",
                        help="no kv_compression in the engine (plugin inert): full-cache rows")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gemma3"))
    parser.add_argument("--smoke", action="store_true", help="tiny sizes for the test suite")
    args = parser.parse_args(argv)
    if args.smoke:
        args.lengths, args.budget = "1000", 256
        args.tasks, args.quality_lengths, args.depths = "passkey", "1000", "0.5"
        args.budgets = "256"
        args.reference_length, args.kv_cache_gib, args.max_model_len = 1000, 0.5, 4096
    args.parts = args.parts.split(",")
    unknown = set(args.parts) - {"memory", "quality", "reference"}
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}")
    if args.full_only and "reference" in args.parts:
        args.parts.remove("reference")  # nothing to compare without compression
    return args


# --- memory ---------------------------------------------------------------------------------


def group_kinds(llm) -> list[str]:
    """``global`` or ``sliding`` per KV cache group, in vLLM's group order."""
    groups = scheduler_of(llm).kv_cache_config.kv_cache_groups
    return [
        "sliding" if getattr(g.kv_cache_spec, "sliding_window", None) else "global" for g in groups
    ]


def held_per_group(scheduler, request_id: str) -> list[int]:
    managers = scheduler.kv_cache_manager.coordinator.single_type_managers
    return [
        sum(not block.is_null for block in manager.req_to_blocks.get(request_id, ()))
        for manager in managers
    ]


def measure_request(llm, prompt: str, budget: int | None, max_tokens: int = 3) -> dict:
    """One request alone, stepped by hand: blocks per group and usage after the prefill step and
    after the first decode step; the pool's free count must come back."""
    engine = llm.llm_engine
    scheduler = scheduler_of(llm)
    pool = scheduler.kv_cache_manager.block_pool
    llm.reset_prefix_cache()
    free_at_start = pool.get_num_free_blocks()
    request_id = f"gemma3-{time.monotonic_ns()}"
    engine.add_request(request_id, prompt, sampling(budget, max_tokens))
    snapshots, prefill_s, internal = [], None, None
    while engine.has_unfinished_requests():
        started = time.perf_counter()
        engine.step()
        prefill_s = prefill_s or time.perf_counter() - started
        if internal is None:
            (internal,) = [r for r in scheduler.requests if r.startswith(request_id)]
        if len(snapshots) < 2 and internal in scheduler.requests:
            usage = scheduler.kv_cache_manager.usage
            snapshots.append((held_per_group(scheduler, internal), usage))
    if pool.get_num_free_blocks() != free_at_start:
        raise RuntimeError(
            f"{pool.get_num_free_blocks()} free blocks after the request, {free_at_start} before"
        )
    prompt_len = len(llm.get_tokenizer()(prompt).input_ids)
    return {"prompt_tokens": prompt_len, "prefill_s": prefill_s, "snapshots": snapshots}


def memory_rows(llm, args, modes: list[int | None]) -> list[dict]:
    kinds = group_kinds(llm)
    rows = []
    for length in (int(n) for n in args.lengths.split(",")):
        prompt = passkey_prompt(length, 4242, 0.5)
        for budget in modes:
            mode = "full cache" if budget is None else f"budget {budget}"
            progress(f"memory: ~{length} tokens, {mode}")
            got = measure_request(llm, prompt, budget)
            row = {"prompt_tokens": got["prompt_tokens"],
                   "mode": "full" if budget is None else "snapkv",
                   "budget": "" if budget is None else budget}
            for label, (held, usage) in zip(("prefill", "decode"), got["snapshots"]):
                global_ = [n for n, kind in zip(held, kinds) if kind == "global"]
                slide = [n for n, kind in zip(held, kinds) if kind == "sliding"]
                row[f"{label}_global"] = "/".join(map(str, global_))
                row[f"{label}_sliding"] = (
                    str(slide[0]) if len(set(slide)) == 1 else "/".join(map(str, slide))
                )
                row[f"{label}_total"] = sum(held)
                row[f"{label}_usage"] = round(usage, 4)
            row["prefill_s"] = round(got["prefill_s"], 2)
            rows.append(row)
    return rows


def plot_memory(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for mode, marker in (("full", "o"), ("snapkv", "s")):
        mine = [r for r in rows if r["mode"] == mode]
        if not mine:
            continue
        name = "full cache" if mode == "full" else f"SnapKV C={mine[0]['budget']}"
        xs = [r["prompt_tokens"] for r in mine]
        globals_ = [sum(int(n) for n in str(r["prefill_global"]).split("/")) for r in mine]
        axes[0].plot(xs, globals_, marker + "-", label=name)
        axes[1].plot(xs, [r["prefill_total"] for r in mine], marker + "-",
                     label=f"{name}, after prefill")
        axes[1].plot(xs, [r["decode_total"] for r in mine], marker + "--",
                     label=f"{name}, decoding")
    axes[0].set_title("full-attention group (3 layers)")
    axes[1].set_title("all 6 KV cache groups")
    for axis in axes:
        axis.set_xlabel("prompt tokens")
        axis.set_ylabel("KV blocks held (128 tokens)")
        axis.set_ylim(bottom=0)
        axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# --- quality --------------------------------------------------------------------------------


def quality_rows(llm, args, budgets: list[int | None]) -> tuple[list[dict], list[dict]]:
    from vllm_snapkv.plan import frees_blocks

    tasks = [
        make_task(kind, int(length), float(depth), seed=0)
        for kind in args.tasks.split(",")
        for length in args.quality_lengths.split(",")
        for depth in args.depths.split(",")
    ]
    prompts = [task.prompt for task in tasks]
    prompt_lens = [len(ids) for ids in llm.get_tokenizer()(prompts).input_ids]
    state = getattr(scheduler_of(llm), "_snapkv", None)
    rows = []
    for budget in budgets:
        progress(f"quality: {'full cache' if budget is None else f'budget {budget}'}, "
                 f"{len(tasks)} prompts")
        before = state.stats.compressed_requests if state else 0
        # Every pass prefills from scratch: no prefix-cache hit on the previous pass's blocks.
        llm.reset_prefix_cache()
        started = time.perf_counter()
        outputs = llm.generate(prompts, sampling(budget, args.max_new_tokens), use_tqdm=False)
        seconds = time.perf_counter() - started
        if budget is not None:
            block_size = state.block_size
            expected = sum(frees_blocks(n, budget, 0, block_size) for n in prompt_lens)
            if state.stats.compressed_requests - before != expected:
                raise RuntimeError(
                    f"budget {budget}: {state.stats.compressed_requests - before} of {expected} "
                    "prompts were compressed (KV cache exhausted?): raise --kv-cache-gib"
                )
        progress(f"  {seconds:.0f} s")
        for task, n, output in zip(tasks, prompt_lens, outputs):
            text = output.outputs[0].text
            rows.append({
                "task": task.kind, "filler_tokens": task.target_tokens, "depth": task.depth,
                "prompt_tokens": n, "budget": "full" if budget is None else budget,
                "compressed": int(budget is not None
                                  and frees_blocks(n, budget, 0, state.block_size)),
                "correct": int(task.is_correct(text)), "answer": task.answer, "text": text,
            })
    cells: dict[tuple, dict] = {}
    for row in rows:
        cell = cells.setdefault((row["task"], row["filler_tokens"]), {
            "task": row["task"], "filler_tokens": row["filler_tokens"], "prompt_tokens": 0, "n": 0,
        })
        cell["prompt_tokens"] = max(cell["prompt_tokens"], row["prompt_tokens"])
        column = "full_cache" if row["budget"] == "full" else f"C={row['budget']}"
        cell[column] = cell.get(column, 0) + row["correct"]
        if row["budget"] == "full":
            cell["n"] += 1
    return rows, list(cells.values())


def plot_quality(table: list[dict], budgets: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(5.5, 3.8))
    for cell in table:
        line, = axis.plot(budgets, [cell[f"C={b}"] / cell["n"] for b in budgets], "o-",
                          label=f"{cell['task']} {cell['prompt_tokens']} tok")
        axis.axhline(cell["full_cache"] / cell["n"], color=line.get_color(), alpha=0.3)
    axis.set_xscale("log", base=2)
    axis.set_xticks(budgets, [str(b) for b in budgets])
    axis.set_ylim(-0.05, 1.05)
    axis.set_xlabel("budget C (tokens per KV head, full-attention layers)")
    axis.set_ylabel("accuracy (faint: full cache)")
    axis.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# --- plugin = reference ---------------------------------------------------------------------


def reference_rows(llm, args, model_dir: str, dump_dir: str) -> list[dict]:
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from model_zoo import reference_kept_positions_for

    ids = llm.get_tokenizer()(passkey_prompt(args.reference_length, 31415, 0.5)).input_ids
    progress(f"reference: plugin on a {len(ids)}-token prompt, budget {args.budget}")
    request_id = f"gemma3-ref-{time.monotonic_ns()}"
    llm.reset_prefix_cache()
    llm.llm_engine.add_request(request_id, {"prompt_token_ids": ids},
                               sampling(args.budget, max_tokens=2))
    while llm.llm_engine.has_unfinished_requests():
        llm.llm_engine.step()
    (path,) = glob.glob(os.path.join(dump_dir, f"{request_id}-*.pt"))
    dumped = torch.load(path)["layers"]
    progress("reference: transformers (eager, float32)")
    expected = reference_kept_positions_for(
        model_dir, ids, args.budget, args.window_size, args.kernel_size
    )
    if sorted(dumped) != sorted(expected):
        raise RuntimeError(
            f"plugin compressed layers {sorted(dumped)}, reference {sorted(expected)}"
        )
    rows = []
    for layer in sorted(expected):
        for head, want in enumerate(expected[layer]):
            got = set(dumped[layer][head].tolist())
            rows.append({
                "prompt_tokens": len(ids), "budget": args.budget, "layer": layer, "kv_head": head,
                "kept": len(got), "same_as_reference": len(got & want),
                "fraction": len(got & want) / len(want),
            })
    return rows


# --- main -----------------------------------------------------------------------------------


def main(argv=None) -> dict[str, list[dict]]:
    args = parse_args(argv)
    from vllm_snapkv.gemma3_model import build_gemma3_model

    model_dir = str(build_gemma3_model())
    quality_budgets = [int(b) for b in args.budgets.split(",")]
    server_budget = max([args.budget, *quality_budgets])
    dump_dir = tempfile.mkdtemp(prefix="gemma3-dumps-")
    compression = {} if args.full_only else {"kv_compression": {
        "method": "snapkv", "budget": server_budget, "window_size": args.window_size,
        "kernel_size": args.kernel_size, "pooling": "max", "dump_selections_to": dump_dir,
    }}
    started = time.perf_counter()
    llm = make_llm(
        model_dir, server_budget, additional_config=compression, enforce_eager=True,
        max_model_len=args.max_model_len, max_num_batched_tokens=args.max_model_len,
        kv_cache_memory_bytes=int(args.kv_cache_gib * 2**30),
    )
    progress(f"engine up in {time.perf_counter() - started:.0f} s")
    snapkv = [] if args.full_only else [args.budget]
    header = (
        f"Machine: {machine()}. Gemma 3 270M (base), float32, block size "
        f"{scheduler_of(llm).kv_cache_config.kv_cache_groups[0].kv_cache_spec.block_size}, "
        f"KV cache groups: {', '.join(group_kinds(llm))}. Window {args.window_size}, "
        f"kernel {args.kernel_size}, max pooling.\n"
    )
    sections, results = [header], {}
    args.out.mkdir(parents=True, exist_ok=True)
    if "memory" in args.parts:
        rows = memory_rows(llm, args, [None, *snapkv])
        write_csv(args.out / "memory.csv", rows)
        plot_memory(rows, args.out / "memory.png")
        sections.append("## Memory: KV blocks held per group (prefill, then first decode step)\n\n"
                        + markdown_table(rows))
        results["memory"] = rows
    if "quality" in args.parts:
        budgets = [None] if args.full_only else [None, *quality_budgets]
        rows, table = quality_rows(llm, args, budgets)
        write_csv(args.out / "quality_rows.csv", rows)
        write_csv(args.out / "quality.csv", table)
        if not args.full_only:
            plot_quality(table, quality_budgets, args.out / "quality.png")
        uncompressed = sorted({
            f"{r['task']} {r['prompt_tokens']} tokens at C={r['budget']}"
            for r in rows if r["budget"] != "full" and not r["compressed"]
        })
        note = ("\n\nNot compressed (prompt within the budget, the full cache is kept): "
                + "; ".join(uncompressed) + ".") if uncompressed else ""
        sections.append(
            f"## Retrieval: correct answers out of n = {len(args.depths.split(','))} depths "
            f"({args.depths}), {args.max_new_tokens} greedy tokens\n\n" + markdown_table(table)
            + note
        )
        results["quality"] = rows
    if "reference" in args.parts:
        rows = reference_rows(llm, args, model_dir, dump_dir)
        write_csv(args.out / "reference.csv", rows)
        sections.append("## Plugin = reference: kept positions per full-attention layer\n\n"
                        + markdown_table(rows))
        results["reference"] = rows
    text = "\n\n".join(sections)
    (args.out / "table.md").write_text(text + "\n")
    print(text)
    llm.llm_engine.engine_core.shutdown()
    return results


if __name__ == "__main__":
    main()
