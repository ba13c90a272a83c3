"""Worker side: execute the scheduler's directives inside vLLM's V1 model runner.

Patched (vLLM 0.32; contract tests in tests/test_contract.py):
- ``GPUModelRunner.initialize_kv_cache`` (post): check every attention layer runs a supported
  backend (``vllm_snapkv.adapter.attention``), refusing the engine start otherwise.
- ``GPUModelRunner._update_states`` (pre): apply last step's block swaps to the request state and
  the block-table row *before* vLLM appends this step's new blocks; forget finished/resumed ids.
- ``GPUModelRunner._prepare_inputs`` (post): physical ``seq_lens`` and slot mapping for compressed
  requests in the compressed groups (RoPE ``positions`` stay logical), written into the runner's
  persistent buffers that attention metadata and CUDA graphs read (``adapter.physical``); locate
  this step's window rows.
- ``CudagraphDispatcher.dispatch``: a step with SnapKV work (a compaction, or a prompt's window
  capture) never replays a *full* CUDA graph (no Python would run inside it); piecewise graphs
  keep attention eager, so they stay allowed. Decode window captures are not such work: they are
  written by a capturable op into a persistent ring (``adapter.window_ring``) that full graphs
  replay. On hybrid models a step whose groups read different lengths never replays a full graph
  either (a full graph captured one ``seq_lens`` buffer for all groups).
- ``GPUModelRunner.execute_model`` (post): check every layer compacted, write debug dumps, queue
  the block swaps.
- ``forward`` of each supported attention implementation (post): write the step's queries into
  the decode window ring, buffer window queries of prompts in chunked prefill, select, compact
  (``compaction.compact_layer``).
``CPUModelRunner`` inherits the runner methods, so patching ``GPUModelRunner`` covers it.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch
from vllm.config import CUDAGraphMode
from vllm.logger import init_logger
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.attention.backend import AttentionType
from vllm.v1.cudagraph_dispatcher import CudagraphDispatcher
from vllm.v1.worker.gpu_model_runner import GPUModelRunner

from vllm_snapkv.adapter.attention import (
    check_attention_layers,
    layout_for,
    loaded_impls,
    unquantised_queries,
)
from vllm_snapkv.adapter.compaction import CompactionJob, compact_layer, write_selection_dump
from vllm_snapkv.adapter.drafter import (
    DRAFTER_PATCHES,
    DrafterLayers,
    compact_drafter_layers,
    drafter_layer_names,
)
from vllm_snapkv.adapter.groups import CompressedGroups
from vllm_snapkv.adapter.layouts import PagedKVLayout, PagedTokens
from vllm_snapkv.adapter.output_projection import find_output_projection, rank_projection
from vllm_snapkv.adapter.physical import (
    PHYSICAL_PATCHES,
    STEP_STATE_ATTR,
    LogicalLengths,
    evicted_offsets_buffer,
    make_lengths_physical,
    swap_block_lists,
    wrap_runner_step,
)
from vllm_snapkv.adapter.scheduler import DIRECTIVES_ATTR
from vllm_snapkv.adapter.window_ring import WindowQueryRing
from vllm_snapkv.config import SnapKVConfig, config_from_additional
from vllm_snapkv.plan import CompressionPlan, StepDirectives
from vllm_snapkv.scoring import DEFAULT_SCORE, ScoreRule, score_rule, value_metric
from vllm_snapkv.timing import CompactionClock

# Under the "vllm" logger tree so vLLM's handlers and VLLM_LOGGING_LEVEL apply.
logger = init_logger(f"vllm.{__name__}")


class WorkerCompression:
    """Per-model-runner SnapKV state, the runner's ``_snapkv`` (one per engine and rank).
    Invariant: after ``execute_model`` of a step, every plan of that step has been applied by
    every attention layer of this worker, or the step failed; either way the step's state
    (``jobs``, ``logical_lengths``) is cleared then.

    The hooks that run without the runner at hand (each compressed layer's attention
    implementation, the runner's CUDA-graph dispatcher and attention groups) find this state
    under :data:`STEP_STATE_ATTR` on themselves (:meth:`attach`), never in a process global:
    several engines may share a process.
    """

    def __init__(
        self,
        config: SnapKVConfig,
        groups: CompressedGroups,
        dump_suffix: str = "",
        query_dtype: torch.dtype = torch.float32,
        drafter_layers: set[str] = frozenset(),
    ):
        self.config = config
        #: The model's dtype: queries vLLM quantised for an fp8 cache are buffered in it.
        self.query_dtype = query_dtype
        self.groups = groups
        #: The target model's compressed layers -> group (a draft model's layers excluded: they
        #: take the target's selection after the drafter ran, ``adapter.drafter``).
        self.target_layers = {
            name: group for name, group in groups.group_of_layer.items()
            if name not in drafter_layers
        }
        self.drafter = DrafterLayers.of(
            set(drafter_layers), groups.group_of_layer, list(self.target_layers)
        )
        #: The runner's attention layers by name (vLLM's static forward context), at attach.
        self.forward_context: dict[str, Any] = {}
        #: Compressing jobs of this step whose drafter layers are still to compact.
        self.drafter_jobs: list[CompactionJob] = []
        #: Evicted tokens per batch row of this step (device), from ``_prepare_inputs`` to the
        #: end of ``sample_tokens`` (the drafter's slots); None without compressed requests.
        self.row_offsets: torch.Tensor | None = None
        # A pipeline stage's KV cache config names only the layers it runs: each stage compacts
        # its own layers, and checks it compacted all of them.
        self.num_layers = len(self.target_layers)
        self.block_size = groups.block_size  # the scheduler's (manager) block size
        #: Appended to dump names so ranks holding other heads or layers do not collide.
        self.dump_suffix = dump_suffix
        self.directives = StepDirectives()
        #: This step's SnapKV work in the attention layers (empty: none).
        self.jobs: list[CompactionJob] = []
        #: This step's logical KV lengths for the groups left alone on a hybrid model, while
        #: compressed requests are in the step; None otherwise.
        self.logical_lengths: LogicalLengths | None = None
        #: request -> layer -> window queries of a prompt buffered from earlier chunks.
        self.window_queries: dict[str, dict[int, list[torch.Tensor]]] = {}
        #: request -> group -> target blocks that replace its block list at the next step.
        self.pending_swaps: dict[str, dict[int, tuple[int, ...]]] = {}
        #: Attention layer name -> its cache layout, from the implementation vLLM runs there.
        self.layouts: dict[str, PagedKVLayout] = {}
        #: Attention backend name per layer, checked at KV-cache initialisation.
        self.backend_names: set[str] = set()
        #: Decode window queries (decode compression on; made at :meth:`attach`), else None.
        self.ring: WindowQueryRing | None = None
        #: Device time spent selecting and compacting (all layers, all requests), for benchmarks.
        self.clock = CompactionClock()
        #: Compressed layer name -> the output projection its heads feed (value-aware rules,
        #: ``adapter.output_projection``); found by :meth:`find_output_projections`.
        self.output_projections: dict[str, Any] = {}
        #: Why value-aware rules cannot run on this model (None: they can).
        self.value_rules_unavailable: str | None = None
        #: Layer name -> its value metric ``[H_kv, D, D]`` (``scoring.value_metric``), built at
        #: the layer's first value-aware compaction and kept (``4·H_kv·D²`` bytes per layer,
        #: held in vLLM's profiling run by ``workspace``).
        self.value_metrics: dict[str, torch.Tensor] = {}

    def check_layers(self, runner: GPUModelRunner) -> None:
        """Refuse (at engine start) any layer of a compressed group SnapKV cannot compact."""
        forward_context = runner.compilation_config.static_forward_context
        names = self.groups.group_of_layer
        backends = check_attention_layers({name: forward_context[name] for name in names})
        self.backend_names = {backend.name for backend in backends.values()}

    def attach(self, runner: GPUModelRunner) -> None:
        """Make this state the one the runner's hooks read: the implementations of the
        compressed layers (capture, compaction), the CUDA-graph dispatcher and the attention
        groups (logical lengths). Other layers' implementations carry none: vLLM runs them
        unchanged."""
        forward_context = runner.compilation_config.static_forward_context
        self.forward_context = forward_context
        for name in self.target_layers:
            setattr(forward_context[name].impl, STEP_STATE_ATTR, self)
        if self.drafter is not None:
            self.drafter.check_heads(
                forward_context,
                {extract_layer_index(name): name for name in self.target_layers},
            )
            # The drafter's slot hooks read this step's evicted offsets.
            setattr(runner.drafter, STEP_STATE_ATTR, self)
        setattr(runner.cudagraph_dispatcher, STEP_STATE_ATTR, self)
        for attention_groups in runner.attn_groups:
            for attention_group in attention_groups:
                setattr(attention_group, STEP_STATE_ATTR, self)
        if self.config.decode_interval:
            self.ring = self._make_ring(runner, forward_context)

    def find_output_projections(self, runner: GPUModelRunner) -> None:
        """Locate every compressed layer's output projection (value-aware rules); a server
        whose default rule reads values refuses to start without them (a request asking for
        such a rule on this model falls back to the paper's rule, logged)."""
        forward_context = runner.compilation_config.static_forward_context
        model = runner.get_model()
        for name in self.target_layers:
            impl = forward_context[name].impl
            projection, reason = find_output_projection(model, name, impl.num_heads, impl.head_size)
            if projection is None:
                self.value_rules_unavailable = reason
                self.output_projections.clear()
                break
            self.output_projections[name] = projection
        if self.value_rules_unavailable and score_rule(self.config.score).needs_values:
            raise RuntimeError(
                f"kv_compression.score={self.config.score!r} needs each attention layer's output "
                f"projection, but {self.value_rules_unavailable}. Choose score 'snapkv'."
            )

    def _make_ring(self, runner: GPUModelRunner, forward_context: dict) -> WindowQueryRing:
        """One ring per compressed layer, sized for every running request (``max_num_seqs``);
        its bound is in the memory vLLM profiles (``workspace.decode_window_buffer_of``). Made
        before vLLM captures its CUDA graphs, which then hold its tensors."""
        ring = WindowQueryRing(
            self.config.window_size,
            runner.max_num_reqs,
            runner._make_buffer(runner.max_num_tokens, dtype=torch.int64),
        )
        for name in sorted(self.target_layers, key=extract_layer_index):
            impl = forward_context[name].impl
            ring.add_layer(name, impl.num_heads, impl.head_size, self.query_dtype, runner.device)
        return ring

    @property
    def step_has_work(self) -> bool:
        """This step runs Python in the attention layers: a compaction, or a prompt's window
        capture (decode window captures are the ring's capturable write, not work)."""
        return bool(self.jobs)

    @property
    def step_uses_mixed_lengths(self) -> bool:
        """This step's groups read different KV lengths (a hybrid model with compressed
        requests)."""
        return self.logical_lengths is not None

    def end_step(self) -> None:
        """The step's work is over (done, or failed): nothing of it may reach the next step."""
        self.jobs = []
        self.logical_lengths = None

    def forget(self, request_id: str) -> None:
        self.window_queries.pop(request_id, None)
        self.pending_swaps.pop(request_id, None)
        self._release_window(request_id)

    def end_drafter_step(self, compact: bool) -> None:
        """After ``sample_tokens`` (the drafter ran, or had nothing to run): compact the drafter
        layers of this step's compressions (``compact``: the step did not fail)."""
        jobs, self.drafter_jobs, self.row_offsets = self.drafter_jobs, [], None
        if compact and jobs:
            device = next(iter(jobs[0].target_slots.values())).device
            started = self.clock.start(device)
            compact_drafter_layers(self.drafter, jobs, self.forward_context, self._layout)
            self.clock.stop(started, device)

    def _release_window(self, request_id: str) -> None:
        self.window_queries.pop(request_id, None)
        if self.ring is not None:
            self.ring.release(request_id)

    # --- step phases, in call order ---------------------------------------------------------

    def before_update_states(self, runner: GPUModelRunner, scheduler_output: Any) -> None:
        if self.drafter_jobs:
            # vLLM skipped sample_tokens after a compressing step (it returned the step's output
            # from execute_model): no KV was written since, so the sources still hold it.
            self.end_drafter_step(compact=True)
        for request_id in scheduler_output.finished_req_ids:
            self.forget(request_id)
        for request_id in scheduler_output.scheduled_cached_reqs.resumed_req_ids:
            self.forget(request_id)
        # A preempted request is recomputed from scratch: its window slot is free from now on.
        for request_id in getattr(scheduler_output, "preempted_req_ids", None) or ():
            self._release_window(request_id)
        for new_request in scheduler_output.scheduled_new_reqs:
            self.forget(new_request.req_id)
        for request_id, targets in self.pending_swaps.items():
            swap_block_lists(runner, request_id, targets)
        self.pending_swaps.clear()
        self.directives = getattr(scheduler_output, DIRECTIVES_ATTR, None) or StepDirectives()
        for request_id in self.directives.released:
            self._release_window(request_id)

    def after_prepare_inputs(
        self, runner: GPUModelRunner, scheduler_output: Any, num_scheduled_tokens: np.ndarray
    ) -> None:
        self.end_step()
        directives = self.directives
        batch = runner.input_batch
        request_ids = batch.req_ids[: batch.num_reqs]
        self.logical_lengths = make_lengths_physical(
            runner, scheduler_output, request_ids, directives.evicted, self.groups
        )
        self.row_offsets = None
        if self.drafter is not None and any(directives.evicted.get(r) for r in request_ids):
            # What make_lengths_physical copied to the device (adapter.physical).
            self.row_offsets = evicted_offsets_buffer(runner).gpu[: len(request_ids)]
        ring = self.ring
        if ring is not None:
            ring.begin_step()
        if directives.plans or directives.captures:
            self._find_jobs(runner, request_ids, num_scheduled_tokens)
        if ring is not None:
            ring.end_step()

    def _find_jobs(
        self, runner: GPUModelRunner, request_ids: list[str], num_scheduled_tokens: np.ndarray
    ) -> None:
        directives, batch, ring = self.directives, runner.input_batch, self.ring
        query_start = runner.query_start_loc.np
        for row, request_id in enumerate(request_ids):
            plan = directives.plans.get(request_id)
            capture = directives.captures.get(request_id)
            if plan is None and capture is None:
                continue
            job = CompactionJob(
                request_id=request_id,
                first_row=int(query_start[row]),
                chunk_start=int(batch.num_computed_tokens_cpu[row]),
                chunk_len=int(num_scheduled_tokens[row]),
                capture=capture,
                plan=plan,
            )
            if capture is not None and capture.phase == "decode":
                # Written by the ring's capturable op in every layer: no job, no lost graph.
                rows = job.window_rows()
                ring.capture(
                    request_id, rows.start, job.chunk_start + rows.start - job.first_row,
                    rows.stop - rows.start,
                )
                continue
            if plan is not None and plan.phase == "decode":
                window_start = plan.window_end - plan.window_size
                if window_start < job.chunk_start:
                    job.ring_rows = ring.window_rows(
                        request_id, window_start, job.chunk_start, runner.device
                    )
            if plan is not None:
                # Built once per step, not per layer: one host-to-device copy each.
                block_ids = runner.requests[request_id].block_ids
                rule = score_rule(plan.score)
                if rule.needs_token_ids:
                    job.token_features = self._token_features(runner, request_id, plan, rule)
                for group_id, targets in plan.target_block_ids.items():
                    job.sources[group_id] = PagedTokens.of(
                        block_ids[group_id], self.block_size, plan.num_sources, runner.device
                    )
                    job.target_slots[group_id] = PagedTokens.of(
                        targets, self.block_size, plan.num_kept, runner.device
                    ).slots()
            self.jobs.append(job)

    @staticmethod
    def _token_features(
        runner: GPUModelRunner, request_id: str, plan: CompressionPlan, rule: ScoreRule
    ) -> torch.Tensor:
        """The rule's features of the request's prompt tokens (on the host: the ids are a host
        list), on the device. The scheduler plans such a rule for prompt compressions of
        requests with token ids only (``planning``); anything else is a bug, not a fallback."""
        prompt_ids = runner.requests[request_id].prompt_token_ids
        if plan.phase != "prompt" or prompt_ids is None or len(prompt_ids) != plan.num_scored:
            raise RuntimeError(
                f"SnapKV: request {request_id}'s {plan.phase} compression with score "
                f"{plan.score!r} has no prompt token ids for its {plan.num_scored} entries"
            )
        features = rule.token_features(torch.tensor(prompt_ids, dtype=torch.int64))
        return features.to(runner.device)

    def on_attention_layer(
        self,
        impl: Any,
        layer: torch.nn.Module,
        query: torch.Tensor,
        kv_cache: torch.Tensor,
    ) -> None:
        group_id = self.groups.group_of_layer.get(layer.layer_name)
        if group_id is None:
            return  # a sliding-window layer of a hybrid model: vLLM manages it unchanged
        layer_index = extract_layer_index(layer.layer_name)
        queries = query.view(-1, impl.num_heads, impl.head_size)
        for job in self.jobs:
            rows = unquantised_queries(layer, queries[job.window_rows()], self.query_dtype)
            if job.ring_rows is not None:  # a decode compression: earlier rows in the ring
                buffered = [self.ring.read(layer.layer_name, job.ring_rows)]
            else:
                buffered = self.window_queries.setdefault(job.request_id, {}).setdefault(
                    layer_index, []
                )
            if job.plan is None:
                buffered.append(rows.clone())
                continue
            window_queries = torch.cat([*buffered, rows]) if buffered else rows
            started = self.clock.start(kv_cache.device)
            job.kept[layer_index] = self._compact(
                impl, layer, job, window_queries, kv_cache, group_id
            )
            self.clock.stop(started, kv_cache.device)
            job.layers_done.add(layer_index)

    def write_window_ring(self, layer: torch.nn.Module, query: torch.Tensor) -> None:
        """The step's queries into the layer's decode window ring (dequantised here, the one
        capture point): in eager steps only when a decode window has a token in the step; while
        a CUDA graph is being captured always, so that every replay writes (to the scratch row
        unless the host pointed a token at its ring row)."""
        ring = self.ring
        if layer.layer_name not in ring.queries:
            return  # a layer left alone (sliding window on a hybrid model)
        if not (ring.writes_this_step or _capturing_cuda_graph(query.device)):
            return
        queries = ring.queries[layer.layer_name]
        rows = query.view(-1, queries.shape[1], queries.shape[2])
        ring.write(layer.layer_name, unquantised_queries(layer, rows, self.query_dtype))

    def _layout(self, impl: Any, layer: torch.nn.Module) -> PagedKVLayout:
        layout = self.layouts.get(layer.layer_name)
        if layout is None:
            layout = self.layouts[layer.layer_name] = layout_for(impl, layer)
        return layout

    def _compact(
        self, impl, layer, job: CompactionJob, window_queries, kv_cache, group_id: int
    ) -> torch.Tensor:
        score, metric = job.plan.score, None
        if score_rule(score).needs_values:
            metric = self._value_metric(impl, layer, kv_cache.device)
            if metric is None:
                logger.warning_once(
                    "SnapKV: selection rule %r needs the layers' output projections, but %s; "
                    "such requests are scored with 'snapkv'", score, self.value_rules_unavailable,
                )
                score = DEFAULT_SCORE
        return compact_layer(
            self._layout(impl, layer), impl, layer, job, window_queries, kv_cache, group_id,
            self.config.kernel_size, self.config.pooling, score, metric,
        )

    def _value_metric(self, impl, layer, device: torch.device) -> torch.Tensor | None:
        """The layer's ``scoring.value_metric`` (built once), or None without its projection."""
        metric = self.value_metrics.get(layer.layer_name)
        if metric is None:
            projection = self.output_projections.get(layer.layer_name)
            if projection is None:
                return None
            metric = self.value_metrics[layer.layer_name] = value_metric(
                rank_projection(projection), impl.num_heads, impl.num_kv_heads, impl.head_size,
                self.query_dtype, device,
            )
        return metric

    @property
    def compaction_seconds(self) -> float:
        return self.clock.seconds

    def after_execute_model(self) -> None:
        jobs = self.jobs
        self.end_step()
        self.clock.settle()
        for job in jobs:
            if job.plan is None:
                continue
            self._release_window(job.request_id)
            if len(job.layers_done) != self.num_layers:
                raise RuntimeError(
                    f"SnapKV: request {job.request_id} was compacted in {len(job.layers_done)} of "
                    f"{self.num_layers} attention layers; its KV cache would be inconsistent"
                )
            self.pending_swaps[job.request_id] = job.plan.target_block_ids
            if self.drafter is not None:
                self.drafter_jobs.append(job)
            if self.config.dump_selections_to:
                write_selection_dump(self.config.dump_selections_to, job, self.dump_suffix)


def _state(runner: GPUModelRunner) -> WorkerCompression | None:
    state = runner.__dict__.get("_snapkv")
    if state is None and "_snapkv" not in runner.__dict__:
        state = _create_state(runner)
        runner._snapkv = state
    return state


def _create_state(runner: GPUModelRunner) -> WorkerCompression | None:
    config = config_from_additional(runner.vllm_config.additional_config)
    if config is None:
        return None
    return WorkerCompression(
        config,
        CompressedGroups.of(runner.kv_cache_config),
        dump_suffix=_rank_suffix(runner.parallel_config),
        query_dtype=runner.model_config.dtype,
        drafter_layers=drafter_layer_names(runner),
    )


def _rank_suffix(parallel_config: Any) -> str:
    """``.tp<r>`` / ``.pp<r>`` for each parallel dimension in use: a tensor-parallel rank holds
    its own KV heads, a pipeline stage its own layers."""
    from vllm.distributed import get_pp_group, get_tensor_model_parallel_rank

    suffix = ""
    if parallel_config.tensor_parallel_size > 1:
        suffix += f".tp{get_tensor_model_parallel_rank()}"
    if parallel_config.pipeline_parallel_size > 1:
        suffix += f".pp{get_pp_group().rank_in_group}"
    return suffix


def _patch_update_states(original):
    @functools.wraps(original)
    def _update_states(self: GPUModelRunner, scheduler_output: Any):
        state = _state(self)
        if state is not None:
            state.before_update_states(self, scheduler_output)
        return original(self, scheduler_output)

    return _update_states


def _patch_prepare_inputs(original):
    @functools.wraps(original)
    def _prepare_inputs(self: GPUModelRunner, scheduler_output: Any, num_scheduled_tokens):
        result = original(self, scheduler_output, num_scheduled_tokens)
        state = _state(self)
        if state is not None:
            state.after_prepare_inputs(self, scheduler_output, num_scheduled_tokens)
        return result

    return _prepare_inputs


def _patch_execute_model(original):
    # The step's state must not outlive it; a failure itself goes on to vLLM.
    return wrap_runner_step(
        original,
        on_return=lambda state: state.after_execute_model(),
        on_raise=lambda state: state.end_step(),
    )


def _patch_initialize_kv_cache(original):
    @functools.wraps(original)
    def initialize_kv_cache(self: GPUModelRunner, *args: Any, **kwargs: Any):
        result = original(self, *args, **kwargs)
        self.__dict__.pop("_snapkv", None)  # the KV cache config may have changed
        state = _state(self)
        if state is not None:
            state.check_layers(self)
            state.attach(self)
            state.find_output_projections(self)
        return result

    return initialize_kv_cache


def _capturing_cuda_graph(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _is_decoder(impl: Any) -> bool:
    # FlashInferImpl serves decoders only and keeps no attn_type.
    return getattr(impl, "attn_type", AttentionType.DECODER) == AttentionType.DECODER


def _patch_attention_forward(original):
    @functools.wraps(original)
    def forward(
        self: Any,
        layer: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: Any,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        output = original(self, layer, query, key, value, kv_cache, attn_metadata, *args, **kwargs)
        state = getattr(self, STEP_STATE_ATTR, None)
        if state is None or attn_metadata is None or not _is_decoder(self):
            return output
        if state.ring is not None:
            state.write_window_ring(layer, query)
        if state.step_has_work:
            state.on_attention_layer(self, layer, query, kv_cache)
        return output

    return forward


def _patch_cudagraph_dispatch(original):
    @functools.wraps(original)
    def dispatch(self: CudagraphDispatcher, *args: Any, **kwargs: Any):
        state = getattr(self, STEP_STATE_ATTR, None)
        if state is not None and (state.step_has_work or state.step_uses_mixed_lengths):
            # A full graph would replay this step's attention without running the compaction (or
            # a prompt's capture), or with one seq_lens buffer for groups that read different
            # lengths; piecewise graphs run attention eagerly (it is a splitting op).
            kwargs["invalid_modes"] = {*(kwargs.get("invalid_modes") or ()), CUDAGraphMode.FULL}
        return original(self, *args, **kwargs)

    return dispatch


def worker_report(worker: Any) -> dict[str, Any]:
    """What this worker runs, for the engine core's start-up check (``collective_rpc``): a rank
    whose runner is not the patched V1 runner, or that has no SnapKV state, would keep the full KV
    layout while the scheduler frees blocks."""
    runner = getattr(worker, "model_runner", None)
    state = runner.__dict__.get("_snapkv") if runner is not None else None
    return {
        "rank": getattr(worker, "rank", None),
        "runner": type(runner).__name__,
        "v1_runner": isinstance(runner, GPUModelRunner),
        "compression": state is not None,
        "backends": sorted(state.backend_names) if state is not None else [],
        "value_rules_unavailable": state.value_rules_unavailable if state is not None else None,
    }


#: (owner class, method name, wrapper factory): every worker patch, in one visible list.
WORKER_PATCHES = (
    (GPUModelRunner, "initialize_kv_cache", _patch_initialize_kv_cache),
    (GPUModelRunner, "_update_states", _patch_update_states),
    (GPUModelRunner, "_prepare_inputs", _patch_prepare_inputs),
    (GPUModelRunner, "execute_model", _patch_execute_model),
    (CudagraphDispatcher, "dispatch", _patch_cudagraph_dispatch),
    *PHYSICAL_PATCHES,
    *DRAFTER_PATCHES,
    *((impl, "forward", _patch_attention_forward) for _, impl in loaded_impls()),
)
