"""RULER (lm-evaluation-harness) through `vllm serve` with the plugin: full cache vs SnapKV at
fractions of the sequence length, optionally side by side with kvpress's SnapKVPress on the same
samples.

    python -m benchmarks.quality.ruler                                  # 13 tasks at 4K, demo model
    python -m benchmarks.quality.ruler --tasks niah_single_2,ruler_vt --limit 20 --seq-len 8192
    python -m benchmarks.quality.ruler --limit 2 --kvpress              # + kvpress, same samples
    python -m benchmarks.quality.ruler --smoke                          # one task, 2 samples, 1K
    python -m benchmarks.quality.ruler --scores snapkv,critical         # + the value-aware rule
    python -m benchmarks.quality.ruler --skip-plugin --kvpress --resume \
        --kvpress-presses snapkv,criticalkv,chunkkv                     # + kvpress's other presses

One server (``benchmarks.servers``: ``vllm serve --kv-compression snapkv``, budget = the largest
asked) serves every mode; each request picks its mode through ``vllm_xargs`` (``kv_compression:
none`` for the full cache, ``snapkv_budget`` for a lower budget, ``snapkv_score`` for another
selection rule). lm_eval runs in its own
virtualenv (``.venv-eval``, ``scripts/setup --test``) through ``benchmarks/quality/ruler_eval.py``,
with the offline data of ``ruler_offline.py``; kvpress in another (``.venv-kvpress``,
``scripts/setup --bench``) through ``ruler_kvpress.py``, after the server has stopped.

Writes into ``--out`` (default ``benchmarks/results/ruler-<model>-<seq len>``): ``samples.jsonl``
(every prompt, its token ids, the references and each mode's completion and score),
``passes.json`` (requests, compressions, prefix-cache hits and seconds per pass), ``scores.csv``,
``table.md`` and ``ruler.png``; with ``--kvpress`` also ``kvpress.jsonl`` and ``agreement.csv``
(per-sample agreement of the presses running the plugin's rule), and ``presses.csv`` once
kvpress.jsonl holds a second press (the plugin's rules and kvpress's presses on the samples every
press ran); with ``--scores`` naming more rules than ``snapkv`` also ``rules.csv`` (each rule
against SnapKV, paired per sample).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from fractions import Fraction
from pathlib import Path

from benchmarks.common import machine, markdown_table, progress, write_csv
from benchmarks.servers import ServerProcess, demo_server_args, free_port, server_env

ROOT = Path(__file__).resolve().parents[2]
ALL_TASKS = (
    "niah_single_1,niah_single_2,niah_single_3,niah_multikey_1,niah_multikey_2,niah_multikey_3,"
    "niah_multiquery,niah_multivalue,ruler_vt,ruler_cwe,ruler_fwe,ruler_qa_squad,ruler_qa_hotpot"
)
FULL = "full"
# kvpress's presses (ruler_kvpress.py): table column and kvpress.jsonl mode at budget t. The
# "kvpress" column also holds kvpress's full-cache run.
KVPRESS_COLUMNS = {
    "snapkv": ("kvpress", lambda t: f"snapkv-{t}"),
    "snapkv-maxpool": ("kvpress max-pool", lambda t: f"snapkv-{t}-maxpool"),
    "criticalkv": ("kvpress CriticalKV", lambda t: f"criticalkv-{t}"),
    "chunkkv": ("kvpress ChunkKV", lambda t: f"chunkkv-{t}"),
}


def side_venv(suffix: str) -> Path:
    """``.venv-eval`` / ``.venv-kvpress`` beside the project's virtualenv (``scripts/setup``)."""
    return ROOT / (os.environ.get("VLLM_SNAPKV_VENV", ".venv") + suffix)


