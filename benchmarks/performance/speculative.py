"""N-gram speculative decoding with and without SnapKV: draft acceptance and output tokens/s.

    python -m benchmarks.performance.speculative [--smoke]

Two engines on the demo model: one with n-gram speculation, one without; each serves the same
batch twice, compressed (SnapKV at ``--budget``, with ``--decode-interval``) and with the full
cache (the request opts out), so compression on/off share an engine. Two workloads: ``copy``
(the prompt asks to repeat a text, the drafts come from it) and ``passkey`` (retrieval over
filler text, the usual long-context request). Acceptance comes from vLLM's own counters
(``vllm:spec_decode_num_accepted_tokens`` / ``..._num_draft_tokens``); tokens/s is the batch's
output tokens over its wall time (greedy, ``ignore_eos``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from benchmarks.common import demo_llm, machine, markdown_table, progress, write_csv
from vllm_snapkv.tasks import passkey_prompt

VERSES = (
    "The quick brown fox jumps over the lazy dog, and the dog sleeps in the warm sun. ",
    "A river runs past the old mill, where the miller counts his sacks of grain. ",
    "Seven ships left the harbour at dawn, each flying a flag of a different colour. ",
    "The library keeps its oldest maps in a locked room under the north stairs. ",
)


def copy_prompt(index: int, num_tokens: int) -> str:
    verse = VERSES[index % len(VERSES)]
    return "Copy this text exactly, again and again:\n" + verse * max(1, num_tokens // 20)


def workload(name: str, batch: int, num_tokens: int) -> list[str]:
    if name == "copy":
        return [copy_prompt(i, num_tokens) for i in range(batch)]
    return [passkey_prompt(num_tokens, 10007 + 97 * i, 0.3 + 0.1 * i) for i in range(batch)]


def spec_counters(llm) -> tuple[int, int]:
    """(accepted, drafted) tokens so far, from vLLM's metrics."""
    accepted = drafted = 0
    for metric in llm.get_metrics():
        if metric.name == "vllm:spec_decode_num_accepted_tokens":
            accepted += metric.value
        elif metric.name == "vllm:spec_decode_num_draft_tokens":
            drafted += metric.value
    return accepted, drafted


def run_batch(llm, prompts: list[str], compressed: bool, max_tokens: int) -> dict:
    from vllm import SamplingParams

    extra = None if compressed else {"kv_compression": "none"}
    params = SamplingParams(
        temperature=0.0, max_tokens=max_tokens, ignore_eos=True, extra_args=extra
    )
    llm.reset_prefix_cache()
    accepted, drafted = spec_counters(llm)
    started = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - started
    new_accepted, new_drafted = spec_counters(llm)
    num_out = sum(len(o.outputs[0].token_ids) for o in outputs)
    drafts = new_drafted - drafted
    return {
        "output_tokens": num_out,
        "seconds": seconds,
        "tokens_per_s": num_out / seconds,
        "draft_tokens": drafts,
        "accepted_tokens": new_accepted - accepted,
        "acceptance_rate": (new_accepted - accepted) / drafts if drafts else 0.0,
        "tokens": [list(o.outputs[0].token_ids) for o in outputs],
    }


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=int, default=256)
    parser.add_argument("--decode-interval", type=int, default=128)
    parser.add_argument("--num-drafts", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=1500)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/speculative"))
    parser.add_argument("--smoke", action="store_true", help="tiny sizes")
    args = parser.parse_args(argv)
    if args.smoke:
        args.prompt_tokens, args.max_tokens, args.batch = 400, 24, 2

    rows, tokens = [], {}
    for speculate in (False, True):
        options = dict(
            enforce_eager=True,
            max_num_batched_tokens=2048,
            disable_log_stats=False,
            additional_config={"kv_compression": {
                "method": "snapkv", "budget": args.budget, "window_size": 32,
                "kernel_size": 7, "decode_interval": args.decode_interval,
            }},
        )
        if speculate:
            options["speculative_config"] = {
                "method": "ngram", "num_speculative_tokens": args.num_drafts,
                "prompt_lookup_min": 2, "prompt_lookup_max": 4,
            }
        progress(f"engine: speculation {'ngram' if speculate else 'off'}")
        llm = demo_llm(args.budget, **options)
        for name in ("copy", "passkey"):
            prompts = workload(name, args.batch, args.prompt_tokens)
            run_batch(llm, prompts[:1], True, 8)  # warm-up
            for compressed in (False, True):
                result = run_batch(llm, prompts, compressed, args.max_tokens)
                tokens[(name, compressed, speculate)] = result.pop("tokens")
                rows.append({
                    "workload": name,
                    "kv_cache": f"snapkv {args.budget}" if compressed else "full",
                    "speculation": f"ngram k={args.num_drafts}" if speculate else "off",
                    **result,
                })
                progress(f"{rows[-1]}")
        llm.llm_engine.engine_core.shutdown()
        del llm

    for row in rows:  # greedy speculation is lossless: the same tokens as without it
        key = (row["workload"], row["kv_cache"] != "full")
        row["same_tokens_as_no_speculation"] = tokens[(*key, True)] == tokens[(*key, False)]
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(args.out / "speculative.csv", rows)
    text = (
        f"Machine: {machine()}. SmolLM2-135M fp32, eager, batch of {args.batch} prompts of "
        f"~{args.prompt_tokens} tokens, {args.max_tokens} output tokens each (greedy, "
        f"ignore_eos); SnapKV budget {args.budget}, window 32, decode_interval "
        f"{args.decode_interval}.\n\n" + markdown_table(rows)
    )
    (args.out / "table.md").write_text(text + "\n")
    print(text)
    return rows


if __name__ == "__main__":
    main()
