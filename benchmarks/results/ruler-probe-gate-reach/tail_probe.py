"""Selection-level screen (a probe record, not a benchmark; README here, "Screen 2"): on the
prompts whose completions are on record, which variant of the step-gated runs keeps the answer
where ``snapkv-rare-continuation`` answers (Gemma 3's needles at 1/16) and where
``snapkv-rare-long-continuation`` answers (Qwen's multi-key needle at 1/16)?

Transformers' eager forward (float32, CPU); kept positions from the plugin's dense selection on
every full-attention layer's post-RoPE queries and keys. Per sample and variant: the reference
answer's tokens kept (summed over layers and KV heads) / the (layer, KV head) pairs keeping every
answer token. The bracket holds the completions' scores on record at that budget.

    P=benchmarks/results/ruler-probe-gate-reach
    .venv/bin/python $P/tail_probe.py gemma-3-270m 256 ruler-continuation-gemma-3-270m-4096 \
        niah_single_2,niah_multikey_1,niah_single_1 4 > $P/gemma-tail-1-16.txt
    .venv/bin/python $P/tail_probe.py Qwen2.5-Coder-1.5B-Instruct 256 \
        ruler-Qwen2.5-Coder-1.5B-Instruct-4096 niah_multikey_2 4 > $P/qwen-tail-1-16.txt
"""
import json
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(RESULTS / "ruler-probe-runs-gemma-3-270m-4096"))
from position_stats import WINDOW, answer_positions, post_rope_queries_and_keys  # noqa: E402
from reach_probe import load_probe_model  # noqa: E402

from vllm_snapkv.scoring import SnapKVRareStepContinuationScore  # noqa: E402
from vllm_snapkv.selection import select_kept_positions  # noqa: E402


def step_variant(reach_share: int, steps_share: int, tail: float = 1.0, counted: bool = True):
    """The step-gated rule with another reach, rare-token count or tail (``counted=False``: no
    count, only the reach)."""
    fields = {"reach_share": reach_share, "rare_steps_share": steps_share, "tail_decay": tail}
    if not counted:  # the tail starts at the short reach, but runs pass any number of rare tokens
        fields["rare_steps_for"] = lambda self, prefix: max(1, min(self.reach, prefix // 32))
        fields["score"] = _uncounted_score
    return type(f"Step{reach_share}_{steps_share}_{tail}", (SnapKVRareStepContinuationScore,), fields)()


def _uncounted_score(self, attention, window, budget, values=None, metric=None, token_features=None):
    short = self.rare_steps_for(budget - window)
    carried = attention.clone()
    sources = attention * token_features
    for d in range(1, min(self.reach_for(budget - window), attention.shape[1] - 1) + 1):
        step = sources[:, :-d] * (self.decay**d * self.tail_decay ** max(0, d - short))
        torch.maximum(carried[:, d:], step, out=carried[:, d:])
    return torch.stack([attention, carried])


RULES = {"snapkv": "snapkv", "scaled": "snapkv-scaled-continuation",
         "rare32": "snapkv-rare-continuation", "rare16": "snapkv-rare-long-continuation",
         "step16/32": "snapkv-rare-step-continuation", "step16/64": step_variant(16, 64),
         "step8/64": step_variant(8, 64), "step16/128": step_variant(16, 128),
         "stepT.8": "snapkv-rare-tail-continuation", "stepT.6": step_variant(16, 32, 0.6),
         "rare16T.8": step_variant(16, 32, 0.8, counted=False),
         "rare16T.6": step_variant(16, 32, 0.6, counted=False), "stepT.8r8": step_variant(8, 32, 0.8)}


def main() -> None:
    name, budget, run, tasks, limit = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
    docs = {int(doc) for doc in sys.argv[6].split(",")} if len(sys.argv) > 6 else None  # doc ids only
    tokenizer, model, layers, scale = load_probe_model(name)
    print(f"# {name} budget {budget} layers {layers}", flush=True)
    rows = [json.loads(line) for line in open(RESULTS / run / "samples.jsonl")]
    for task in tasks.split(","):
        for row in [r for r in rows if r["task"] == task and (docs is None or r["doc_id"] in docs)][:limit]:
            ids = row["prompt_token_ids"]
            captured = post_rope_queries_and_keys(model, ids)
            refs = row["references"] if isinstance(row["references"], list) else [row["references"]]
            answers = answer_positions(tokenizer, ids, refs)
            outputs = row["outputs"]
            known = " ".join(f"{key.removesuffix(f'-{budget}')}={outputs[key]['score']:.0f}"
                             for key in outputs if key.endswith(f"-{budget}")
                             and (key.startswith("snapkv-rare") or key == f"snapkv-{budget}"))
            line = [f"{task} {row['doc_id']} ({len(answers)}) [{known}]"]
            for label, rule in RULES.items():
                total = whole = 0
                for layer in layers:
                    q, k = captured[layer]
                    kept_rows = select_kept_positions(q[:, -WINDOW:].permute(1, 0, 2), k.permute(1, 0, 2),
                                                      budget, scale, score=rule, token_ids=torch.tensor(ids))
                    for kept in map(set, kept_rows.tolist()):
                        total += len(kept & answers)
                        whole += answers <= kept
                line.append(f"{label} {total}/{whole}")
            print(" | ".join(line), flush=True)


if __name__ == "__main__":
    main()