def parse_budget(text: str, seq_len: int) -> tuple[str, int]:
    """``"1/8"`` -> ("1/8", seq_len / 8); ``"512"`` -> ("512", 512)."""
    if "/" in text:
        return text, int(Fraction(text) * seq_len)
    return text, int(text)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder; default: the demo model")
    parser.add_argument("--tasks", default=ALL_TASKS, help="lm_eval RULER task names")
    parser.add_argument("--seq-len", type=int, default=4096, help="RULER max_seq_length")
    parser.add_argument("--limit", type=int, default=25, help="samples per task (the first N)")
    parser.add_argument("--budgets", default="1/4,1/8,1/16",
                        help="SnapKV budgets: fractions of --seq-len or token counts")
    parser.add_argument("--scores", default="snapkv",
                        help="selection rules at every budget, per request (snapkv_score): "
                        "e.g. snapkv,critical adds the value-aware rule beside SnapKV, on the "
                        "same samples and server; the extra rules are compared pairwise")
    parser.add_argument("--round-size", type=int, default=8,
                        help="samples per task evaluated in all modes before the next ones "
                        "(their prompts must fit the KV cache for the prefix-cache reuse)")
    parser.add_argument("--num-concurrent", type=int, default=4, help="requests in flight")
    parser.add_argument("--kv-cache-gib", type=float, default=2.0)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--window-size", type=int, default=32)
    parser.add_argument("--kernel-size", type=int, default=7)
    parser.add_argument("--kvpress", action="store_true",
                        help="also kvpress's SnapKVPress on the same samples (.venv-kvpress)")
    parser.add_argument("--kvpress-presses", default="snapkv",
                        help="kvpress presses at the budgets: snapkv (kvpress's SnapKVPress), "
                        "snapkv-maxpool (with the plugin's max pooling), criticalkv, chunkkv "
                        "(kvpress's presses at equal per-head memory, on its SnapKVPress)")
    parser.add_argument("--kvpress-limit", type=int, default=None,
                        help="samples per task for kvpress (default: all of --limit)")
    parser.add_argument("--kvpress-modes", default=None,
                        help="what kvpress runs: 'full' and budgets as in --budgets (default: "
                        "full and every budget); the tables show every kvpress row present")
    parser.add_argument("--resume", action="store_true",
                        help="keep the passes --out holds and the kvpress rows kvpress.jsonl "
                        "holds; run only what is missing (an interrupted run, or a rule or "
                        "budget added to an earlier run: same --tasks, so the same samples)")
    parser.add_argument("--skip-plugin", action="store_true",
                        help="no server: reuse samples.jsonl and passes.json in --out (e.g. to "
                        "run --kvpress later, or elsewhere, on the same samples)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--smoke", action="store_true", help="one task, 2 samples, 1K")
    args = parser.parse_args(argv)
    if args.smoke:
        args.tasks, args.limit, args.seq_len, args.kv_cache_gib = "niah_single_1", 2, 1024, 0.5
    if args.model is None:
        from vllm_snapkv.demo_model import build_demo_model

        args.model = str(build_demo_model())
    args.budget_list = [parse_budget(b, args.seq_len) for b in args.budgets.split(",")]
    args.score_list = [score for score in args.scores.split(",") if score]
    if "snapkv" not in args.score_list:
        args.score_list.insert(0, "snapkv")  # the baseline every other rule is compared with
    args.extra_scores = [score for score in args.score_list if score != "snapkv"]
    unknown = [press for press in args.kvpress_presses.split(",") if press not in KVPRESS_COLUMNS]
    if unknown:  # before the server and lm_eval run, not after
        parser.error(f"--kvpress-presses: unknown {', '.join(unknown)}; choose from "
                     f"{', '.join(KVPRESS_COLUMNS)}")
    if args.out is None:
        args.out = ROOT / "benchmarks" / "results" / f"ruler-{Path(args.model).name}-{args.seq_len}"
    return args


def run_plugin(args: argparse.Namespace) -> None:
    """Start the server, run lm_eval against it, stop it."""
    eval_python = side_venv("-eval") / "bin" / "python"
    if not eval_python.exists():
        raise SystemExit(f"{eval_python} missing: run scripts/setup --test (lm_eval's venv)")
    port, name = free_port(), Path(args.model).name
    budgets = [tokens for _, tokens in args.budget_list]
    server_args = demo_server_args(
        args.model, port, name, int(args.kv_cache_gib * 2**30),
        "--kv-compression", "snapkv", "--snapkv-budget", str(max(budgets)),
        "--snapkv-window-size", str(args.window_size),
        "--snapkv-kernel-size", str(args.kernel_size), "--block-size", "128",
        # RULER sizes prompt + answer to seq_len, without lm_eval's answer prefix.
        max_model_len=args.seq_len + 256,
    )
    server_args[server_args.index("--dtype") + 1] = args.dtype
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.resume:
        # A fresh run writes new samples (a task's samples depend on the tasks listed before
        # it): kvpress's rows of the old ones would be paired with other prompts.
        for stale in ("kvpress.jsonl", "agreement.csv", "presses.csv"):
            (args.out / stale).unlink(missing_ok=True)
    progress(f"starting vllm serve {name} (budget {max(budgets)})")
    server = ServerProcess(server_args, port, args.out / "server.log", server_env())
    try:
        server.wait_healthy()
        subprocess.run([
            str(eval_python), "-m", "benchmarks.quality.ruler_eval", "run",
            "--base-url", server.base, "--model", name, "--tokenizer", args.model,
            "--tasks", args.tasks, "--seq-len", str(args.seq_len), "--limit", str(args.limit),
            "--budgets", ",".join(str(b) for b in budgets), "--scores", ",".join(args.score_list),
            "--round-size", str(args.round_size),
            "--num-concurrent", str(args.num_concurrent), "--block-size", "128",
            "--out", str(args.out), *(["--resume"] if args.resume else []),
        ], cwd=ROOT, check=True)
    finally:
        server.stop()


