"""(b) Throughput at equal KV cache size through the OpenAI server: N concurrent long-prompt
requests, full cache vs SnapKV, with a KV cache small enough that the full cache is memory-bound.

    python -m benchmarks.performance.throughput [--smoke]

One `vllm serve` process (SnapKV on) serves both runs; the full-cache run opts every request out
(`"kv_compression": "none"`), so both see the same KV cache. Prompts start with a unique line, so
no run reuses another's prefix cache.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.common import add_model_options, machine, markdown_table, progress, write_csv
from vllm_snapkv.tasks import passkey_prompt

BLOCK_BYTES = 30 * 3 * 128 * 2 * 64 * 4  # SmolLM2-135M, float32, block size 128


def start_server(model_dir: str, port: int, budget: int, kv_cache_bytes: int, log: Path,
                 dtype: str = "float32", max_model_len: int = 8192, enforce_eager: bool = False):
    vllm = Path(sys.executable).parent / "vllm"
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    command = [
        str(vllm), "serve", model_dir, "--served-model-name", "bench", "--port", str(port),
        "--host", "127.0.0.1", "--dtype", dtype, "--max-model-len", str(max_model_len),
        "--max-num-batched-tokens", str(max_model_len), "--gpu-memory-utilization", "0.3",
        "--kv-cache-memory-bytes", str(kv_cache_bytes),
        "--kv-compression", "snapkv", "--snapkv-budget", str(budget),
        *(["--enforce-eager"] if enforce_eager else []),
    ]
    process = subprocess.Popen(command, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)
    for _ in range(300):
        if process.poll() is not None:
            raise RuntimeError(f"server exited; see {log}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return process
        except OSError:
            time.sleep(2)
    process.kill()
    raise RuntimeError(f"server did not start; see {log}")


def run(client, prompts: list[str], max_tokens: int, xargs: dict) -> dict:
    def one(prompt: str) -> int:
        reply = client.completions.create(
            model="bench", prompt=prompt, max_tokens=max_tokens, temperature=0,
            extra_body={"vllm_xargs": xargs, "ignore_eos": True},
        )
        return reply.usage.completion_tokens

    started = time.perf_counter()
    with ThreadPoolExecutor(len(prompts)) as pool:
        tokens = sum(pool.map(one, prompts))
    elapsed = time.perf_counter() - started
    return {"seconds": elapsed, "requests_per_s": len(prompts) / elapsed,
            "output_tokens_per_s": tokens / elapsed}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--filler-tokens", type=int, default=3700, help="~4K-token prompts")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--budget", type=int, default=512)
    parser.add_argument("--kv-blocks", type=int, default=80, help="~2.4 full-cache requests of the demo model (ignored with --kv-cache-gib)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/throughput"))
    parser.add_argument("--smoke", action="store_true")
    add_model_options(parser)
    parser.set_defaults(kv_cache_gib=None)
    args = parser.parse_args(argv)
    if args.smoke:
        args.requests, args.filler_tokens, args.max_tokens, args.budget = 2, 500, 4, 256
        args.kv_blocks = 80
    import openai

    from vllm_snapkv.demo_model import build_demo_model

    args.out.mkdir(parents=True, exist_ok=True)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    kv_cache_bytes = (
        args.kv_blocks * BLOCK_BYTES if args.kv_cache_gib is None else int(args.kv_cache_gib * 2**30)
    )
    server = start_server(args.model or str(build_demo_model()), port, args.budget, kv_cache_bytes,
                          args.out / "server.log", args.dtype, args.max_model_len,
                          enforce_eager=args.smoke)  # smoke: no compile (it runs, no figure)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-", timeout=3600)

        def prompts(run_name: str) -> list[str]:
            return [f"Document {run_name}-{i}. " + passkey_prompt(args.filler_tokens, 1000 + i, 0.5)
                    for i in range(args.requests)]

        progress("warm-up")
        run(client, ["Hello"], 2, {})
        results = {}
        for name, xargs in (("full", {"kv_compression": "none"}),
                            ("snapkv", {"snapkv_budget": args.budget})):
            progress(f"{name}: {args.requests} concurrent requests")
            results[name] = run(client, prompts(name), args.max_tokens, xargs)
        # The same prompts with one output token: the prefill work both runs share, which
        # on a CPU is most of the time.
        progress(f"prefill only: {args.requests} concurrent requests, 1 output token")
        prefill = run(client, prompts("prefill"), 1, {"kv_compression": "none"})["seconds"]
    finally:
        server.terminate()
        server.wait(timeout=60)
    rows = [{"mode": name, "requests": args.requests, "kv_blocks": args.kv_blocks, **values}
            for name, values in results.items()]
    write_csv(args.out / "throughput.csv", rows)
    ratio_rps = results["snapkv"]["requests_per_s"] / results["full"]["requests_per_s"]
    ratio_tps = results["snapkv"]["output_tokens_per_s"] / results["full"]["output_tokens_per_s"]
    decode_ratio = (results["full"]["seconds"] - prefill) / (results["snapkv"]["seconds"] - prefill)
    text = (f"Machine: {machine()}. {args.requests} concurrent requests, ~{args.filler_tokens} "
            f"filler tokens each, {args.max_tokens} output tokens (ignore_eos), KV cache "
            f"{args.kv_blocks} blocks of 128 tokens, SnapKV budget {args.budget}.\n\n"
            + markdown_table(rows)
            + f"\n\nSnapKV / full: requests/s x{ratio_rps:.2f}, output tokens/s x{ratio_tps:.2f}"
            + f"\n\nPrefill only ({args.requests} such prompts, 1 output token): {prefill:.1f} s;"
            + f" time beyond it, full / SnapKV: x{decode_ratio:.2f}")
    (args.out / "table.md").write_text(text + "\n")
    print(text)
    return rows


if __name__ == "__main__":
    main()
