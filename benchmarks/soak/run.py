"""Differential soak through the OpenAI server: a SnapKV server against one without the plugin.

    python -m benchmarks.soak.run                  # CI size: 40 requests
    python -m benchmarks.soak.run --requests 200   # the long mode

One seeded workload (greedy everywhere): completions (token-id prompts of exact lengths around the
budget, the window and block boundaries; some sharing long prefixes) and chat; streaming and not;
~30 % ``kv_compression: none``, ~30 % a smaller ``snapkv_budget``; ``n=2`` parallel sampling;
~10 % of streams cancelled by the client after a few chunks; a KV cache small enough that vLLM
preempts. Phases:

1. the workload, concurrently, on the SnapKV server and on a plain server (``VLLM_PLUGINS=""``);
2. every compressed request again, alone and sequentially, on the SnapKV server.

Checks, each a count in the report: opted-out outputs equal to the plain server's; compressed
outputs under load equal to the same request alone; the server healthy and its KV cache back to
idle afterwards; compression counters consistent with the requests sent (exactly in phase 2,
within vLLM's preemption count in phase 1, where a preempted request is compressed again).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from benchmarks.common import progress
from benchmarks.servers import (
    DEMO_BLOCK_BYTES,
    ServerProcess,
    demo_server_args,
    free_port,
    server_env,
)
from vllm_snapkv.plan import frees_blocks
from vllm_snapkv.tasks import passkey_prompt

MODEL_NAME = "soak"
BUDGET, WINDOW, BLOCK_SIZE = 256, 32, 128
#: Completion prompt lengths straddling the budget, budget + window and block boundaries.
LENGTHS = (100, 200, 255, 256, 257, 287, 288, 289, 383, 384, 385, 511, 512, 513, 700, 1000, 1400)
SMALLER_BUDGETS = (33, 64, 100, 128, 200, 255)
HEADER_TOKENS = 24


@dataclass
class SoakRequest:
    index: int
    kind: str  # "completion" | "chat"
    prompt: list[int] | str
    stream: bool
    n: int
    max_tokens: int
    xargs: dict
    cancel_after_chunks: int | None = None
    prompt_tokens: int = 0  # filled from the server's /tokenize

    @property
    def opted_out(self) -> bool:
        return self.xargs.get("kv_compression") == "none"

    @property
    def budget(self) -> int:
        return int(self.xargs.get("snapkv_budget", BUDGET))

    def eligible(self) -> bool:
        """Compressed (or skipped for lack of blocks) once its prefill completes: rule 1."""
        return not self.opted_out and frees_blocks(self.prompt_tokens, self.budget, 0, BLOCK_SIZE)


@dataclass
class SoakResult:
    texts: list[str] = field(default_factory=list)
    cancelled: bool = False
    error: str | None = None


def exact_prompt(tokenizer, length: int, key: int, depth: float) -> list[int]:
    ids = tokenizer(passkey_prompt(length + 200, key, depth)).input_ids
    return ids[:HEADER_TOKENS] + ids[len(ids) - (length - HEADER_TOKENS):]


def build_workload(tokenizer, count: int, seed: int) -> list[SoakRequest]:
    rng = random.Random(seed)
    shared = [exact_prompt(tokenizer, n, 7000 + n, 0.4)[:-12] for n in (600, 900)]
    questions = [tokenizer(q).input_ids for q in (
        " What is the pass key? The pass key is", " Repeat the pass key. It is",
        " Tell me the hidden number. It is")]
    requests = []
    for index in range(count):
        kind = "chat" if rng.random() < 0.35 else "completion"
        if kind == "chat":
            prompt: list[int] | str = passkey_prompt(rng.choice((150, 300, 600, 900)),
                                                    rng.randrange(10000, 99999), rng.random())
        elif rng.random() < 0.25:
            prompt = rng.choice(shared) + rng.choice(questions)
        else:
            prompt = exact_prompt(tokenizer, rng.choice(LENGTHS), rng.randrange(10000, 99999),
                                  rng.random())
        draw = rng.random()
        xargs = ({"kv_compression": "none"} if draw < 0.3 else
                 {"snapkv_budget": rng.choice(SMALLER_BUDGETS)} if draw < 0.6 else {})
        stream = rng.random() < 0.5
        requests.append(SoakRequest(
            index=index, kind=kind, prompt=prompt, stream=stream,
            n=2 if not stream and rng.random() < 0.2 else 1,
            max_tokens=rng.randrange(8, 40), xargs=xargs,
            cancel_after_chunks=rng.randrange(2, 5) if stream and rng.random() < 0.2 else None,
        ))
    return requests


def count_prompt_tokens(base: str, request: SoakRequest) -> int:
    """Prompt tokens as the engine sees them (chat: after the server's chat template)."""
    import urllib.request

    if request.kind == "completion":
        return len(request.prompt)
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": request.prompt}],
            "add_generation_prompt": True}
    call = urllib.request.Request(base + "/tokenize", data=json.dumps(body).encode(),
                                  headers={"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(call, timeout=60).read())["count"]


def send(client, request: SoakRequest, xargs: dict | None = None,
         request_id: str | None = None) -> SoakResult:
    """One request through the openai client; a cancelled stream is closed after a few chunks.
    Greedy, except ``n=2``, which vLLM refuses with greedy sampling: a temperature so low that
    sampling picks the argmax whatever the random draw, so outputs stay comparable. (Not a seed:
    vLLM 0.32's CPU worker crashes on a seeded request's partial-prefill step, see README.)"""
    sampling = {"temperature": 0.0 if request.n == 1 else 1e-4}
    options = dict(model=MODEL_NAME, max_tokens=request.max_tokens, n=request.n,
                   stream=request.stream, extra_body={"vllm_xargs": request.xargs if xargs is None
                                                      else xargs}, **sampling)
    if request_id is not None:  # vLLM takes it as the engine request id: selection dumps' names
        options["extra_headers"] = {"X-Request-Id": request_id}
    result = SoakResult(texts=[""] * request.n)
    try:
        if request.kind == "completion":
            response = client.completions.create(prompt=request.prompt, **options)
        else:
            response = client.chat.completions.create(
                messages=[{"role": "user", "content": request.prompt}], **options)
        if not request.stream:
            for choice in response.choices:
                result.texts[choice.index] = (choice.text if request.kind == "completion"
                                              else choice.message.content)
            return result
        for number, chunk in enumerate(response, start=1):
            for choice in chunk.choices:
                piece = choice.text if request.kind == "completion" else choice.delta.content
                result.texts[choice.index] += piece or ""
            if request.cancel_after_chunks and number >= request.cancel_after_chunks:
                response.close()  # the client goes away mid-generation
                result.cancelled = True
                break
    except Exception as error:  # noqa: BLE001 - every failure is a counted finding
        result.error = f"{type(error).__name__}: {error}"[:300]
    return result


def run_concurrently(client, requests, concurrency: int, tag: str) -> list[SoakResult]:
    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(lambda r: send(client, r, request_id=f"soak{r.index}-{tag}"),
                             requests))


def start(model_dir: str, out: Path, name: str, kv_blocks: int, with_plugin: bool,
          dump_dir: Path | None = None) -> ServerProcess:
    port = free_port()
    extra = ["--kv-compression", "snapkv", "--snapkv-budget", str(BUDGET),
             "--snapkv-window-size", str(WINDOW)] if with_plugin else []
    if dump_dir is not None:
        extra += ["--snapkv-dump-selections-to", str(dump_dir)]
    return ServerProcess(
        demo_server_args(model_dir, port, MODEL_NAME, kv_blocks * DEMO_BLOCK_BYTES, *extra,
                         max_model_len=2048),
        port, out / f"{name}.log", server_env(without_plugin=not with_plugin))


def selection_overlap(dump_dir: Path, index: int) -> float | None:
    """Share of kept positions the loaded and the alone run of request ``index`` have in common
    (mean over layers, heads and choices; last compression of each), or None without dumps."""
    import torch

    def load(tag):
        paths = sorted(dump_dir.glob(f"*soak{index}-{tag}-*.pt"))
        return [torch.load(path)["layers"] for path in paths]

    loaded, alone = load("load"), load("alone")
    if not loaded or len(loaded) != len(alone):
        return None
    shares = [len(set(a[layer][head].tolist()) & set(b[layer][head].tolist())) / a[layer].shape[1]
              for a, b in zip(loaded, alone) for layer in a for head in range(a[layer].shape[0])]
    return round(sum(shares) / len(shares), 4)


def run_soak(requests_count: int, seed: int, out: Path, concurrency: int = 8,
             kv_blocks: int = 17, dump_selections: bool = False) -> dict:
    import openai
    from transformers import AutoTokenizer

    from vllm_snapkv.demo_model import build_demo_model

    out.mkdir(parents=True, exist_ok=True)
    model_dir = str(build_demo_model())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    workload = build_workload(tokenizer, requests_count, seed)
    dump_dir = out / "selections" if dump_selections else None
    snap = start(model_dir, out, "snapkv-server", kv_blocks, with_plugin=True, dump_dir=dump_dir)
    plain = start(model_dir, out, "plain-server", kv_blocks, with_plugin=False)
    report: dict = {"requests": requests_count, "seed": seed, "concurrency": concurrency,
                    "kv_blocks": kv_blocks}
    try:
        snap.wait_healthy()
        plain.wait_healthy()
        snap_client = openai.OpenAI(base_url=snap.base + "/v1", api_key="-", max_retries=0,
                                    timeout=600)
        plain_client = openai.OpenAI(base_url=plain.base + "/v1", api_key="-", max_retries=0,
                                     timeout=600)
        for request in workload:
            request.prompt_tokens = count_prompt_tokens(snap.base, request)
        idle = snap.metrics()

        progress(f"phase 1: {len(workload)} requests, {concurrency} at a time, on both servers")
        started = time.monotonic()
        loaded = run_concurrently(snap_client, workload, concurrency, "load")
        report["phase1_seconds"] = round(time.monotonic() - started, 1)
        plain_results = run_concurrently(plain_client, workload, concurrency, "plain")
        after_load = snap.metrics()

        finished = [r for r, res in zip(workload, loaded) if not res.cancelled and not res.error]
        # n=2 needs sampling (vLLM refuses n > 1 with greedy), and even near-zero temperature
        # does not make it reproducible (the full-cache control differs too): not compared.
        sampled = [r for r in finished if r.n > 1]
        finished = [r for r in finished if r.n == 1]
        compressed = [r for r in finished if not r.opted_out]
        progress(f"phase 2: {len(compressed)} compressed requests alone, one by one")
        alone = [send(snap_client, request, request_id=f"soak{request.index}-alone")
                 for request in compressed]
        after_alone = snap.metrics()
        # Control: the opted-out requests alone too. Differences here would be vLLM's own
        # batch-dependent numerics, not the plugin.
        full_cache = [r for r in finished if r.opted_out]
        full_alone = [send(snap_client, request) for request in full_cache]

        def delta(after, before, name):
            return after.get(name, 0.0) - before.get(name, 0.0)

        def different(pairs):
            # Failed requests are counted under "errors", not compared.
            return [r.index for r, a, b in pairs if a.texts != b.texts and not (a.error or b.error)]

        report["different_texts"] = {}

        def note(pairs, label):
            for r, a, b in pairs:
                if a.texts != b.texts and not (a.error or b.error):
                    report["different_texts"][f"{label}-{r.index}"] = [a.texts, b.texts]

        opted_out = [(r, loaded[r.index], plain_results[r.index]) for r in finished
                     if r.opted_out]
        report.update({
            "completions": sum(r.kind == "completion" for r in workload),
            "chats": sum(r.kind == "chat" for r in workload),
            "streamed": sum(r.stream for r in workload),
            "n2": sum(r.n == 2 for r in workload),
            "cancelled": sum(res.cancelled for res in loaded),
            "errors": [(r.index, res.error) for r, res in zip(workload, loaded) if res.error],
            "plain_errors": [(r.index, res.error) for r, res in zip(workload, plain_results)
                             if res.error and not res.cancelled],
            "opted_out_compared": len(opted_out),
            "opted_out_different": different(opted_out),
            "sampled_not_compared": len(sampled),
            "compressed_compared": len(compressed),
            "compressed_different": different(
                [(r, loaded[r.index], a) for r, a in zip(compressed, alone)]),
            "opted_out_alone_compared": len(full_cache),
            "opted_out_alone_different": different(
                [(r, loaded[r.index], a) for r, a in zip(full_cache, full_alone)]),
            "preemptions": delta(after_load, idle, "vllm:num_preemptions_total"),
        })
        report["phase1_skipped"] = delta(after_load, idle, "vllm:snapkv_skipped_compressions_total")
        if dump_dir is not None:
            # A request the pool was too short for under load kept its full cache (counted as
            # skipped, no selection dump): it must then answer as the server without the plugin.
            skipped = [index for index in report["compressed_different"]
                       if not list(dump_dir.glob(f"*soak{index}-load-*.pt"))]
            report["skipped_under_load"] = skipped
            report["skipped_unlike_plain"] = [
                index for index in skipped
                if loaded[index].texts != plain_results[index].texts]
            report["compressed_different"] = [
                index for index in report["compressed_different"] if index not in skipped]
            report["selection_overlap_of_different"] = {
                index: selection_overlap(dump_dir, index)
                for index in report["compressed_different"]}
        note(opted_out, "plain")
        note([(r, loaded[r.index], a) for r, a in zip(compressed, alone)], "alone")
        note([(r, loaded[r.index], a) for r, a in zip(full_cache, full_alone)], "full-alone")
        eligible_load = sum(r.n for r, res in zip(workload, loaded) if r.eligible()
                            and not res.error)
        compressions_load = (delta(after_load, idle, "vllm:snapkv_compressed_requests_total")
                             + delta(after_load, idle, "vllm:snapkv_skipped_compressions_total"))
        report["phase1_eligible"] = eligible_load
        report["phase1_compressed_or_skipped"] = compressions_load
        report["phase1_counters_consistent"] = (
            eligible_load <= compressions_load <= eligible_load + report["preemptions"])
        eligible_alone = [r for r in compressed if r.eligible()]
        report["phase2_eligible"] = sum(r.n for r in eligible_alone)
        report["phase2_compressed"] = delta(after_alone, after_load,
                                            "vllm:snapkv_compressed_requests_total")
        report["phase2_skipped"] = delta(after_alone, after_load,
                                         "vllm:snapkv_skipped_compressions_total")
        report["phase2_evicted_expected"] = sum(
            r.n * (r.prompt_tokens - r.budget) for r in eligible_alone)
        report["phase2_evicted"] = delta(after_alone, after_load,
                                         "vllm:snapkv_evicted_tokens_total")
        time.sleep(1)
        final = snap.metrics()
        report["kv_cache_usage_idle"] = idle.get("vllm:kv_cache_usage_perc")
        report["kv_cache_usage_after"] = final.get("vllm:kv_cache_usage_perc")
        report["running_after"] = final.get("vllm:num_requests_running")
        report["healthy_after"] = snap.healthy()
    finally:
        snap.stop()
        plain.stop()
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "workload.json").write_text(json.dumps(
        [{k: v for k, v in asdict(r).items() if k != "prompt"} for r in workload], indent=0))
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--kv-blocks", type=int, default=17,
                        help="of 128 tokens: one above the 16 a 2048-token request needs; preempts")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/soak"))
    parser.add_argument("--dump-selections", action="store_true",
                        help="keep every selection; the report compares those of differing outputs")
    args = parser.parse_args()
    report = run_soak(args.requests, args.seed, args.out, args.concurrency, args.kv_blocks,
                      args.dump_selections)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