def run_kvpress(args: argparse.Namespace) -> float:
    kvpress_python = side_venv("-kvpress") / "bin" / "python"
    if not kvpress_python.exists():
        raise SystemExit(f"{kvpress_python} missing: run scripts/setup --bench (kvpress's venv)")
    began = time.monotonic()
    modes = (args.kvpress_modes or "full," + args.budgets).split(",")
    budgets = [parse_budget(mode, args.seq_len)[1] for mode in modes if mode != FULL]
    command = [
        str(kvpress_python), "-m", "benchmarks.quality.ruler_kvpress",
        "--model", args.model, "--samples", str(args.out / "samples.jsonl"),
        "--budgets", ",".join(str(tokens) for tokens in budgets),
        "--window-size", str(args.window_size), "--kernel-size", str(args.kernel_size),
        "--presses", args.kvpress_presses, "--out", str(args.out / "kvpress.jsonl"),
    ]
    if args.tasks != ALL_TASKS:
        command += ["--tasks", args.tasks]
    if args.kvpress_limit is not None:
        command += ["--limit", str(args.kvpress_limit)]
    command += ["--skip-full"] if FULL not in modes else []
    command += ["--resume"] if args.resume else []
    subprocess.run(command, cwd=ROOT, check=True)
    subprocess.run([
        str(side_venv("-eval") / "bin" / "python"), "-m", "benchmarks.quality.ruler_eval",
        "score", "--samples", str(args.out / "samples.jsonl"),
        "--completions", str(args.out / "kvpress.jsonl"),
    ], cwd=ROOT, check=True)
    return time.monotonic() - began


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in open(path)]


def samples_of_this_run(samples: list[dict], limit: int) -> list[dict]:
    """The rows of the first ``limit`` samples per task: an earlier ``--resume`` run with a larger
    ``--limit`` leaves more rows on record, which lack the passes this call added."""
    return [row for row in samples if row["doc_id"] < limit]


def check_same_prompts(samples: list[dict], kvpress: list[dict]) -> None:
    """Every kvpress row answered the prompt ``samples.jsonl`` holds under its task and id."""
    lengths = {(r["task"], r["doc_id"]): r["prompt_tokens"] for r in samples}
    for row in kvpress:
        held = lengths.get((row["task"], row["doc_id"]))
        if held is not None and held != row["prompt_tokens"]:
            raise SystemExit(
                f"kvpress.jsonl: {row['task']} sample {row['doc_id']} ({row['mode']}) answered a "
                f"{row['prompt_tokens']}-token prompt, samples.jsonl holds {held} tokens: the "
                "rows are from other samples; delete kvpress.jsonl and run --kvpress again")


