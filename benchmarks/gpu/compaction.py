"""Selection + compaction on the standard KV layout at 7-8B shapes: torch only, no vLLM.

What the plugin does at the end of one request's prefill on a GPU backend, layer by layer
(``WorkerCompression._compact``): score the prompt's keys, read span by span from the paged cache
(a strided view of one shared buffer, as vLLM 0.32 lays it out), against the observation window,
pool, pick the top positions per KV head, gather the kept K/V and write them into the request's
target blocks. Timed per request (all layers; synchronised wall clock), for each prompt length
and budget, next to the peak temporary memory of one request: on CUDA the rise of
``torch.cuda.max_memory_allocated`` over what was allocated before the request (after a warm-up,
so one-time library workspaces are not counted); on CPU the peak of the CPU allocator's running
total during one extra, untimed request under ``torch.profiler`` with ``profile_memory=True``
(:func:`peak_cpu_bytes`). ``bound MiB`` is ``vllm_snapkv.selection.compaction_workspace_bytes``
for the shape. ``--selection dense`` runs the unchunked reference instead (what the plugin did
before: all keys copied, [H_q, W, L] logits).

    python -m benchmarks.gpu.compaction                       # 8B shapes on cuda:0
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

from vllm_snapkv.adapter.layouts import PagedTokens, read_key_span
from vllm_snapkv.adapter.layouts.standard import StandardLayout
from vllm_snapkv.selection import (
    SCORE_CHUNK_TOKENS,
    compaction_workspace_bytes,
    select_kept_positions,
    select_kept_positions_chunked,
)

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
    scale = args.head_size**-0.5
    for layer, cache in enumerate(caches):
        if args.selection == "dense":  # the unchunked reference: every key copied at once
            keys = layout.read_keys(cache, source)
            kept = select_kept_positions(
                window_queries[layer], keys, budget, scale, args.kernel_size, "max"
            )
            kept_keys = keys[kept.T, heads]
        else:  # what the worker runs

            def read(start, end, cache=cache):
                return layout.scoring_keys(read_key_span(layout, cache, source, start, end))

            kept = select_kept_positions_chunked(
                window_queries[layer], read, source.num_tokens, budget, scale, args.kernel_size,
                "max", chunk_size=args.score_chunk, block_size=source.block_size,
            )
            kept_keys = layout.gather_keys(cache, source, kept.T)
        layout.write(cache, kept_keys, layout.gather_values(cache, source, kept.T), target_slots)


def peak_cpu_bytes(run) -> int:
    """Peak of the bytes the CPU allocator holds for tensors allocated while ``run()`` runs
    (tensors allocated before it are not counted), from the allocation events of
    ``torch.profiler`` with ``profile_memory=True``: each carries the allocator's running total
    after it, so the peak includes every intermediate, freed or not, down to ATen's own
    temporaries."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            fields = node.extra_fields
            events.append((node.start_time_ns, fields.alloc_size, fields.total_allocated))
    if not events:
        return 0
    events.sort(key=lambda event: event[0])
    _, first_size, first_total = events[0]
    return max(total for _, _, total in events) - (first_total - first_size)


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

    def run():
        compact_request(args, caches, window_queries, source, target_slots, budget)

    times, peak = [], 0
    for repeat in range(args.warmup + args.repeats):
        synchronize(device)
        if device.type == "cuda" and repeat >= args.warmup:
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        started = time.perf_counter()
        run()
        synchronize(device)
        if repeat >= args.warmup:
            times.append((time.perf_counter() - started) * 1e3)
            if device.type == "cuda":
                peak = max(peak, torch.cuda.max_memory_allocated(device) - before)
    if device.type == "cpu":
        peak = peak_cpu_bytes(run)
    bound = compaction_workspace_bytes(
        args.q_heads, args.kv_heads, args.head_size, args.window, budget, args.kernel_size,
        block_size, DTYPES[args.dtype].itemsize, chunk_size=args.score_chunk,
    )
    del caches
    return {
        "prompt_tokens": prompt_len, "budget": budget, "layers": args.layers,
        "selection": args.selection,
        "ms_per_request": round(statistics.median(times), 3),
        "ms_per_layer": round(statistics.median(times) / args.layers, 4),
        "peak_temp_mib": round(peak / 2**20, 1) if device.type in ("cuda", "cpu") else None,
        "bound_mib": round(bound / 2**20, 1) if args.selection == "chunked" else None,
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
    parser.add_argument("--selection", choices=("chunked", "dense"), default="chunked",
                        help="chunked: what the plugin runs; dense: the unchunked reference")
    parser.add_argument("--score-chunk", type=int, default=SCORE_CHUNK_TOKENS,
                        help="key positions scored at a time (chunked selection)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu-compaction"))
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (test suite)")
    args = parser.parse_args()
    if sorted(args.kv_layout) != sorted(LOGICAL_AXES):
        parser.error(f"--kv-layout must be a permutation of {LOGICAL_AXES}, got {args.kv_layout!r}")
    if args.smoke:
        args.layers, args.q_heads, args.kv_heads, args.head_size = 2, 4, 2, 16
        args.prompt_lens, args.budgets, args.warmup, args.repeats = "300", "64", 0, 1
        args.score_chunk = 64  # several spans, the pooling halo carried across them
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
    method = ("torch.cuda.max_memory_allocated rise" if device.type == "cuda"
              else "CPU allocator peak under torch.profiler")
    selection = ("chunked" + f", {args.score_chunk}-position spans"
                 if args.selection == "chunked" else "dense (unchunked reference)")
    lines = [f"Device: {name}; {args.layers} layers, {args.q_heads}/{args.kv_heads} heads, "
             f"head {args.head_size}, {args.dtype}, {args.kv_layout}, block {args.block_size}; "
             f"selection {selection}; peak temporary memory per request: {method}",
             "", "| prompt tokens | budget | ms per request | ms per layer | peak temp MiB | "
             "bound MiB |", "|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['prompt_tokens']} | {r['budget']} | {r['ms_per_request']} | "
              f"{r['ms_per_layer']} | {r['peak_temp_mib']} | {r['bound_mib'] or '-'} |"
              for r in rows]
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
