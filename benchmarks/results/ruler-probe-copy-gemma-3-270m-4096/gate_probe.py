"""Selection-level screen of a candidate for the next round (a probe record, not a benchmark;
README here): ``snapkv-scaled-continuation`` with the carry gated by how often the source
position's token occurs in the prompt (a score is carried forward only from positions whose
token occurs at most ``max_count`` times). No completions: per sample
and full-attention layer, on common words the leading list items kept contiguously (what
copy_stretch.txt shows the completion copies), on the needle and frequent words the reference
answer tokens kept.

    P=benchmarks/results/ruler-probe-copy-gemma-3-270m-4096
    .venv/bin/python $P/gate_probe.py 16 > $P/gate_probe.txt
"""
import json
import sys
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "ruler-probe-runs-gemma-3-270m-4096"))
from copy_probe import leading_items_kept, list_items
from position_stats import WINDOW, answer_positions, post_rope_queries_and_keys
from transformers import AutoModelForCausalLM, AutoTokenizer

from vllm_snapkv.scoring import ContinuationScore, SnapKVScaledContinuationScore
from vllm_snapkv.selection import select_kept_positions

RESULTS = Path(__file__).resolve().parent.parent
SAMPLES = (("ruler-snapkv-chunk-gemma-3-270m-4096", "niah_single_2", 8),
           ("ruler-snapkv-chunk-gemma-3-270m-4096", "ruler_fwe", 8),
           ("ruler-cwe-gemma-3-270m-4096", "ruler_cwe", 16))


class GatedScaledContinuation(SnapKVScaledContinuationScore):
    """Probe only: the carried track sees zero attention at positions whose token is frequent.
    (Built into the plugin afterwards as ``snapkv-rare-continuation``, which reads the token ids
    itself; the same selection up to 4K tokens with ``max_count`` 16.)"""

    name = "gated-scaled-continuation"

    def __init__(self, carries: torch.Tensor):
        self.carries = carries  # [n] bool: the position's token occurs at most max_count times

    def score(self, attention, window, budget, values=None, metric=None, token_features=None):
        gated = attention * self.carries[: attention.shape[1]]
        carried = ContinuationScore.score(self, gated, window, budget)  # this class's reach
        rest = torch.maximum(carried[0], attention)  # a position keeps its own score
        return torch.stack([attention, rest])


def main() -> None:
    max_count = int(sys.argv[1])
    model_dir = Path.home() / ".cache/vllm-snapkv/gemma-3-270m"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    layers = [i for i, kind in enumerate(model.config.layer_types) if kind == "full_attention"]
    scale = model.config.query_pre_attn_scalar ** -0.5
    budget = 256
    for run, task, limit in SAMPLES:
        rows = [json.loads(line) for line in open(RESULTS / run / "samples.jsonl")]
        for row in [r for r in rows if r["task"] == task][:limit]:
            ids = row["prompt_token_ids"]
            counts = Counter(ids)
            carries = torch.tensor([counts[t] <= max_count for t in ids], dtype=torch.float32)
            rules = {"snapkv": "snapkv", "scaled": "snapkv-scaled-continuation",
                     "gated": GatedScaledContinuation(carries)}
            captured = post_rope_queries_and_keys(model, ids)
            if task == "ruler_cwe":
                items = list_items(tokenizer, ids)
            else:
                refs = row["references"] if isinstance(row["references"], list) else [row["references"]]
                answers = answer_positions(tokenizer, ids, refs)
            line = [f"{task} doc {row['doc_id']:2d}"]
            for label, rule in rules.items():
                per_layer = []
                for layer in layers:
                    q, k = captured[layer]
                    wq, keys = q[:, -WINDOW:].permute(1, 0, 2), k.permute(1, 0, 2)
                    kept = set(select_kept_positions(wq, keys, budget, scale, score=rule)[0].tolist())
                    if task == "ruler_cwe":
                        per_layer.append(leading_items_kept(items, kept))
                    else:
                        per_layer.append(len(kept & answers))
                line.append(f"{label} {per_layer}")
            print(" | ".join(line), flush=True)


if __name__ == "__main__":
    main()
