"""What the scheduler tells the workers each step. Plain dataclasses, no vLLM import.

The scheduler is the single source of truth: it decides which request compresses, into which
blocks, and how many tokens each request has evicted. Workers execute exactly that, so the plan
never depends on a step's outputs (safe to build before the previous step has run).
"""

from __future__ import annotations

from dataclasses import dataclass, field


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def frees_blocks(prompt_len: int, budget: int, num_output_tokens: int, block_size: int) -> bool:
    """Rule 1: compress only when it returns at least one block to the pool."""
    kept, held = budget + num_output_tokens, prompt_len + num_output_tokens
    return prompt_len > budget and cdiv(kept, block_size) < cdiv(held, block_size)


def prefix_hit_limit(prompt_len: int, window_size: int, block_size: int) -> int:
    """Most prompt tokens a prefix-cache hit may cover for a request that will be compressed.

    Queries are not cached, so the last ``window_size`` prompt tokens must be recomputed by this
    request for their queries to exist; hits are block-aligned.
    """
    return max(prompt_len - window_size, 0) // block_size * block_size


def decode_threshold(budget: int, decode_interval: int, block_size: int) -> int:
    """Stored entries per KV head at which a decode compression brings them back to ``budget``:
    ``budget + decode_interval``, or the first entry of a new block when that many would still
    fit the budget's blocks (rule 1: a compression frees at least one block)."""
    return max(budget + decode_interval, cdiv(budget, block_size) * block_size + 1)


def speculative_chunk_end(
    point: int, num_known_tokens: int, chunk_start: int, chunk_end: int
) -> int:
    """End of a chunk ``[chunk_start, chunk_end)`` whose positions from ``num_known_tokens`` on
    are draft tokens (speculative decoding), cut so that no draft lies at or after position
    ``point - 1``.

    A request compresses at ``point`` in the step whose chunk ends there, scoring entries
    ``[0, point)`` with the queries of ``[point - window, point)``. Drafts may be rejected, which
    rolls ``num_computed_tokens`` back: were position ``point - 1`` a draft, the compaction
    would score (and keep) the KV and queries of tokens that are then replaced. So drafts stop
    before ``point - 1``; the step that reaches the point computes only known tokens (a plain
    decode step, ``[point - 1, point)``, or a re-prefill chunk ending at the point), and
    compresses exactly where non-speculative decoding does."""
    if chunk_end <= num_known_tokens or chunk_start >= point:
        return chunk_end  # no drafts, or the point is behind the chunk
    limit = point if num_known_tokens >= point else point - 1
    return min(chunk_end, limit)


@dataclass(frozen=True)
class WindowCapture:
    """Buffer the queries of window positions ``[window_end - window_size, window_end)`` that
    fall inside this step's chunk; the compression they score happens in a later step.
    ``phase``: the compression's (``"prompt"``: a prefill chunk of the prompt; ``"decode"``: the
    tokens before a decode compression, captured by the worker's CUDA-graph-safe ring)."""

    window_end: int
    window_size: int
    phase: str = "prompt"


@dataclass(frozen=True)
class CompressionPlan:
    """A compression happens in this step: compact the request's KV into ``target_block_ids``.

    ``phase`` ``"prompt"``: the prefill completes now; the scored entries are the prompt.
    ``"decode"``: the request's stored entries reached the decode threshold; the scored entries
    are everything it stores now (earlier kept entries and tokens generated since).

    Every attention layer of a compressed KV cache group scores the first ``num_scored`` stored
    entries (physical order) with the queries of logical positions ``[window_end -
    window_size, window_end)``, keeps ``budget`` of them per KV head (the last ``window_size``
    always) and writes them, in stored order, into slots ``0 .. budget-1`` of its group's
    targets, followed by the ``num_output_tokens`` entries after them. Those exist only when a
    preempted request re-prefills past its prompt; keeping them verbatim makes the compressed
    cache the same as before the preemption. From the next step on, the request's block list in
    each compressed group is that group's targets (+ blocks allocated later) and
    ``num_evicted`` more tokens are not held there. Groups left alone (sliding-window,
    recurrent state) keep their blocks.

    ``target_block_ids`` maps each compressed group id to its targets (``cdiv(num_kept,
    block_size)`` blocks). ``reused_block_ids`` are targets that were the request's own source
    blocks (compaction in place, when the pool had too few free blocks); the worker reads all
    sources before writing. ``index`` counts the request's compressions (0: its prompt).
    """

    num_scored: int
    budget: int
    window_size: int
    window_end: int
    num_output_tokens: int
    target_block_ids: dict[int, tuple[int, ...]]
    reused_block_ids: frozenset[int] = frozenset()
    phase: str = "prompt"
    index: int = 0
    #: The selection rule (``vllm_snapkv.scoring``): the request's ``snapkv_score`` or the
    #: server's ``score``.
    score: str = "snapkv"

    @property
    def num_sources(self) -> int:
        """Stored entries the compaction reads (scored ones and the verbatim tail)."""
        return self.num_scored + self.num_output_tokens

    @property
    def num_kept(self) -> int:
        return self.budget + self.num_output_tokens

    @property
    def num_evicted(self) -> int:
        return self.num_scored - self.budget


@dataclass
class StepDirectives:
    """Attached to vLLM's ``SchedulerOutput`` as ``snapkv_directives``."""

    #: Requests compressed in this step (prompt or decode compressions).
    plans: dict[str, CompressionPlan] = field(default_factory=dict)
    #: Requests whose chunk holds part of the observation window of a later compression.
    captures: dict[str, WindowCapture] = field(default_factory=dict)
    #: Requests whose planned compression did not happen (e.g. no free target blocks): drop
    #: their buffered window queries.
    released: set[str] = field(default_factory=set)
    #: Scheduled requests already compressed in an earlier step -> tokens evicted. Their
    #: physical KV length is the logical one minus this.
    evicted: dict[str, int] = field(default_factory=dict)

    def has_work(self) -> bool:
        return bool(self.plans or self.captures or self.released or self.evicted)
