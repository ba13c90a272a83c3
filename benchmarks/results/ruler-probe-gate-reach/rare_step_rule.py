"""A probe record, not plugin code: the candidate rule the sixth probe round pointed at, as it
was pasted into ``vllm_snapkv/scoring.py`` (and ``SCORE_RULES``) for one screening run on each
model and removed before committing (README here, "Screen"). Runs carried from rare tokens whose
reach counts the rare tokens they pass: a score is carried from a rare position ``s`` to ``p``
(``d = p - s <= (C - W) // 16``) while ``(s, p]`` holds at most ``(C - W) // 32`` rare tokens, so
a run goes far only through frequent tokens (a multi-key needle's ` is: ` and digits on
Qwen's haystack) and stays short through rare ones (an essay needle's digits on Gemma 3's).
Checked before the runs: its chunked selection equals the dense one on a random prompt."""
import torch

from vllm_snapkv.scoring import SnapKVRareContinuationScore
class SnapKVRareStepContinuationScore(SnapKVRareContinuationScore):
    """Runs from rare tokens whose reach counts the rare
    tokens they pass: a score is carried from a rare position s to p (d = p - s <= (C - W) // 16)
    while (s, p] holds at most (C - W) // 32 rare tokens."""

    name = "snapkv-rare-step-continuation"

    def score(self, attention, window, budget, values=None, metric=None, token_features=None):
        if token_features is None:
            raise ValueError(f"the {self.name!r} score needs the prompt's token ids")
        prefix_budget = budget - window
        rare_steps = self.reach_for(prefix_budget)
        raw_reach = max(1, min(self.reach, prefix_budget // 16))
        sources = attention * token_features
        cumulative = torch.cumsum(token_features.to(torch.int32), 0)
        carried = attention.clone()
        for distance in range(1, min(raw_reach, attention.shape[1] - 1) + 1):
            passed = cumulative[distance:] - cumulative[:-distance]
            step = sources[:, :-distance] * (self.decay**distance) * (passed <= rare_steps)
            torch.maximum(carried[:, distance:], step, out=carried[:, distance:])
        return torch.stack([attention, carried])
