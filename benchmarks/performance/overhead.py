"""(d) Selection + compaction time as a fraction of the prefill step.

    python -m benchmarks.performance.overhead [--smoke]
"""

from __future__ import annotations

from benchmarks.common import (
    length_sweep_parser,
    sweep_llm,
    machine,
    markdown_table,
    progress,
    worker_state_of,
    write_csv,
)
from benchmarks.performance.engine_steps import run_one
from vllm_snapkv.tasks import passkey_prompt


def main(argv=None) -> list[dict]:
    parser = length_sweep_parser(__doc__, "1000,2000,4000,6000", "benchmarks/results/overhead")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if args.smoke:
        args.lengths, args.budget, args.repeats = "600", 256, 1
    llm = sweep_llm(args, enforce_eager=args.smoke)
    rows = []
    for length in (int(n) for n in args.lengths.split(",")):
        progress(f"~{length} filler tokens")
        prompt = passkey_prompt(length, 4242, 0.5)
        samples = []
        for _ in range(args.repeats):
            full = run_one(llm, prompt, None, max_tokens=1)
            before = worker_state_of(llm).compaction_seconds
            snap = run_one(llm, prompt, args.budget, max_tokens=1)
            compaction = worker_state_of(llm).compaction_seconds - before
            samples.append((compaction, snap["prefill_s"], full["prefill_s"], full["prompt_tokens"]))
        # Minimum of each quantity over the repeats: the least disturbed measurement of each.
        compaction, snap_prefill, full_prefill = (min(column) for column in list(zip(*samples))[:3])
        prompt_tokens = samples[0][3]
        rows.append({
            "prompt_tokens": prompt_tokens, "budget": args.budget,
            "compaction_ms": 1000 * compaction, "prefill_step_ms": 1000 * snap_prefill,
            "overhead_fraction": compaction / snap_prefill,
            "full_prefill_step_ms": 1000 * full_prefill,
            "step_time_ratio": snap_prefill / full_prefill,
        })
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(args.out / "overhead.csv", rows)
    text = (f"Machine: {machine()}. compaction = selection + gather + cache write, all 30 layers; "
            f"best of {args.repeats}.\n\n" + markdown_table(rows))
    (args.out / "table.md").write_text(text + "\n")
    print(text)
    return rows


if __name__ == "__main__":
    main()
