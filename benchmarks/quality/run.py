"""Long-context retrieval accuracy: full cache vs SnapKV (plugin) vs dense reference (transformers).

    python -m benchmarks.quality.run                  # the published grid (~12 min on 2 cores)
    python -m benchmarks.quality.run --smoke          # tiny grid, seconds

Writes ``rows.csv`` (one row per prompt and budget), ``table.md`` and ``accuracy.png`` into
``--out``, and prints the table.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
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
from vllm_snapkv.plan import frees_blocks
from vllm_snapkv.tasks import make_task


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="passkey,multikey,query_first")
    parser.add_argument("--lengths", default="1000,2000,4000,6000", help="filler tokens")
    parser.add_argument("--depths", default="0.1,0.5,0.9")
    parser.add_argument("--budgets", default="64,128,256,512,1024")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--window-size", type=int, default=32, help="SnapKV observation window")
    parser.add_argument("--kernel-size", type=int, default=7, help="SnapKV pooling kernel (odd)")
    parser.add_argument("--no-reference", action="store_true")
    parser.add_argument(
        "--kv-cache-gib", type=float, default=6.0,
        help="vLLM KV cache; the default holds all 36 prompts of the grid at once",
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/quality"))
    parser.add_argument("--smoke", action="store_true", help="tiny grid for the test suite")
    args = parser.parse_args(argv)
    if args.smoke:
        args.tasks, args.lengths, args.depths, args.budgets = "passkey", "300", "0.5", "64,128"
        args.max_new_tokens, args.kv_cache_gib = 8, 0.5
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    from vllm_snapkv.demo_model import build_demo_model

    model_dir = str(build_demo_model())
    budgets = [int(b) for b in args.budgets.split(",")]
    tasks = [
        make_task(kind, int(length), float(depth), seed=0)
        for kind in args.tasks.split(",")
        for length in args.lengths.split(",")
        for depth in args.depths.split(",")
    ]
    kv_cache_bytes = int(args.kv_cache_gib * 2**30)
    snapkv = {"window_size": args.window_size, "kernel_size": args.kernel_size}
    # The smoke run skips torch.compile (most of its time): it checks the table, not speed.
    llm = make_llm(model_dir, budget=max(budgets), kv_cache_memory_bytes=kv_cache_bytes,
                   enforce_eager=args.smoke, **snapkv)
    prompts = [task.prompt for task in tasks]
    prompt_lens = [len(ids) for ids in llm.get_tokenizer()(prompts).input_ids]
    plugin: dict[int | None, list[bool]] = {}
    plugin_texts: dict[int | None, list[str]] = {}
    stats = scheduler_of(llm)._snapkv.stats
    block_size = scheduler_of(llm)._snapkv.block_size
    for budget in [None, *budgets]:
        progress(f"vLLM, {'full cache' if budget is None else f'budget {budget}'}: {len(tasks)} prompts")
        compressed_before = stats.compressed_requests
        outputs = llm.generate(prompts, sampling(budget, args.max_new_tokens), use_tqdm=False)
        plugin_texts[budget] = [o.outputs[0].text for o in outputs]
        plugin[budget] = [t.is_correct(text) for t, text in zip(tasks, plugin_texts[budget])]
        expected = 0 if budget is None else sum(
            frees_blocks(length, budget, 0, block_size) for length in prompt_lens
        )
        if stats.compressed_requests - compressed_before != expected:
            # A request that kept its full cache (pool exhausted) would be scored as SnapKV.
            raise RuntimeError(
                f"budget {budget}: {stats.compressed_requests - compressed_before} of {expected} "
                "prompts were compressed (KV cache exhausted): raise --kv-cache-gib"
            )

    reference: dict[int, list[bool]] = defaultdict(list)
    reference_texts: dict[int, list[str]] = defaultdict(list)
    if not args.no_reference:
        from benchmarks.quality.reference import DenseSnapKVReference

        dense = DenseSnapKVReference(model_dir, block_size=block_size, **snapkv)
        for index, task in enumerate(tasks):
            progress(f"reference {index + 1}/{len(tasks)}: {task.kind} {prompt_lens[index]} tokens")
            texts = dense.generate(task.prompt, budgets, args.max_new_tokens)
            for budget in budgets:
                reference[budget].append(task.is_correct(texts[budget]))
                reference_texts[budget].append(texts[budget])

    rows = []
    for index, task in enumerate(tasks):
        for budget in budgets:
            rows.append({
                "task": task.kind,
                "filler_tokens": task.target_tokens,
                "depth": task.depth,
                "prompt_tokens": prompt_lens[index],
                "budget": budget,
                "full_cache": int(plugin[None][index]),
                "plugin": int(plugin[budget][index]),
                "reference": int(reference[budget][index]) if reference else "",
                "answer": task.answer,
                "plugin_text": plugin_texts[budget][index],
                "reference_text": reference_texts[budget][index] if reference else "",
            })
    table = summarize(rows, has_reference=bool(reference))
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(args.out / "rows.csv", rows)
    text = (
        f"Machine: {machine()}. Window {args.window_size}, kernel {args.kernel_size}. "
        f"Correct answers out of n = {len(args.depths.split(','))} depths; "
        "same_text: completions of plugin and reference identical.\n\n"
    )
    text += markdown_table(table)
    (args.out / "table.md").write_text(text + "\n")
    plot(table, budgets, args.out / "accuracy.png")
    print(text)
    return rows


def summarize(rows: list[dict], has_reference: bool) -> list[dict]:
    cells: dict[tuple, dict] = {}
    for row in rows:
        key = (row["task"], row["filler_tokens"], row["budget"])
        cell = cells.setdefault(key, {
            "task": row["task"], "filler_tokens": row["filler_tokens"], "budget": row["budget"],
            "prompt_tokens": 0, "n": 0, "full_cache": 0, "plugin": 0, "reference": 0, "same_text": 0,
        })
        cell["n"] += 1
        cell["prompt_tokens"] = max(cell["prompt_tokens"], row["prompt_tokens"])
        for column in ("full_cache", "plugin", "reference"):
            cell[column] += int(row[column] or 0)
        cell["same_text"] += row["plugin_text"] == row["reference_text"]
    table = list(cells.values())
    for cell in table:
        cell["plugin_vs_reference"] = cell["plugin"] - cell["reference"] if has_reference else ""
        if not has_reference:
            cell["reference"] = cell["same_text"] = ""
    return table


def plot(table: list[dict], budgets: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = sorted({c["task"] for c in table})
    lengths = sorted({c["filler_tokens"] for c in table})
    fig, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds), 4), squeeze=False)
    for axis, kind in zip(axes[0], kinds):
        for length in lengths:
            cells = sorted(
                (c for c in table if c["task"] == kind and c["filler_tokens"] == length),
                key=lambda c: c["budget"],
            )
            xs = [c["budget"] for c in cells]
            line, = axis.plot(xs, [c["plugin"] / c["n"] for c in cells], "o-", label=f"{length} plugin")
            if cells and cells[0]["reference"] != "":
                axis.plot(xs, [c["reference"] / c["n"] for c in cells], "x--", color=line.get_color(),
                          label=f"{length} reference")
            axis.axhline(cells[0]["full_cache"] / cells[0]["n"], color=line.get_color(), alpha=0.3)
        axis.set_xscale("log", base=2)
        axis.set_xticks(budgets, [str(b) for b in budgets])
        axis.set_ylim(-0.05, 1.05)
        axis.set_title(f"{kind} (faint line: full cache)")
        axis.set_xlabel("budget C (tokens per KV head)")
        axis.set_ylabel("accuracy")
        axis.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
