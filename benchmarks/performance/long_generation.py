"""Long generations: KV blocks held and decode time per token vs generated tokens, with and
without decode compression (--snapkv-decode-interval), and throughput at equal KV memory for
short prompts with long outputs.

    python -m benchmarks.performance.long_generation [--smoke]

Part 1: one request at a time (a short prompt, ``--generate`` tokens, EOS ignored), in one
engine: the full cache (the request opts out with ``kv_compression: none``; prompt-only SnapKV
is the same here, the prompt being short) and decode compression. Per step: blocks the request
holds, step wall time.
Part 2: ``--requests`` requests of ``--throughput-tokens`` output tokens each at once, in an
engine whose KV cache holds ``--kv-blocks`` blocks: all requests opted out (the full cache) vs
decode compression. Wall time, output tokens/s, preemptions, peak running requests.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from benchmarks.common import (
    machine,
    make_llm,
    markdown_table,
    progress,
    scheduler_of,
    write_csv,
)
from vllm_snapkv.plan import cdiv


def engine(budget: int, decode_interval: int, kv_blocks: int = 80, max_model_len: int = 8192):
    """``benchmarks.common.make_llm`` on the demo model with decode compression configured."""
    from vllm_snapkv.demo_model import build_demo_model

    # SmolLM2 float32: 30 layers x 3 KV heads x 64 x (K, V) x 4 bytes x 128 tokens per block.
    block_bytes = 30 * 3 * 64 * 2 * 4 * 128
    config = {"method": "snapkv", "budget": budget, "window_size": 32,
              "decode_interval": decode_interval}
    return make_llm(
        str(build_demo_model()),
        budget,
        max_model_len=max_model_len,
        max_num_batched_tokens=2048,
        kv_cache_memory_bytes=kv_blocks * block_bytes,
        enforce_eager=True,
        additional_config={"kv_compression": config},
    )


def params(max_tokens: int, opt_out: bool = False):
    from vllm import SamplingParams

    extra = {"kv_compression": "none"} if opt_out else None
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
                          extra_args=extra)


def prompt_ids(llm, length: int) -> list[int]:
    from vllm_snapkv.tasks import passkey_prompt

    return llm.get_tokenizer()(passkey_prompt(length + 100, 777, 0.5)).input_ids[:length]


def one_generation(llm, ids: list[int], max_tokens: int, opt_out: bool) -> list[dict]:
    """Step one request to its end; per decode step the blocks it holds and the step time."""
    llm.reset_prefix_cache()
    scheduler = scheduler_of(llm)
    manager = scheduler.kv_cache_manager.coordinator.single_type_managers[0]
    request_id = f"long-{time.monotonic_ns()}"
    llm.llm_engine.add_request(request_id, {"prompt_token_ids": ids}, params(max_tokens, opt_out))
    (internal,) = [r for r in scheduler.requests if r.startswith(request_id)]
    rows, generated = [], 0
    while llm.llm_engine.has_unfinished_requests():
        started = time.perf_counter()
        llm.llm_engine.step()
        elapsed = time.perf_counter() - started
        blocks = manager.req_to_blocks.get(internal)
        if blocks is not None and generated:
            rows.append({"generated": generated, "blocks": len(blocks), "step_ms": 1000 * elapsed})
        generated += 1
    return rows


def part1(args: argparse.Namespace) -> list[dict]:
    llm = engine(args.budget, args.decode_interval)
    ids = prompt_ids(llm, args.prompt)
    runs = {
        "full cache": one_generation(llm, ids, args.generate, opt_out=True),
        f"decode compression (C={args.budget}, interval={args.decode_interval})":
            one_generation(llm, ids, args.generate, opt_out=False),
    }
    llm.llm_engine.engine_core.shutdown()
    summary = []
    for mode, rows in runs.items():
        for start in range(0, len(rows), args.bucket):
            bucket = rows[start : start + args.bucket]
            summary.append({
                "mode": mode,
                "generated": bucket[-1]["generated"],
                "blocks": bucket[-1]["blocks"],
                "max_blocks": max(r["blocks"] for r in bucket),
                "ms_per_token": sum(r["step_ms"] for r in bucket) / len(bucket),
            })
    return summary


def part2(args: argparse.Namespace) -> list[dict]:
    llm = engine(
        args.throughput_budget, args.throughput_interval, args.kv_blocks,
        max_model_len=args.prompt + args.requests + args.throughput_tokens,
    )
    scheduler = scheduler_of(llm)
    preempted = []
    preempt = scheduler._preempt_request

    def spy(request, *a, **k):
        preempted.append(request.request_id)
        return preempt(request, *a, **k)

    scheduler._preempt_request = spy
    rows = []
    for mode, opt_out in (("full cache", True), ("decode compression", False)):
        preempted.clear()
        llm.reset_prefix_cache()
        for index in range(args.requests):
            ids = prompt_ids(llm, args.prompt + index)
            llm.llm_engine.add_request(f"{mode}-{index}", {"prompt_token_ids": ids},
                                       params(args.throughput_tokens, opt_out))
        peak_running, tokens = 0, 0
        started = time.perf_counter()
        while llm.llm_engine.has_unfinished_requests():
            for output in llm.llm_engine.step():
                if output.finished:
                    tokens += len(output.outputs[0].token_ids)
            peak_running = max(peak_running, len(scheduler.running))
        wall = time.perf_counter() - started
        rows.append({
            "mode": mode, "budget": args.throughput_budget,
            "decode_interval": args.throughput_interval, "kv_blocks": args.kv_blocks,
            "requests": args.requests,
            "output_tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "preemptions": len(preempted), "peak_running": peak_running,
        })
        progress(f"{mode}: {tokens / wall:.1f} tokens/s, {len(preempted)} preemptions")
    llm.llm_engine.engine_core.shutdown()
    return rows


def plot(summary: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (blocks, speed) = plt.subplots(1, 2, figsize=(10, 3.5))
    for mode in dict.fromkeys(r["mode"] for r in summary):
        rows = [r for r in summary if r["mode"] == mode]
        xs = [r["generated"] for r in rows]
        blocks.plot(xs, [r["max_blocks"] for r in rows], label=mode)
        speed.plot(xs, [r["ms_per_token"] for r in rows], label=mode)
    blocks.set_xlabel("generated tokens")
    blocks.set_ylabel("KV blocks held (128 tokens)")
    speed.set_xlabel("generated tokens")
    speed.set_ylabel("decode ms / token")
    for axis in (blocks, speed):
        axis.set_ylim(bottom=0)
        axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=int, default=512)
    parser.add_argument("--decode-interval", type=int, default=512)
    parser.add_argument("--prompt", type=int, default=100)
    parser.add_argument("--generate", type=int, default=8000)
    parser.add_argument("--bucket", type=int, default=250, help="steps averaged per table row")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--throughput-tokens", type=int, default=2000)
    parser.add_argument("--kv-blocks", type=int, default=64)
    parser.add_argument("--throughput-budget", type=int, default=256)
    parser.add_argument("--throughput-interval", type=int, default=256)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/long-generation"))
    parser.add_argument("--smoke", action="store_true", help="tiny sizes for the test suite")
    args = parser.parse_args(argv)
    if args.smoke:
        # Two decode compressions in 160 tokens (threshold 192 entries, then every 64).
        args.budget, args.decode_interval, args.generate, args.bucket = 128, 64, 160, 50
        args.requests, args.throughput_tokens, args.kv_blocks = 3, 160, 12
        args.throughput_budget, args.throughput_interval = 128, 64
    progress("part 1: one long generation, full cache vs decode compression")
    summary = part1(args)
    progress("part 2: throughput at equal KV memory")
    throughput = part2(args)
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(args.out / "growth.csv", summary)
    write_csv(args.out / "throughput.csv", throughput)
    plot(summary, args.out / "growth.png")
    bound = cdiv(max(args.budget + args.decode_interval, cdiv(args.budget, 128) * 128 + 1), 128)
    text = (
        f"Machine: {machine()}. SmolLM2-135M float32 on the CPU build, block size 128, greedy, "
        f"EOS ignored; budget {args.budget}, window 32, decode_interval {args.decode_interval} "
        f"(bound: {bound} blocks).\n\n"
        f"Part 1: a {args.prompt}-token prompt generating {args.generate} tokens, one request "
        f"alone; each row averages {args.bucket} decode steps.\n\n"
        + markdown_table(summary)
        + f"\n\nPart 2: {args.requests} requests ({args.prompt}-token prompts, "
        f"{args.throughput_tokens} output tokens each) at once, KV cache of {args.kv_blocks} "
        f"blocks; budget {args.throughput_budget}, decode_interval {args.throughput_interval}."
        "\n\n"
        + markdown_table(throughput)
        + "\n"
    )
    (args.out / "table.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
