"""Window queries of decode compressions, written by a CUDA-graph-capturable op.

A decode compression at position ``point`` scores with the queries of positions ``[point - W,
point)``, computed one decode step at a time before it. Capturing them with Python inside the
attention layer would forbid full CUDA graphs in every step in which *any* request of the batch
is within ``W`` tokens of its point (with many running requests, nearly every decode step).
Instead every compressed layer owns a persistent ring of ``max_num_seqs * W`` query rows (+ one
scratch row): request slot ``s`` holds position ``p`` in row ``s * W + p % W``. Each step writes
*all* of the step's query rows into the ring with one ``index_copy_`` whose destination rows come
from a persistent device buffer (:attr:`WindowQueryRing.rows`): rows of window tokens point at
their ring row, every other row (and the padding of a graph's batch) at the scratch row. The
op has the step's fixed shapes and reads only persistent tensors, so a full CUDA graph captures
it once and replays it with the rows the host wrote for that step. Only the step that compacts
leaves the full graph; it reads its earlier window rows from the ring, in position order.

Prompt compressions keep the worker's per-request list buffer: their capture chunks are prefills,
which never run as full graphs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


class WindowQueryRing:
    """The decode window queries of one model runner (``WorkerCompression.ring``).

    Invariant: every device destination row in :attr:`rows` is the scratch row except, from a
    step's :meth:`end_step` to the write of its last compressed layer, the rows of that step's
    window tokens; so a replayed graph of any batch size writes nothing but window tokens into
    request rows, and a forward outside the plugin's steps writes none.
    """

    def __init__(self, window_size: int, num_slots: int, rows: Any):
        self.window_size = window_size
        self.num_slots = num_slots
        self.scratch_row = num_slots * window_size
        #: vLLM ``CpuGpuBuffer`` (int64, one entry per token of the largest batch): the ring row
        #: each token's query goes to in this step.
        self.rows = rows
        self.rows.np[:] = self.scratch_row
        self.rows.copy_to_gpu()
        #: Compressed layer name -> its ring ``[num_slots * W + 1, H_q, D]``.
        self.queries: dict[str, torch.Tensor] = {}
        #: The compressed layer a forward runs last: its write points the device rows back at
        #: the scratch row, so a forward outside the plugin's steps (a dummy batch, replayed
        #: from a full graph too) writes nothing into request rows.
        self.last_layer: str | None = None
        self._slot_of: dict[str, int] = {}
        #: request -> positions ``[first, end)`` its slot holds (written in consecutive steps).
        self._captured: dict[str, tuple[int, int]] = {}
        self._free_slots = list(range(num_slots - 1, -1, -1))
        #: Host entries ``[0, _written)`` may hold request rows (this step's), to reset next step.
        self._written = 0
        self._to_copy = 0

    def add_layer(
        self, name: str, num_heads: int, head_size: int, dtype: torch.dtype, device: Any
    ) -> None:
        """Add a compressed layer; layers are added in the order a forward runs them."""
        self.last_layer = name
        # Uninitialised: a row is read only after this request's window wrote it (checked in
        # window_rows), and untouched host pages cost no memory on CPU.
        self.queries[name] = torch.empty(
            self.scratch_row + 1, num_heads, head_size, dtype=dtype, device=device
        )

    # --- slots --------------------------------------------------------------------------------

    def slot(self, request_id: str) -> int:
        slot = self._slot_of.get(request_id)
        if slot is None:
            if not self._free_slots:
                # A slot is held from a request's first capture to its compaction, release,
                # preemption or end; at most max_num_seqs requests run at once.
                raise RuntimeError(
                    f"SnapKV: no free window-query slot for request {request_id} "
                    f"({self.num_slots} slots, held by {sorted(self._slot_of)})"
                )
            slot = self._slot_of[request_id] = self._free_slots.pop()
        return slot

    def release(self, request_id: str) -> None:
        self._captured.pop(request_id, None)
        slot = self._slot_of.pop(request_id, None)
        if slot is not None:
            self._free_slots.append(slot)

    def captured(self, request_id: str) -> tuple[int, int] | None:
        """Positions ``[first, end)`` the request's slot holds, or None (no slot)."""
        return self._captured.get(request_id)

    @property
    def slots_held(self) -> int:
        return len(self._slot_of)

    # --- a step -------------------------------------------------------------------------------

    def begin_step(self) -> None:
        """Host rows of the last step's window tokens go back to the scratch row."""
        self.rows.np[: self._written] = self.scratch_row
        self._to_copy = self._written
        self._written = 0

    def capture(self, request_id: str, first_row: int, first_position: int, num_rows: int) -> None:
        """This step's batch rows ``[first_row, first_row + num_rows)`` hold the queries of the
        request's positions from ``first_position`` on, all inside its next decode window."""
        if num_rows <= 0:
            return
        base = self.slot(request_id) * self.window_size
        first, end = self._captured.get(request_id, (first_position, first_position))
        if not first <= first_position <= end:  # not inside or right after the last: a new window
            first = first_position
        # Starting before ``end``: speculative decoding rejected drafts and rolled back; these
        # rows overwrite the rejected tokens' queries, and what lies past them is stale.
        self._captured[request_id] = (first, first_position + num_rows)
        positions = np.arange(first_position, first_position + num_rows)
        self.rows.np[first_row : first_row + num_rows] = base + positions % self.window_size
        self._written = max(self._written, first_row + num_rows)

    def end_step(self) -> None:
        """One non-blocking copy of the host rows that changed (none: no copy)."""
        count = max(self._to_copy, self._written)
        if count:
            self.rows.copy_to_gpu(count)
        self._to_copy = 0

    @property
    def writes_this_step(self) -> bool:
        """Some token of this step belongs to a decode window (an eager step must write)."""
        return self._written > 0

    def write(self, layer_name: str, queries: torch.Tensor) -> None:
        """All ``queries [num_tokens, H_q, D]`` of the step (graph padding included) into the
        layer's ring: fixed shapes, persistent tensors only (capturable)."""
        ring = self.queries[layer_name]
        rows = self.rows.gpu[: queries.shape[0]]
        ring.index_copy_(0, rows, queries.to(ring.dtype))
        if layer_name == self.last_layer:
            rows.fill_(self.scratch_row)

    def window_rows(self, request_id: str, first_position: int, end_position: int, device: Any):
        """Ring rows of the request's positions ``[first_position, end_position)``, in order
        (one host-to-device copy, on the compacting step only). Raises unless every one of them
        was captured since the slot was last released (a gap would score stale queries)."""
        first, end = self._captured.get(request_id, (0, 0))
        if not (first <= first_position and end_position <= end):
            raise RuntimeError(
                f"SnapKV: request {request_id} compresses with window positions "
                f"[{first_position}, {end_position}) but only [{first}, {end}) were captured"
            )
        base = self.slot(request_id) * self.window_size
        positions = torch.arange(first_position, end_position)
        return (base + positions % self.window_size).to(device)

    def read(self, layer_name: str, ring_rows: torch.Tensor) -> torch.Tensor:
        return self.queries[layer_name][ring_rows]
