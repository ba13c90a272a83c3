"""Engine-core side: decide compressions, swap block lists, keep block accounting physical.

Patched (vLLM 0.32, v1 engine; contract tests in tests/test_contract.py):
- ``Scheduler.__init__``: validate the KV cache layout, attach :class:`SchedulerCompression`.
- ``Scheduler._update_after_schedule``: plan compressions of requests whose prefill completes in
  this step, allocate targets, release sources, attach :class:`StepDirectives` to the output.
- ``Scheduler._get_local_prefix_cache_hit``: keep the observation window out of prefix-cache hits.
- ``Scheduler._reserve_prefill_lookahead`` (post): end a preempted request's re-prefill chunk at
  its prompt, so its earlier outputs are recomputed over the compressed cache.
- ``Scheduler._preempt_request`` / ``_free_request``: forget per-request state.
- ``KVCacheCoordinator.get_num_blocks_to_allocate`` / ``allocate_new_blocks``: subtract evicted
  tokens, so the freed blocks are not allocated again at the next step.
- ``KVCacheCoordinator.cache_blocks``: never hash compacted blocks (their content is no longer
  the prompt prefix the hashes describe).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

from vllm.logger import init_logger
from vllm.platforms import current_platform
from vllm.v1.core.kv_cache_coordinator import KVCacheCoordinator
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig
from vllm.v1.request import Request

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
    cdiv,
    frees_blocks,
    prefix_hit_limit,
)

# Under the "vllm" logger tree so vLLM's handlers and VLLM_LOGGING_LEVEL apply.
logger = init_logger(f"vllm.{__name__}")

#: Attribute on ``SchedulerOutput`` carrying this step's :class:`StepDirectives` to the workers.
DIRECTIVES_ATTR = "snapkv_directives"


def check_kv_cache_config(kv_cache_config: KVCacheConfig) -> None:
    """Compression is defined for one group of plain full-attention layers only."""
    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1:
        raise ValueError(
            "kv_compression: SnapKV supports models with exactly one KV cache group "
            f"(plain full attention); this model has {len(groups)} "
            "(hybrid, sliding-window or cross-attention layers)."
        )
    spec = groups[0].kv_cache_spec
    if type(spec) is not FullAttentionSpec:
        raise ValueError(
            "kv_compression: SnapKV supports plain full attention only; this model's KV cache "
            f"spec is {type(spec).__name__} (MLA, sink or sliding-window variants are not "
            "supported)."
        )


@dataclass
class SchedulerCompression:
    """Per-scheduler SnapKV state. Invariant: ``evicted[r] > 0`` iff ``r``'s block list holds
    compacted KV, i.e. its physical KV length is its logical length minus ``evicted[r]``."""

    config: SnapKVConfig
    block_size: int
    #: Requests whose prompt is not yet computed (new or resumed): they compress when their
    #: prefill reaches the prompt's end (a preempted request's re-prefill is split there, see
    #: ``_patch_split_at_prompt_end``).
    prefilling: set[str] = field(default_factory=set)
    #: Shared with the KV cache coordinator (same dict object).
    evicted: dict[str, int] = field(default_factory=dict)
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

    def compression_budget(self, request: Request) -> int | None:
        """The budget the request compresses with at the end of its prompt, or None. Decided on
        the prompt alone, so a preempted request's re-prefill decides as its first prefill did."""
        budget = self.budget_for(request)
        if budget is None or not frees_blocks(
            request.num_prompt_tokens, budget, 0, self.block_size
        ):
            return None
        return budget

    def forget(self, request_id: str) -> None:
        self.prefilling.discard(request_id)
        self.evicted.pop(request_id, None)


def _state(scheduler: Scheduler) -> SchedulerCompression | None:
    return getattr(scheduler, "_snapkv", None)


