"""Engine-core side: decide compressions, swap block lists, keep block accounting physical.

Patched (vLLM 0.32/0.33, v1 engine; contract tests in tests/test_contract.py and
tests/test_contract_sources.py):
- ``Scheduler.__init__``: validate the KV cache layout, attach :class:`SchedulerCompression`.
- ``Scheduler._update_after_schedule``: plan this step's compressions (prompts whose prefill
  completes, decoding requests whose stored entries reach the decode threshold) and window
  captures, allocate targets, release sources, attach :class:`StepDirectives` to the output.
- ``Scheduler._get_local_prefix_cache_hit``: keep the observation window out of prefix-cache hits.
- ``Scheduler._reserve_prefill_lookahead`` (post): end a preempted request's re-prefill chunks at
  its compression points, so its earlier outputs are recomputed over the compressed cache; cut a
  speculative-decoding chunk so its draft tokens stop before the next compression point
  (``plan.speculative_chunk_end``). vLLM schedules only the drafts that fit the chunk.
- ``Scheduler._preempt_request`` / ``_free_request``: forget per-request state.
What compresses when (the per-scheduler state and step planning): ``planning``. Block accounting
of compressed groups (targets, block swap, physical counts): ``block_accounting``.
"""

from __future__ import annotations

import functools
from typing import Any

from vllm.logger import init_logger
from vllm.platforms import current_platform
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import Request

from vllm_snapkv.adapter.block_accounting import share_evicted_counts
from vllm_snapkv.adapter.groups import CompressedGroups
from vllm_snapkv.adapter.planning import SchedulerCompression, plan_step
from vllm_snapkv.config import config_from_additional
from vllm_snapkv.plan import speculative_chunk_end
from vllm_snapkv.metrics import publishers_from_environment

# Under the "vllm" logger tree so vLLM's handlers and VLLM_LOGGING_LEVEL apply.
logger = init_logger(f"vllm.{__name__}")

#: Attribute on ``SchedulerOutput`` carrying this step's :class:`StepDirectives` to the workers.
DIRECTIVES_ATTR = "snapkv_directives"


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
        share_evicted_counts(self.kv_cache_manager.coordinator, state.groups, state.evicted_of)
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


def _patch_update_after_schedule(original):
    @functools.wraps(original)
    def _update_after_schedule(self: Scheduler, scheduler_output: SchedulerOutput) -> None:
        state = _state(self)
        if state is not None:
            setattr(scheduler_output, DIRECTIVES_ATTR, plan_step(self, state, scheduler_output))
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
        if state is None or num_new_tokens <= 1:
            return num_new_tokens
        point = state.next_compression_point(request)
        if point is None:
            return num_new_tokens
        chunk_end = num_computed_tokens + num_new_tokens
        if request.spec_token_ids and chunk_end > request.num_tokens:
            # Draft tokens (n-gram speculation) in the chunk: they stop before the point.
            return (
                speculative_chunk_end(point, request.num_tokens, num_computed_tokens, chunk_end)
                - num_computed_tokens
            )
        if num_computed_tokens < point < chunk_end and not _split_crashes_vllm(request):
            return point - num_computed_tokens
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
            state.forgotten(request.request_id)
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