def summarize(args: argparse.Namespace, samples: list[dict], kvpress: list[dict]) -> tuple:
    """Per task and budget: samples and mean score (0-100) of the plugin and of kvpress's
    SnapKVPress; per task, budget and kvpress variant: per-sample agreement with the plugin."""
    modes = [(FULL, FULL, None)] + [(label, f"snapkv-{t}", t) for label, t in args.budget_list]
    tasks = list(dict.fromkeys(row["task"] for row in samples))
    by_kvpress = {(c["task"], c["doc_id"], c["mode"]): c for c in kvpress}
    # Every press kvpress.jsonl holds rows of: (column, kvpress mode at budget t, whether it
    # runs the plugin's rule, which makes per-sample agreement meaningful).
    modes_held = {c["mode"] for c in kvpress}
    variants = [
        (column, mode_of, press.startswith("snapkv"))
        for press, (column, mode_of) in KVPRESS_COLUMNS.items()
        if press == "snapkv" or any(mode_of(t) in modes_held for _, t in args.budget_list)]
    rows, agreement = [], []
    for task in tasks:
        task_samples = [r for r in samples if r["task"] == task]
        for label, mode, budget in modes:
            plugin = [r["outputs"][mode]["score"] for r in task_samples]
            row = {"task": task, "budget": label, "budget_tokens": budget or "", "n": len(plugin),
                   "plugin": 100 * sum(plugin) / len(plugin)}
            for variant, mode_of, same_rule in variants if kvpress else []:
                if budget is None and variant != "kvpress":
                    continue  # the full cache is one kvpress run
                key = FULL if budget is None else mode_of(budget)
                pairs = [(r, by_kvpress[(task, r["doc_id"], key)]) for r in task_samples
                         if (task, r["doc_id"], key) in by_kvpress]
                row[f"{variant} n"] = len(pairs)
                row[variant] = 100 * sum(c["score"] for _, c in pairs) / len(pairs) if pairs else ""
                if pairs and same_rule:
                    agreement.append({
                        "task": task, "budget": label, "kvpress": variant, "n": len(pairs),
                        "plugin_score": 100 * sum(r["outputs"][mode]["score"] for r, _ in pairs)
                        / len(pairs),
                        "kvpress_score": 100 * sum(c["score"] for _, c in pairs) / len(pairs),
                        "same_score": sum(r["outputs"][mode]["score"] == c["score"]
                                          for r, c in pairs),
                        "same_text": sum(r["outputs"][mode]["text"].strip() == c["text"].strip()
                                         for r, c in pairs),
                    })
            for rule in args.extra_scores if budget is not None else []:
                extra = [r["outputs"][f"{rule}-{budget}"]["score"] for r in task_samples]
                row[rule] = 100 * sum(extra) / len(extra)
            rows.append(row)
    # The mean row: unweighted mean over tasks (RULER's and lm_eval's group aggregate).
    for label, mode, budget in modes:
        cells = [r for r in rows if r["budget"] == label]
        mean = {"task": "mean", "budget": label, "budget_tokens": budget or "",
                "n": sum(r["n"] for r in cells),
                "plugin": sum(r["plugin"] for r in cells) / len(cells)}
        for rule in args.extra_scores if budget is not None else []:
            mean[rule] = sum(r[rule] for r in cells) / len(cells)
        for variant, _, _ in variants if kvpress else []:
            scored = [r for r in cells if r.get(variant, "") != ""]
            mean[f"{variant} n"] = sum(r[f"{variant} n"] for r in scored)
            mean[variant] = sum(r[variant] for r in scored) / len(scored) if scored else ""
            same = [a for a in agreement if a["budget"] == label and a["kvpress"] == variant]
            if same:
                agreement.append({
                    "task": "all", "budget": label, "kvpress": variant,
                    "n": sum(a["n"] for a in same),
                    "plugin_score": sum(a["plugin_score"] for a in same) / len(same),
                    "kvpress_score": sum(a["kvpress_score"] for a in same) / len(same),
                    "same_score": sum(a["same_score"] for a in same),
                    "same_text": sum(a["same_text"] for a in same),
                })
        rows.append(mean)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    return [{key: row.get(key, "") for key in columns} for row in rows], agreement


def paired_difference(values: list[float], base: list[float]) -> tuple[float, float]:
    """Mean of the per-sample differences ``values - base`` and its standard error (sample
    standard deviation / sqrt(n))."""
    diffs = [v - b for v, b in zip(values, base)]
    n, mean = len(diffs), sum(diffs) / len(diffs)
    variance = sum((d - mean) ** 2 for d in diffs) / (n - 1) if n > 1 else 0.0
    return mean, (variance / n) ** 0.5


