"""lm-evaluation-harness's RULER tasks against a running `vllm serve` with the plugin: the full
cache (every request opts out) and SnapKV at several budgets (optionally with other selection
rules, ``--scores``, each per request through ``vllm_xargs``), through lm_eval's Python API
(``simple_evaluate``, model ``local-completions``). Runs in lm_eval's own virtualenv (``.venv-eval``,
made by ``scripts/setup --test``): it talks HTTP only. ``benchmarks/quality/ruler.py`` starts the
server and calls this; run it by hand against your own server the same way.

    .venv-eval/bin/python -m benchmarks.quality.ruler_eval run --base-url http://127.0.0.1:8000 \\
        --model NAME --tokenizer MODEL_DIR --seq-len 4096 --budgets 1024,512,256 --limit 5 --out DIR

Per task, ``--round-size`` samples at a time: the full-cache pass first, then each budget on the
same samples, so the compressed requests hit the prompt blocks the full pass left in vLLM's
prefix cache (all but the last window + one block of each prompt are not recomputed). The KV cache
must hold one round's prompts for that. After every pass the server's counters are read: every
compressed-pass request whose prompt frees a block (rule 1) must have been compressed, and none
skipped for lack of blocks, or the run stops (a request that kept its full cache would be scored
as SnapKV).

lm_eval sends ``"seed": 1234`` with every request. RULER is greedy, so vLLM gives the requests no
generator and the seed changes nothing, except that the plugin treats any seeded request as one
vLLM 0.32's CPU worker cannot split (README, "Preemption") and keeps vLLM's plain re-prefill after
a preemption. ``gen_kwargs`` therefore sends ``"seed": null``: a preempted request then continues
exactly as if it had not been preempted. Preemptions are counted anyway.

Writes ``samples.jsonl`` (one line per task and sample: the prompt as sent, its token ids from the
server's ``/tokenize``, the references, and each mode's completion and score) and ``passes.json``
(one entry per pass: requests, compressions, preemptions, seconds).

``score`` scores other completions of the same samples (kvpress's, from ``ruler_kvpress.py``)
with lm_eval's own RULER metric.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

ALL_TASKS = (
    "niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2",
    "niah_multikey_3", "niah_multiquery", "niah_multivalue", "ruler_vt", "ruler_cwe",
    "ruler_fwe", "ruler_qa_squad", "ruler_qa_hotpot",
)
FULL = "full"


def mode_name(budget: int | None, score: str = "snapkv") -> str:
    """``full``, ``snapkv-<budget>``, or ``<rule>-<budget>`` for another selection rule."""
    return FULL if budget is None else f"{score}-{budget}"


def request_kwargs(budget: int | None, score: str = "snapkv") -> dict:
    """Generation kwargs lm_eval passes into each request body: the plugin's per-request options
    (``vllm_xargs``: the budget and, for another rule than the paper's, ``snapkv_score``) and no
    seed (see the module docstring)."""
    if budget is None:
        xargs: dict = {"kv_compression": "none"}
    else:
        xargs = {"snapkv_budget": budget}
        if score != "snapkv":
            xargs["snapkv_score"] = score
    return {"vllm_xargs": xargs, "seed": None}


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.loads(response.read())


def _metrics(base_url: str) -> dict[str, float]:
    from benchmarks.servers import parse_metrics

    with urllib.request.urlopen(base_url + "/metrics", timeout=60) as response:
        return parse_metrics(response.read().decode())


def _counter_delta(before: dict, after: dict, name: str) -> int:
    return int(after.get(name, 0.0) - before.get(name, 0.0))


def scoring_kind(task) -> str:
    """``part`` for the QA tasks (any reference counts), ``all`` for the rest (every one must
    appear): the two RULER metrics in lm_eval's ``common_utils``."""
    return "part" if task.config.process_results.__name__ == "process_results_part" else "all"


def score_text(kind: str, text: str, references: list[str]) -> float:
    """lm_eval's RULER score of one completion (``common_utils.process_results[_part]``)."""
    from lm_eval.tasks.ruler.common_utils import (
        postprocess_pred,
        string_match_all,
        string_match_part,
    )

    metric = string_match_part if kind == "part" else string_match_all
    return metric(postprocess_pred([text]), [references])


def run(args: argparse.Namespace) -> None:
    from benchmarks.quality import ruler_offline

    ruler_offline.apply()
    import lm_eval.tasks
    import numpy
    from lm_eval import simple_evaluate
    from lm_eval.models.openai_completions import LocalCompletionsAPI
    from lm_eval.tasks import TaskManager

    from benchmarks.common import progress
    from vllm_snapkv.plan import frees_blocks

    budgets = [int(b) for b in args.budgets.split(",") if b]
    scores = [s for s in args.scores.split(",") if s]
    # Every rule at every budget, on the same samples: the compressed passes of all rules hit
    # the full pass's prompt blocks.
    modes: list[tuple[int | None, str]] = [(None, "snapkv")] + [
        (budget, score) for budget in budgets for score in scores
    ]
    metric_key = str(args.seq_len)
    progress(f"building RULER tasks at {args.seq_len} tokens: {args.tasks}")
    # The tasks draw their samples from the global generators while they are built: seeded as
    # simple_evaluate seeds them (lm_eval's defaults) before it builds the same task list, so
    # the samples are those of `lm_eval --tasks <the same list>`, run after run.
    random.seed(0)
    numpy.random.seed(1234)
    # Only RULER's folder is indexed: indexing all of lm_eval's tasks takes ~20 s on 2 cores.
    manager = TaskManager(
        include_path=str(Path(lm_eval.tasks.__file__).parent / "ruler"), include_defaults=False,
        metadata={"max_seq_lengths": [args.seq_len], "tokenizer": args.tokenizer},
    )
    tasks = manager.load(args.tasks.split(","))["tasks"]
    ruler_offline.check_applied()
    lm = LocalCompletionsAPI(
        base_url=args.base_url + "/v1/completions", model=args.model, tokenizer=args.tokenizer,
        tokenizer_backend="huggingface", tokenized_requests=False,
        num_concurrent=args.num_concurrent, max_retries=1, timeout=3600,
    )
    payload = lm._create_payload(["x"], generate=True, gen_kwargs=request_kwargs(None))
    if payload.get("seed", "missing") is not None:  # lm_eval changed how it builds the body
        raise RuntimeError(f"gen_kwargs no longer override lm_eval's seed: {payload}")

    rows: dict[tuple[str, int], dict] = {}
    passes: list[dict] = []
    if args.resume and (args.out / "passes.json").exists():
        rows = {(r["task"], r["doc_id"]): r for r in _read_jsonl(args.out / "samples.jsonl")}
        passes = json.loads((args.out / "passes.json").read_text())
    for task_name in args.tasks.split(","):
        task = tasks[task_name]
        count = min(args.limit, len(task.eval_docs))
        kind = scoring_kind(task)
        for start in range(0, count, args.round_size):
            indices = list(range(start, min(count, start + args.round_size)))
            for budget, rule in modes:
                name = mode_name(budget, rule)
                if pass_on_record(rows, task_name, indices, name):
                    continue  # --resume (its prompts are checked when another pass runs)
                progress(f"{task_name} samples {indices[0]}-{indices[-1]}: {name}")
                before, began = _metrics(args.base_url), time.monotonic()
                result = simple_evaluate(
                    model=lm, tasks=[task], samples={task_name: indices}, task_manager=manager,
                    gen_kwargs=request_kwargs(budget, rule), log_samples=True, bootstrap_iters=0,
                    verbosity="WARNING",
                )
                seconds, after = time.monotonic() - began, _metrics(args.base_url)
                compressed = 0
                for sample in result["samples"][task_name]:
                    row = rows.get((task_name, sample["doc_id"]))
                    if row is None:
                        prompt = sample["arguments"][0][0]
                        ids = _post(args.base_url + "/tokenize",
                                    {"model": args.model, "prompt": prompt})["tokens"]
                        row = rows[(task_name, sample["doc_id"])] = {
                            "task": task_name, "doc_id": sample["doc_id"], "scoring": kind,
                            "prompt": prompt, "prompt_token_ids": ids, "prompt_tokens": len(ids),
                            "references": sample["doc"]["outputs"],
                            "max_tokens": sample["arguments"][0][1].get("max_gen_toks"),
                            "stop": sample["arguments"][0][1].get("until") or [],
                            "outputs": {},
                        }
                    elif row["prompt"] != sample["arguments"][0][0]:
                        raise RuntimeError(
                            f"{task_name} sample {sample['doc_id']}: lm_eval built another prompt "
                            f"than {args.out / 'samples.jsonl'} holds (a task's samples depend on "
                            "the tasks listed before it): --resume needs the same --tasks")
                    text = sample["filtered_resps"][0]
                    row["outputs"][name] = {"text": text, "score": sample[metric_key]}
                    if budget is not None:
                        compressed += frees_blocks(row["prompt_tokens"], budget, 0, args.block_size)
                counted = _counter_delta(before, after, "vllm:snapkv_compressed_requests_total")
                skipped = _counter_delta(before, after, "vllm:snapkv_skipped_compressions_total")
                if counted != compressed or skipped:
                    raise RuntimeError(
                        f"{task_name} {name}: {counted} of {compressed} eligible requests were "
                        f"compressed, {skipped} skipped (KV cache exhausted?): raise --kv-cache-gib "
                        "or lower --round-size"
                    )
                passes.append({
                    "task": task_name, "first_sample": indices[0], "mode": name, "budget": budget,
                    "score": rule,
                    "requests": len(indices), "compressed": counted, "seconds": round(seconds, 1),
                    "preemptions": _counter_delta(before, after, "vllm:num_preemptions_total"),
                    "prompt_tokens": _counter_delta(before, after, "vllm:prompt_tokens_total"),
                    "prefix_cache_hit_tokens": _counter_delta(
                        before, after, "vllm:prefix_cache_hits_total"),
                })
                # After every pass: an interrupted run --resumes from the next one.
                _write(args.out, rows, passes)


def pass_on_record(rows: dict[tuple[str, int], dict], task: str, indices: list[int],
                   mode: str) -> bool:
    """Whether every sample of a round already holds ``mode``'s completion, so that ``--resume``
    skips the pass."""
    return all((task, i) in rows and mode in rows[(task, i)]["outputs"] for i in indices)


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in open(path)]


