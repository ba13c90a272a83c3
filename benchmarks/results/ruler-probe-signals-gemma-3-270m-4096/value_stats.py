"""Are the positions SnapKV keeps repeated tokens? Per RULER sample and Gemma 3 full-attention
layer (a probe record, not a benchmark; README here): of the top ``(budget - 32) // 2``
positions by the pooled score ("pooled") and by the raw window attention ("raw"), the
``<bos>`` plateau 0-3 left out, the mean over positions of the largest cosine similarity of its
value to another such position more than 8 away, and the share of positions where that
similarity exceeds 0.9.

    .venv/bin/python benchmarks/results/ruler-probe-signals-gemma-3-270m-4096/value_stats.py \
        benchmarks/results/ruler-continuation-gemma-3-270m-4096/samples.jsonl 2 256 \
        niah_single_1,niah_single_2,niah_multikey_1,ruler_cwe,ruler_fwe,ruler_vt,niah_multikey_2
"""
import json, sys
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "ruler-probe-runs-gemma-3-270m-4096"))
from position_stats import post_rope_queries_and_keys, WINDOW, KERNEL
from transformers import AutoModelForCausalLM
from vllm_snapkv.selection import group_mean, pool_scores, window_attention_scores

samples, per_task, budget = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
tasks = sys.argv[4].split(",")
model_dir = str(Path.home() / ".cache/vllm-snapkv/gemma-3-270m")
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
config = model.config
layers = [i for i, kind in enumerate(config.layer_types) if kind == "full_attention"]
scale = config.query_pre_attn_scalar ** -0.5
values = {}
for layer in layers:
    model.model.layers[layer].self_attn.v_proj.register_forward_hook(
        lambda mod, inp, out, layer=layer: values.__setitem__(layer, out[0].detach()))
rows = [json.loads(l) for l in open(samples)]
seen = {}
for row in rows:
    if row["task"] not in tasks or seen.get(row["task"], 0) >= per_task: continue
    seen[row["task"]] = seen.get(row["task"], 0) + 1
    ids = row["prompt_token_ids"]
    o = row["outputs"]
    sc = [round(o[k]["score"], 2) for k in ("full", f"snapkv-{budget}", f"snapkv-scaled-continuation-{budget}") if k in o]
    captured = post_rope_queries_and_keys(model, ids)
    stats = []
    for layer in layers:
        q, k = captured[layer]
        wq, keys = q[:, -WINDOW:].permute(1, 0, 2), k.permute(1, 0, 2)
        s = group_mean(pool_scores(window_attention_scores(wq, keys, scale), KERNEL, "max"), keys.shape[1])[0]
        raw = window_attention_scores(wq, keys, scale).mean(0)
        P = budget - WINDOW
        v = values[layer][: s.shape[0]]
        v = torch.nn.functional.normalize(v, dim=-1)
        res = []
        for name, sel in (("pooled", s), ("raw", raw)):
            top = torch.topk(sel[4:], P // 2).indices + 4
            sim = v[top] @ v[top].T
            dist = (top[:, None] - top[None, :]).abs()
            sim[dist <= 8] = -1
            mx = sim.max(1).values
            res += [round(float(mx.mean()), 2), round(float((mx > 0.9).float().mean()), 2)]
        stats.append((layer, *res))
    print(f"{row['task']:16s} {row['doc_id']} {sc} " + "  ".join(f"L{a}: pooled mean {b} >.9 {c} | raw mean {d} >.9 {e}" for a, b, c, d, e in stats), flush=True)
