"""Engine-core planning: which request compresses in which step, and what the workers capture.

No vLLM patch here (``scheduler`` installs them): the per-scheduler state
(:class:`SchedulerCompression`) and the step planning run from inside
``Scheduler._update_after_schedule`` and ``Scheduler._reserve_prefill_lookahead``. A request
compresses at the end of its prompt (when that frees a block) and, with ``decode_interval``,
whenever its stored entries reach the decode threshold; the observation window's queries are
captured in the steps before when they are not all in the compressing step.

Each request's compression state is one :class:`RequestCompression` record, owned by
:class:`SchedulerCompression` and changed only through its named transitions. Block accounting
(``block_accounting``) only allocates targets; it decides nothing about what compresses when.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from vllm.logger import init_logger
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import Request

from vllm_snapkv.adapter.block_accounting import swap_in_targets
from vllm_snapkv.adapter.groups import CompressedGroups
from vllm_snapkv.config import (
    KVCompressionConfigError,
    SnapKVConfig,
    request_budget,
    request_score,
)
from vllm_snapkv.metrics import CompressionStats, StatsPublisher
from vllm_snapkv.plan import (
    CompressionPlan,
    StepDirectives,
    WindowCapture,
    decode_threshold,
    frees_blocks,
    prefix_hit_limit,
)
from vllm_snapkv.scoring import score_rule

# Under the "vllm" logger tree so vLLM's handlers and VLLM_LOGGING_LEVEL apply.
logger = init_logger(f"vllm.{__name__}")

#: ``"prompt"``: the request compresses when its prefill reaches the prompt's end
#: (``next_point``). ``"decode"``: it compresses in the step whose chunk reaches ``next_point``
#: (never, when that is None).
Phase = Literal["prompt", "decode"]


@dataclass
class RequestCompression:
    """One request's compression state. Invariant: ``evicted > 0`` iff the request's block
    lists of the compressed groups hold compacted KV (its physical KV length there is its logical
    length minus ``evicted``). A preempted request's record is forgotten: it is recomputed from
    scratch and compresses again at the same points, from a fresh record."""

    #: Entries per KV head it keeps at each compression; None: never compressed (opted out).
    budget: int | None
    phase: Phase
    #: Logical position at whose step it compresses next (its window is the ``window_size``
    #: positions before); None: it never compresses again.
    next_point: int | None
    evicted: int = 0
    #: First window position whose queries were captured for ``next_point`` (decode phase).
    window_captured_from: int | None = None
    #: Compressions so far (the next plan's ``index``).
    index: int = 0
    #: Selection rule of every compression of the request (``snapkv_score`` or the server's).
    score: str = "snapkv"


@dataclass
class SchedulerCompression:
    """Per-scheduler SnapKV state: the configuration, the compressed groups, every request's
    :class:`RequestCompression` and the compression counters."""

    config: SnapKVConfig
    groups: CompressedGroups
    #: request id -> its record, from its first prefix-cache lookup or step until it finishes,
    #: is aborted or is preempted.
    requests: dict[str, RequestCompression] = field(default_factory=dict)
    stats: CompressionStats = field(default_factory=CompressionStats)
    publishers: list[StatsPublisher] = field(default_factory=list)

    def publish_stats(self, new_ratios: list[float] | None = None) -> None:
        for publisher in self.publishers:
            publisher.publish(self.stats, new_ratios or ())

    @property
    def block_size(self) -> int:
        return self.groups.block_size

    def settings_for(self, request: Request) -> tuple[int | None, str]:
        """The request's budget (None when it is not compressed) and selection rule."""
        extra_args = request.sampling_params.extra_args if request.sampling_params else None
        try:
            budget = request_budget(self.config, extra_args)
            score = request_score(self.config, extra_args)
        except KVCompressionConfigError as error:
            # Frontends validate these; a request that slipped through keeps its full cache
            # rather than failing the engine for everyone.
            logger.warning("SnapKV: request %s not compressed: %s", request.request_id, error)
            return None, self.config.score
        needs_ids = budget is not None and score_rule(score).needs_token_ids
        if needs_ids and request.prompt_token_ids is None:
            # Prompt embeddings carry no token ids; another rule would change answers unasked.
            logger.warning(
                "SnapKV: request %s not compressed: score %r reads the prompt's token ids and "
                "the request sent prompt embeddings", request.request_id, score,
            )
            return None, score
        return budget, score

    # --- reading ----------------------------------------------------------------------------

    def record(self, request: Request) -> RequestCompression:
        """The request's record, started (nothing computed, nothing evicted) if it has none."""
        record = self.requests.get(request.request_id)
        if record is None:
            record = self.requests[request.request_id] = self._start(request)
        return record

    def evicted_of(self, request_id: str) -> int:
        """Tokens the request's compressed-group block lists no longer hold (0: none). What the
        KV cache managers of the compressed groups read; they never change it."""
        record = self.requests.get(request_id)
        return record.evicted if record is not None else 0

    @property
    def evicted(self) -> dict[str, int]:
        """Compressed requests -> evicted tokens (a snapshot)."""
        return {r: record.evicted for r, record in self.requests.items() if record.evicted}

    def prefix_hit_limit(self, request: Request) -> int | None:
        """Most tokens a prefix-cache hit may cover, or None. Queries are not cached, so the
        request must compute every window position of its next compression: a hit past that
        window would make it compress elsewhere, or with another window, than it did before a
        preemption (and than an unpreempted request does). Looked up only for requests with
        nothing computed, whose record is fresh."""
        point = self.record(request).next_point
        if point is None:
            return None
        return prefix_hit_limit(point, self.config.window_size, self.block_size)

    def next_compression_point(self, request: Request) -> int | None:
        """Logical position at whose step the request compresses next, or None."""
        return self.record(request).next_point

    # --- transitions (the only code that changes a record) ---------------------------------

    def _start(self, request: Request) -> RequestCompression:
        budget, score = self.settings_for(request)
        prompt_len = request.num_prompt_tokens
        if budget is not None and frees_blocks(prompt_len, budget, 0, self.block_size):
            # Decided on the prompt alone, so a preempted request's re-prefill decides as its
            # first prefill did.
            return RequestCompression(budget, "prompt", prompt_len, score=score)
        point = self._decode_point(budget, evicted=0)
        return RequestCompression(budget, "decode", point, score=score)

    def _decode_point(self, budget: int | None, evicted: int) -> int | None:
        """Where a request holding ``logical - evicted`` entries reaches the decode threshold;
        None when decode compression is off or the request is not compressed."""
        if budget is None or not self.config.decode_interval:
            return None
        return evicted + decode_threshold(budget, self.config.decode_interval, self.block_size)

    def window_captured(self, request_id: str, first_position: int) -> None:
        """Queries of the next decode point's window are being captured from ``first_position``
        on (kept from the first capture step)."""
        record = self.requests[request_id]
        if record.window_captured_from is None:
            record.window_captured_from = first_position

    def window_missed(self, request_id: str, chunk_end: int) -> None:
        """A chunk ran past the decode point (a re-prefill the scheduler could not split there)
        without the window's queries all seen: compress once a whole window has been."""
        record = self.requests[request_id]
        record.next_point = chunk_end + self.config.window_size
        record.window_captured_from = None

    def compressed(self, request_id: str, plan: CompressionPlan) -> None:
        """``plan`` was given its targets: the next decode point counts from the new length."""
        record = self.requests[request_id]
        record.evicted += plan.num_evicted
        record.index = plan.index + 1
        record.phase = "decode"
        record.next_point = self._decode_point(record.budget, record.evicted)
        record.window_captured_from = None

    def skipped(self, request_id: str, plan: CompressionPlan) -> None:
        """No blocks to compact ``plan`` into. The window queries exist only during this step: a
        skipped prompt compression leaves the request its full cache for good (no decode
        compressions either, which would count from a prompt never compressed); a skipped
        decode compression is tried again one interval later."""
        record = self.requests[request_id]
        record.phase = "decode"
        record.window_captured_from = None
        if plan.phase == "decode":
            record.next_point = plan.window_end + self.config.decode_interval
        else:
            record.next_point = None

    def forgotten(self, request_id: str) -> None:
        """The request finished, was aborted, or was preempted (recomputed from scratch later,
        from a fresh record)."""
        self.requests.pop(request_id, None)


