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


@dataclass(frozen=True)
class WindowCapture:
    """Buffer the queries of window positions ``[prompt_len - window_size, prompt_len)`` that
    fall inside this step's chunk; the prefill completes in a later step."""

    prompt_len: int
    window_size: int


@dataclass(frozen=True)
class CompressionPlan:
    """The request's prefill completes in this step: compact its KV into ``target_block_ids``.

    Every attention layer of a compressed KV cache group selects ``budget`` prompt positions per
    KV head (the last ``window_size`` always) and writes them, ascending, into slots
    ``0 .. budget-1`` of its group's targets, followed by the ``num_output_tokens`` positions
    after the prompt. Those exist only when a preempted request re-prefills its earlier outputs;
    keeping them verbatim makes the compressed cache the same as before the preemption. From the
    next step on, the request's block list in each compressed group is that group's targets (+
    blocks allocated later) and ``num_evicted`` tokens are not held there. Groups left alone
    (sliding-window, recurrent state) keep their blocks.

    ``target_block_ids`` maps each compressed group id to its targets (``cdiv(num_kept,
    block_size)`` blocks). ``reused_block_ids`` are targets that were the request's own source
    blocks (compaction in place, when the pool had too few free blocks); the worker reads all
    sources before writing.
    """

    prompt_len: int
    budget: int
    window_size: int
    num_output_tokens: int
    target_block_ids: dict[int, tuple[int, ...]]
    reused_block_ids: frozenset[int] = frozenset()

    @property
    def prefill_len(self) -> int:
        return self.prompt_len + self.num_output_tokens

    @property
    def num_kept(self) -> int:
        return self.budget + self.num_output_tokens

    @property
    def num_evicted(self) -> int:
        return self.prompt_len - self.budget


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
