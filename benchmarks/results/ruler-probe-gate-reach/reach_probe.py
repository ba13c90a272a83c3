"""Selection-level screen (a probe record, not a benchmark; README here): does the rare-token
gate of ``snapkv-rare-continuation`` let the carried runs be longer? Once only rare tokens start
runs, there are fewer of them, so each may reach further at the same budget. Variants differ only
in the reach: ``reach_share`` 32 (the plugin's rule: 7 at 1/16 of 4K), 16, 8, and the fixed 24.

Transformers' eager forward (float32, CPU) of a developer model; kept positions from the plugin's
dense selection on every full-attention layer's post-RoPE queries and keys. Per sample and rule:
on common words (``ruler_cwe``) the leading list items kept whole and in a row, summed over
layers; on the other tasks the reference answer's tokens kept, summed over layers and KV heads,
and the number of (layer, KV head) pairs that keep every answer token.

    P=benchmarks/results/ruler-probe-gate-reach
    .venv/bin/python $P/reach_probe.py gemma-3-270m 256 > $P/gemma-1-16.txt
    .venv/bin/python $P/reach_probe.py Qwen2.5-Coder-1.5B-Instruct 256 > $P/qwen-1-16.txt
"""
import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

RESULTS = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(RESULTS / "ruler-probe-copy-gemma-3-270m-4096"))
sys.path.insert(0, str(RESULTS / "ruler-probe-runs-gemma-3-270m-4096"))
from copy_probe import leading_items_kept, list_items  # noqa: E402
from position_stats import WINDOW, answer_positions, post_rope_queries_and_keys  # noqa: E402

from vllm_snapkv.scoring import SnapKVRareContinuationScore  # noqa: E402
from vllm_snapkv.selection import select_kept_positions  # noqa: E402

SAMPLES = {
    "gemma-3-270m": (("ruler-snapkv-chunk-gemma-3-270m-4096", "niah_single_2", 8),
                     ("ruler-snapkv-chunk-gemma-3-270m-4096", "niah_multiquery", 8),
                     ("ruler-snapkv-chunk-gemma-3-270m-4096", "ruler_fwe", 8),
                     ("ruler-cwe-gemma-3-270m-4096", "ruler_cwe", 16)),
    "Qwen2.5-Coder-1.5B-Instruct": (("ruler-Qwen2.5-Coder-1.5B-Instruct-4096", "niah_multikey_2", 4),
                                    ("ruler-Qwen2.5-Coder-1.5B-Instruct-4096", "ruler_vt", 4),
),
}


def rare_rule(share: int, reach: int = 24) -> SnapKVRareContinuationScore:
    variant = type(f"Rare{share}", (SnapKVRareContinuationScore,), {"reach_share": share, "reach": reach})
    return variant()


RULES = {"snapkv": "snapkv", "scaled": "snapkv-scaled-continuation", "rare32": rare_rule(32),
         "rare16": rare_rule(16), "rare-fixed24": rare_rule(1)}


def load_probe_model(name: str):
    """The tokenizer, the float32 eager model, its full-attention layers and the attention scale."""
    model_dir = Path.home() / ".cache/vllm-snapkv" / name
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    config = model.config
    types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    layers = [i for i, kind in enumerate(types) if kind == "full_attention"]
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    scale = (getattr(config, "query_pre_attn_scalar", None) or head_dim) ** -0.5
    return tokenizer, model, layers, scale


def main() -> None:
    name, budget = sys.argv[1], int(sys.argv[2])
    tokenizer, model, layers, scale = load_probe_model(name)
    print(f"# {name}, budget {budget}, window {WINDOW}, full-attention layers {layers}", flush=True)
    for run, task, limit in SAMPLES[name]:
        rows = [json.loads(line) for line in open(RESULTS / run / "samples.jsonl")]
        for row in [r for r in rows if r["task"] == task][:limit]:
            ids = row["prompt_token_ids"]
            captured = post_rope_queries_and_keys(model, ids)
            if task == "ruler_cwe":
                items = list_items(tokenizer, ids)
            else:
                refs = row["references"] if isinstance(row["references"], list) else [row["references"]]
                answers = answer_positions(tokenizer, ids, refs)
            line = [f"{task} doc {row['doc_id']:2d}" + ("" if task == "ruler_cwe" else f" ({len(answers)} answer tokens)")]
            for label, rule in RULES.items():
                total, whole = 0, 0
                for layer in layers:
                    q, k = captured[layer]
                    wq, keys = q[:, -WINDOW:].permute(1, 0, 2), k.permute(1, 0, 2)
                    kept_rows = select_kept_positions(wq, keys, budget, scale, score=rule,
                                                      token_ids=torch.tensor(ids))
                    for kept in map(set, kept_rows.tolist()):
                        if task == "ruler_cwe":
                            total += leading_items_kept(items, kept)
                        else:
                            total += len(kept & answers)
                            whole += answers <= kept
                line.append(f"{label} {total}" + ("" if task == "ruler_cwe" else f"/{whole}"))
            print(" | ".join(line), flush=True)


if __name__ == "__main__":
    main()