def plan_step(scheduler: Scheduler, state: SchedulerCompression, output: SchedulerOutput):
    """Build this step's directives; must run before ``num_computed_tokens`` advances."""
    directives = StepDirectives()
    compressing: list[tuple[str, CompressionPlan]] = []
    for request_id, num_scheduled in output.num_scheduled_tokens.items():
        request = scheduler.requests[request_id]
        record = state.record(request)
        chunk_start = request.num_computed_tokens
        chunk_end = chunk_start + num_scheduled
        if record.evicted:
            directives.evicted[request_id] = record.evicted
        if record.phase == "prompt":
            plan = _plan_prompt(state, request, record, chunk_end, directives)
        else:
            plan = _plan_decode(state, request, record, chunk_start, chunk_end, directives)
        if plan is not None:
            compressing.append((request_id, plan))
    if not compressing:
        return directives

    new_ratios = []
    compactions = swap_in_targets(
        scheduler.kv_cache_manager.coordinator, state.groups.group_ids, state.block_size,
        compressing,
    )
    for request_id, plan in compressing:
        compaction = compactions[request_id]
        if compaction is None:
            state.skipped(request_id, plan)
            state.stats.skipped_no_free_blocks += 1
            directives.released.add(request_id)
            logger.warning(
                "SnapKV: request %s keeps its KV cache uncompressed at position %d: no free "
                "blocks to compact it into",
                request_id,
                plan.window_end,
            )
            continue
        plan = compaction.plan
        state.compressed(request_id, plan)
        directives.plans[request_id] = plan
        if plan.phase == "decode":
            state.stats.record_decode_compression(plan.num_evicted, compaction.num_freed)
        else:
            new_ratios.append(
                state.stats.record_compression(
                    plan.num_scored, plan.budget, plan.num_evicted, compaction.num_freed
                )
            )
    state.publish_stats(new_ratios)
    return directives


