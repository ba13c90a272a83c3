"""How SnapKV's kept positions spread over the prompt, per RULER sample and Gemma 3 full-attention
layer (a probe record, not a benchmark; README here). Per layer, at ``budget``: clusters (groups
of SnapKV's top ``budget - 32`` positions separated by more than 8 positions), the 64-position
blocks its top 64 and top 16 positions touch (the ``<bos>`` plateau 0-3 left out), the effective
number of positions (exp of the entropy of the normalised scores) and the share of the score the
top ``budget - 32`` hold.

    .venv/bin/python benchmarks/results/ruler-probe-signals-gemma-3-270m-4096/spread_stats.py \
        benchmarks/results/ruler-continuation-gemma-3-270m-4096/samples.jsonl 4 256 > spread_stats.jsonl
"""
import json, sys
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "ruler-probe-runs-gemma-3-270m-4096"))
from position_stats import post_rope_queries_and_keys, WINDOW, KERNEL
from transformers import AutoModelForCausalLM
from vllm_snapkv.selection import group_mean, pool_scores, window_attention_scores

samples, per_task, budget = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
tasks = sys.argv[4].split(",") if len(sys.argv) > 4 else None
model_dir = str(Path.home() / ".cache/vllm-snapkv/gemma-3-270m")
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
config = model.config
layers = [i for i, kind in enumerate(config.layer_types) if kind == "full_attention"]
scale = config.query_pre_attn_scalar ** -0.5
rows = [json.loads(l) for l in open(samples)]
seen = {}
out = []
for row in rows:
    if tasks and row["task"] not in tasks: continue
    if seen.get(row["task"], 0) >= per_task: continue
    seen[row["task"]] = seen.get(row["task"], 0) + 1
    ids = row["prompt_token_ids"]
    o = row["outputs"]
    sc = {k: round(o[k]["score"], 2) for k in ("full", f"snapkv-{budget}", f"snapkv-scaled-continuation-{budget}") if k in o}
    captured = post_rope_queries_and_keys(model, ids)
    stats = []
    for layer in layers:
        q, k = captured[layer]
        wq, keys = q[:, -WINDOW:].permute(1, 0, 2), k.permute(1, 0, 2)
        att = window_attention_scores(wq, keys, scale)
        pooled = pool_scores(att, KERNEL, "max")
        s = group_mean(pooled, keys.shape[1])[0]
        n = s.shape[0]
        P = budget - WINDOW
        top = torch.topk(s, P).indices.sort().values
        gaps = (top[1:] - top[:-1])
        clusters = int((gaps > 8).sum()) + 1
        top64 = torch.topk(s[4:], 64).indices + 4
        blocks64 = len(set((top64 // 64).tolist()))
        top16 = torch.topk(s[4:], 16).indices + 4
        blocks16 = len(set((top16 // 64).tolist()))
        p = s[4:] / s[4:].sum()
        eff = float(torch.exp(-(p * torch.log(p + 1e-30)).sum()))
        mass_top = float(torch.topk(s[4:], P).values.sum() / s[4:].sum())
        stats.append((layer, clusters, blocks64, blocks16, round(eff), round(mass_top, 2)))
    rec = dict(task=row["task"], doc=row["doc_id"], n=len(ids), scores=sc, stats=stats)
    out.append(rec)
    print(json.dumps(rec), flush=True)
