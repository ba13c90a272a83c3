"""(a) KV blocks held per request right after prefill vs prompt length: full cache vs SnapKV.

    python -m benchmarks.performance.memory [--smoke]
"""

from __future__ import annotations

from benchmarks.common import (
    length_sweep_parser,
    sweep_llm,
    machine,
    markdown_table,
    plot_full_vs_snapkv,
    progress,
    write_csv,
)
from benchmarks.performance.engine_steps import run_one
from vllm_snapkv.tasks import passkey_prompt


def main(argv=None) -> list[dict]:
    parser = length_sweep_parser(__doc__, "500,1000,2000,4000,6000", "benchmarks/results/memory")
    args = parser.parse_args(argv)
    if args.smoke:
        args.lengths, args.budget = "600", 256
    llm = sweep_llm(args, enforce_eager=True)
    rows = []
    for length in (int(n) for n in args.lengths.split(",")):
        progress(f"prompt of ~{length} filler tokens")
        prompt = passkey_prompt(length, 4242, 0.5)
        full = run_one(llm, prompt, None, max_tokens=2)
        snap = run_one(llm, prompt, args.budget, max_tokens=2)
        ratio = full["blocks"] / snap["blocks"]
        ideal = full["prompt_tokens"] / args.budget
        rows.append({
            "prompt_tokens": full["prompt_tokens"], "budget": args.budget,
            "full_blocks": full["blocks"], "snapkv_blocks": snap["blocks"],
            "blocks_ratio": ratio, "L_over_C": ideal,
            "target_met": ratio >= 0.95 * ideal if full["prompt_tokens"] > args.budget else "n/a",
        })
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(args.out / "memory.csv", rows)
    plot_full_vs_snapkv(rows, "full_blocks", "snapkv_blocks", "KV blocks held after prefill",
                        args.out / "memory.png")
    text = f"Machine: {machine()}. Block size 128.\n\n" + markdown_table(rows)
    (args.out / "table.md").write_text(text + "\n")
    print(text)
    return rows


if __name__ == "__main__":
    main()
