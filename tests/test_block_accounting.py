"""Engine-core block accounting across KV cache groups, without an engine: targets per
compressed group when the pool is short (compaction in place), never a block another request
holds."""

from __future__ import annotations

from dataclasses import dataclass

from vllm_snapkv.adapter.block_accounting import _in_place_targets


@dataclass(eq=False)
class Block:
    block_id: int
    ref_cnt: int = 1


class Pool:
    def __init__(self, num_free: int, first_id: int = 100):
        self.free = [Block(first_id + i, 0) for i in range(num_free)]
        self.evicted: set[int] = set()

    def get_num_free_blocks(self) -> int:
        return len(self.free)

    def get_new_blocks(self, count: int) -> list[Block]:
        taken, self.free = self.free[:count], self.free[count:]
        return taken

    def evict_blocks(self, block_ids: set[int]) -> None:
        self.evicted |= block_ids


def test_each_compressed_group_reuses_its_own_tail_blocks_then_fresh_ones():
    # Group 0: 6 owned blocks; group 5: its first 4 blocks shared with another request, 2 owned.
    sources = {
        0: [Block(i) for i in range(1, 7)],
        5: [Block(i, ref_cnt=2) for i in range(11, 15)] + [Block(15), Block(16)],
    }
    pool = Pool(num_free=1)
    targets, reused = _in_place_targets(pool, sources, num_targets=3)
    assert [b.block_id for b in targets[0]] == [4, 5, 6]  # the tail, in order
    assert [b.block_id for b in targets[5]] == [15, 16, 100]  # owned tail + the one free block
    assert reused == {4, 5, 6, 15, 16} == pool.evicted  # their cached hashes are dropped
    assert pool.get_num_free_blocks() == 0


def test_no_targets_when_even_in_place_does_not_fit():
    sources = {0: [Block(1), Block(2, ref_cnt=3)], 1: [Block(3, ref_cnt=2)]}
    pool = Pool(num_free=1)
    targets, reused = _in_place_targets(pool, sources, num_targets=2)
    assert targets is None and reused == set()
    assert pool.evicted == set() and pool.get_num_free_blocks() == 1  # nothing touched


class FreeingPool(Pool):
    def free_blocks(self, blocks) -> None:
        for block in blocks:
            block.ref_cnt -= 1
            self.free.append(block)


def decode_plan():
    from vllm_snapkv.plan import CompressionPlan

    return CompressionPlan(
        num_scored=384, budget=256, window_size=32, window_end=1000, num_output_tokens=0,
        target_block_ids={}, phase="decode", index=1,
    )


def test_decode_compression_in_place_when_the_pool_is_empty():
    """A decode compression with no free block compacts into the request's own tail blocks:
    one block goes back; the allocator returns the plan with its targets and nothing else."""
    from types import SimpleNamespace

    from vllm_snapkv.adapter.block_accounting import swap_in_targets

    pool = FreeingPool(num_free=0)
    manager = SimpleNamespace(req_to_blocks={"r": [Block(1), Block(2), Block(3)]})
    coordinator = SimpleNamespace(single_type_managers=[manager], block_pool=pool)
    compaction = swap_in_targets(coordinator, (0,), 128, [("r", decode_plan())])["r"]
    plan = compaction.plan
    assert plan.target_block_ids == {0: (2, 3)} and plan.reused_block_ids == {2, 3}
    assert (plan.index, plan.num_evicted, compaction.num_freed) == (1, 128, 1)
    assert [b.block_id for b in manager.req_to_blocks["r"]] == [2, 3]
    assert [b.block_id for b in pool.free] == [1]


def test_no_blocks_to_compact_into_is_a_skip_that_touches_nothing():
    from types import SimpleNamespace

    from vllm_snapkv.adapter.block_accounting import swap_in_targets

    pool = FreeingPool(num_free=0)
    shared = [Block(1, ref_cnt=2), Block(2, ref_cnt=2), Block(3, ref_cnt=2)]
    manager = SimpleNamespace(req_to_blocks={"r": list(shared)})
    coordinator = SimpleNamespace(single_type_managers=[manager], block_pool=pool)
    assert swap_in_targets(coordinator, (0,), 128, [("r", decode_plan())]) == {"r": None}
    assert manager.req_to_blocks["r"] == shared and not pool.free and not pool.evicted


def test_step_records_compressions_and_skips_in_the_request_records(monkeypatch):
    """plan_step turns the allocator's answers into the record transitions, directives and
    counters: one request compressed in place (evicted grows, decode series), one skipped (its
    window dropped, tried one interval later)."""
    from types import SimpleNamespace

    from vllm_snapkv.adapter import planning
    from vllm_snapkv.config import parse_config

    state = planning.SchedulerCompression(
        config=parse_config({"budget": 256, "decode_interval": 128}),
        groups=SimpleNamespace(block_size=128, group_ids=(0,)),
    )
    pool = FreeingPool(num_free=0)
    shared = [Block(4, ref_cnt=2), Block(5, ref_cnt=2), Block(6, ref_cnt=2)]
    manager = SimpleNamespace(
        req_to_blocks={"own": [Block(1), Block(2), Block(3)], "shared": list(shared)}
    )
    coordinator = SimpleNamespace(single_type_managers=[manager], block_pool=pool)
    requests = {
        r: SimpleNamespace(request_id=r, num_prompt_tokens=100, sampling_params=None,
                           num_computed_tokens=383)
        for r in ("own", "shared")
    }
    scheduler = SimpleNamespace(
        requests=requests, kv_cache_manager=SimpleNamespace(coordinator=coordinator)
    )
    output = SimpleNamespace(num_scheduled_tokens={"own": 1, "shared": 1})
    for request in requests.values():  # both captured their window [352, 384) one row a step
        state.record(request)
        state.window_captured(request.request_id, 352)
    directives = planning.plan_step(scheduler, state, output)
    assert set(directives.plans) == {"own"} and directives.released == {"shared"}
    own, skipped = state.requests["own"], state.requests["shared"]
    assert (own.evicted, own.index, own.next_point) == (128, 1, 128 + 384)
    assert (skipped.evicted, skipped.index, skipped.next_point) == (0, 0, 384 + 128)
    assert (state.stats.decode_compressions, state.stats.decode_freed_blocks) == (1, 1)
    assert state.stats.skipped_no_free_blocks == 1 and state.stats.compressed_requests == 0
