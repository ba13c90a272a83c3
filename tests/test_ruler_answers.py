"""The aggregation-answer readings of ``benchmarks.quality.ruler_answers`` on synthetic RULER rows
(no server): list words exclude the instruction and the question, ``first-k`` counts only the
first ``k`` distinct list words named, and rules are paired with SnapKV at their own budget."""

from __future__ import annotations

import json

import pytest

from benchmarks.quality import ruler_answers

FWE_PROMPT = ("Read the following coded text and track the frequency of each coded word. Find the "
              "three most frequently appeared coded words. aaaaaa bbbbbb ... aaaaaa cccccc ... "
              "dddddd aaaaaa bbbbbb\nQuestion: Do not provide any explanation. Please ignore the "
              "dots '....'. What are the three most frequently appeared words in the above coded "
              "text? Answer: According to the coded text above, the three most frequently "
              "appeared words are:")
CWE_PROMPT = ("Below is a numbered list of words. In these words, some appear more often than "
              "others. Memorize the ones that appear most often.\n1. apple 2. pear 3. apple "
              "4. plum\nQuestion: What are the 10 most common words in the above list?\n\nAnswer: "
              "The top 10 words that appear most often in the list are:")


def _sample(task: str, doc_id: int, prompt: str, references: list[str],
            texts: dict[str, tuple[float, str]]) -> dict:
    return {"task": task, "doc_id": doc_id, "prompt": prompt, "references": references,
            "outputs": {mode: {"score": score, "text": text}
                        for mode, (score, text) in texts.items()}}


def test_list_words_are_the_lists_own_not_the_instructions_or_the_questions():
    assert ruler_answers.list_words(FWE_PROMPT, "ruler_fwe") == {
        "aaaaaa", "bbbbbb", "cccccc", "dddddd"}
    assert ruler_answers.list_words(CWE_PROMPT, "ruler_cwe") == {"apple", "pear", "plum"}


def test_first_k_counts_the_first_distinct_list_words_only():
    # Containment gives 2/3 for a completion that lists four words; the question asks for
    # three, and the first three distinct list words named hold one reference.
    sample = _sample("ruler_fwe", 0, FWE_PROMPT, ["aaaaaa", "bbbbbb", "cccccc"], {
        "snapkv-256": (2 / 3, " dddddd dddddd aaaaaa Question provide ... dots bbbbbb"),
        "rule-256": (1 / 3, " aaaaaa, aaaaaa, aaaaaa."),
    })
    rows = {r["mode"]: r for r in ruler_answers.answer_rows([sample], ["snapkv-256", "rule-256"])}
    assert rows["snapkv-256"]["distinct"] == 3  # dddddd, aaaaaa, bbbbbb; question words ignored
    assert abs(rows["snapkv-256"]["first_k"] - 200 / 3) < 1e-9
    assert rows["rule-256"]["distinct"] == 1
    assert abs(rows["rule-256"]["first_k"] - 100 / 3) < 1e-9


def test_rules_pair_with_snapkv_at_their_own_budget(tmp_path):
    assert ruler_answers.snapkv_mode("snapkv-scaled-continuation-256") == "snapkv-256"
    assert ruler_answers.snapkv_mode("snapkv-256") is None
    assert ruler_answers.snapkv_mode("full") is None
    refs = ["apple", "pear"]
    samples = [
        _sample("ruler_cwe", 0, CWE_PROMPT, refs, {
            "full": (1.0, "1. apple 2. pear"), "snapkv-512": (1.0, "1. apple 2. pear"),
            "rule-512": (0.5, "1. apple 2. apple"), "snapkv-256": (0.5, "1. plum 2. apple"),
            "rule-256": (1.0, "1. pear 2. apple")}),
        _sample("ruler_cwe", 1, CWE_PROMPT, refs, {
            "full": (0.5, "1. plum 2. pear"), "snapkv-512": (0.5, "1. pear"),
            "rule-512": (0.5, "1. pear"), "snapkv-256": (0.0, "1. plum"),
            "rule-256": (0.5, "1. apple")}),
        _sample("niah_single_2", 0, "no list", ["1234"], {"full": (1.0, "1234")}),
    ]
    with open(tmp_path / "samples.jsonl", "w") as handle:
        handle.writelines(json.dumps(s) + "\n" for s in samples)
    table = ruler_answers.main(["--out", str(tmp_path)])
    lines = {line.split(" | ")[1]: line for line in table.splitlines()[2:]}
    assert set(lines) == {"full", "snapkv-512", "rule-512", "snapkv-256", "rule-256"}
    # rule-512 vs snapkv-512: -50 and 0 points; rule-256 vs snapkv-256: +50 and +50.
    assert lines["rule-512"].endswith("| -25.0 ± 25.0 | -25.0 ± 25.0 |")
    assert lines["rule-256"].endswith("| +50.0 ± 0.0 | +50.0 ± 0.0 |")
    assert lines["snapkv-256"].endswith("|  |  |")
    assert (tmp_path / "answers.md").read_text().strip() == table
    assert (tmp_path / "answers.csv").read_text().count("\n") == 11  # header + 2 × 5 rows


def test_a_run_without_aggregation_samples_or_an_unknown_mode_is_refused_by_name(tmp_path):
    niah = _sample("niah_single_2", 0, "no list", ["1234"], {"full": (1.0, "1234")})
    (tmp_path / "samples.jsonl").write_text(json.dumps(niah) + "\n")
    with pytest.raises(SystemExit, match="holds no ruler_cwe or ruler_fwe sample"):
        ruler_answers.main(["--out", str(tmp_path)])
    cwe = _sample("ruler_cwe", 0, CWE_PROMPT, ["apple"], {"full": (1.0, "1. apple")})
    (tmp_path / "samples.jsonl").write_text(json.dumps(cwe) + "\n")
    with pytest.raises(SystemExit, match="--modes: snapkv-256 not in this run; it holds full"):
        ruler_answers.main(["--out", str(tmp_path), "--modes", "full,snapkv-256"])
