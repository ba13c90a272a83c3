"""Selection + compaction on the standard KV layout at 7B shapes: torch only, no vLLM.

What the plugin does at the end of one request's prefill on a GPU backend, layer by layer: read
the prompt's keys from the paged cache (a strided view of one shared buffer, as vLLM 0.32 lays it
out), score them with the observation window, pool, pick the top positions per KV head, gather
the kept K/V and write them into the request's target blocks. Timed with CUDA events per request
(all layers), for each prompt length and budget.

    python -m benchmarks.gpu.compaction                       # 7B shapes on cuda:0
    python -m benchmarks.gpu.compaction --smoke --device cpu  # tiny shapes (test suite)

Defaults: Llama-3.1-8B-like (32 layers, 32 query / 8 KV heads, head 128), bf16, 16-token blocks,
LBNHC (vLLM's default layout), prompts 8K-128K, budgets 1024/2048/4096, window 32, kernel 7.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from vllm_snapkv.adapter.layouts import PagedTokens
from vllm_snapkv.adapter.layouts.standard import StandardLayout
from vllm_snapkv.selection import select_kept_positions

#: Logical axes of a KV cache group, in vLLM's KVCacheLayout naming.
LOGICAL_AXES = "LBHNC"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def layer_caches(args, num_blocks: int, device) -> list[torch.Tensor]:
    """One buffer in ``args.kv_layout``'s physical order; a logical [B, H, N, C] view per layer."""
    logical = (args.layers, num_blocks, args.kv_heads, args.block_size, 2 * args.head_size)
    order = [LOGICAL_AXES.index(axis) for axis in args.kv_layout]
    buffer = torch.empty([logical[axis] for axis in order], dtype=DTYPES[args.dtype], device=device)
    buffer.normal_()
    whole = buffer.permute(*sorted(range(5), key=lambda i: order[i]))
    return list(whole.unbind(0))


def compact_request(args, caches, window_queries, source: PagedTokens, target_slots, budget):
    layout = StandardLayout()
    heads = torch.arange(args.kv_heads, device=target_slots.device)
    for layer, cache in enumerate(caches):
        keys = layout.read_keys(cache, source)
        kept = select_kept_positions(
            window_queries[layer], keys, budget, args.head_size**-0.5, args.kernel_size, "max"
        )
        per_slot = kept.T
        layout.write(cache, keys[per_slot, heads], layout.gather_values(cache, source, per_slot),
                     target_slots)


def synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(args, device, prompt_len: int, budget: int) -> dict:
    block_size = args.block_size
    prompt_blocks, target_blocks = -(-prompt_len // block_size), -(-budget // block_size)
    num_blocks = prompt_blocks + target_blocks + 1
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    caches = layer_caches(args, num_blocks, device)
    generator = torch.Generator().manual_seed(0)
    # Block 0 is vLLM's null block; sources are scattered, as after a busy pool.
    blocks = (torch.randperm(num_blocks - 1, generator=generator) + 1).tolist()
    source = PagedTokens.of(blocks[:prompt_blocks], block_size, prompt_len, device)
    target_slots = PagedTokens.of(blocks[prompt_blocks:], block_size, budget, device).slots()
    window_queries = torch.randn(
        args.layers, args.window, args.q_heads, args.head_size, dtype=DTYPES[args.dtype],
        device=device,
    )
    times = []
    for repeat in range(args.warmup + args.repeats):
        synchronize(device)
        started = time.perf_counter()
        compact_request(args, caches, window_queries, source, target_slots, budget)
        synchronize(device)
        if repeat >= args.warmup:
            times.append((time.perf_counter() - started) * 1e3)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    del caches
    return {
        "prompt_tokens": prompt_len, "budget": budget, "layers": args.layers,
        "ms_per_request": round(statistics.median(times), 3),
        "ms_per_layer": round(statistics.median(times) / args.layers, 4),
        "peak_gib": round(peak, 2) if peak is not None else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--q-heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-size", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--kv-layout", default="LBNHC", help="a vLLM KVCacheLayout name")
    parser.add_argument("--prompt-lens", default="8192,16384,32768,65536,131072")
    parser.add_argument("--budgets", default="1024,2048,4096")
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--kernel-size", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu-compaction"))
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (test suite)")
    args = parser.parse_args()
    if sorted(args.kv_layout) != sorted(LOGICAL_AXES):
        parser.error(f"--kv-layout must be a permutation of {LOGICAL_AXES}, got {args.kv_layout!r}")
    if args.smoke:
        args.layers, args.q_heads, args.kv_heads, args.head_size = 2, 4, 2, 16
        args.prompt_lens, args.budgets, args.warmup, args.repeats = "300", "64", 0, 1
    device = torch.device(args.device)
    rows = [
        measure(args, device, prompt_len, budget)
        for prompt_len in map(int, args.prompt_lens.split(","))
        for budget in map(int, args.budgets.split(","))
        if budget < prompt_len
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    setup = {k: str(v) for k, v in vars(args).items() if k != "out"}
    (args.out / "rows.json").write_text(json.dumps({"device": name, "setup": setup, "rows": rows},
                                                   indent=1))
    lines = [f"Device: {name}; {args.layers} layers, {args.q_heads}/{args.kv_heads} heads, "
             f"head {args.head_size}, {args.dtype}, {args.kv_layout}, block {args.block_size}",
             "", "| prompt tokens | budget | ms per request | ms per layer | peak GiB |",
             "|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['prompt_tokens']} | {r['budget']} | {r['ms_per_request']} | "
              f"{r['ms_per_layer']} | {r['peak_gib']} |" for r in rows]
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