def _patch_init(original):
    @functools.wraps(original)
    def __init__(self: Scheduler, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        config = config_from_additional(self.vllm_config.additional_config)
        if config is None:
            return
        check_kv_cache_config(self.kv_cache_config)
        coordinator = self.kv_cache_manager.coordinator
        state = SchedulerCompression(
            config=config,
            block_size=coordinator.single_type_managers[0].block_size,
            # data_parallel_index, not _rank: vLLM resets the rank of independent (non-MoE) DP
            # engines to 0; the index is the engine's `engine` label in vLLM's own metrics.
            publishers=publishers_from_environment(
                self.vllm_config.model_config.served_model_name,
                self.vllm_config.parallel_config.data_parallel_index,
            ),
        )
        coordinator._snapkv_evicted = state.evicted
        self._snapkv = state
        state.publish_stats()  # counters exist (at 0) from the start, as Prometheus expects
        logger.info(
            "SnapKV KV-cache compression on: budget=%d, window_size=%d, kernel_size=%d, "
            "pooling=%s, block_size=%d",
            config.budget,
            config.window_size,
            config.kernel_size,
            config.pooling,
            state.block_size,
        )

    return __init__


def _plan_step(scheduler: Scheduler, state: SchedulerCompression, output: SchedulerOutput):
    """Build this step's directives; must run before ``num_computed_tokens`` advances."""
    directives = StepDirectives()
    state.prefilling.update(new_request.req_id for new_request in output.scheduled_new_reqs)
    state.prefilling.update(output.scheduled_cached_reqs.resumed_req_ids)

    window = state.config.window_size
    completing: list[tuple[Request, int, int]] = []
    for request_id, num_scheduled in output.num_scheduled_tokens.items():
        if request_id in state.evicted:
            directives.evicted[request_id] = state.evicted[request_id]
            continue
        if request_id not in state.prefilling:
            continue
        request = scheduler.requests[request_id]
        prompt_end = request.num_prompt_tokens
        chunk_start = request.num_computed_tokens
        chunk_end = chunk_start + num_scheduled
        completes = chunk_end >= prompt_end
        holds_window = chunk_start < prompt_end and chunk_end > prompt_end - window
        if not (completes or holds_window):
            continue
        budget = state.compression_budget(request)
        if completes:
            state.prefilling.discard(request_id)
            if budget is not None:
                # 0 unless a resumed request's chunk ran past its prompt (the split at the
                # prompt's end did not apply): those outputs are kept verbatim.
                completing.append((request, budget, chunk_end - prompt_end))
        elif budget is not None:
            directives.captures[request_id] = WindowCapture(prompt_end, window)

    if completing:
        _compress(scheduler, state, completing, directives)
    return directives


def _compress(
    scheduler: Scheduler,
    state: SchedulerCompression,
    completing: list[tuple[Request, int, int]],
    directives: StepDirectives,
) -> None:
    """Copy-on-compress into fresh blocks; in place only when the pool is short.

    Every target is allocated before any source is released, so a fresh target can never be a
    block another request of this step still reads from. Fresh targets leave the source blocks
    (and their prefix-cache hashes) intact for later requests with the same prefix.
    """
    manager = scheduler.kv_cache_manager.coordinator.single_type_managers[0]
    block_pool = manager.block_pool
    allocations: list[tuple[Request, CompressionPlan, list]] = []
    for request, budget, num_output_tokens in completing:
        request_id = request.request_id
        sources = manager.req_to_blocks[request_id]
        num_targets = cdiv(budget + num_output_tokens, state.block_size)
        if block_pool.get_num_free_blocks() >= num_targets:
            targets, reused = block_pool.get_new_blocks(num_targets), []
        else:
            targets, reused = _in_place_targets(block_pool, sources, num_targets)
        if targets is None:
            # The window queries exist only during this step: compressing later is impossible.
            state.stats.skipped_no_free_blocks += 1
            directives.released.add(request_id)
            logger.warning(
                "SnapKV: request %s keeps its full KV cache: no free blocks to compact it into",
                request_id,
            )
            continue
        plan = CompressionPlan(
            prompt_len=request.num_prompt_tokens,
            budget=budget,
            window_size=state.config.window_size,
            num_output_tokens=num_output_tokens,
            target_block_ids=tuple(block.block_id for block in targets),
            reused_block_ids=tuple(block.block_id for block in reused),
        )
        allocations.append((request, plan, targets))

    new_ratios = []
    for request, plan, targets in allocations:
        request_id = request.request_id
        sources = manager.req_to_blocks[request_id]
        manager.req_to_blocks[request_id] = list(targets)
        reused = set(plan.reused_block_ids)
        block_pool.free_blocks(reversed([b for b in sources if b.block_id not in reused]))
        directives.plans[request_id] = plan
        state.evicted[request_id] = plan.num_evicted
        new_ratios.append(
            state.stats.record_compression(
                plan.prompt_len, plan.budget, plan.num_evicted, len(sources) - len(targets)
            )
        )
    state.publish_stats(new_ratios)


def _in_place_targets(block_pool, sources: list, num_targets: int):
    """Targets for compaction in place: the request's own blocks that no other request holds,
    taken from the tail, and fresh blocks for the rest. ``(None, [])`` when even that does not fit.

    The worker reads every kept entry of a layer before it writes any, so any owned block may be
    a target. Tail blocks go first because the leading ones are the prompt prefix later requests
    are most likely to hit: freed untouched, they keep their prefix-cache entries.
    """
    owned = [block for block in reversed(sources) if block.ref_cnt == 1][:num_targets]
    num_fresh = num_targets - len(owned)
    if num_fresh > block_pool.get_num_free_blocks():
        return None, []
    reused = owned[::-1]
    # Their content changes: no later request may hit them as a cached prompt block.
    block_pool.evict_blocks({block.block_id for block in reused})
    return reused + block_pool.get_new_blocks(num_fresh), reused


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
    def _get_local_prefix_cache_hit(self: Scheduler, request: Request):
        blocks, num_hit_tokens, *rest = original(self, request)
        state = _state(self)
        if state is None or num_hit_tokens == 0:
            return (blocks, num_hit_tokens, *rest)
        prompt_len = request.num_prompt_tokens
        if state.compression_budget(request) is None:
            return (blocks, num_hit_tokens, *rest)
        limit = prefix_hit_limit(prompt_len, state.config.window_size, state.block_size)
        if num_hit_tokens > limit:
            blocks = self.kv_cache_manager.truncate_computed_blocks(blocks, limit)
            num_hit_tokens = limit
        return (blocks, num_hit_tokens, *rest)

    return _get_local_prefix_cache_hit


def _patch_split_at_prompt_end(original):
    """A preempted request recomputes its prompt and its earlier outputs. Those outputs were first
    computed attending to the compressed cache, so the re-prefill chunk must end at the prompt:
    the prompt is compressed exactly as the first time, and the outputs are recomputed over the
    compressed cache in the next steps (as a short prefill with physical slots)."""

    @functools.wraps(original)
    def _reserve_prefill_lookahead(
        self: Scheduler, request: Request, num_computed_tokens: int, num_new_tokens: int
    ) -> int:
        num_new_tokens = original(self, request, num_computed_tokens, num_new_tokens)
        state = _state(self)
        prompt_len = request.num_prompt_tokens
        if (
            state is not None
            and num_computed_tokens < prompt_len < num_computed_tokens + num_new_tokens
            and request.request_id not in state.evicted
            and not _split_crashes_vllm(request)
            and state.compression_budget(request) is not None
        ):
            return prompt_len - num_computed_tokens
        return num_new_tokens

    return _reserve_prefill_lookahead


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


def _evicted_for(coordinator: KVCacheCoordinator, request_id: str) -> int:
    evicted = getattr(coordinator, "_snapkv_evicted", None)
    return evicted.get(request_id, 0) if evicted else 0


def _patch_get_num_blocks_to_allocate(original):
    @functools.wraps(original)
    def get_num_blocks_to_allocate(
        self: KVCacheCoordinator,
        request_id: str,
        num_tokens: int,
        new_computed_blocks,
        num_encoder_tokens: int,
        total_computed_tokens: int,
        num_local_computed_tokens: int,
        num_tokens_main_model: int,
        *args: Any,
        **kwargs: Any,
    ) -> int:
        evicted = _evicted_for(self, request_id)
        return original(
            self,
            request_id,
            num_tokens - evicted,
            new_computed_blocks,
            num_encoder_tokens,
            total_computed_tokens - evicted,
            num_local_computed_tokens - evicted,
            num_tokens_main_model - evicted,
            *args,
            **kwargs,
        )

    return get_num_blocks_to_allocate


def _patch_allocate_new_blocks(original):
    @functools.wraps(original)
    def allocate_new_blocks(
        self: KVCacheCoordinator,
        request_id: str,
        num_tokens: int,
        num_tokens_main_model: int,
        *args: Any,
        **kwargs: Any,
    ):
        evicted = _evicted_for(self, request_id)
        return original(
            self, request_id, num_tokens - evicted, num_tokens_main_model - evicted, *args, **kwargs
        )

    return allocate_new_blocks


def _patch_cache_blocks(original):
    @functools.wraps(original)
    def cache_blocks(self: KVCacheCoordinator, request: Request, num_computed_tokens: int) -> None:
        if _evicted_for(self, request.request_id):
            return
        original(self, request, num_computed_tokens)

    return cache_blocks


#: (owner class, method name, wrapper factory): every engine-core patch, in one visible list.
SCHEDULER_PATCHES = (
    (Scheduler, "__init__", _patch_init),
    (Scheduler, "_update_after_schedule", _patch_update_after_schedule),
    (Scheduler, "_get_local_prefix_cache_hit", _patch_prefix_cache_hit),
    (Scheduler, "_reserve_prefill_lookahead", _patch_split_at_prompt_end),
    (Scheduler, "_preempt_request", _patch_forget),
    (Scheduler, "_free_request", _patch_forget),
    (KVCacheCoordinator, "get_num_blocks_to_allocate", _patch_get_num_blocks_to_allocate),
    (KVCacheCoordinator, "allocate_new_blocks", _patch_allocate_new_blocks),
    (KVCacheCoordinator, "cache_blocks", _patch_cache_blocks),
)
