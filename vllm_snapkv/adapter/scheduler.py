"""Engine-core side: decide compressions, swap block lists, keep block accounting physical.

Patched (vLLM 0.32/0.33, v1 engine; contract tests in tests/test_contract.py and
tests/test_contract_sources.py):
- ``Scheduler.__init__``: validate the KV cache layout, attach :class:`SchedulerCompression`.
- ``Scheduler._update_after_schedule``: plan this step's compressions (prompts whose prefill
  completes, decoding requests whose stored entries reach the decode threshold) and window
  captures, allocate targets, release sources, attach :class:`StepDirectives` to the output.
- ``Scheduler._get_local_prefix_cache_hit``: keep the observation window out of prefix-cache hits.
- ``Scheduler._reserve_prefill_lookahead`` (post): end a preempted request's re-prefill chunks at
  its compression points, so its earlier outputs are recomputed over the compressed cache.
- ``Scheduler._preempt_request`` / ``_free_request``: forget per-request state.
Block accounting of compressed groups (targets, block swap, physical counts): ``block_accounting``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

from vllm.logger import init_logger
from vllm.platforms import current_platform
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import Request

from vllm_snapkv.adapter.block_accounting import compress_completing, share_evicted_counts
from vllm_snapkv.adapter.groups import CompressedGroups
from vllm_snapkv.config import (
    KVCompressionConfigError,
    SnapKVConfig,
    config_from_additional,
    request_budget,
)
from vllm_snapkv.metrics import CompressionStats, StatsPublisher, publishers_from_environment
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

#: Attribute on ``SchedulerOutput`` carrying this step's :class:`StepDirectives` to the workers.
DIRECTIVES_ATTR = "snapkv_directives"


@dataclass
class SchedulerCompression:
    """Per-scheduler SnapKV state. Invariant: ``evicted[r] > 0`` iff ``r``'s block list holds
    compacted KV, i.e. its physical KV length is its logical length minus ``evicted[r]``."""

    config: SnapKVConfig
    groups: CompressedGroups
    #: Requests whose prompt is not yet computed (new or resumed): they compress when their
    #: prefill reaches the prompt's end (a preempted request's re-prefill is split there, see
    #: ``_patch_split_at_prompt_end``).
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
        request_id = request.request_id
        if request_id not in self.decode_points:
            budget = self.budget_for(request) if self.config.decode_interval else None
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


def _state(scheduler: Scheduler) -> SchedulerCompression | None:
    return getattr(scheduler, "_snapkv", None)


def _patch_init(original):
    @functools.wraps(original)
    def __init__(self: Scheduler, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        config = config_from_additional(self.vllm_config.additional_config)
        if config is None:
            return
        state = SchedulerCompression(
            config=config,
            groups=CompressedGroups.of(self.kv_cache_config),
            # data_parallel_index, not _rank: vLLM resets the rank of independent (non-MoE) DP
            # engines to 0; the index is the engine's `engine` label in vLLM's own metrics.
            publishers=publishers_from_environment(
                self.vllm_config.model_config.served_model_name,
                self.vllm_config.parallel_config.data_parallel_index,
            ),
        )
        share_evicted_counts(self.kv_cache_manager.coordinator, state.groups, state.evicted)
        self._snapkv = state
        state.publish_stats()  # counters exist (at 0) from the start, as Prometheus expects
        logger.info(
            "SnapKV KV-cache compression on: budget=%d, window_size=%d, kernel_size=%d, "
            "pooling=%s, decode_interval=%d, block_size=%d, compressed KV cache groups %s of %d",
            config.budget,
            config.window_size,
            config.kernel_size,
            config.pooling,
            config.decode_interval,
            state.block_size,
            list(state.groups.group_ids),
            len(self.kv_cache_config.kv_cache_groups),
        )

    return __init__


def _plan_step(scheduler: Scheduler, state: SchedulerCompression, output: SchedulerOutput):
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


def _patch_update_after_schedule(original):
    @functools.wraps(original)
    def _update_after_schedule(self: Scheduler, scheduler_output: SchedulerOutput) -> None:
        state = _state(self)
        if state is not None:
            setattr(scheduler_output, DIRECTIVES_ATTR, _plan_step(self, state, scheduler_output))
        original(self, scheduler_output)

    return _update_after_schedule


def _patch_prefix_cache_hit(original):
    @functools.wraps(original)
    def _get_local_prefix_cache_hit(self: Scheduler, request: Request, *args: Any, **kwargs: Any):
        blocks, num_hit_tokens, *rest = original(self, request, *args, **kwargs)
        state = _state(self)
        if state is None or num_hit_tokens == 0:
            return (blocks, num_hit_tokens, *rest)
        limit = state.prefix_hit_limit(request)
        if limit is not None and num_hit_tokens > limit:
            # Looked up again rather than truncated: a sliding-window group's hit holds only the
            # window before its end (null blocks earlier), not the window before ``limit``.
            blocks, num_hit_tokens, shared_prefix_boundary = _cache_hit_within(
                self.kv_cache_manager, request, limit
            )
            rest[0] = shared_prefix_boundary
        return (blocks, num_hit_tokens, *rest)

    return _get_local_prefix_cache_hit


def _cache_hit_within(kv_cache_manager: Any, request: Request, max_tokens: int):
    """vLLM's local prefix-cache lookup (``KVCacheManager.get_computed_blocks``) capped at
    ``max_tokens``: ``(blocks, hit tokens, shared prefix boundary)``."""
    computed, num_hit_tokens, num_uncached = kv_cache_manager.coordinator.find_longest_cache_hit(
        request.block_hashes, max_tokens
    )
    boundary = num_hit_tokens + num_uncached if num_uncached else 0
    return kv_cache_manager.create_kv_cache_blocks(computed), num_hit_tokens, boundary


def _patch_split_at_compression_points(original):
    """A preempted request recomputes its prompt and its earlier outputs. Those outputs were first
    computed attending to the compressed cache, so the re-prefill chunks must end where the
    request compressed: at the prompt's end (the prompt is compressed exactly as the first time,
    and the outputs are recomputed over the compressed cache in the next steps, as a short
    prefill with physical slots), and at each decode point."""

    @functools.wraps(original)
    def _reserve_prefill_lookahead(
        self: Scheduler, request: Request, num_computed_tokens: int, num_new_tokens: int
    ) -> int:
        num_new_tokens = original(self, request, num_computed_tokens, num_new_tokens)
        state = _state(self)
        if state is None or num_new_tokens <= 1 or _split_crashes_vllm(request):
            return num_new_tokens
        point = _next_compression_point(state, request, num_computed_tokens)
        if point is not None and num_computed_tokens < point < num_computed_tokens + num_new_tokens:
            return point - num_computed_tokens
        return num_new_tokens

    return _reserve_prefill_lookahead


def _next_compression_point(
    state: SchedulerCompression, request: Request, num_computed_tokens: int
) -> int | None:
    """Logical position at whose step the request compresses next, or None."""
    prompt_len = request.num_prompt_tokens
    if num_computed_tokens < prompt_len and request.request_id not in state.evicted:
        if state.compression_budget(request) is not None:
            return prompt_len
    return state.decode_point(request)


def _split_crashes_vllm(request: Request) -> bool:
    """vLLM 0.32 on CPU rewinds a seeded request's generator after every partial-prefill step
    (``gen.set_offset``), which CPU generators do not support: the worker crashes, also without
    this plugin (a seeded prompt longer than one chunk). Seeded requests therefore keep vLLM's
    single re-prefill chunk on CPU (their earlier outputs are then recomputed over the full
    prompt; see README, "Preemption")."""
    seeded = request.sampling_params is not None and request.sampling_params.seed is not None
    return seeded and current_platform.is_cpu()


def _patch_forget(original):
    @functools.wraps(original)
    def wrapper(self: Scheduler, request: Request, *args: Any, **kwargs: Any):
        result = original(self, request, *args, **kwargs)
        state = _state(self)
        if state is not None:
            state.forget(request.request_id)
        return result

    return wrapper


#: (owner class, method name, wrapper factory): every engine-core patch, in one visible list.
SCHEDULER_PATCHES = (
    (Scheduler, "__init__", _patch_init),
    (Scheduler, "_update_after_schedule", _patch_update_after_schedule),
    (Scheduler, "_get_local_prefix_cache_hit", _patch_prefix_cache_hit),
    (Scheduler, "_reserve_prefill_lookahead", _patch_split_at_compression_points),
    (Scheduler, "_preempt_request", _patch_forget),
    (Scheduler, "_free_request", _patch_forget),
)