def paired_rules(args: argparse.Namespace, samples: list[dict]) -> list[dict]:
    """Each extra rule against SnapKV on the same samples, per task and budget and over all
    tasks: both means, the paired difference (rule - SnapKV, points) and its standard error
    (sample standard deviation of the per-sample differences / sqrt(n)), and the share of the
    full cache's lead over SnapKV the rule closed (gap closed). One column layout for every rule
    (``rule_score``: the rule's mean), so one CSV holds them all."""
    out = []
    tasks = list(dict.fromkeys(row["task"] for row in samples))
    for rule in args.extra_scores:
        for label, budget in args.budget_list:
            groups = [(task, [r for r in samples if r["task"] == task]) for task in tasks]
            groups.append(("all", samples))
            for task, rows in groups:
                full = [100 * r["outputs"][FULL]["score"] for r in rows]
                base = [100 * r["outputs"][f"snapkv-{budget}"]["score"] for r in rows]
                other = [100 * r["outputs"][f"{rule}-{budget}"]["score"] for r in rows]
                n = len(rows)
                mean_diff, se = paired_difference(other, base)
                gap = sum(full) / n - sum(base) / n
                out.append({
                    "rule": rule, "budget": label, "task": task, "n": n,
                    "full": round(sum(full) / n, 1), "snapkv": round(sum(base) / n, 1),
                    "rule_score": round(sum(other) / n, 1), "diff": round(mean_diff, 2),
                    "se": round(se, 2),
                    "gap_closed": round(mean_diff / gap, 2) if gap > 0 else "",
                })
    return out


def side_by_side(args: argparse.Namespace, samples: list[dict], kvpress: list[dict]) -> list[dict]:
    """Per budget, over the samples every kvpress press at that budget ran (kvpress usually runs
    a subset of the plugin's samples): the mean of the full cache, of each plugin rule and of each
    press, and each one's paired difference from the plugin's SnapKV with its standard error."""
    by_kvpress = {(c["task"], c["doc_id"], c["mode"]): c["score"] for c in kvpress}
    out = []
    for label, budget in args.budget_list:
        columns = {"plugin full": lambda r: r["outputs"][FULL]["score"]}
        for rule in args.score_list:
            columns[f"plugin {rule}"] = lambda r, m=f"{rule}-{budget}": r["outputs"][m]["score"]
        for column, mode_of in KVPRESS_COLUMNS.values():
            mode = mode_of(budget)
            if any((r["task"], r["doc_id"], mode) in by_kvpress for r in samples):
                columns[column] = lambda r, m=mode: by_kvpress.get((r["task"], r["doc_id"], m))
        presses = [c for c in columns if c.startswith("kvpress")]
        both = [r for r in samples if presses and all(columns[c](r) is not None for c in presses)]
        if not both:
            continue
        base = [100 * r["outputs"][f"snapkv-{budget}"]["score"] for r in both]
        for column, score_of in columns.items():
            values = [100 * score_of(r) for r in both]
            mean_diff, se = paired_difference(values, base)
            out.append({"budget": label, "method": column, "n": len(both),
                        "tasks": len({r["task"] for r in both}),
                        "score": round(sum(values) / len(both), 1),
                        "diff_vs_plugin_snapkv": round(mean_diff, 2), "se": round(se, 2)})
    return out


def wide_table(rows: list[dict], args: argparse.Namespace, variants: list[str]) -> str:
    labels = [FULL] + [label for label, _ in args.budget_list]
    header = ["task", "n"] + [f"plugin {label}" for label in labels]
    header += [f"{rule} {label}" for rule in args.extra_scores for label in labels]
    header += [f"{variant} {label}" for variant in variants for label in labels]
    table = []
    for task in dict.fromkeys(r["task"] for r in rows):
        cells = {r["budget"]: r for r in rows if r["task"] == task}
        line = {"task": task, "n": cells[FULL]["n"]}
        for label in labels:
            line[f"plugin {label}"] = _score(cells[label]["plugin"])
            for rule in args.extra_scores:
                line[f"{rule} {label}"] = _score(cells[label].get(rule, ""))
            for variant in variants:
                line[f"{variant} {label}"] = _score(cells[label].get(variant, ""))
        table.append(line)
    return markdown_table(table, [h for h in header if any(line[h] != "" for line in table)])


def _hit_share(passes: list[dict]) -> float:
    compressed = [p for p in passes if p["budget"] is not None]
    prompt = sum(p["prompt_tokens"] for p in compressed)
    return sum(p["prefix_cache_hit_tokens"] for p in compressed) / prompt if prompt else 0.0


def _score(value) -> str:
    return f"{value:.1f}" if isinstance(value, float) else str(value)


