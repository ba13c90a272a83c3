"""The RULER benchmark's tables from synthetic rows (no server, no kvpress): every kvpress press
kvpress.jsonl holds gets its column, and per-sample agreement with the plugin is reported only for
the presses that run the plugin's rule (SnapKVPress with either pooling). And which passes
``--resume`` skips."""

from __future__ import annotations

import json

import pytest

from benchmarks.quality import ruler
from benchmarks.quality.ruler_eval import pass_on_record


def _sample(task: str, doc_id: int, scores: dict[str, float]) -> dict:
    return {"task": task, "doc_id": doc_id, "prompt_tokens": 4000,
            "outputs": {mode: {"score": s, "text": str(s)} for mode, s in scores.items()}}


def _completion(task: str, doc_id: int, mode: str, score: float, prompt_tokens: int = 4000) -> dict:
    return {"task": task, "doc_id": doc_id, "mode": mode, "score": score, "text": str(score),
            "prompt_tokens": prompt_tokens}


def test_kvpress_columns_agreement_and_side_by_side_follow_the_presses_held(tmp_path):
    args = ruler.parse_args(["--skip-plugin", "--model", str(tmp_path), "--budgets", "512",
                             "--seq-len", "4096", "--out", str(tmp_path)])
    samples = [_sample("niah_single_2", 0, {"full": 1.0, "snapkv-512": 0.0}),
               _sample("niah_single_2", 1, {"full": 1.0, "snapkv-512": 1.0})]
    kvpress = [_completion("niah_single_2", 0, "full", 1.0),
               _completion("niah_single_2", 0, "snapkv-512", 0.0),
               _completion("niah_single_2", 0, "criticalkv-512", 1.0),
               _completion("niah_single_2", 1, "criticalkv-512", 1.0),
               _completion("niah_single_2", 0, "chunkkv-512", 0.0)]
    rows, agreement = ruler.summarize(args, samples, kvpress)

    at_512 = next(r for r in rows if r["task"] == "niah_single_2" and r["budget"] == "512")
    assert at_512["plugin"] == 50.0
    assert (at_512["kvpress"], at_512["kvpress n"]) == (0.0, 1)
    assert (at_512["kvpress CriticalKV"], at_512["kvpress CriticalKV n"]) == (100.0, 2)
    assert (at_512["kvpress ChunkKV"], at_512["kvpress ChunkKV n"]) == (0.0, 1)
    assert "kvpress max-pool" not in at_512  # no such rows held
    full = next(r for r in rows if r["task"] == "niah_single_2" and r["budget"] == "full")
    assert full["kvpress"] == 100.0 and full["kvpress CriticalKV"] == ""

    assert {a["kvpress"] for a in agreement} == {"kvpress"}
    per_task = [a for a in agreement if a["task"] == "niah_single_2" and a["budget"] == "512"]
    assert [(a["n"], a["same_score"], a["same_text"]) for a in per_task] == [(1, 1, 1)]

    # Side by side: only the samples every press ran (sample 0), each against the plugin's SnapKV.
    compared = {c["method"]: c for c in ruler.side_by_side(args, samples, kvpress)}
    assert set(compared) == {"plugin full", "plugin snapkv", "kvpress", "kvpress CriticalKV",
                             "kvpress ChunkKV"}
    assert {c["n"] for c in compared.values()} == {1}
    assert compared["kvpress CriticalKV"]["score"] == 100.0
    assert compared["kvpress CriticalKV"]["diff_vs_plugin_snapkv"] == 100.0
    assert compared["kvpress ChunkKV"]["diff_vs_plugin_snapkv"] == 0.0


def test_kvpress_rows_of_other_samples_are_refused():
    samples = [_sample("niah_single_2", 0, {"full": 1.0, "snapkv-512": 0.0})]
    ruler.check_same_prompts(samples, [_completion("niah_single_2", 0, "snapkv-512", 0.0)])
    stale = [_completion("niah_single_2", 0, "snapkv-512", 0.0, prompt_tokens=3990)]
    with pytest.raises(SystemExit, match="niah_single_2 sample 0 .*3990-token prompt.*4000"):
        ruler.check_same_prompts(samples, stale)


def test_an_unknown_kvpress_press_is_refused_before_anything_runs(tmp_path, capsys):
    with pytest.raises(SystemExit):
        ruler.parse_args(["--skip-plugin", "--model", str(tmp_path), "--out", str(tmp_path),
                          "--kvpress-presses", "snapkv,adakv"])
    assert "--kvpress-presses: unknown adakv; choose from snapkv, snapkv-maxpool" in (
        capsys.readouterr().err)


def test_resume_skips_only_the_passes_every_sample_of_the_round_holds():
    rows = {("niah_single_2", 0): _sample("niah_single_2", 0, {"full": 1.0, "snapkv-512": 0.0}),
            ("niah_single_2", 1): _sample("niah_single_2", 1, {"full": 1.0})}
    assert pass_on_record(rows, "niah_single_2", [0, 1], "full")
    assert not pass_on_record(rows, "niah_single_2", [0, 1], "snapkv-512")  # sample 1 lacks it
    assert pass_on_record(rows, "niah_single_2", [0], "snapkv-512")
    assert not pass_on_record(rows, "niah_single_2", [0, 1, 2], "full")  # sample 2 never ran
    assert not pass_on_record(rows, "ruler_vt", [0], "full")  # another task's rows


def test_tables_cover_this_calls_limit_when_an_earlier_run_held_more_samples(tmp_path):
    """A ``--resume`` call with a smaller ``--limit`` than the run on record: the rows beyond it
    lack this call's passes, and the tables are built over the first ``--limit`` samples only."""
    on_record = [_sample("niah_single_2", 0, {"full": 1.0, "snapkv-512": 0.0}),
                 _sample("niah_single_2", 1, {"full": 1.0})]  # the earlier run's second sample
    (tmp_path / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in on_record))
    (tmp_path / "passes.json").write_text("[]")
    rows = ruler.main(["--skip-plugin", "--model", str(tmp_path), "--tasks", "niah_single_2",
                       "--budgets", "512", "--limit", "1", "--out", str(tmp_path)])

    at_512 = next(r for r in rows if r["task"] == "niah_single_2" and r["budget"] == "512")
    assert (at_512["n"], at_512["plugin"]) == (1, 0.0)
    assert "1 samples per task" in (tmp_path / "table.md").read_text()