def _write(out: Path, rows: dict, passes: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "samples.jsonl.part", "w") as handle:
        for row in rows.values():
            handle.write(json.dumps(row) + "\n")
    (out / "samples.jsonl.part").rename(out / "samples.jsonl")
    (out / "passes.json").write_text(json.dumps(passes, indent=1) + "\n")


def score(args: argparse.Namespace) -> None:
    """Add lm_eval's score to every completion of ``--completions`` (JSON lines with ``task``,
    ``doc_id``, ``text``; the references come from ``--samples``), in place."""
    samples = {(row["task"], row["doc_id"]): row for row in _read_jsonl(args.samples)}
    completions = _read_jsonl(args.completions)
    for completion in completions:
        sample = samples[(completion["task"], completion["doc_id"])]
        completion["score"] = score_text(sample["scoring"], completion["text"],
                                         sample["references"])
    with open(args.completions, "w") as handle:
        for completion in completions:
            handle.write(json.dumps(completion) + "\n")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    runner = commands.add_parser("run", help="evaluate against a running server")
    runner.add_argument("--base-url", required=True, help="the server, e.g. http://127.0.0.1:8000")
    runner.add_argument("--model", required=True, help="the served model name")
    runner.add_argument("--tokenizer", required=True, help="local tokenizer folder")
    runner.add_argument("--tasks", default=",".join(ALL_TASKS))
    runner.add_argument("--seq-len", type=int, default=4096)
    runner.add_argument("--limit", type=int, default=500, help="samples per task (first N)")
    runner.add_argument("--budgets", default="", help="SnapKV budgets in tokens, comma-separated")
    runner.add_argument("--scores", default="snapkv",
                        help="selection rules run at every budget (snapkv_score per request), "
                        "comma-separated, e.g. snapkv,critical")
    runner.add_argument("--round-size", type=int, default=8,
                        help="samples per round; the KV cache must hold a round's prompts")
    runner.add_argument("--num-concurrent", type=int, default=4)
    runner.add_argument("--block-size", type=int, default=128, help="the server's block size")
    runner.add_argument("--resume", action="store_true",
                        help="keep the passes --out holds (same --tasks); run only the "
                        "missing ones, e.g. a rule or budget added to an earlier run")
    runner.add_argument("--out", type=Path, required=True)
    scorer = commands.add_parser("score", help="score other completions of the same samples")
    scorer.add_argument("--samples", type=Path, required=True)
    scorer.add_argument("--completions", type=Path, required=True)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.command == "run":
        run(args)
    else:
        score(args)


if __name__ == "__main__":
    sys.exit(main())
