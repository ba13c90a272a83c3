"""Selection rules: how the prefix positions of one layer are scored before the generic top-C
step. Pure torch, no vLLM import.

A rule (a :class:`ScoreRule`) only scores; keeping positions is generic
(:func:`keep_by_priority`, used by both ``selection.select_kept_positions`` and
``selection.select_kept_positions_chunked``). Scores come in *priority tracks*: track ``t``
contributes its best ``counts[t]`` positions among those no earlier track took. One track is the
plain top-``(C - W)``; two tracks express a two-stage rule such as CriticalKV's. Every rule keeps
exactly ``C`` entries per KV head (the window included), so blocks stay ``ceil(C / bs)``.

Rules (:data:`SCORE_RULES`, chosen by ``--snapkv-score`` or per request ``snapkv_score``):

- ``snapkv`` (:class:`SnapKVScore`, the default): the paper's window attention, pooled and
  averaged per GQA group. Unchanged, so the plugin keeps matching the reference.
- ``chunk`` (:class:`ChunkScore`): whole chunks, after ChunkKV (Liu et al. 2025,
  arXiv:2502.00299). Prefix positions are grouped in aligned chunks of ``chunk_size``; every
  position scores its chunk's mean SnapKV score, so the top keeps whole chunks (the last one cut
  at the budget keeps its earliest positions). A fact the window attends to survives with its
  neighbours: a number written one digit token at a time keeps all its digits, where per-token
  pooling keeps the few around the attention peak.
- ``snapkv-chunk`` (:class:`SnapKVChunkScore`): both: half the prefix budget to SnapKV's single
  positions, the rest to whole chunks by ``chunk``'s score (the two-track shape of ``critical``).
- ``continuation`` (:class:`ContinuationScore`): SnapKV's score carried forward. Each position
  scores the largest of its own score and ``decay ** d`` times the score ``d`` positions before
  it (``decay`` 0.95, ``d <= reach`` = 24). What the window attends to is often where a fact
  *starts* (RULER's needle key, the first digits of its value): the positions after an attended
  one are what the model reads next, so they rank just below it and above the weakly attended
  rest. A position whose score stands out keeps a long run after it; peaks of similar height
  keep short ones each (the decay), so scattered facts (frequent words) are not traded for
  context as with fixed chunks. Max pooling's plateau stays: only its far side is extended.
- ``snapkv-continuation`` (:class:`SnapKVContinuationScore`): half the prefix budget to
  SnapKV's single positions, the rest by ``continuation`` (the two-track shape of
  ``snapkv-chunk``, :class:`SnapKVFirst`).
- ``snapkv-scaled-continuation`` (:class:`SnapKVScaledContinuationScore`): as
  ``snapkv-continuation``, but a score is carried at most ``(C - W) // 32`` positions (1 to
  24): 7 at 1/16 of a 4K prompt, 15 at 1/8, 24 from 1/4 on.
  At small budgets long runs after a few dominant positions crowd out single positions.
- ``snapkv-rare-continuation`` (:class:`SnapKVRareContinuationScore`): as
  ``snapkv-scaled-continuation``, but a score is carried only from positions whose token is
  rare in the prompt (at most 16 occurrences up to 4K tokens, one in 256 positions beyond).
  On a list the carried runs start at its numbering, which repeats, and crowd out the list's
  first items; a needle's runs start at its own rare tokens. It reads the
  prompt's token ids, so prompt compressions only (refused with ``decode_interval``).
- ``snapkv-rare-long-continuation`` (:class:`SnapKVRareLongContinuationScore`): as
  ``snapkv-rare-continuation`` with twice the reach, ``(C - W) // 16`` (14 at 1/16 of a 4K
  prompt, 24 from 1/8 on). With only rare tokens starting runs there are fewer of them, so each
  can run longer: far enough from a needle's key through the digits of its value when the
  haystack repeats digits (RULER's multi-key needle on Qwen2.5-Coder). At 1/16 it loses needles
  whose digits are rare (Gemma 3's essay haystack; a reading: half as many runs fit).
- ``critical`` (:class:`CriticalScore`): value-aware, after CriticalKV (Feng et al. 2025,
  arXiv:2502.03805) as kvpress's ``CriticalKVPress`` mixes it. Stage 1 keeps the SnapKV top of
  ``first_stage_ratio`` of the budget (the window counted in it, as kvpress counts it); stage 2
  fills the rest by ``(attention / W + epsilon) * ||W_o v||``: an entry whose value the output
  projection maps to a large vector moves the layer's output more, at equal attention.

``||W_o v||`` here is the root mean square, over the query heads ``q`` sharing the KV head, of
``||W_o^q v||_2`` (``W_o^q``: the ``[hidden, D]`` columns of the output projection that head
``q``'s output meets). kvpress takes the mean of L1 norms; the L2 form is
``sqrt(v^T M_h v)`` with ``M_h = mean_q W_o^q^T W_o^q`` (:func:`value_metric`, ``[H_kv, D, D]``
per layer, built once), which costs ``D^2`` per position and KV head instead of ``D * hidden *
G`` and holds no ``[positions, hidden]`` intermediate.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import ClassVar

import torch


class ScoreRule(ABC):
    """One selection rule: :meth:`score` rates positions; :meth:`priorities` says how many each
    score track contributes. Stateless; rules needing the layer's values set
    :attr:`needs_values`."""

    name: ClassVar[str]
    #: :meth:`score` sees ranges that start at a multiple of this position and end at one or at
    #: the prefix's end (the chunked path emits its ranges so), for rules scoring aligned groups.
    alignment: ClassVar[int] = 1
    #: Bytes :meth:`score` allocates per scored position and KV head beyond its inputs (the
    #: compaction workspace bound, ``selection.compaction_workspace_bytes``, adds them).
    score_bytes_per_position: ClassVar[int] = 0
    #: :meth:`score` of a position also reads the SnapKV scores of up to this many positions
    #: before it: the chunked path hands it those of the previous range first, then drops their
    #: scores, so a range's scores equal the dense ones (such rules keep ``alignment`` 1).
    lookback: ClassVar[int] = 0
    #: The rule reads the scored entries' values (dequantised as attention sees them) and the
    #: layer's value metric (:func:`value_metric`).
    needs_values: ClassVar[bool] = False
    #: The rule reads the prompt's token ids. Such a rule defines ``token_features(token_ids)
    #: -> [L]`` (one value per prompt position, computed once per compression from the ``[L]``
    #: ids); :meth:`score` sees the scored positions' slice. Prompt compressions only: after
    #: one, the plugin does not track which prompt position each stored entry of a head holds.
    needs_token_ids: ClassVar[bool] = False

    def priorities(self, budget: int, window: int) -> tuple[int, ...]:
        """Positions each score track contributes, in priority order; they sum to the prefix
        budget ``budget - window``."""
        return (budget - window,)

    @abstractmethod
    def score(
        self,
        attention: torch.Tensor,
        window: int,
        budget: int,
        values: torch.Tensor | None = None,
        metric: torch.Tensor | None = None,
        token_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``[tracks, H_kv, n]`` float32 scores of ``n`` consecutive prefix positions.

        Args:
            attention: ``[H_kv, n]`` SnapKV's score of those positions: window attention summed
                over the ``window`` queries, pooled, averaged per GQA group.
            window: the number of window queries.
            budget: ``C``, the entries each KV head keeps (the window included).
            values: ``[n, H_kv, D]`` their values as attention sees them (rules with
                :attr:`needs_values` only).
            metric: ``[H_kv, D, D]`` the layer's :func:`value_metric` (idem).
            token_features: ``[n]`` the rule's ``token_features`` of those positions (rules
                with :attr:`needs_token_ids` only).
        """


