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
