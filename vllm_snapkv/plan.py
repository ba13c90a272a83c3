"""What the scheduler tells the workers each step. Plain dataclasses, no vLLM import.

The scheduler is the single source of truth: it decides which request compresses, into which
blocks, and how many tokens each request has evicted. Workers execute exactly that, so the plan
never depends on a step's outputs (safe to build before the previous step has run).
"""

from __future__ import annotations

from dataclasses import dataclass, field


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def frees_blocks(prefill_len: int, budget: int, block_size: int) -> bool:
    """Rule 1: compress only when it returns at least one block to the pool."""
    return prefill_len > budget and cdiv(budget, block_size) < cdiv(prefill_len, block_size)


def prefix_hit_limit(prefill_len: int, window_size: int, block_size: int) -> int:
    """Most prompt tokens a prefix-cache hit may cover for a request that will be compressed.

    Queries are not cached, so the last ``window_size`` prompt tokens must be recomputed by this
    request for their queries to exist; hits are block-aligned.
    """
    return max(prefill_len - window_size, 0) // block_size * block_size


@dataclass(frozen=True)
class WindowCapture:
    """Buffer the queries of window positions ``[prefill_len - window_size, prefill_len)`` that
    fall inside this step's chunk; the prefill completes in a later step."""

    prefill_len: int
    window_size: int


@dataclass(frozen=True)
class CompressionPlan:
    """Request's prefill completes in this step: compact its KV into ``target_block_ids``.

    Every attention layer keeps ``budget`` positions per KV head (the last ``window_size`` always),
    written in ascending position order into slots ``0 .. budget-1`` of the targets. From the next
    step on, the request's block list is ``target_block_ids`` (+ blocks allocated later) and
    ``prefill_len - budget`` tokens count as evicted.
    """

    prefill_len: int
    budget: int
    window_size: int
    target_block_ids: tuple[int, ...]

    @property
    def num_evicted(self) -> int:
        return self.prefill_len - self.budget


@dataclass
class StepDirectives:
    """Attached to vLLM's ``SchedulerOutput`` as ``snapkv_directives``."""

    #: Requests whose prefill completes now and are compressed now.
    plans: dict[str, CompressionPlan] = field(default_factory=dict)
    #: Requests in chunked prefill whose chunk holds part of the observation window.
    captures: dict[str, WindowCapture] = field(default_factory=dict)
    #: Requests whose prefill completed without compression (e.g. no free target blocks):
    #: drop their buffered window queries.
    released: set[str] = field(default_factory=set)
    #: Scheduled requests already compressed in an earlier step -> tokens evicted. Their
    #: physical KV length is the logical one minus this.
    evicted: dict[str, int] = field(default_factory=dict)

    def has_work(self) -> bool:
        return bool(self.plans or self.captures or self.released or self.evicted)
