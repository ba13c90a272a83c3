"""Long-context retrieval prompts for demos, tests and benchmarks.

Completion-style passkey prompts (the form SmolLM2-135M answers with the full cache): filler text,
one key line at a depth, the question at the end, inside the observation window.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

FILLER = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. "
    "There and back again. "
)
HEADER = "There is important info hidden inside a lot of irrelevant text. Find it and memorize it. "
QUESTION = "What is the pass key? The pass key is"


def passkey_prompt(num_filler_tokens: int, passkey: int, depth: float) -> str:
    """~``num_filler_tokens`` tokens of filler (24 tokens a sentence group for SmolLM2), the key
    line at ``depth`` (0..1) of the filler, and the question at the end."""
    groups = [FILLER] * max(1, num_filler_tokens // 24)
    groups.insert(
        int(len(groups) * depth),
        f"The pass key is {passkey}. Remember it. {passkey} is the pass key. ",
    )
    return HEADER + "".join(groups) + QUESTION


# --- benchmark tasks ------------------------------------------------------------------------

COLORS = ("red", "blue", "green", "yellow", "white", "black")


@dataclass(frozen=True)
class RetrievalTask:
    """One generated prompt and the string a correct completion contains."""

    kind: str
    target_tokens: int
    depth: float
    prompt: str
    answer: str

    def is_correct(self, completion: str) -> bool:
        return self.answer in completion


def _filler_with(lines: list[str], num_filler_tokens: int, depths: list[float]) -> str:
    groups = [FILLER] * max(1, num_filler_tokens // 24)
    for line, depth in sorted(zip(lines, depths), key=lambda pair: -pair[1]):
        groups.insert(int(len(groups) * depth), line)
    return "".join(groups)


def make_task(kind: str, num_filler_tokens: int, depth: float, seed: int) -> RetrievalTask:
    """``passkey``: one key, the question at the end (inside the observation window).
    ``multikey``: four keys for four doors, the question asks one.
    ``query_first``: the question comes before the context; the prompt ends with a bare cue, so
    the observation window holds no question (SnapKV's known weak case)."""
    rng = random.Random(f"{kind}-{num_filler_tokens}-{depth}-{seed}")
    key = rng.randrange(10000, 100000)
    if kind == "passkey":
        prompt = passkey_prompt(num_filler_tokens, key, depth)
        return RetrievalTask(kind, num_filler_tokens, depth, prompt, str(key))
    if kind == "multikey":
        doors = rng.sample(COLORS, 4)
        keys = [rng.randrange(10000, 100000) for _ in doors]
        asked = rng.randrange(4)
        spread = [depth if i == asked else rng.random() for i in range(4)]
        lines = [f"The pass key of the {d} door is {k}. " for d, k in zip(doors, keys)]
        body = _filler_with(lines, num_filler_tokens, spread)
        door = doors[asked]
        question = f"What is the pass key of the {door} door? The pass key of the {door} door is"
        return RetrievalTask(
            kind, num_filler_tokens, depth, HEADER + body + question, str(keys[asked])
        )
    if kind == "query_first":
        line = f"The pass key is {key}. Remember it. {key} is the pass key. "
        body = _filler_with([line], num_filler_tokens, [depth])
        prompt = "Question: what is the pass key hidden in the text below? " + HEADER + body
        prompt += "Answer: the pass key is"
        return RetrievalTask(kind, num_filler_tokens, depth, prompt, str(key))
    raise ValueError(f"unknown task kind {kind!r}; known: passkey, multikey, query_first")
