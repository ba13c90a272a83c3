"""Engine-core planning: which request compresses in which step, and what the workers capture.

No vLLM patch here (``scheduler`` installs them): the per-scheduler state
(:class:`SchedulerCompression`) and the step planning run from inside
``Scheduler._update_after_schedule`` and ``Scheduler._reserve_prefill_lookahead``. A request
compresses at the end of its prompt (when that frees a block) and, with ``decode_interval``,
whenever its stored entries reach the decode threshold; the observation window's queries are
captured in the steps before when they are not all in the compressing step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.logger import init_logger
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import Request

from vllm_snapkv.adapter.block_accounting import compress_completing
from vllm_snapkv.adapter.groups import CompressedGroups
from vllm_snapkv.config import KVCompressionConfigError, SnapKVConfig, request_budget
from vllm_snapkv.metrics import CompressionStats, StatsPublisher
from vllm_snapkv.plan import (
    CompressionPlan,
    StepDirectives,
    WindowCapture,
    decode_threshold,
    frees_blocks,
    prefix_hit_limit,
)

# Under the "vllm" logger tree so vLLM's handlers and VLLM_LOGGING_LEVEL apply.
logger = init_logger(f"vllm.{__name__}")


@dataclass
class SchedulerCompression:
    """Per-scheduler SnapKV state. Invariant: ``evicted[r] > 0`` iff ``r``'s block list holds
    compacted KV, i.e. its physical KV length is its logical length minus ``evicted[r]``."""

    config: SnapKVConfig
    groups: CompressedGroups
    #: Requests whose prompt is not yet computed (new or resumed): they compress when their
    #: prefill reaches the prompt's end (a preempted request's re-prefill is split there, see
    #: ``scheduler._patch_split_at_compression_points``).
    prefilling: set[str] = field(default_factory=set)
    #: Shared with the KV cache coordinator (same dict object).
    evicted: dict[str, int] = field(default_factory=dict)
    #: Decode compressions (``decode_interval`` > 0): request -> logical position at whose step
    #: the next one happens (its window is the ``window_size`` positions before), or None when
    #: the request never compresses while decoding. Computed on first use after each
    #: compression (:meth:`decode_point`).
    decode_points: dict[str, int | None] = field(default_factory=dict)
    #: request -> first window position whose queries were captured for its next decode point.
    window_captured_from: dict[str, int] = field(default_factory=dict)
    #: request -> compressions so far (the next plan's ``index``).
    num_compressions: dict[str, int] = field(default_factory=dict)
    stats: CompressionStats = field(default_factory=CompressionStats)
    publishers: list[StatsPublisher] = field(default_factory=list)

    def publish_stats(self, new_ratios: list[float] | None = None) -> None:
        for publisher in self.publishers:
            publisher.publish(self.stats, new_ratios or ())

    def budget_for(self, request: Request) -> int | None:
        """The request's budget, or None when it is not compressed."""
        extra_args = request.sampling_params.extra_args if request.sampling_params else None
        try:
            return request_budget(self.config, extra_args)
        except KVCompressionConfigError as error:
            # Frontends validate these; a request that slipped through keeps its full cache
            # rather than failing the engine for everyone.
            logger.warning("SnapKV: request %s not compressed: %s", request.request_id, error)
            return None

    @property
    def block_size(self) -> int:
        return self.groups.block_size

    def compression_budget(self, request: Request) -> int | None:
        """The budget the request compresses with at the end of its prompt, or None. Decided on
        the prompt alone, so a preempted request's re-prefill decides as its first prefill did."""
        budget = self.budget_for(request)
        if budget is None or not frees_blocks(
            request.num_prompt_tokens, budget, 0, self.block_size
        ):
            return None
        return budget

    def decode_point(self, request: Request) -> int | None:
        """Logical position whose step compresses the request while it decodes: its stored
        entries then reach :func:`decode_threshold`. None when decode compression is off, the
        request opted out, or its prompt compression was skipped."""
        if not self.config.decode_interval:
            return None
        request_id = request.request_id
        if request_id not in self.decode_points:
            budget = self.budget_for(request)
            self.decode_points[request_id] = None if budget is None else (
                self.evicted.get(request_id, 0)
                + decode_threshold(budget, self.config.decode_interval, self.block_size)
            )
        return self.decode_points[request_id]

    def prefix_hit_limit(self, request: Request) -> int | None:
        """Most prompt tokens a prefix-cache hit may cover (queries are not cached, so this
        request must compute every window position of its next compression), or None."""
        window = self.config.window_size
        if self.compression_budget(request) is not None:
            return prefix_hit_limit(request.num_prompt_tokens, window, self.block_size)
        point = self.decode_point(request)
        if point is not None and point - window < request.num_prompt_tokens:
            return prefix_hit_limit(point, window, self.block_size)
        return None

    def forget(self, request_id: str) -> None:
        """Drop the request's state (finished, aborted, or preempted: a preempted request is
        recomputed from scratch and compresses again at the same points)."""
        self.prefilling.discard(request_id)
        self.evicted.pop(request_id, None)
        self.decode_points.pop(request_id, None)
        self.window_captured_from.pop(request_id, None)
        self.num_compressions.pop(request_id, None)


