"""Per-position statistics behind this probe's README (a probe record, not a benchmark).

For RULER samples of a run directory, on Gemma 3's three full-attention layers: the pooled
SnapKV scores from transformers' eager forward of the same weights, the top 8 positions, how
many tokens of the reference answers each rule keeps, and for `snapkv-scaled-continuation` the
positions it adds to SnapKV's selection with the ratio of their own score to the score carried
to them (for needle samples also per answer token: SnapKV rank, ratio, kept or not).

    .venv/bin/python benchmarks/results/ruler-probe-runs-gemma-3-270m-4096/position_stats.py \\
        --samples benchmarks/results/ruler-snapkv-chunk-gemma-3-270m-4096/samples.jsonl \\
        --task ruler_fwe --limit 8 --budget 256
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from vllm_snapkv.scoring import SCORE_RULES
from vllm_snapkv.selection import (
    group_mean, pool_scores, select_kept_positions, window_attention_scores,
)

WINDOW, KERNEL = 32, 7
RULES = ("snapkv", "snapkv-continuation", "snapkv-scaled-continuation")


def post_rope_queries_and_keys(model, ids: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, ``[H, L, D]`` queries and keys after RoPE (the model's own rotary code: the
    ``apply_rotary_pos_emb`` of its attention module's file, Gemma 3's or Qwen2's alike)."""
    modeling = sys.modules[type(model.model.layers[0].self_attn).__module__]
    captured, original = [], modeling.apply_rotary_pos_emb

    def capture(q, k, *args, **kwargs):
        q, k = original(q, k, *args, **kwargs)
        captured.append((q[0].detach(), k[0].detach()))
        return q, k

    modeling.apply_rotary_pos_emb = capture
    try:
        with torch.no_grad():
            model(torch.tensor([ids]))
    finally:
        modeling.apply_rotary_pos_emb = original
    return captured


def answer_positions(tokenizer, ids: list[int], references: list[str]) -> set[int]:
    """Every occurrence of a reference's tokens in the prompt, with and without a leading space."""
    found: set[int] = set()
    for reference in references:
        for form in (" " + reference, reference):
            tokens = tokenizer(form, add_special_tokens=False)["input_ids"]
            for start in range(len(ids) - len(tokens) + 1):
                if ids[start:start + len(tokens)] == tokens:
                    found.update(range(start, start + len(tokens)))
    return found


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=str(Path.home() / ".cache/vllm-snapkv/gemma-3-270m"))
    parser.add_argument("--samples", type=Path, required=True)
    parser.add_argument("--task", required=True)
    parser.add_argument("--limit", type=int, default=8)
    parser.add_argument("--budget", type=int, default=256)
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(
        args.model, dtype=torch.float32, attn_implementation="eager")
    config = model.config
    layers = [i for i, kind in enumerate(config.layer_types) if kind == "full_attention"]
    scale = config.query_pre_attn_scalar ** -0.5
    rows = [json.loads(line) for line in open(args.samples)]
    for row in [r for r in rows if r["task"] == args.task][: args.limit]:
        ids = row["prompt_token_ids"]
        references = row["references"]
        references = references if isinstance(references, list) else [references]
        answers = answer_positions(tokenizer, ids, references)
        scored = {mode: round(out["score"], 2) for mode, out in row["outputs"].items()
                  if mode == "full" or mode.endswith(f"-{args.budget}")}
        print(f"== {args.task} doc {row['doc_id']} answers {references} "
              f"({len(answers)} tokens) scores {scored}")
        captured = post_rope_queries_and_keys(model, ids)
        for layer in layers:
            q, k = captured[layer]
            window_queries, keys = q[:, -WINDOW:].permute(1, 0, 2), k.permute(1, 0, 2)
            attention = window_attention_scores(window_queries, keys, scale)
            pooled = pool_scores(attention, KERNEL, "max")
            scores = group_mean(pooled, keys.shape[1])[0]  # Gemma 3 270M: one KV head
            prefix = scores.shape[0]
            order = torch.sort(scores, descending=True, stable=True).indices
            rank = torch.empty_like(order)
            rank[order] = torch.arange(prefix)
            top = [(int(p), tokenizer.decode([ids[p]]), round(float(scores[p] / scores.sum()), 3))
                   for p in order[:8]]
            kept = {rule: set(select_kept_positions(window_queries, keys, args.budget, scale,
                                                    score=rule)[0].tolist()) for rule in RULES}
            # The rule's own second track: SnapKV's score carried forward at this budget.
            carried = SCORE_RULES["snapkv-scaled-continuation"].score(
                scores[None], WINDOW, args.budget)[1, 0]
            added = sorted(p for p in kept["snapkv-scaled-continuation"] - kept["snapkv"]
                           if p < prefix)
            ratios = sorted(float(scores[p] / carried[p]) for p in added)
            median = ratios[len(ratios) // 2] if ratios else float("nan")
            print(f"  layer {layer}: top 8 {top}")
            print(f"    answer tokens kept: "
                  f"{ {rule: len(positions & answers) for rule, positions in kept.items()} }; "
                  f"added by the scaled rule {len(added)}, own/carried median {median:.3g}")
            if args.task.startswith("niah"):
                tokens = sorted(p for p in answers if p < prefix)
                print(f"    answer ranks {[int(rank[p]) for p in tokens]} own/carried "
                      f"{[round(float(scores[p] / carried[p]), 3) for p in tokens]}")


if __name__ == "__main__":
    main()
