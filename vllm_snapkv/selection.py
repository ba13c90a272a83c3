"""SnapKV position selection: pure torch, no vLLM import.

Implements rules 2-7 of shared/docs/snapkv-algorithm.md for one attention layer of one request:
window-attention scores -> 1-D pooling -> mean over each GQA group -> top positions per KV head,
plus the observation window, in ascending order. Two implementations of the same selection:

- :func:`select_kept_positions_chunked`, what the worker runs, holds nothing proportional to the
  prompt length ``L``. Keys come through a callback, one span of ``P`` positions at a time
  (:data:`SCORE_CHUNK_TOKENS`, rounded to the cache's blocks), scored with an exact two-pass
  softmax. Pass 1: per KV head, query head of its group and window query, the running max and
  sum of ``exp(logit - max)`` over all ``L`` keys (sink term included, soft-cap applied, causal
  inside the window). Pass 2: each span's logits again, normalised with those, summed over the
  window queries; pooled with the ``k // 2`` window sums on either side carried between spans
  (each position's sum is computed once, so pooling equals the unchunked pooling); averaged per
  GQA group; merged into a running top-``(C - W)`` per KV head by a stable sort of the running
  top followed by the span (among equal scores the earlier position wins, as in
  :func:`top_positions`).
- :func:`select_kept_positions` is the dense definition: all ``L`` keys at once, ``[H_q, W, L]``
  logits and probabilities materialised (and, through matmul broadcasting, the keys in float32
  once per query head). It is the reference the chunked path is tested against
  (tests/test_selection.py, tests/test_compaction_memory.py).

Both compute in float32. The chunked softmax sums its denominator span by span (across spans in
float64) and its matmuls have other shapes, so scores agree to float32 rounding of the logits
(relative differences ~1e-6, up to ~1e-5 where logits reach ~50), not bit for bit: the
selections can differ only where two positions' scores are that close at the budget's edge, the
latitude any change of matmul kernel (CPU vs GPU, another cuBLAS algorithm) already has. Exact
ties (max-pooling plateaus, equal keys) are broken identically.

Temporary memory of compacting one request in one layer (:func:`compaction_workspace_bytes`),
independent of ``L``. With ``P`` the span (:data:`SCORE_CHUNK_TOKENS` rounded down to a multiple
of the block size, at least one block), ``h = k // 2``, ``H_q``/``H_kv`` query and KV heads,
``W`` the window, ``D`` the head size, ``D_s``/``e`` the stored K row width and element bytes of
the cache, ``C`` the budget and ``N = C + outputs`` the rows written::

    selection = 4·P·H_q·W             logits of one span (normalised in place)
              + 8·P·H_kv·D            its keys in float32 (x2: fp8 dequantisation holds two)
              + 2·e·P·H_kv·D_s        the stored rows read (x2: gather, then reorder: CPU amx)
              + 12·(P + 2h + a)·H_q   window sums (with the carried halo) and pooled scores
              + 48·H_kv·(C + P)       running top merged with a span (scores, positions, sort)
              + 4·H_q·W·(D + 2)       scaled window queries, running max and sum
    write     = 4·e·N·H_kv·D_s + 64·N·H_kv    kept K and V, their concatenation, indices
    bound     = max(selection, write)

``a`` is the rule's alignment minus one (:attr:`~vllm_snapkv.scoring.ScoreRule.alignment`:
a rule scoring aligned chunks sees ranges ending at chunk boundaries, so up to ``a`` more sums
are carried; 0 for SnapKV); a rule allocating ``s`` bytes per scored position and KV head
(:attr:`~vllm_snapkv.scoring.ScoreRule.score_bytes_per_position`: 12 for ``chunk``, 8 for
``continuation``, 0 for SnapKV) adds ``s·(P + a + 1 + b)·H_kv``, where ``b`` is its
:attr:`~vllm_snapkv.scoring.ScoreRule.lookback` (24 for ``continuation``, else 0); a rule with a
lookback also holds its range's scores joined to the ``b`` before them, ``4·(P + b)·H_kv``. A
rule with ``T`` score tracks (:mod:`vllm_snapkv.scoring`) keeps ``T`` running tops (the merge
term times ``T``). A rule that reads values (``critical``)
adds to ``selection`` the values of one span, ``2·e·P·H_kv·D_s + 16·P·H_kv·D + 64·P·H_kv``
(the stored rows gathered, their float32 dequantisation, the projected rows and the indices),
and builds each layer's value metric once, a separate phase of
``G·D·(e_m·(H_q·D + hidden) + 4·hidden) + 8·G·D²`` (``G = H_q / H_kv``, ``e_m`` the model's
element bytes): ``bound = max(selection, write, metric)``.

A rule that reads token ids (the ``snapkv-rare-*`` rules) also needs its per-position
features of the prompt, ``[L]`` (one byte per position for their rare-token mask): the
one term proportional to ``L``, computed once per compression on the host and held for all
layers, not per layer.

For Llama-3.1-8B (32/8 heads, head 128, bf16 cache, block 16, W 32, k 7, P 8192) the bound is
135-136 MiB for C = 1024-4096 (the selection term; write is 34 MiB at C = 4096); measured on the
standard layout, 83-91 MiB from 8K to 128K tokens, where the dense path held 209 MiB at 8K and
about 3.2 GiB at 128K (docs/results.md, "Compaction memory"). The kept positions
(``8·H_kv·C`` bytes per layer) are the result, not workspace.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Literal

import torch
import torch.nn.functional as F

from vllm_snapkv.scoring import (
    DEFAULT_SCORE,
    ScoreRule,
    candidate_counts,
    keep_by_priority,
    score_rule,
)

Pooling = Literal["max", "avg"]

#: Key positions scored at a time by :func:`select_kept_positions_chunked` (rounded down to a
#: multiple of the cache's block size, at least one block). The workspace grows linearly with it
#: (the bound is ~135 MiB for Llama-3.1-8B at 8192); smaller spans mean more, smaller kernels.
SCORE_CHUNK_TOKENS = 8192

#: ``read_keys(start, end)``: keys of prompt positions ``[start, end)`` as ``[end - start, H_kv,
#: D]``, any float dtype (scored in float32), after RoPE and dequantised as attention sees them.
KeyReader = Callable[[int, int], torch.Tensor]


def window_attention_scores(
    window_queries: torch.Tensor,
    keys: torch.Tensor,
    scale: float,
    sinks: torch.Tensor | None = None,
    soft_cap: float | None = None,
) -> torch.Tensor:
    """Attention mass each prefix position receives from the observation window, normalised as
    the layer's own attention normalises it.

    Args:
        window_queries: ``[W, H_q, D]`` queries of the last ``W`` prompt tokens, after RoPE.
        keys: ``[L, H_kv, D]`` keys of the whole prompt, after RoPE. ``H_q % H_kv == 0``.
        scale: the layer's softmax scale.
        sinks: ``[H_q]`` learned sink logits (gpt-oss): each query head's softmax denominator
            also holds ``exp(sink)``, so the keys share less than all of the mass.
        soft_cap: logit soft-capping ``cap * tanh(logits / cap)`` (Gemma 2), applied after the
            scale as the attention kernels do.

    Returns:
        ``[H_q, L - W]`` float32: softmax(Q_win K^T) over all ``L`` keys (causal inside the window),
        summed over the ``W`` window queries, restricted to the prefix ``[0, L - W)``.
    """
    num_window, num_q_heads, head_dim = window_queries.shape
    prompt_len, num_kv_heads, _ = keys.shape
    if num_q_heads % num_kv_heads:
        raise ValueError(f"H_q={num_q_heads} is not a multiple of H_kv={num_kv_heads}")
    if num_window > prompt_len:
        raise ValueError(f"window ({num_window}) longer than the prompt ({prompt_len})")
    group = num_q_heads // num_kv_heads
    # [H_kv, G, W, D] x [H_kv, D, L] -> [H_kv, G, W, L]; K is never expanded to H_q heads.
    q = window_queries.float().permute(1, 0, 2).reshape(num_kv_heads, group, num_window, head_dim)
    # [H_kv, 1, D, L]: contiguous when the caller's keys are a view of [H_kv, D, L] storage.
    k = keys.float().permute(1, 2, 0).unsqueeze(1)
    logits = torch.matmul(q * scale, k)
    if soft_cap:
        logits = torch.tanh(logits / soft_cap) * soft_cap
    prefix_len = prompt_len - num_window
    # Window query i sits at position prefix_len + i and must not see window keys after it.
    causal = torch.ones(num_window, num_window, dtype=torch.bool, device=keys.device).triu(1)
    logits[..., prefix_len:].masked_fill_(causal, float("-inf"))
    if sinks is not None:
        # One extra column per query head: the sink takes its share of the softmax mass.
        sink_column = sinks.float().view(num_kv_heads, group, 1, 1).expand(-1, -1, num_window, 1)
        logits = torch.cat([logits, sink_column], dim=-1)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    return probs[..., :prefix_len].sum(dim=2).reshape(num_q_heads, prefix_len)


def pool_scores(scores: torch.Tensor, kernel_size: int, pooling: Pooling) -> torch.Tensor:
    """1-D pooling along positions (stride 1, same length), so neighbours of a hit survive too."""
    if kernel_size % 2 != 1:
        raise ValueError(f"kernel_size must be odd, got {kernel_size}")
    if kernel_size == 1:
        return scores
    padding = kernel_size // 2
    if pooling == "max":
        return F.max_pool1d(scores, kernel_size, stride=1, padding=padding)
    if pooling == "avg":
        # count_include_pad=True (F's default) matches the official code's AvgPool1d.
        return F.avg_pool1d(scores, kernel_size, stride=1, padding=padding)
    raise ValueError(f"pooling must be 'max' or 'avg', got {pooling!r}")


def group_mean(scores: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """``[H_q, N]`` -> ``[H_kv, N]``: mean over the query heads that share one KV head."""
    num_q_heads, length = scores.shape
    return scores.reshape(num_kv_heads, num_q_heads // num_kv_heads, length).mean(dim=1)


def top_positions(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Per row, the ``count`` highest-scoring positions, ascending; among equal scores the earlier
    position wins (max pooling creates plateaus of equal scores, and topk's tie order is
    unspecified). A stable sort keeps ties in position order and, unlike selecting by a threshold
    and ``nonzero``, never waits for the device to know how many entries qualify."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :count]
    return order.sort(dim=-1).values


def select_kept_positions(
    window_queries: torch.Tensor,
    keys: torch.Tensor,
    budget: int,
    scale: float,
    kernel_size: int = 7,
    pooling: Pooling = "max",
    sinks: torch.Tensor | None = None,
    soft_cap: float | None = None,
    score: str | ScoreRule = DEFAULT_SCORE,
    values: torch.Tensor | None = None,
    value_metric: torch.Tensor | None = None,
    token_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Positions each KV head keeps: ``budget - W`` prefix positions chosen by the ``score`` rule
    (:mod:`vllm_snapkv.scoring`; the default is the paper's top ``budget - W``) plus the window.
    ``sinks`` and ``soft_cap`` as in :func:`window_attention_scores`; ``values`` (``[L, H_kv,
    D]``, as attention sees them) and ``value_metric`` for rules that read values;
    ``token_ids`` (``[L]``, the prompt's) for rules that read them.

    Returns a ``LongTensor[H_kv, budget]``, each row ascending; among equal scores the earlier
    position is kept. The caller skips prompts with
    ``L <= budget`` (nothing to evict); they are rejected here.
    """
    num_window = window_queries.shape[0]
    prompt_len, num_kv_heads, _ = keys.shape
    if not num_window < budget < prompt_len:
        raise ValueError(
            f"need window ({num_window}) < budget ({budget}) < prompt length ({prompt_len})"
        )
    rule = score_rule(score)
    scores = window_attention_scores(window_queries, keys, scale, sinks, soft_cap)
    scores = group_mean(pool_scores(scores, kernel_size, pooling), num_kv_heads)
    prefix_len = prompt_len - num_window
    if rule.needs_values and (values is None or value_metric is None):
        raise ValueError(f"the {rule.name!r} score needs values and value_metric")
    features = None
    if rule.needs_token_ids:
        if token_ids is None or token_ids.shape != (prompt_len,):
            raise ValueError(f"the {rule.name!r} score needs the prompt's {prompt_len} token ids")
        features = rule.token_features(token_ids)[:prefix_len]
    tracks = rule.score(
        scores, num_window, budget, values[:prefix_len] if rule.needs_values else None,
        value_metric, features,
    )
    counts = rule.priorities(budget, num_window)
    candidates = [
        torch.sort(track, dim=-1, descending=True, stable=True).indices[:, :count]
        for track, count in zip(tracks, candidate_counts(counts))
    ]
    top = keep_by_priority(candidates, counts)
    window = torch.arange(prefix_len, prompt_len, device=keys.device)
    # top is ascending and every window position is after the prefix: already sorted.
    return torch.cat([top, window.expand(num_kv_heads, -1)], dim=-1)


