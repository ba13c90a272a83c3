"""(c) Decode time per output token vs context length: full cache vs SnapKV, and a prompt of
length C with the full cache (the physical limit).

    python -m benchmarks.performance.decode [--smoke]
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
    parser = length_sweep_parser(__doc__, "1000,2000,4000,6000", "benchmarks/results/decode")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    if args.smoke:
        args.lengths, args.budget, args.max_tokens, args.repeats = "600", 256, 6, 1
    llm = sweep_llm(args, enforce_eager=args.smoke)

    def best(prompt: str, budget: int | None) -> dict:
        runs = [run_one(llm, prompt, budget, args.max_tokens) for _ in range(args.repeats)]
        return min(runs, key=lambda r: r["decode_ms_per_token"])

    # A prompt about C tokens long, full cache: what decoding over C entries costs.
    short = best(passkey_prompt(max(args.budget - 60, 24), 1234, 0.5), None)
    progress(f"physical limit: {short['prompt_tokens']}-token prompt, "
             f"{short['decode_ms_per_token']:.2f} ms/token")
    rows = []
    for length in (int(n) for n in args.lengths.split(",")):
        progress(f"~{length} filler tokens")
        prompt = passkey_prompt(length, 4242, 0.5)
        full, snap = best(prompt, None), best(prompt, args.budget)
        rows.append({
            "prompt_tokens": full["prompt_tokens"], "budget": args.budget,
            "full_ms_per_token": full["decode_ms_per_token"],
            "snapkv_ms_per_token": snap["decode_ms_per_token"],
            "speedup": full["decode_ms_per_token"] / snap["decode_ms_per_token"],
            "prompt_C_ms_per_token": short["decode_ms_per_token"],
            "snapkv_over_prompt_C": snap["decode_ms_per_token"] / short["decode_ms_per_token"],
        })
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(args.out / "decode.csv", rows)
    plot_full_vs_snapkv(
        rows, "full_ms_per_token", "snapkv_ms_per_token", "decode ms / output token",
        args.out / "decode.png", reference=(short["decode_ms_per_token"], "prompt of length C"),
    )
    text = (f"Machine: {machine()}. Single request, greedy, {args.max_tokens} output tokens, "
            f"best of {args.repeats}; prompt_C = a {short['prompt_tokens']}-token prompt, full cache.\n\n"
            + markdown_table(rows))
    (args.out / "table.md").write_text(text + "\n")
    print(text)
    return rows


if __name__ == "__main__":
    main()
