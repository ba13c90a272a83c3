"""Engine-core block accounting of the compressed KV cache groups.

At a request's compaction step each compressed group gets ``cdiv(kept, block_size)`` target
blocks from the shared pool and gives its prompt blocks back; afterwards vLLM's managers of those
groups count blocks from the physical length (logical − evicted). Groups left alone (sliding
window, recurrent state) are never touched: vLLM keeps managing them from logical lengths.

Patched (vLLM 0.32; contract tests in tests/test_contract.py):
- ``SingleTypeKVCacheManager.get_num_blocks_to_allocate`` / ``allocate_new_blocks`` (args):
  managers of compressed groups subtract the request's evicted tokens, so the freed blocks are not
  allocated again at the next step. ``FullAttentionManager`` inherits both; other managers never
  carry the evicted counts.
- ``KVCacheCoordinator.cache_blocks`` (guard): a compressed request's blocks are never hashed
  again (the compacted blocks' content is no longer the prompt prefix the hashes describe).
"""

from __future__ import annotations

import functools
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from vllm.logger import init_logger
from vllm.v1.core.kv_cache_coordinator import KVCacheCoordinator
from vllm.v1.core.single_type_kv_cache_manager import SingleTypeKVCacheManager
from vllm.v1.request import Request

from vllm_snapkv.adapter.groups import CompressedGroups
from vllm_snapkv.plan import CompressionPlan, StepDirectives, cdiv

if TYPE_CHECKING:
    from vllm_snapkv.adapter.planning import SchedulerCompression

logger = init_logger(f"vllm.{__name__}")

#: Attribute holding the scheduler's ``evicted`` dict (the same object) on the coordinator and on
#: the managers of compressed groups.
EVICTED_ATTR = "_snapkv_evicted"


def share_evicted_counts(
    coordinator: KVCacheCoordinator, groups: CompressedGroups, evicted: dict[str, int]
) -> None:
    """Give the coordinator and the compressed groups' managers the scheduler's evicted counts."""
    setattr(coordinator, EVICTED_ATTR, evicted)
    for group_id in groups.group_ids:
        setattr(coordinator.single_type_managers[group_id], EVICTED_ATTR, evicted)


def _evicted(owner: Any, request_id: str) -> int:
    evicted = getattr(owner, EVICTED_ATTR, None)
    return evicted.get(request_id, 0) if evicted else 0


def compress_completing(
    coordinator: KVCacheCoordinator,
    state: "SchedulerCompression",
    compressing: list[tuple[Request, CompressionPlan]],
    directives: StepDirectives,
) -> list[float]:
    """Give each of this step's compressions its targets in every compressed group (fresh
    blocks; the request's own blocks only when the pool is short), release its sources and
    record it. ``compressing`` holds plans without targets. Returns the prompt compression
    ratios recorded.

    Every target of the step is allocated before any source is released, so a fresh target can
    never be a block another request of this step still reads from. Fresh targets leave the
    source blocks (and their prefix-cache hashes) intact for later requests with the same prefix.
    """
    managers = {g: coordinator.single_type_managers[g] for g in state.groups.group_ids}
    block_pool = coordinator.block_pool
    allocations: list[tuple[Request, CompressionPlan, dict[int, list]]] = []
    for request, plan in compressing:
        request_id = request.request_id
        sources = {g: manager.req_to_blocks[request_id] for g, manager in managers.items()}
        num_targets = cdiv(plan.num_kept, state.block_size)
        if block_pool.get_num_free_blocks() >= num_targets * len(managers):
            targets = {g: block_pool.get_new_blocks(num_targets) for g in managers}
            reused: set[int] = set()
        else:
            targets, reused = _in_place_targets(block_pool, sources, num_targets)
        if targets is None:
            _skip(state, request_id, plan, directives)
            continue
        plan = replace(
            plan,
            target_block_ids={g: tuple(b.block_id for b in blocks) for g, blocks in targets.items()},
            reused_block_ids=frozenset(reused),
        )
        allocations.append((request, plan, targets))

    new_ratios = []
    for request, plan, targets in allocations:
        request_id = request.request_id
        num_freed = 0
        for group_id, manager in managers.items():
            sources = manager.req_to_blocks[request_id]
            manager.req_to_blocks[request_id] = list(targets[group_id])
            released = [b for b in sources if b.block_id not in plan.reused_block_ids]
            block_pool.free_blocks(reversed(released))
            num_freed += len(sources) - len(targets[group_id])
        directives.plans[request_id] = plan
        state.evicted[request_id] = state.evicted.get(request_id, 0) + plan.num_evicted
        state.num_compressions[request_id] = plan.index + 1
        state.decode_points.pop(request_id, None)  # the next one counts from the new length
        if plan.phase == "decode":
            state.stats.record_decode_compression(plan.num_evicted, num_freed)
            continue
        new_ratios.append(
            state.stats.record_compression(
                plan.num_scored, plan.budget, plan.num_evicted, num_freed
            )
        )
    return new_ratios


