"""Fifth probe round on Gemma 3 270M (a probe record, not a benchmark; README here). Kept
positions come from transformers' eager forward of the same weights and the plugin's dense
selection (``select_kept_positions``), completions from a run's samples.jsonl. Two reports:

``copy``: common words (RULER's ruler_cwe). How far each completion copies the prompt's numbered
list from its start ("1. w1 2. w2 ..." matching items 1, 2, ... in order), beside how many
leading list items ("N. word", every token) each mode's rule keeps contiguously in each of the
three full-attention layers.

``sources``: where ``snapkv-scaled-continuation``'s runs come from. For each prefix position the
rule keeps beyond SnapKV's selection, the source position whose carried score won it
(``argmax_d decay**d * score[p - d]``, ``d <= reach``); per source: its token, how often that
token occurs in the prompt, positions it added (``*``: a reference answer token lies in its run).

    P=benchmarks/results/ruler-probe-copy-gemma-3-270m-4096
    .venv/bin/python $P/copy_probe.py copy benchmarks/results/ruler-cwe-gemma-3-270m-4096/samples.jsonl \\
        ruler_cwe 16 256 > $P/copy_stretch.txt
    .venv/bin/python $P/copy_probe.py sources \\
        benchmarks/results/ruler-snapkv-chunk-gemma-3-270m-4096/samples.jsonl niah_single_2 4 256
"""
import bisect
import json
import re
import sys
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "ruler-probe-runs-gemma-3-270m-4096"))
from position_stats import KERNEL, WINDOW, answer_positions, post_rope_queries_and_keys
from transformers import AutoModelForCausalLM, AutoTokenizer

from vllm_snapkv.scoring import SCORE_RULES
from vllm_snapkv.selection import (
    group_mean, pool_scores, select_kept_positions, window_attention_scores,
)

RULE = SCORE_RULES["snapkv-scaled-continuation"]


def list_items(tokenizer, ids: list[int]) -> list[tuple[range, str]]:
    """The numbered list's items in prompt order: the token positions of "N. word", the word."""
    ends = [len(tokenizer.decode(ids[: i + 1])) for i in range(len(ids))]
    text = tokenizer.decode(ids)
    start, stop = text.index("\n1. ") + 1, text.index("\nQuestion")
    items = []
    for match in re.finditer(r"(\d+)\. (\S+)", text[start:stop]):
        first = bisect.bisect_right(ends, start + match.start())
        last = bisect.bisect_left(ends, start + match.end())
        items.append((range(first, last + 1), match.group(2)))
    return items


def leading_items_kept(items: list[tuple[range, str]], kept: set[int]) -> int:
    """How many of the list's items, from the first on, ``kept`` holds whole (every token)."""
    count = 0
    while count < len(items) and all(t in kept for t in items[count][0]):
        count += 1
    return count


def copy_report(tokenizer, row, captured, layers, scale, budget) -> str:
    items = list_items(tokenizer, row["prompt_token_ids"])
    line = [f"doc {row['doc_id']:2d}"]
    for rule in ("snapkv", RULE.name):
        stretch = []
        for layer in layers:
            q, k = captured[layer]
            wq, keys = q[:, -WINDOW:].permute(1, 0, 2), k.permute(1, 0, 2)
            kept = set(select_kept_positions(wq, keys, budget, scale, score=rule)[0].tolist())
            stretch.append(leading_items_kept(items, kept))
        copied = 0
        for j, match in enumerate(re.finditer(r"(\d+)\.\s*(\S+)", row["outputs"][f"{rule}-{budget}"]["text"])):
            if j >= len(items) or match.group(2) != items[j][1]:
                break
            copied += 1
        line.append(f"{rule}-{budget}: kept-start items per layer {stretch} copied {copied}")
    return " | ".join(line)


def sources_report(tokenizer, row, captured, layers, scale, budget) -> str:
    ids = row["prompt_token_ids"]
    counts = Counter(ids)
    references = row["references"] if isinstance(row["references"], list) else [row["references"]]
    answers = answer_positions(tokenizer, ids, references)
    scores = {m: round(o["score"], 2) for m, o in row["outputs"].items()
              if m in ("full", f"snapkv-{budget}", f"{RULE.name}-{budget}")}
    out = [f"== {row['task']} doc {row['doc_id']} {scores}"]
    reach = RULE.reach_for(budget - WINDOW)
    for layer in layers:
        q, k = captured[layer]
        wq, keys = q[:, -WINDOW:].permute(1, 0, 2), k.permute(1, 0, 2)
        pooled = pool_scores(window_attention_scores(wq, keys, scale), KERNEL, "max")
        attention = group_mean(pooled, keys.shape[1])[0]  # Gemma 3 270M: one KV head
        snap = set(select_kept_positions(wq, keys, budget, scale, score="snapkv")[0].tolist())
        kept = set(select_kept_positions(wq, keys, budget, scale, score=RULE.name)[0].tolist())
        added = sorted(p for p in kept - snap if p < attention.shape[0])
        sources = Counter(
            max((float(attention[p - d]) * RULE.decay**d, p - d) for d in range(min(reach, p) + 1))[1]
            for p in added)
        described = [
            f"{tokenizer.decode([ids[s]])!r}x{counts[ids[s]]}:{n}"
            f"{'*' if any(a in answers for a in range(s, s + reach + 4)) else ''}"
            for s, n in sorted(sources.items(), key=lambda item: -item[1])]
        out.append(f"  L{layer}: added {len(added)} from {len(sources)} sources; "
                   f"answer tokens kept snapkv/rule {len(snap & answers)}/{len(kept & answers)}")
        out.append("    " + " ".join(described[:25]))
    return "\n".join(out)


def main() -> None:
    report, samples, task, limit, budget = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
    model_dir = Path.home() / ".cache/vllm-snapkv/gemma-3-270m"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    layers = [i for i, kind in enumerate(model.config.layer_types) if kind == "full_attention"]
    scale = model.config.query_pre_attn_scalar ** -0.5
    write = {"copy": copy_report, "sources": sources_report}[report]
    rows = [json.loads(line) for line in open(samples)]
    for row in [r for r in rows if r["task"] == task][:limit]:
        captured = post_rope_queries_and_keys(model, row["prompt_token_ids"])
        print(write(tokenizer, row, captured, layers, scale, budget), flush=True)


if __name__ == "__main__":
    main()
