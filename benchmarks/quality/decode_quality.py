"""Quality of decode compression: perplexity of a fixed long continuation scored with the
compressed vs the full cache, and next-token agreement with the full cache, in the transformers
reference (benchmarks/quality/decode_reference.py, which the plugin equals: tests/
test_decode_compression.py).

    python -m benchmarks.quality.decode_quality [--smoke]

The text is natural English that ships with Python (the reference-manual topics of
``pydoc_data``): a ``--prompt``-token prompt, then ``--continuation`` tokens fed one at a time
(teacher forcing). Each setting scores every continuation token with the cache it would have
while generating; "agreement" is the fraction of steps whose greedy next token equals the
full cache's at the same step.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from benchmarks.common import machine, markdown_table, progress, write_csv
from benchmarks.quality.decode_reference import DecodeSnapKVReference


def fixed_text_ids(tokenizer, num_tokens: int) -> list[int]:
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    text = "\n\n".join(topics[key] for key in sorted(topics))
    ids = tokenizer(text).input_ids
    if len(ids) < num_tokens:
        raise SystemExit(f"the fixed text has only {len(ids)} tokens")
    return ids[:num_tokens]


def score(reference: DecodeSnapKVReference, ids: list[int], prompt: int) -> dict:
    """Teacher-forced run; returns per-token log-probs and greedy picks."""
    forced = ids[prompt:]
    run = reference.run(ids[:prompt], len(forced), forced=forced)
    return {"log_probs": run.forced_log_probs, "argmax": run.argmax,
            "compressions": len(run.compressions), "max_cache": max(run.cache_lengths)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", type=int, default=1024)
    parser.add_argument("--continuation", type=int, default=1536)
    parser.add_argument(
        "--settings", default="256:0,256:128,256:512,512:0,512:512",
        help="budget:decode_interval pairs (interval 0: prompt-only SnapKV)",
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/decode-quality"))
    parser.add_argument("--smoke", action="store_true", help="tiny sizes for the test suite")
    args = parser.parse_args(argv)
    if args.smoke:
        args.prompt, args.continuation, args.settings = 300, 200, "256:0,256:64"
    from transformers import AutoTokenizer

    from vllm_snapkv.demo_model import build_demo_model

    model_dir = str(build_demo_model())
    ids = fixed_text_ids(AutoTokenizer.from_pretrained(model_dir), args.prompt + args.continuation)
    progress("full cache")
    full = score(DecodeSnapKVReference(model_dir, budget=10**9), ids, args.prompt)
    rows = [{
        "budget": "full", "decode_interval": "-", "max_cache_entries": full["max_cache"],
        "compressions": 0,
        "perplexity": math.exp(-sum(full["log_probs"]) / len(full["log_probs"])),
        "agreement_with_full": 1.0,
    }]
    for setting in args.settings.split(","):
        budget, interval = (int(part) for part in setting.split(":"))
        progress(f"budget {budget}, decode_interval {interval}")
        result = score(
            DecodeSnapKVReference(model_dir, budget, 32, interval, 7, 128), ids, args.prompt
        )
        same = sum(a == b for a, b in zip(result["argmax"], full["argmax"]))
        rows.append({
            "budget": budget, "decode_interval": interval,
            "max_cache_entries": result["max_cache"], "compressions": result["compressions"],
            "perplexity": math.exp(-sum(result["log_probs"]) / len(result["log_probs"])),
            "agreement_with_full": same / len(full["argmax"]),
        })
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(args.out / "quality.csv", rows)
    text = (
        f"Machine: {machine()}. SmolLM2-135M float32, transformers reference; a {args.prompt}-"
        f"token prompt and a {args.continuation}-token continuation of Python's reference-manual "
        "text, teacher-forced; window 32, kernel 7, max pooling, block size 128.\n\n"
        + markdown_table(rows)
        + "\n"
    )
    (args.out / "table.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