def plot(rows: list[dict], args: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fractions = [tokens / args.seq_len for _, tokens in args.budget_list]
    fig, axis = plt.subplots(figsize=(6, 4))
    for task in dict.fromkeys(r["task"] for r in rows):
        cells = {r["budget"]: r for r in rows if r["task"] == task}
        ys = [cells[label]["plugin"] for label, _ in args.budget_list]
        if task == "mean":
            line, = axis.plot(fractions, ys, "o-", lw=2.5, color="C0", label="SnapKV (plugin), mean")
            axis.axhline(cells[FULL]["plugin"], color="C0", ls="--", label="full cache, mean")
            if cells[FULL].get("kvpress", "") != "":
                axis.axhline(cells[FULL]["kvpress"], color="C3", ls=":", alpha=0.6,
                             label="kvpress full cache, mean")
                axis.plot(fractions, [cells[label]["kvpress"] for label, _ in args.budget_list],
                          "x:", lw=2, color="C3", label="kvpress SnapKVPress, mean")
        else:
            axis.plot(fractions, ys, "-", lw=0.8, alpha=0.35, color="gray")
    axis.set_xscale("log", base=2)
    axis.set_xticks(fractions, [label for label, _ in args.budget_list])
    axis.set_ylim(-3, 103)
    axis.set_xlabel(f"budget (fraction of {args.seq_len} tokens)")
    axis.set_ylabel("RULER score (gray: one task each)")
    axis.set_title(f"RULER {args.seq_len}, {Path(args.model).name}")
    axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if not args.skip_plugin:
        run_plugin(args)
    kvpress_seconds = run_kvpress(args) if args.kvpress else None
    samples = samples_of_this_run(read_jsonl(args.out / "samples.jsonl"), args.limit)
    kvpress_path = args.out / "kvpress.jsonl"
    # Every kvpress row on record, also when this call ran none (e.g. --skip-plugin to rebuild
    # the tables after an interrupted run).
    kvpress = read_jsonl(kvpress_path) if kvpress_path.exists() else []
    check_same_prompts(samples, kvpress)
    rows, agreement = summarize(args, samples, kvpress)
    write_csv(args.out / "scores.csv", rows)
    if agreement:
        write_csv(args.out / "agreement.csv", agreement)
    passes = json.loads((args.out / "passes.json").read_text())
    per_task = args.limit if not samples else max(
        sum(r["task"] == t for r in samples) for t in {r["task"] for r in samples})
    text = (
        f"Machine: {machine()}. Model {Path(args.model).name} ({args.dtype}), RULER "
        f"{args.seq_len} (lm_eval 0.4.13, offline data), {per_task} samples per task, "
        f"SnapKV window {args.window_size}, kernel {args.kernel_size}, max pooling; budgets "
        + ", ".join(f"{label} = {tokens}" for label, tokens in args.budget_list)
        + f". lm_eval against the server: {sum(p['seconds'] for p in passes):.0f} s in "
        f"{len(passes)} passes ({sum(p['preemptions'] for p in passes)} preemptions; the "
        f"SnapKV passes took {_hit_share(passes):.0%} of their prompt tokens from the prefix "
        "cache)"
        + (f"; kvpress {kvpress_seconds:.0f} s" if kvpress_seconds is not None else "")
        + ". Scores 0-100; mean = unweighted over tasks.\n\n"
    )
    variants = [c for c, _ in KVPRESS_COLUMNS.values() if any(c in r for r in rows)]
    text += wide_table(rows, args, variants)
    if agreement:
        text += ("\n\nPer-sample agreement with the plugin (same_score: same lm_eval score; "
                 "same_text: identical completion; full: no compression on either side; "
                 "scores over the samples both ran, the all rows unweighted over tasks):\n\n")
        text += markdown_table(agreement)
    compared = side_by_side(args, samples, kvpress) if len(variants) > 1 else []
    if compared:
        write_csv(args.out / "presses.csv", compared)
        text += ("\n\nThe plugin's rules and kvpress's presses on the samples every press ran "
                 "(score: mean over samples; diff: mean per-sample difference from the plugin's "
                 "SnapKV, in points; se: its standard error):\n\n")
        text += markdown_table(compared)
    if args.extra_scores:
        paired = paired_rules(args, samples)
        write_csv(args.out / "rules.csv", paired)
        text += ("\n\nSelection rules against SnapKV on the same samples (diff: mean of the "
                 "per-sample differences, rule - SnapKV, in points; se: its standard error; "
                 "gap_closed: diff / (full - SnapKV)):\n\n")
        text += markdown_table(paired)
    (args.out / "table.md").write_text(text + "\n")
    plot(rows, args, args.out / "ruler.png")
    print(text)
    return rows


if __name__ == "__main__":
    main()
