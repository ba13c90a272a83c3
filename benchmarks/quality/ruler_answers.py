"""What RULER's aggregation answers list, per mode of a run (``benchmarks.quality.ruler``'s
``samples.jsonl``): common words (``ruler_cwe``) and frequent words (``ruler_fwe``).

RULER scores these tasks by containment: the share of the reference words that appear anywhere in
the completion. A completion that lists many of the prompt's words scores on every reference among
them, whatever the question asked for (the 10 or the 3 most frequent). Small models often answer by
copying the list from its start, so a selection that makes them copy longer lists scores higher
without counting better (docs/results.md, "Why the aggregation tasks move"). Two readings separate
the two, per sample and mode:

- ``distinct``: how many distinct words of the prompt's list the completion names;
- ``first-k``: the share of the references among the first ``k`` distinct list words it names,
  ``k`` the number of references (what the question asks for).

    python -m benchmarks.quality.ruler_answers --out benchmarks/results/ruler-cwe-gemma-3-270m-4096

prints the table and writes ``answers.md`` and ``answers.csv`` beside ``samples.jsonl``.
"""

from __future__ import annotations

import argparse
import csv
import re
import statistics
from pathlib import Path

from benchmarks.quality.ruler import paired_difference, read_jsonl

#: Where each task's list starts in the prompt (after the instruction) and where it ends (the
#: question), as lm_eval 0.4.13's RULER templates write them.
LIST_STARTS = {"ruler_cwe": "\n", "ruler_fwe": "coded words."}
LIST_END = "\nQuestion:"
WORD = re.compile(r"[A-Za-z]+")


def list_words(prompt: str, task: str) -> set[str]:
    """The words of the prompt's list (not of its instruction or question)."""
    start = prompt.index(LIST_STARTS[task]) + len(LIST_STARTS[task])
    return set(WORD.findall(prompt[start:prompt.rindex(LIST_END)]))


def named_words(text: str, vocabulary: set[str]) -> list[str]:
    """The distinct vocabulary words ``text`` names, in the order it first names them."""
    return list(dict.fromkeys(w for w in WORD.findall(text) if w in vocabulary))


def answer_rows(samples: list[dict], modes: list[str]) -> list[dict]:
    """Per aggregation sample and mode: RULER's score, ``distinct`` and ``first-k``."""
    rows = []
    for sample in samples:
        if sample["task"] not in LIST_STARTS:
            continue
        vocabulary = list_words(sample["prompt"], sample["task"])
        references = sample["references"]
        for mode in modes:
            output = sample["outputs"].get(mode)
            if output is None:
                continue
            named = named_words(output["text"], vocabulary)
            rows.append({
                "task": sample["task"], "doc_id": sample["doc_id"], "mode": mode,
                "score": 100 * output["score"], "distinct": len(named),
                "first_k": 100 * sum(w in references for w in named[: len(references)])
                / len(references),
            })
    return rows


def snapkv_mode(mode: str) -> str | None:
    """The SnapKV mode at ``mode``'s budget (``rule-256`` -> ``snapkv-256``); None for the full
    cache and for SnapKV itself."""
    rule, _, budget = mode.rpartition("-")
    return f"snapkv-{budget}" if budget.isdigit() and rule != "snapkv" else None


def summary_table(rows: list[dict], modes: list[str]) -> str:
    """Markdown: per task and mode, the means of the three readings, and ``score`` and
    ``first-k`` paired against SnapKV at the same budget (± standard error) on the samples both
    hold."""
    lines = ["| task | mode | n | score | first-k | distinct (mean / median) "
             "| score − SnapKV | first-k − SnapKV |", "|---" * 8 + "|"]
    for task in sorted({row["task"] for row in rows}):
        by_mode = {mode: {r["doc_id"]: r for r in rows if r["task"] == task and r["mode"] == mode}
                   for mode in modes}
        for mode in modes:
            held = by_mode[mode]
            if not held:
                continue
            base = by_mode.get(snapkv_mode(mode), {})
            docs = sorted(held.keys() & base.keys())
            paired = []
            for key in ("score", "first_k"):
                if not docs:
                    paired.append("")
                    continue
                mean, error = paired_difference([held[d][key] for d in docs],
                                                [base[d][key] for d in docs])
                paired.append(f"{mean:+.1f} ± {error:.1f}")
            distinct = [r["distinct"] for r in held.values()]
            lines.append(
                f"| {task} | {mode} | {len(held)} "
                f"| {statistics.mean(r['score'] for r in held.values()):.1f} "
                f"| {statistics.mean(r['first_k'] for r in held.values()):.1f} "
                f"| {statistics.mean(distinct):.1f} / {statistics.median(distinct):g} "
                f"| {paired[0]} | {paired[1]} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="a RULER run's directory")
    parser.add_argument("--modes", help="comma-separated modes (default: every mode held)")
    args = parser.parse_args(argv)
    samples = read_jsonl(args.out / "samples.jsonl")
    held = list(dict.fromkeys(m for s in samples if s["task"] in LIST_STARTS for m in s["outputs"]))
    if not held:
        raise SystemExit(f"{args.out / 'samples.jsonl'} holds no {' or '.join(LIST_STARTS)} sample")
    modes = args.modes.split(",") if args.modes else held
    unknown = [mode for mode in modes if mode not in held]
    if unknown:
        raise SystemExit(f"--modes: {', '.join(unknown)} not in this run; it holds {', '.join(held)}")
    rows = answer_rows(samples, modes)
    table = summary_table(rows, modes)
    (args.out / "answers.md").write_text(table + "\n")
    with open(args.out / "answers.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(table)
    return table


if __name__ == "__main__":
    main()