def _skip(
    state: "SchedulerCompression", request_id: str, plan: CompressionPlan, directives: StepDirectives
) -> None:
    """No blocks to compact into. The window queries exist only during this step: a skipped
    prompt compression leaves the request its full cache for good (no decode compressions
    either, which would count from a prompt never compressed); a skipped decode compression is
    tried again one interval later."""
    state.stats.skipped_no_free_blocks += 1
    directives.released.add(request_id)
    if plan.phase == "decode":
        state.decode_points[request_id] = plan.window_end + state.config.decode_interval
    else:
        state.decode_points[request_id] = None
    logger.warning(
        "SnapKV: request %s keeps its KV cache uncompressed at position %d: no free blocks to "
        "compact it into",
        request_id,
        plan.window_end,
    )


def _in_place_targets(block_pool: Any, sources: dict[int, list], num_targets: int):
    """Targets for compaction in place: in each compressed group, the request's own blocks that
    no other request holds, taken from the tail, and fresh blocks for the rest. ``(None, set())``
    when even that does not fit.

    The worker reads every kept entry of a layer before it writes any, so any owned block may be
    a target. Tail blocks go first because the leading ones are the prompt prefix later requests
    are most likely to hit: freed untouched, they keep their prefix-cache entries.
    """
    owned = {
        g: [b for b in reversed(blocks) if b.ref_cnt == 1][:num_targets][::-1]
        for g, blocks in sources.items()
    }
    num_fresh = sum(num_targets - len(blocks) for blocks in owned.values())
    if num_fresh > block_pool.get_num_free_blocks():
        return None, set()
    reused = {b.block_id for blocks in owned.values() for b in blocks}
    # Their content changes: no later request may hit them as a cached prompt block.
    block_pool.evict_blocks(reused)
    targets = {
        g: blocks + block_pool.get_new_blocks(num_targets - len(blocks))
        for g, blocks in owned.items()
    }
    return targets, reused


def _patch_get_num_blocks_to_allocate(original):
    @functools.wraps(original)
    def get_num_blocks_to_allocate(
        self: SingleTypeKVCacheManager,
        request_id: str,
        num_tokens: int,
        new_computed_blocks,
        total_computed_tokens: int,
        num_local_computed_tokens: int,
        num_tokens_main_model: int,
        *args: Any,
        **kwargs: Any,
    ) -> int:
        evicted = _evicted(self, request_id)
        return original(
            self,
            request_id,
            num_tokens - evicted,
            new_computed_blocks,
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
        self: SingleTypeKVCacheManager,
        request_id: str,
        num_tokens: int,
        num_tokens_main_model: int,
        *args: Any,
        **kwargs: Any,
    ):
        evicted = _evicted(self, request_id)
        return original(
            self, request_id, num_tokens - evicted, num_tokens_main_model - evicted, *args, **kwargs
        )

    return allocate_new_blocks


def _patch_cache_blocks(original):
    @functools.wraps(original)
    def cache_blocks(self: KVCacheCoordinator, request: Request, num_computed_tokens: int) -> None:
        if _evicted(self, request.request_id):
            return
        original(self, request, num_computed_tokens)

    return cache_blocks


BLOCK_ACCOUNTING_PATCHES = (
    (SingleTypeKVCacheManager, "get_num_blocks_to_allocate", _patch_get_num_blocks_to_allocate),
    (SingleTypeKVCacheManager, "allocate_new_blocks", _patch_allocate_new_blocks),
    (KVCacheCoordinator, "cache_blocks", _patch_cache_blocks),
)