def chunk_positions(chunk_size: int | None = None, block_size: int = 1) -> int:
    """Positions per scored span: ``chunk_size`` (None: :data:`SCORE_CHUNK_TOKENS`, read at call
    time) rounded down to a multiple of ``block_size``, at least one block, so spans start at
    block boundaries."""
    if chunk_size is None:
        chunk_size = SCORE_CHUNK_TOKENS
    if chunk_size < 1 or block_size < 1:
        raise ValueError(f"chunk_size ({chunk_size}) and block_size ({block_size}) must be >= 1")
    return max(1, chunk_size // block_size) * block_size


def _spans(begin: int, end: int, step: int) -> Iterator[tuple[int, int]]:
    for start in range(begin, end, step):
        yield start, min(start + step, end)


class ChunkedWindowScores:
    """The pooled, group-averaged window scores of :func:`select_kept_positions_chunked`, one span
    of prefix positions at a time (see the module docstring for the two passes). Nothing it holds
    between spans depends on the prompt length: the scaled window queries and, per query head and
    window query, the softmax max and denominator."""

    def __init__(
        self,
        window_queries: torch.Tensor,
        read_keys: KeyReader,
        prompt_len: int,
        scale: float,
        kernel_size: int = 7,
        pooling: Pooling = "max",
        sinks: torch.Tensor | None = None,
        soft_cap: float | None = None,
        chunk_size: int | None = None,
        block_size: int = 1,
        alignment: int = 1,
    ):
        num_window = window_queries.shape[0]
        if num_window > prompt_len:
            raise ValueError(f"window ({num_window}) longer than the prompt ({prompt_len})")
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        if pooling not in ("max", "avg"):
            raise ValueError(f"pooling must be 'max' or 'avg', got {pooling!r}")
        self.window_queries, self.read_keys = window_queries, read_keys
        self.prompt_len, self.prefix_len = prompt_len, prompt_len - num_window
        self.scale, self.kernel_size, self.pooling = scale, kernel_size, pooling
        self.sinks, self.soft_cap = sinks, soft_cap
        self.step = chunk_positions(chunk_size, block_size)
        if alignment < 1:
            raise ValueError(f"alignment must be >= 1, got {alignment}")
        self.alignment = alignment
        self.queries: torch.Tensor | None = None  # [H_kv, G * W, D], scaled, float32
        self.num_kv_heads = 0

    def _logits(self, start: int, end: int) -> torch.Tensor:
        """``[H_kv, G, W, end - start]`` float32 logits of the window against keys
        ``[start, end)``, soft-capped, causal inside the window."""
        keys = self.read_keys(start, end)
        num_window, num_q_heads, head_dim = self.window_queries.shape
        if keys.dim() != 3 or keys.shape[0] != end - start or keys.shape[2] != head_dim:
            raise ValueError(
                f"read_keys({start}, {end}) returned {tuple(keys.shape)}, expected "
                f"[{end - start}, H_kv, {head_dim}]"
            )
        if self.queries is None:
            num_kv_heads = keys.shape[1]
            if num_q_heads % num_kv_heads:
                raise ValueError(f"H_q={num_q_heads} is not a multiple of H_kv={num_kv_heads}")
            group = num_q_heads // num_kv_heads
            q = self.window_queries.float().permute(1, 0, 2).reshape(
                num_kv_heads, group, num_window, head_dim
            )
            self.queries = (q * self.scale).reshape(num_kv_heads, group * num_window, head_dim)
            self.num_kv_heads = num_kv_heads
        num_kv_heads = self.num_kv_heads
        # [H_kv, G*W, D] x [H_kv, D, n]: a plain batched matmul, K never expanded to H_q heads.
        logits = torch.matmul(self.queries, keys.float().permute(1, 2, 0))
        del keys
        logits = logits.view(num_kv_heads, -1, num_window, end - start)
        if self.soft_cap:
            logits.div_(self.soft_cap).tanh_().mul_(self.soft_cap)
        if end > self.prefix_len + 1:
            # Window query i sits at position prefix + i and must not see window keys after it.
            first = max(start, self.prefix_len)
            causal = torch.ones(num_window, num_window, dtype=torch.bool, device=logits.device)
            causal = causal.triu(1)[:, first - self.prefix_len : end - self.prefix_len]
            logits[..., first - start :].masked_fill_(causal, float("-inf"))
        return logits

    def _normaliser(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Pass 1: per (KV head, query head of its group, window query) the max logit over all
        ``L`` keys and the sink, and ``sum(exp(logit - max))`` (sink included)."""
        running_max = total = None
        for start, end in _spans(0, self.prompt_len, self.step):
            logits = self._logits(start, end)
            if running_max is None:
                shape = logits.shape[:3]
                if self.sinks is not None:
                    running_max = self.sinks.float().view(shape[0], shape[1], 1).expand(shape)
                    total = torch.ones(shape, dtype=torch.float64, device=logits.device)
                else:
                    running_max = torch.full(
                        shape, float("-inf"), dtype=torch.float32, device=logits.device
                    )
                    total = torch.zeros(shape, dtype=torch.float64, device=logits.device)
            new_max = torch.maximum(running_max, logits.amax(dim=-1))
            chunk_sum = logits.sub_(new_max.unsqueeze(-1)).exp_().sum(dim=-1)
            del logits
            # Accumulated across spans in float64: rescaling and adding span by span then costs
            # no more than the float32 sum of one row the dense softmax does.
            rescale = torch.exp((running_max - new_max).double())
            total = total * rescale + chunk_sum.double()
            running_max = new_max
        return running_max, total.float()

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor]]:
        """Pass 2: ``(start, scores)`` for consecutive ranges of the prefix ``[0, L - W)``;
        ``scores`` is ``[H_kv, n]`` float32, the columns ``[start, start + n)`` of
        ``group_mean(pool_scores(window_attention_scores(...)))``.

        Each position's window sum is computed once: pooling a span also needs the ``k // 2``
        sums after it, so a range is emitted one halo late (and, with an ``alignment`` above
        1, ends at a multiple of it unless it is the last), and the sums from ``k // 2`` before
        the next range's first position are carried to the next span. (Recomputing a halo in
        the next span would run another matmul shape, which may round differently and split a
        max-pooling plateau of equal scores.)"""
        running_max, total = self._normaliser()
        running_max, total = running_max.unsqueeze(-1), total.unsqueeze(-1)
        halo = self.kernel_size // 2
        carried = None  # window sums from position emitted - halo to the span
        emitted = 0  # positions [0, emitted) are out
        for start, end in _spans(0, self.prefix_len, self.step):
            probs = self._logits(start, end).sub_(running_max).exp_().div_(total)
            sums = probs.sum(dim=2).view(-1, end - start)  # [H_q, n]
            del probs
            if carried is not None:
                sums = torch.cat([carried, sums], dim=1)
            first = end - sums.shape[1]  # the position of sums[:, 0]
            # Positions up to end - halo see all their neighbours (or the prefix's true end);
            # a range ends at a multiple of the alignment (a rule's chunk) except the last.
            last = self.prefix_len
            if end < self.prefix_len:
                last = end - halo - (end - halo) % self.alignment
            if last > emitted:
                pooled = pool_scores(sums, self.kernel_size, self.pooling)
                pooled = pooled[:, emitted - first : last - first]
                yield emitted, group_mean(pooled, self.num_kv_heads)
                del pooled
                emitted = last
            keep_from = max(0, emitted - halo - first)
            carried = sums[:, keep_from:] if keep_from < sums.shape[1] else None


def merge_top(
    top_scores: torch.Tensor | None,
    top_positions_: torch.Tensor | None,
    scores: torch.Tensor,
    start: int,
    count: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge the scores of positions ``start .. start + n - 1`` (``[H, n]``) into a running top
    (``[H, <= count]`` scores and positions, ordered by score descending, then position
    ascending; None for none yet). All running positions precede ``start``, so a stable sort of
    the running top followed by the span keeps that order: the result is the top ``count`` of
    everything merged so far, ties to the earlier position, exactly :func:`top_positions`."""
    positions = torch.arange(start, start + scores.shape[1], device=scores.device)
    positions = positions.expand(scores.shape[0], -1)
    if top_scores is not None:
        scores = torch.cat([top_scores, scores], dim=1)
        positions = torch.cat([top_positions_, positions], dim=1)
    order = torch.sort(scores, dim=-1, descending=True, stable=True)
    indices = order.indices[:, :count]
    return order.values[:, :count], positions.gather(1, indices)


def select_kept_positions_chunked(
    window_queries: torch.Tensor,
    read_keys: KeyReader,
    prompt_len: int,
    budget: int,
    scale: float,
    kernel_size: int = 7,
    pooling: Pooling = "max",
    sinks: torch.Tensor | None = None,
    soft_cap: float | None = None,
    chunk_size: int | None = None,
    block_size: int = 1,
    score: str | ScoreRule = DEFAULT_SCORE,
    read_values: KeyReader | None = None,
    value_metric: torch.Tensor | None = None,
    token_features: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`select_kept_positions` in bounded memory: keys come from ``read_keys(start, end)``
    (see :data:`KeyReader`), spans of ``chunk_positions(chunk_size, block_size)`` positions
    starting at block boundaries, each read twice (once per pass); for a rule that reads values,
    ``read_values(start, end)`` (``[end - start, H_kv, D]``, as attention sees them) once per
    scored range; for a rule that reads token ids, ``token_features`` is its
    ``token_features(prompt ids)`` (``[L]``; computed once by the caller for all layers), each
    range scored with its slice; a rule with a ``lookback`` scores each range after the
    previous range's last ``lookback`` scores. Each score track keeps a running top of the
    positions :func:`~vllm_snapkv.scoring.keep_by_priority` may need, merged span by span.
    Same result: ``LongTensor[H_kv, budget]``, rows ascending, the rule's ``budget - W`` prefix
    positions per KV head (ties: the earlier position) and the window. No host synchronisation:
    every shape is known from the arguments."""
    num_window = window_queries.shape[0]
    if not num_window < budget < prompt_len:
        raise ValueError(
            f"need window ({num_window}) < budget ({budget}) < prompt length ({prompt_len})"
        )
    rule = score_rule(score)
    if rule.needs_values and (read_values is None or value_metric is None):
        raise ValueError(f"the {rule.name!r} score needs read_values and value_metric")
    if rule.needs_token_ids and (token_features is None or token_features.shape[0] != prompt_len):
        raise ValueError(f"the {rule.name!r} score needs token_features of the {prompt_len} "
                         "prompt positions")
    scorer = ChunkedWindowScores(
        window_queries, read_keys, prompt_len, scale, kernel_size, pooling, sinks, soft_cap,
        chunk_size, block_size, rule.alignment,
    )
    counts = rule.priorities(budget, num_window)
    needed = candidate_counts(counts)
    running: list[tuple[torch.Tensor | None, torch.Tensor | None]] = [(None, None)] * len(counts)
    before = None  # the last rule.lookback scores of the previous range
    for start, scores in scorer:
        if before is not None:
            scores = torch.cat([before, scores], dim=1)
        held = 0 if before is None else before.shape[1]
        values = None
        if rule.needs_values:
            values = read_values(start - held, start - held + scores.shape[1])
        features = None
        if rule.needs_token_ids:
            features = token_features[start - held : start - held + scores.shape[1]]
        tracks = rule.score(scores, num_window, budget, values, value_metric, features)
        tracks = tracks[:, :, held:]
        del values
        if rule.lookback:
            before = scores[:, -rule.lookback:].clone()  # not a view of the whole range
        running = [
            merge_top(top_scores, top, track, start, count)
            for (top_scores, top), track, count in zip(running, tracks, needed)
        ]
        del tracks
    top = keep_by_priority([top for _, top in running], counts)
    window = torch.arange(prompt_len - num_window, prompt_len, device=top.device)
    return torch.cat([top, window.expand(top.shape[0], -1)], dim=-1)


def compaction_workspace_bytes(
    num_q_heads: int,
    num_kv_heads: int,
    head_size: int,
    window: int,
    budget: int,
    kernel_size: int = 7,
    block_size: int = 16,
    cache_element_bytes: int = 2,
    stored_width: int | None = None,
    num_outputs: int = 0,
    chunk_size: int | None = None,
    score: str | ScoreRule = DEFAULT_SCORE,
    hidden_size: int | None = None,
    model_element_bytes: int = 2,
) -> int:
    """Upper bound, in bytes, of the temporary memory of compacting one request in one layer
    (selection with :func:`select_kept_positions_chunked` under rule ``score``, then gathering
    and writing the kept rows); the formula is in the module docstring. Independent of the
    prompt length. ``stored_width``: a cache row's width per head (default ``head_size``);
    ``num_outputs``: earlier outputs re-prefilled after a preemption, written after the
    selection. Rules that read values also need ``hidden_size`` (the output projection's
    output width) and ``model_element_bytes`` (its dtype), for the one-time value metric."""
    width = head_size if stored_width is None else stored_width
    span = chunk_positions(chunk_size, block_size)
    halo = kernel_size // 2
    rule = score_rule(score)
    tracks = len(rule.priorities(budget, window))
    selection = (
        4 * span * num_q_heads * window
        + 8 * span * num_kv_heads * head_size
        + 2 * cache_element_bytes * span * num_kv_heads * width
        + 12 * (span + 2 * halo + rule.alignment - 1) * num_q_heads
        + rule.score_bytes_per_position * (span + rule.alignment + rule.lookback) * num_kv_heads
        + (4 * (span + rule.lookback) * num_kv_heads if rule.lookback else 0)  # joined scores
        + 48 * num_kv_heads * (budget + span) * tracks
        + 4 * num_q_heads * window * (head_size + 2)
    )
    rows = budget + num_outputs
    write = 4 * cache_element_bytes * rows * num_kv_heads * width + 64 * rows * num_kv_heads
    metric = 0
    if rule.needs_values:
        if hidden_size is None:
            raise ValueError(f"the {rule.name!r} score's workspace needs hidden_size")
        selection += (
            2 * cache_element_bytes * span * num_kv_heads * width
            + 16 * span * num_kv_heads * head_size
            + 64 * span * num_kv_heads
        )
        group_rows = num_q_heads // num_kv_heads * head_size
        metric = group_rows * (
            model_element_bytes * (num_q_heads * head_size + hidden_size) + 4 * hidden_size
        ) + 8 * group_rows * head_size
    return max(selection, write, metric)


def value_metric_bytes(num_kv_heads: int, head_size: int, num_layers: int) -> int:
    """Bytes the value metrics of ``num_layers`` compressed layers hold once built
    (``scoring.value_metric``: ``[H_kv, D, D]`` float32 each), kept by the worker."""
    return 4 * num_kv_heads * head_size * head_size * num_layers
