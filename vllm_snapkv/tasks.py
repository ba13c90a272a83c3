"""Long-context retrieval prompts for demos, tests and benchmarks.

Completion-style passkey prompts (the form SmolLM2-135M answers with the full cache): filler text,
one key line at a depth, the question at the end, inside the observation window.
"""

from __future__ import annotations

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
