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
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from vllm.v1.core.kv_cache_coordinator import KVCacheCoordinator
from vllm.v1.core.single_type_kv_cache_manager import SingleTypeKVCacheManager
from vllm.v1.request import Request

from vllm_snapkv.adapter.groups import CompressedGroups
from vllm_snapkv.plan import CompressionPlan, cdiv

#: Attribute holding the scheduler's evicted-count reader (``request id -> evicted tokens``) on
#: the coordinator and on the managers of compressed groups. They read it; the scheduler's
#: planning state owns the counts.
EVICTED_ATTR = "_snapkv_evicted_of"

EvictedReader = Callable[[str], int]


def share_evicted_counts(
    coordinator: KVCacheCoordinator, groups: CompressedGroups, evicted_of: EvictedReader
) -> None:
    """Let the coordinator and the compressed groups' managers read the evicted counts."""
    setattr(coordinator, EVICTED_ATTR, evicted_of)
    for group_id in groups.group_ids:
        setattr(coordinator.single_type_managers[group_id], EVICTED_ATTR, evicted_of)


def _evicted(owner: Any, request_id: str) -> int:
    evicted_of = getattr(owner, EVICTED_ATTR, None)
    return evicted_of(request_id) if evicted_of is not None else 0


@dataclass(frozen=True)
class Compaction:
    """A compression's blocks: its plan with the targets filled in, and the blocks it gave
    back to the pool (all compressed groups together)."""

    plan: CompressionPlan
    num_freed: int


def swap_in_targets(
    coordinator: KVCacheCoordinator,
    group_ids: tuple[int, ...],
    block_size: int,
    compressing: list[tuple[str, CompressionPlan]],
) -> dict[str, Compaction | None]:
    """Give each of this step's compressions (plans without targets) its targets in every
    compressed group (fresh blocks; the request's own blocks only when the pool is short), make
    them its block lists and release its sources. Per request: its :class:`Compaction`, or None
    when there are no blocks to compact into (its blocks are left as they were). Changes block
    lists and the pool only; what that means for the request is the caller's to record.

    Every target of the step is allocated before any source is released, so a fresh target can
    never be a block another request of this step still reads from. Fresh targets leave the
    source blocks (and their prefix-cache hashes) intact for later requests with the same prefix.
    """
    managers = {g: coordinator.single_type_managers[g] for g in group_ids}
    block_pool = coordinator.block_pool
    results: dict[str, Compaction | None] = {}
    allocations: list[tuple[str, CompressionPlan, dict[int, list]]] = []
    for request_id, plan in compressing:
        sources = {g: manager.req_to_blocks[request_id] for g, manager in managers.items()}
        num_targets = cdiv(plan.num_kept, block_size)
        if block_pool.get_num_free_blocks() >= num_targets * len(managers):
            targets = {g: block_pool.get_new_blocks(num_targets) for g in managers}
            reused: set[int] = set()
        else:
            targets, reused = _in_place_targets(block_pool, sources, num_targets)
        if targets is None:
            results[request_id] = None
            continue
        plan = replace(
            plan,
            target_block_ids={g: tuple(b.block_id for b in blocks) for g, blocks in targets.items()},
            reused_block_ids=frozenset(reused),
        )
        allocations.append((request_id, plan, targets))

    for request_id, plan, targets in allocations:
        num_freed = 0
        for group_id, manager in managers.items():
            sources = manager.req_to_blocks[request_id]
            manager.req_to_blocks[request_id] = list(targets[group_id])
            released = [b for b in sources if b.block_id not in plan.reused_block_ids]
            block_pool.free_blocks(reversed(released))
            num_freed += len(sources) - len(targets[group_id])
        results[request_id] = Compaction(plan, num_freed)
    return results


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