def _plan_prompt(
    state: SchedulerCompression,
    request: Request,
    record: RequestCompression,
    chunk_end: int,
    directives: StepDirectives,
) -> CompressionPlan | None:
    """The prompt compression when this chunk completes the prompt; captures the window of a
    chunk that does not."""
    window = state.config.window_size
    prompt_end = record.next_point
    if chunk_end < prompt_end:
        if chunk_end > prompt_end - window:
            directives.captures[request.request_id] = WindowCapture(prompt_end, window)
        return None
    # num_output_tokens is 0 unless a resumed request's chunk ran past its prompt (the split
    # at the prompt's end did not apply): those outputs are kept verbatim.
    return CompressionPlan(
        num_scored=prompt_end,
        budget=record.budget,
        window_size=window,
        window_end=prompt_end,
        num_output_tokens=chunk_end - prompt_end,
        target_block_ids={},
        phase="prompt",
        index=record.index,
        score=record.score,
    )


def _plan_decode(
    state: SchedulerCompression,
    request: Request,
    record: RequestCompression,
    chunk_start: int,
    chunk_end: int,
    directives: StepDirectives,
) -> CompressionPlan | None:
    """A decode compression when this step's chunk reaches the request's decode point; window
    captures in the steps before it."""
    point = record.next_point
    window = state.config.window_size
    if point is None or chunk_end <= point - window:
        return None
    request_id = request.request_id
    window_start = point - window
    if chunk_end < point:
        state.window_captured(request_id, max(chunk_start, window_start))
        directives.captures[request_id] = WindowCapture(point, window, phase="decode")
        return None
    observed = chunk_start <= chunk_end - window or (
        chunk_end == point and record.window_captured_from == window_start
    )
    if not observed:
        state.window_missed(request_id, chunk_end)
        directives.released.add(request_id)
        return None
    return CompressionPlan(
        num_scored=chunk_end - record.evicted,
        budget=record.budget,
        window_size=window,
        window_end=chunk_end,
        num_output_tokens=0,
        target_block_ids={},
        phase="decode",
        index=record.index,
        score=record.score,
    )