def plan_step(scheduler: Scheduler, state: SchedulerCompression, output: SchedulerOutput):
    """Build this step's directives; must run before ``num_computed_tokens`` advances."""
    directives = StepDirectives()
    state.prefilling.update(new_request.req_id for new_request in output.scheduled_new_reqs)
    state.prefilling.update(output.scheduled_cached_reqs.resumed_req_ids)

    compressing: list[tuple[Request, CompressionPlan]] = []
    for request_id, num_scheduled in output.num_scheduled_tokens.items():
        request = scheduler.requests[request_id]
        chunk_start = request.num_computed_tokens
        chunk_end = chunk_start + num_scheduled
        if request_id in state.evicted:
            directives.evicted[request_id] = state.evicted[request_id]
        if request_id in state.prefilling:
            awaiting_prompt, plan = _plan_prompt(state, request, chunk_start, chunk_end, directives)
            if plan is not None:
                compressing.append((request, plan))
            if awaiting_prompt:
                continue
        plan = _plan_decode(state, request, chunk_start, chunk_end, directives)
        if plan is not None:
            compressing.append((request, plan))

    if compressing:
        new_ratios = compress_completing(
            scheduler.kv_cache_manager.coordinator, state, compressing, directives
        )
        state.publish_stats(new_ratios)
    return directives


def _plan_prompt(
    state: SchedulerCompression,
    request: Request,
    chunk_start: int,
    chunk_end: int,
    directives: StepDirectives,
) -> tuple[bool, CompressionPlan | None]:
    """A prefilling request's prompt compression: ``(the prompt compresses (now or later), the
    plan when it compresses now)``; captures the window of a chunk that does not complete it."""
    request_id = request.request_id
    window = state.config.window_size
    prompt_end = request.num_prompt_tokens
    completes = chunk_end >= prompt_end
    if completes:
        state.prefilling.discard(request_id)
    budget = state.compression_budget(request)
    if budget is None:
        return False, None
    if not completes:
        if chunk_end > prompt_end - window:
            directives.captures[request_id] = WindowCapture(prompt_end, window)
        return True, None
    # num_output_tokens is 0 unless a resumed request's chunk ran past its prompt (the split
    # at the prompt's end did not apply): those outputs are kept verbatim.
    return True, CompressionPlan(
        num_scored=prompt_end,
        budget=budget,
        window_size=window,
        window_end=prompt_end,
        num_output_tokens=chunk_end - prompt_end,
        target_block_ids={},
        phase="prompt",
        index=state.num_compressions.get(request_id, 0),
    )


def _plan_decode(
    state: SchedulerCompression,
    request: Request,
    chunk_start: int,
    chunk_end: int,
    directives: StepDirectives,
) -> CompressionPlan | None:
    """A decode compression when this step's chunk reaches the request's decode point; window
    captures in the steps before it."""
    point = state.decode_point(request)
    if point is None or chunk_end <= point - state.config.window_size:
        return None
    request_id = request.request_id
    window = state.config.window_size
    window_start = point - window
    if chunk_end < point:
        state.window_captured_from.setdefault(request_id, max(chunk_start, window_start))
        directives.captures[request_id] = WindowCapture(point, window)
        return None
    observed = chunk_start <= chunk_end - window or (
        chunk_end == point and state.window_captured_from.get(request_id) == window_start
    )
    state.window_captured_from.pop(request_id, None)
    if not observed:
        # The chunk ran past the point (a re-prefill the scheduler could not split there) and
        # the window's queries were not all seen: compress once a whole window has been.
        state.decode_points[request_id] = chunk_end + window
        directives.released.add(request_id)
        return None
    budget = state.budget_for(request)
    evicted = state.evicted.get(request_id, 0)
    return CompressionPlan(
        num_scored=chunk_end - evicted,
        budget=budget,
        window_size=window,
        window_end=chunk_end,
        num_output_tokens=0,
        target_block_ids={},
        phase="decode",
        index=state.num_compressions.get(request_id, 0),
    )


def next_compression_point(
    state: SchedulerCompression, request: Request, num_computed_tokens: int
) -> int | None:
    """Logical position at whose step the request compresses next, or None."""
    prompt_len = request.num_prompt_tokens
    if num_computed_tokens < prompt_len and request.request_id not in state.evicted:
        if state.compression_budget(request) is not None:
            return prompt_len
    return state.decode_point(request)