class SnapKVScore(ScoreRule):
    """The paper's rule: the top ``C - W`` positions by pooled window attention."""

    name = "snapkv"

    def score(self, attention, window, budget, values=None, metric=None, token_features=None):
        return attention.unsqueeze(0)


class ChunkScore(ScoreRule):
    """ChunkKV's rule (see the module docstring): each position scores the mean of its aligned
    chunk. ``chunk_size`` 16, not ChunkKV's 10: on RULER's niah_single_2 (docs/results.md,
    "Selection rules") chunks of 10 often split a 7-digit needle and lost its last digits. In a
    decode compression the scored entries are the stored ones, in their (ascending logical)
    order, so a chunk there is ``chunk_size`` consecutive stored entries."""

    name = "chunk"
    chunk_size: ClassVar[int] = 16
    alignment = chunk_size
    score_bytes_per_position = 12  # float32: the padded scores, the repeated means, the track

    def score(self, attention, window, budget, values=None, metric=None, token_features=None):
        heads, length = attention.shape
        size = self.chunk_size
        chunks = -(-length // size)
        padded = torch.nn.functional.pad(attention, (0, chunks * size - length))
        padded = padded.view(heads, chunks, size)
        # Summed one column at a time (elementwise adds in a fixed order, zeros padding a short
        # last chunk): the same bits however many chunks a range holds, so the chunked path
        # equals the dense one.
        total = padded[:, :, 0].clone()
        for column in range(1, size):
            total += padded[:, :, column]
        counts = torch.full((chunks,), float(size), device=attention.device)
        counts[-1] = length - (chunks - 1) * size
        means = total / counts
        return means.repeat_interleave(size, dim=1)[:, :length].unsqueeze(0)


class SnapKVFirst:
    """Mixin for the rules ``snapkv-<rule>``: track 0 keeps the SnapKV top of ``snapkv_share`` of
    the prefix budget, track 1 fills the rest by the rule it is mixed into (next in the MRO), a
    position already kept counting once. The single positions hedge a rule that spends the
    budget on context against tasks that need many scattered single tokens (RULER's common and
    frequent words on Gemma 3, docs/results.md)."""

    snapkv_share: ClassVar[float] = 0.5

    def priorities(self, budget: int, window: int) -> tuple[int, ...]:
        prefix_budget = budget - window
        first = int(prefix_budget * self.snapkv_share)
        return (first, prefix_budget - first)

    def score(self, attention, window, budget, values=None, metric=None, token_features=None):
        rest = super().score(  # type: ignore[misc]
            attention, window, budget, values, metric, token_features
        )
        return torch.cat([attention.unsqueeze(0), rest])


class SnapKVChunkScore(SnapKVFirst, ChunkScore):
    """SnapKV's single positions first, then whole chunks by :class:`ChunkScore`'s chunk means
    (a ranked chunk adds only its positions not kept yet). Pure ``chunk`` spends a small budget
    on few chunks and loses frequent words on Gemma 3 (docs/results.md)."""

    name = "snapkv-chunk"
    score_bytes_per_position = ChunkScore.score_bytes_per_position + 8  # the two stacked tracks


class CriticalScore(ScoreRule):
    """CriticalKV's two stages (see the module docstring). ``first_stage_ratio`` and
    ``epsilon`` are kvpress's defaults; ``epsilon`` is on the scale of attention averaged over
    the window (kvpress's SnapKV score), hence ``attention / window``."""

    name = "critical"
    needs_values = True
    first_stage_ratio = 0.5
    epsilon = 1e-4

    def priorities(self, budget, window):
        prefix_budget = budget - window
        first = min(max(int(budget * self.first_stage_ratio) - window, 0), prefix_budget)
        return (first, prefix_budget - first)

    def score(self, attention, window, budget, values=None, metric=None, token_features=None):
        if values is None or metric is None:
            raise ValueError("the 'critical' score needs the values and the layer's value metric")
        weighted = (attention / window + self.epsilon) * projected_value_norms(values, metric)
        return torch.stack([attention, weighted])


class ContinuationScore(ScoreRule):
    """SnapKV's score carried forward (see the module docstring): a position scores the larger
    of its own score and ``decay ** d`` times the score of the position ``d`` before it, for
    ``d <= reach``. Scores are non-negative, so only the ``reach`` positions before a range
    matter (:attr:`~ScoreRule.lookback`)."""

    name = "continuation"
    decay: ClassVar[float] = 0.95
    reach: ClassVar[int] = 24
    lookback = reach
    score_bytes_per_position = 8  # float32: the carried scores and one scaled copy

    def reach_for(self, prefix_budget: int) -> int:
        """Positions a score is carried forward at a prefix budget of ``prefix_budget``."""
        return self.reach

    def score(self, attention, window, budget, values=None, metric=None, token_features=None):
        carried = attention.clone()
        reach = self.reach_for(budget - window)
        for distance in range(1, min(reach, attention.shape[1] - 1) + 1):
            torch.maximum(
                carried[:, distance:],
                attention[:, :-distance] * self.decay**distance,
                out=carried[:, distance:],
            )
        return carried.unsqueeze(0)


class SnapKVContinuationScore(SnapKVFirst, ContinuationScore):
    """SnapKV's single positions first, then :class:`ContinuationScore`'s order for the rest
    (mostly what follows the strongest positions)."""

    name = "snapkv-continuation"
    score_bytes_per_position = ContinuationScore.score_bytes_per_position + 8  # the two tracks


class SnapKVScaledContinuationScore(SnapKVContinuationScore):
    """:class:`SnapKVContinuationScore` with the reach scaled to the budget: a score is carried
    at most ``prefix_budget // reach_share`` positions (between 1 and ``reach``). A few positions
    can hold most of the window's attention (on RULER's frequent words, Gemma 3's top 8
    positions hold up to 87 % of SnapKV's kept score): with a fixed reach of 24, each keeps a run
    of 24 after it, which at 1/16 of a 4K prompt (224 prefix entries) leaves little room for the
    scattered single positions SnapKV keeps (docs/results.md, "Reach scaled to the budget")."""

    name = "snapkv-scaled-continuation"
    reach_share: ClassVar[int] = 32

    def reach_for(self, prefix_budget: int) -> int:
        return max(1, min(self.reach, prefix_budget // self.reach_share))


class SnapKVRareContinuationScore(SnapKVScaledContinuationScore):
    """:class:`SnapKVScaledContinuationScore` whose carried track is carried only from positions
    whose token is rare in the prompt: at most ``max(min_rare_count, L // rare_share)``
    occurrences in its ``L`` tokens (16 up to a 4K prompt, one in 256 positions beyond). A
    frequent token's score stays on the position itself. On RULER's common words (Gemma 3,
    docs/results.md, "A fifth probe round") the carried runs start at the list's numbering
    (digits and ``.``, 82 to 423 occurrences in a 4K prompt) and take the slots that kept the
    list's first items whole; a needle's runs start at rare tokens (its key's ``:``, the space
    before its digits). Prompt compressions only (:attr:`~ScoreRule.needs_token_ids`)."""

    name = "snapkv-rare-continuation"
    needs_token_ids = True
    min_rare_count: ClassVar[int] = 16
    rare_share: ClassVar[int] = 256
    # The parent's 16 and the gated scores (float32); the rare mask is one byte per position.
    score_bytes_per_position = SnapKVScaledContinuationScore.score_bytes_per_position + 4

    def token_features(self, token_ids: torch.Tensor) -> torch.Tensor:
        """``[L]`` bool: the position's token is rare in the prompt."""
        _, inverse, counts = torch.unique(token_ids, return_inverse=True, return_counts=True)
        limit = max(self.min_rare_count, token_ids.shape[0] // self.rare_share)
        return (counts <= limit)[inverse]

    def score(self, attention, window, budget, values=None, metric=None, token_features=None):
        if token_features is None:
            raise ValueError(f"the {self.name!r} score needs the prompt's token ids")
        carried = ContinuationScore.score(self, attention * token_features, window, budget)[0]
        torch.maximum(carried, attention, out=carried)  # a frequent token keeps its own score
        return torch.stack([attention, carried])


class SnapKVRareLongContinuationScore(SnapKVRareContinuationScore):
    """:class:`SnapKVRareContinuationScore` with the reach of ``prefix_budget // 16``. The
    scaled reach (``// 32``) was chosen with every position starting a run; the gate leaves the
    runs to rare tokens, and at 1/16 a reach of 7 ends a needle's run a few digits into its
    value when the haystack's digits are frequent (RULER's multi-key needle, where the haystack
    is itself numbered needles). Measured: it answers that needle on Qwen2.5-Coder-1.5B, but at
    1/16 loses Gemma 3's needles, whose digits are rare and start runs of their own
    (docs/results.md, "Longer runs from rare tokens")."""

    name = "snapkv-rare-long-continuation"
    reach_share = 16


class SnapKVRareStepContinuationScore(SnapKVRareLongContinuationScore):
    """:class:`SnapKVRareLongContinuationScore` whose runs count the rare tokens they pass: a
    score is carried from a rare position ``s`` to ``p`` (``p - s`` up to the long reach,
    ``prefix_budget // 16``) only while ``(s, p]`` holds at most the short reach's number
    (``prefix_budget // 32``) of rare tokens. So a run goes far through frequent tokens (a
    multi-key needle's value, whose digits a haystack of numbered needles repeats, on
    Qwen2.5-Coder-1.5B) and stays short through rare ones (an essay needle's digits on Gemma 3,
    each of which starts a run of its own). Measured: at 1/16 Gemma 3's needles are cut anyway
    (43 % of SnapKV's gap; a reading: runs from the essay's other rare words now run on through
    its frequent ones); :class:`SnapKVRareTailContinuationScore` adds the tail that keeps them
    (docs/results.md, "Runs that count rare tokens"). Runs end where the long rule's end, so
    its :attr:`~ScoreRule.lookback` covers the chunked path. A position more than the short
    reach past its source scores ``tail_decay`` less per further position (1: no extra decay)."""

    name = "snapkv-rare-step-continuation"
    rare_steps_share: ClassVar[int] = 32
    tail_decay: ClassVar[float] = 1.0
    # The rare counts per position: their int32 cumulative sum, one difference, its mask.
    score_bytes_per_position = SnapKVRareLongContinuationScore.score_bytes_per_position + 12

    def rare_steps_for(self, prefix_budget: int) -> int:
        """Rare tokens a run may pass at a prefix budget of ``prefix_budget``."""
        return max(1, min(self.reach, prefix_budget // self.rare_steps_share))

    def rare_passes_allowed(self, distance: int, rare_steps: int) -> int:
        """Rare tokens a run may pass on its way to the position ``distance`` after its source."""
        return rare_steps

    def score(self, attention, window, budget, values=None, metric=None, token_features=None):
        if token_features is None:
            raise ValueError(f"the {self.name!r} score needs the prompt's token ids")
        reach = self.reach_for(budget - window)
        rare_steps = self.rare_steps_for(budget - window)
        sources = attention * token_features
        rare_seen = torch.cumsum(token_features, 0, dtype=torch.int32)
        carried = attention.clone()  # a frequent token keeps its own score
        for distance in range(1, min(reach, attention.shape[1] - 1) + 1):
            allowed = self.rare_passes_allowed(distance, rare_steps)
            within = rare_seen[distance:] - rare_seen[:-distance] <= allowed
            factor = self.decay**distance * self.tail_decay ** max(0, distance - rare_steps)
            step = sources[:, :-distance] * factor
            step.mul_(within)
            torch.maximum(carried[:, distance:], step, out=carried[:, distance:])
        return torch.stack([attention, carried])


class SnapKVRareTailContinuationScore(SnapKVRareStepContinuationScore):
    """:class:`SnapKVRareStepContinuationScore` whose runs past the short reach decay faster
    (``tail_decay`` 0.8 per position): their far positions outrank other runs' near ones only
    after a source far stronger than those runs' sources. The multi-key needle's key is such a
    source on Qwen2.5-Coder-1.5B, where the window asks for it by name; on Gemma 3's essay the
    untailed long runs after ordinary rare words took the slots of the needle's own runs at 1/16
    (docs/results.md, "Runs that count rare tokens")."""

    name = "snapkv-rare-tail-continuation"
    tail_decay = 0.8


class SnapKVRarePathContinuationScore(SnapKVRareStepContinuationScore):
    """:class:`SnapKVRareStepContinuationScore` whose runs go past the short reach
    (``prefix_budget // 32``) only through frequent tokens: a score is carried from a rare
    position ``s`` to ``p`` beyond it only if ``(s, p]`` holds no rare token. Within the short
    reach it is :class:`SnapKVRareContinuationScore`'s run. A multi-key needle's key is followed
    by frequent tokens only (the haystack repeats ``is:`` and the value's digits), so its run
    reaches the whole value (Qwen2.5-Coder-1.5B); an essay's rare words sit a few words apart,
    so their runs stay short and leave Gemma 3's needle digits their slots, which the step and
    tail rules' long runs through a few rare words took at 1/16. Measured at 1/16: Gemma 3's
    needles kept (53 % of SnapKV's gap on 3 tasks), Qwen's multi-key needle answered, but Qwen's
    variable tracking falls (-15 points on 4 samples; docs/results.md, "Runs only through
    frequent tokens")."""

    name = "snapkv-rare-path-continuation"

    def rare_passes_allowed(self, distance: int, rare_steps: int) -> int:
        return rare_steps if distance <= rare_steps else 0


#: Every rule by name; the first is the default.
SCORE_RULES: dict[str, ScoreRule] = {
    rule.name: rule
    for rule in (
        SnapKVScore(), CriticalScore(), ChunkScore(), SnapKVChunkScore(), ContinuationScore(),
        SnapKVContinuationScore(), SnapKVScaledContinuationScore(), SnapKVRareContinuationScore(),
        SnapKVRareLongContinuationScore(), SnapKVRareStepContinuationScore(),
        SnapKVRareTailContinuationScore(), SnapKVRarePathContinuationScore(),
    )
}
SCORE_NAMES: tuple[str, ...] = tuple(SCORE_RULES)
DEFAULT_SCORE = "snapkv"


def score_rule(rule: str | ScoreRule) -> ScoreRule:
    """The rule named ``rule`` (or ``rule`` itself); raises naming the allowed names."""
    if isinstance(rule, ScoreRule):
        return rule
    try:
        return SCORE_RULES[rule]
    except KeyError:
        raise ValueError(f"score must be one of {', '.join(SCORE_NAMES)}; got {rule!r}") from None


def projected_value_norms(values: torch.Tensor, metric: torch.Tensor) -> torch.Tensor:
    """``[H_kv, n]``: ``sqrt(v^T M_h v)`` for each value ``v`` (``[n, H_kv, D]``, any float
    dtype) of KV head ``h``, in float32."""
    v = values.float().permute(1, 0, 2)  # [H_kv, n, D]
    projected = torch.matmul(v, metric)
    return projected.mul_(v).sum(dim=-1).clamp_(min=0).sqrt_()


def value_metric(
    project: Callable[[torch.Tensor], torch.Tensor],
    num_q_heads: int,
    num_kv_heads: int,
    head_size: int,
    dtype: torch.dtype,
    device: torch.device | str,
) -> torch.Tensor:
    """``[H_kv, D, D]`` float32: ``M_h = mean_q W_o^q^T W_o^q`` over the query heads ``q`` of KV
    head ``h``, so that ``v^T M_h v`` is the mean over those heads of ``||W_o^q v||^2``.

    ``project(x)`` is ``x W_o^T`` for rows ``x`` of width ``H_q * D`` (the attention output of
    this rank's query heads, in ``dtype``): the output projection without its bias and, under
    tensor parallelism, without the all-reduce (the rank's partial product, which involves only
    its own heads' columns). Passing unit rows through it reads ``W_o`` however the layer stores
    it (CPU builds repack linear weights and drop the plain matrix). One KV head's ``G * D``
    rows at a time, so the transient memory is ``O(G * D * (H_q * D + hidden))``."""
    if num_q_heads % num_kv_heads:
        raise ValueError(f"H_q={num_q_heads} is not a multiple of H_kv={num_kv_heads}")
    group = num_q_heads // num_kv_heads
    width = num_q_heads * head_size
    rows = group * head_size
    metric = torch.empty(num_kv_heads, head_size, head_size, dtype=torch.float32, device=device)
    for kv_head in range(num_kv_heads):
        unit = torch.zeros(rows, width, dtype=dtype, device=device)
        unit[:, kv_head * rows : (kv_head + 1) * rows].fill_diagonal_(1)
        columns = project(unit).float().view(group, head_size, -1)  # [G, D, hidden]: W_o^q^T
        del unit
        metric[kv_head] = torch.matmul(columns, columns.transpose(1, 2)).mean(dim=0)
    return metric


def candidate_counts(counts: tuple[int, ...]) -> tuple[int, ...]:
    """Positions of each track's own order that :func:`keep_by_priority` may need: its count
    plus all earlier tracks' (those may have taken that many of its best)."""
    total, out = 0, []
    for count in counts:
        total += count
        out.append(total)
    return tuple(out)


def keep_by_priority(candidates: list[torch.Tensor], counts: tuple[int, ...]) -> torch.Tensor:
    """The generic keep step. ``candidates[t]``: ``[H, >= candidate_counts(counts)[t]]``
    positions of track ``t``, best first (ties: the earlier position). Track 0 keeps its first
    ``counts[0]``; each later track its first ``counts[t]`` not kept yet. Returns ``[H,
    sum(counts)]`` positions, each row ascending. No host synchronisation."""
    kept: torch.Tensor | None = None
    for track, count in zip(candidates, counts):
        if count == 0:
            continue
        if kept is None:
            chosen = track[:, :count]
        else:
            # Membership by binary search in the ascending kept rows: O(H * (k + n)) memory.
            track = track.contiguous()
            at = torch.searchsorted(kept, track).clamp_(max=kept.shape[1] - 1)
            taken = kept.gather(1, at) == track
            # A stable sort puts the free candidates first, in their order.
            order = torch.sort(taken.to(torch.uint8), dim=1, stable=True).indices[:, :count]
            chosen = track.gather(1, order)
        kept = chosen if kept is None else torch.cat([kept, chosen], dim=1)
        kept = kept.sort(dim=1).values
    return kept
