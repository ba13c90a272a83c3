"""Contract tests: fail loudly when the vLLM internals the adapter relies on change.

Each assertion names one fact of vLLM 0.32 that a patch in vllm_snapkv/adapter depends on.
"""

from __future__ import annotations

import dataclasses
import inspect
import pickle

import pytest
import vllm

from vllm_snapkv.adapter import SUPPORTED_VLLM_MINORS, all_patches, check_vllm_version


def params(function) -> list[str]:
    return list(inspect.signature(function).parameters)


def source(function) -> str:
    return inspect.getsource(inspect.unwrap(function))


def test_installed_vllm_is_a_supported_minor():
    # The CPU build these tests run on is 0.32; 0.33's source: tests/test_contract_sources.py.
    assert vllm.__version__.startswith("0.32.")
    assert SUPPORTED_VLLM_MINORS == ("0.32", "0.33")


def test_other_vllm_versions_are_refused_naming_both():
    check_vllm_version("0.32.7")
    check_vllm_version("0.32.0+cpu")
    check_vllm_version("0.33.0")
    check_vllm_version("0.33.2+cu130")
    for unsupported in ("0.31.1", "0.34.0", "1.0.0"):
        with pytest.raises(RuntimeError) as error:
            check_vllm_version(unsupported)
        assert "0.32.x and 0.33.x" in str(error.value) and unsupported in str(error.value)


@pytest.mark.parametrize("owner,name,factory", all_patches(), ids=lambda x: getattr(x, "__name__", ""))
def test_every_patched_method_exists(owner, name, factory):
    assert name in owner.__dict__, f"{owner.__name__}.{name} is gone"


def test_scheduler_hook_signatures():
    from vllm.v1.core.sched.scheduler import Scheduler

    unwrap = inspect.unwrap
    assert params(unwrap(Scheduler._update_after_schedule)) == ["self", "scheduler_output"]
    assert params(unwrap(Scheduler._get_local_prefix_cache_hit)) == ["self", "request"]
    # The hit is get_computed_blocks(request): find_longest_cache_hit(block_hashes, num_tokens-1).
    lookup = source(vllm.v1.core.kv_cache_manager.KVCacheManager.get_computed_blocks)
    assert "self.coordinator.find_longest_cache_hit(" in lookup
    assert "self.create_kv_cache_blocks(computed_blocks)" in lookup
    assert params(unwrap(Scheduler._preempt_request))[:2] == ["self", "request"]
    assert params(unwrap(Scheduler._free_request))[:2] == ["self", "request"]
    # The planning hook runs before num_computed_tokens advances.
    body = source(Scheduler._update_after_schedule)
    assert "request.num_computed_tokens += num_scheduled_token" in body
    assert "self._update_after_schedule(scheduler_output)" in source(Scheduler.schedule)
    # The prefix-cache hit comes back as (blocks, num_tokens, ...).
    assert "return blocks, num_local" in source(Scheduler._get_local_prefix_cache_hit)
    # The prompt-end split: every scheduled chunk (running and waiting paths) passes through
    # _reserve_prefill_lookahead after its size is final and before its slots are allocated.
    assert params(unwrap(Scheduler._reserve_prefill_lookahead)) == [
        "self", "request", "num_computed_tokens", "num_new_tokens",
    ]
    schedule = source(Scheduler.schedule)
    calls = [i for i in range(len(schedule)) if schedule.startswith(
        "num_new_tokens = self._reserve_prefill_lookahead(", i)]
    allocations = [i for i in range(len(schedule)) if schedule.startswith(
        "self.kv_cache_manager.allocate_slots(", i)]
    assert len(calls) == 2 and len(allocations) >= 2
    assert all(any(call < allocation for call in calls) for allocation in allocations)
    assert calls[0] < allocations[0] < calls[1] < allocations[-1]


def test_manager_signatures_the_accounting_patch_shifts():
    from vllm.v1.core.kv_cache_coordinator import KVCacheCoordinator
    from vllm.v1.core.single_type_kv_cache_manager import (
        FullAttentionManager,
        SingleTypeKVCacheManager,
    )

    unwrap = inspect.unwrap
    assert params(unwrap(SingleTypeKVCacheManager.get_num_blocks_to_allocate))[:7] == [
        "self",
        "request_id",
        "num_tokens",
        "new_computed_blocks",
        "total_computed_tokens",
        "num_local_computed_tokens",
        "num_tokens_main_model",
    ]
    assert params(unwrap(SingleTypeKVCacheManager.allocate_new_blocks))[:4] == [
        "self",
        "request_id",
        "num_tokens",
        "num_tokens_main_model",
    ]
    # The managers of compressed (full-attention) groups run the patched base methods.
    for name in ("get_num_blocks_to_allocate", "allocate_new_blocks"):
        assert name not in FullAttentionManager.__dict__
    # The coordinator hands each manager the same logical counts, in group order.
    body = source(KVCacheCoordinator.get_num_blocks_to_allocate)
    assert "for i, manager in enumerate(self.single_type_managers)" in body
    assert "manager.allocate_new_blocks(" in source(KVCacheCoordinator.allocate_new_blocks)
    assert params(unwrap(KVCacheCoordinator.cache_blocks)) == [
        "self",
        "request",
        "num_computed_tokens",
    ]
    # The capped re-lookup of a prefix-cache hit.
    assert params(KVCacheCoordinator.find_longest_cache_hit)[:3] == [
        "self",
        "block_hashes",
        "max_cache_hit_length",
    ]


def test_kv_cache_group_kinds():
    from vllm.v1.kv_cache_interface import (
        FullAttentionSpec,
        MambaSpec,
        MLAAttentionSpec,
        SinkFullAttentionSpec,
        SlidingWindowSpec,
    )

    # Exact-type checks decide which groups compress: the variants are subclasses.
    assert not issubclass(SlidingWindowSpec, FullAttentionSpec)
    assert issubclass(MLAAttentionSpec, FullAttentionSpec)
    assert issubclass(SinkFullAttentionSpec, FullAttentionSpec)
    assert {"block_size"} <= {f.name for f in dataclasses.fields(FullAttentionSpec)}
    assert "block_size" in {f.name for f in dataclasses.fields(MambaSpec)}


def test_hybrid_metadata_facts():
    from vllm.v1.attention.backend import CommonAttentionMetadata
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.utils import AttentionGroup

    # One seq_lens for every group: only block table and slot mapping change per group, and
    # each group's metadata is built through AttentionGroup.build_metadata.
    build = source(GPUModelRunner._build_attention_metadata)
    assert "seq_lens=self.seq_lens[:num_reqs_padded]" in build
    assert "cm = copy(cm_base)" in build
    assert "attn_group.build_metadata(" in build
    assert "builder.update_block_table(" in build  # reuses a same-spec group's metadata
    assert params(AttentionGroup.build_metadata)[:2] == ["self", "common_attn_metadata"]
    assert "kv_cache_group_id" in {f.name for f in dataclasses.fields(AttentionGroup)}
    fields = {f.name for f in dataclasses.fields(CommonAttentionMetadata)}
    assert {"seq_lens", "seq_lens_cpu_upper_bound", "max_seq_len",
            "_num_computed_tokens_cache"} <= fields
    # Per-group block tables and slot mappings, and per-group block ids in the request state.
    from vllm.v1.worker.block_table import MultiGroupBlockTable

    assert "self.block_tables" in source(MultiGroupBlockTable.__init__)
    assert params(MultiGroupBlockTable.__getitem__) == ["self", "idx"]


def test_attention_layer_facts_the_refusals_and_scores_read():
    from vllm.model_executor.layers.attention.attention import Attention
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl

    init = source(Attention.__init__)
    assert "self.sliding_window = sliding_window" in init
    assert "self.layer_name = prefix" in init
    impl_init = source(CPUAttentionBackendImpl.__init__)
    for attribute in ("self.alibi_slopes =", "self.sinks = sinks", "self.logits_soft_cap ="):
        assert attribute in impl_init
    # The CPU kernel puts the sinks into the softmax as its own logit per query head.
    assert "s_aux=self.sinks" in source(CPUAttentionBackendImpl.forward)


def test_block_pool_and_manager_api():
    from vllm.v1.core.block_pool import BlockPool
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.core.kv_cache_utils import KVCacheBlock
    from vllm.v1.core.single_type_kv_cache_manager import SingleTypeKVCacheManager

    for name in ("get_new_blocks", "free_blocks", "evict_blocks", "get_num_free_blocks"):
        assert callable(getattr(BlockPool, name))
    assert params(KVCacheManager.truncate_computed_blocks) == ["self", "blocks", "num_computed_tokens"]
    block = KVCacheBlock(block_id=3)
    assert block.ref_cnt == 0 and block.block_id == 3
    init = source(SingleTypeKVCacheManager.__init__)
    assert "self.req_to_blocks" in init and "self.block_pool" in init
    # Freed un-hashed blocks are reused first: why targets are allocated before sources go back.
    assert "prepend_n" in source(BlockPool.free_blocks)


def test_scheduler_output_carries_extra_attributes_through_pickle():
    from vllm.v1.core.sched.output import CachedRequestData, SchedulerOutput

    fields = {field.name for field in dataclasses.fields(SchedulerOutput)}
    assert {
        "scheduled_new_reqs",
        "scheduled_cached_reqs",
        "num_scheduled_tokens",
        "total_num_scheduled_tokens",
        "finished_req_ids",
    } <= fields
    assert "resumed_req_ids" in {field.name for field in dataclasses.fields(CachedRequestData)}
    assert not hasattr(SchedulerOutput, "__slots__")
    output = SchedulerOutput.make_empty()
    output.snapkv_directives = {"marker": 1}
    assert pickle.loads(pickle.dumps(output)).snapkv_directives == {"marker": 1}


def test_model_runner_facts():
    from vllm.v1.worker.block_table import BlockTable
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    # CPUModelRunner inherits the patched methods.
    for name in ("_update_states", "_prepare_inputs", "execute_model"):
        assert name not in CPUModelRunner.__dict__
    # ...and reaches the patched initialize_kv_cache (the backend check) through super().
    assert "super().initialize_kv_cache(" in source(CPUModelRunner.initialize_kv_cache)
    assert "self.initialize_attn_backend(" in source(GPUModelRunner.initialize_kv_cache)
    assert params(inspect.unwrap(GPUModelRunner._prepare_inputs)) == [
        "self",
        "scheduler_output",
        "num_scheduled_tokens",
    ]
    init = source(GPUModelRunner.__init__)
    for buffer in ("self.seq_lens =", "self.positions =", "self.optimistic_seq_lens_cpu =",
                   "self.req_indices =", "self.query_start_loc ="):
        assert buffer in init
    prepare = source(GPUModelRunner._prepare_inputs)
    # seq_lens / slots come from num_computed_tokens; the post-hook rewrites both.
    assert "self.seq_lens[:num_reqs] = (" in prepare
    assert "compute_slot_mapping(" in prepare
    # Block ids of cached requests are appended after the pre-hook's swap.
    assert "block_ids.extend(new_ids)" in source(GPUModelRunner._update_states)
    assert params(BlockTable.add_row) == ["self", "block_ids", "row_idx"]
    assert "num_blocks_per_row" in source(BlockTable.append_row)


def test_request_token_ids_facts():
    """What rules reading token ids rely on (``snapkv-rare-continuation``): the worker reads
    the prompt's ids from the runner's per-request state, the scheduler sees a request of
    prompt embeddings by its ids being None."""
    from vllm.v1.request import Request
    from vllm.v1.worker.gpu_input_batch import CachedRequestState

    fields = {field.name: field.type for field in dataclasses.fields(CachedRequestState)}
    assert "prompt_token_ids" in fields and "block_ids" in fields
    assert "list[int] | None" in str(fields["prompt_token_ids"])
    assert "self.prompt_token_ids = prompt_token_ids" in source(Request.__init__)


def test_decode_window_ring_facts():
    """What ``adapter.window_ring`` and its worker hooks rely on: the runner's buffer factory and
    sizes (the ring's destination rows cover every token of the largest batch, its slots every
    running request), and the V1 scheduler naming the requests it preempted in each output."""
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    init = source(GPUModelRunner.__init__)
    assert "self.max_num_tokens = scheduler_config.max_num_batched_tokens" in init
    assert "self.max_num_reqs = scheduler_config.max_num_seqs" in init
    assert params(GPUModelRunner._make_buffer)[:2] == ["self", "size"]
    assert "preempted_req_ids" in {field.name for field in dataclasses.fields(SchedulerOutput)}
    assert "preempted_req_ids=self.reset_preempted_req_ids" in source(Scheduler.schedule)
    assert "self.reset_preempted_req_ids.add(request.request_id)" in source(
        Scheduler._preempt_request
    )


def test_cpu_attention_facts():
    from vllm import _custom_ops as ops
    from vllm.model_executor.models.utils import extract_layer_index
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl

    assert params(inspect.unwrap(CPUAttentionBackendImpl.forward))[:7] == [
        "self",
        "layer",
        "query",
        "key",
        "value",
        "kv_cache",
        "attn_metadata",
    ]
    assert CPUAttentionBackend.forward_includes_kv_cache_update is False
    assert params(ops.cpu_attn_reshape_and_cache)[:6] == [
        "key",
        "value",
        "key_cache",
        "value_cache",
        "slot_mapping",
        "isa",
    ]
    assert "layer.isa = self.isa" in inspect.getsource(
        __import__("vllm.v1.attention.backends.cpu_attn", fromlist=["x"])
    )
    assert extract_layer_index("model.layers.17.self_attn.attn") == 17


def test_request_ids_get_a_suffix_in_the_engine():
    # Dumps are named by the engine's id: the caller's id, '-', 8 random characters.
    from vllm.v1.engine.input_processor import InputProcessor

    assert 'f"{request.external_req_id}-{random_uuid():.8}"' in source(
        InputProcessor.assign_request_id
    )


def test_frontend_hook_facts():
    from vllm.config import VllmConfig
    from vllm.engine.arg_utils import AsyncEngineArgs, EngineArgs
    from vllm.v1.engine.input_processor import InputProcessor

    # add_cli_args / from_cli_args are replaced as a staticmethod / classmethod.
    assert isinstance(inspect.getattr_static(EngineArgs, "add_cli_args"), staticmethod)
    assert isinstance(inspect.getattr_static(EngineArgs, "from_cli_args"), classmethod)
    # AsyncEngineArgs reaches the patched methods through a dynamic lookup / inheritance.
    assert "parser = EngineArgs.add_cli_args(parser)" in source(AsyncEngineArgs.add_cli_args)
    assert "from_cli_args" not in AsyncEngineArgs.__dict__
    # from_cli_args keeps dataclass fields only: why the flags are merged by the wrapper.
    assert "dataclasses.fields(cls)" in source(EngineArgs.from_cli_args)
    assert "additional_config" in {f.name for f in dataclasses.fields(EngineArgs)}
    assert params(inspect.unwrap(EngineArgs.create_engine_config))[0] == "self"
    assert "additional_config" in VllmConfig.__dataclass_fields__
    # Per-request validation runs on the params before the request reaches the engine core.
    assert params(inspect.unwrap(InputProcessor._validate_params))[:3] == [
        "self",
        "params",
        "supported_tasks",
    ]
    assert "self._validate_params(" in source(InputProcessor.process_inputs)
    # vLLM's own 64-bit check of extra_args runs while SamplingParams is built (before plugins).
    from vllm.sampling_params import SamplingParams

    assert "self._verify_extra_args()" in source(SamplingParams._verify_args)


def test_runner_execute_model_runs_the_forward():
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    body = source(GPUModelRunner.execute_model)
    # The post-hook checks compaction after the forward, which happens inside execute_model.
    assert "self._update_states(scheduler_output)" in body
    assert "self._prepare_inputs(" in body
    assert "self._model_forward(" in body


# --- GPU attention backends (standard KV layout) ------------------------------------------------

BACKENDS_DIR = "vllm/v1/attention/backends"


def backend_source(module: str) -> str:
    """A backend module's source without importing it (FlashInfer needs the flashinfer package)."""
    import importlib.util
    import pathlib

    spec = importlib.util.find_spec("vllm")
    return (pathlib.Path(spec.origin).parent.parent / BACKENDS_DIR / f"{module}.py").read_text()


@pytest.mark.parametrize("module,impl", [("flash_attn", "FlashAttentionImpl"),
                                         ("triton_attn", "TritonAttentionImpl"),
                                         ("flex_attention", "FlexAttentionImpl")])
def test_importable_gpu_backends_keep_the_hooked_contract(module, impl):
    backend_module = __import__(f"vllm.v1.attention.backends.{module}", fromlist=["x"])
    impl_class = getattr(backend_module, impl)
    assert params(inspect.unwrap(impl_class.forward))[:8] == [
        "self", "layer", "query", "key", "value", "kv_cache", "attn_metadata", "output",
    ]
    # The step's K/V are written (do_kv_cache_update) before forward runs: compaction, which
    # runs after forward, sees them.
    backend_class = next(
        value for value in vars(backend_module).values()
        if isinstance(value, type) and getattr(value, "get_impl_cls", None)
        and value.__module__ == backend_module.__name__
        and value.get_impl_cls() is impl_class
    )
    assert backend_class.forward_includes_kv_cache_update is False
    # They read the logical [blocks, kv_heads, block_size, K|V] view split in half.
    assert "kv_cache.transpose(1, 2).split(" in backend_source(module)
    for attribute in ("self.head_size = head_size", "self.scale = float(scale)",
                      "self.num_heads = num_heads"):
        assert attribute in inspect.getsource(impl_class.__init__)


def test_flashinfer_contract_by_source():
    text = backend_source("flashinfer")
    assert "class FlashInferImpl(AttentionImpl):" in text
    assert "forward_includes_kv_cache_update: bool = False" in text
    import re

    # forward(self, layer, query, key, value, kv_cache, attn_metadata, output, ...)
    assert re.search(
        r"def forward\(\s*self,\s*layer:[^,]*,\s*query:[^,]*,\s*key:[^,]*,\s*value:[^,]*,"
        r"\s*kv_cache:[^,]*,\s*attn_metadata: FlashInferMetadata,\s*output:",
        text,
    )
    # Its cache is the logical view, permuted to the physical layout only inside forward.
    assert "kv_cache.permute(*stride_order)" in text
    assert "k_cache, v_cache = kv_cache.transpose(1, 2).split(" in text
    # Decoder-only: no attn_type attribute (the hook treats a missing one as DECODER).
    assert "if attn_type != AttentionType.DECODER:" in text
    for attribute in ("self.head_size = head_size", "self.scale = float(scale)"):
        assert attribute in text


def test_supported_backends_are_vllm_backend_names():
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from vllm_snapkv.adapter.attention import SUPPORTED_BACKENDS

    for backend in SUPPORTED_BACKENDS:
        path = AttentionBackendEnum[backend.name].get_path()
        assert path.startswith(backend.module + "."), (backend.name, path)


def test_standard_layout_facts():
    from vllm.v1.kv_cache_interface import create_kv_cache_views
    from vllm.v1.kv_cache_layout import KVCacheLayout

    # Every order is a permutation of the logical [L, B, H, N, C]; views are [B, H, N, C].
    assert {layout.name for layout in KVCacheLayout} == {
        "LBHNC", "LBNHC", "LHBNC", "BLHNC", "BLNHC", "BHLNC"
    }
    body = source(create_kv_cache_views)
    assert "torch.as_strided(" in body and "view_5d[layer_idx]" in body


def test_cudagraph_dispatch_facts():
    from vllm.config import CUDAGraphMode
    from vllm.v1.cudagraph_dispatcher import CudagraphDispatcher
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    assert "invalid_modes" in params(inspect.unwrap(CudagraphDispatcher.dispatch))
    assert "allowed_modes -= invalid_modes" in source(CudagraphDispatcher.dispatch)
    # The runner dispatches by keyword, after _prepare_inputs (where the step's SnapKV work is
    # known), so the dispatch patch sees whether this step has any.
    body = source(GPUModelRunner.execute_model)
    assert body.index("self._prepare_inputs(") < body.index(
        "self._determine_batch_execution_and_padding("
    )
    assert "invalid_modes={CUDAGraphMode.FULL} if disable_full else None" in source(
        GPUModelRunner._determine_batch_execution_and_padding
    )
    assert CUDAGraphMode.FULL_AND_PIECEWISE.has_full_cudagraphs()
    assert not CUDAGraphMode.PIECEWISE.has_full_cudagraphs()


def test_model_runner_selection_facts():
    import vllm.envs as envs
    from vllm.config import VllmConfig
    from vllm.v1.engine.core import EngineCore
    from vllm.v1.serial_utils import run_method

    # VLLM_USE_V2_MODEL_RUNNER=0 selects the V1 runner; read from the environment lazily.
    assert "use_v2_model_runner = envs.VLLM_USE_V2_MODEL_RUNNER" in source(
        VllmConfig.use_v2_model_runner.fget
    )
    assert "VLLM_USE_V2_MODEL_RUNNER" in envs.environment_variables
    # The start-up check runs after every worker initialised its KV cache, through a callable
    # collective_rpc (called with the worker as its first argument).
    assert "kv_cache_config = self._initialize_kv_caches(vllm_config)" in source(EngineCore.__init__)
    assert "func = partial(method, obj)" in source(run_method)
    # A refused start shuts the executor down itself (engine._patch_initialize_kv_caches): every
    # executor has shutdown(), and EngineCore.__init__ calls it on no failure path of its own.
    from vllm.v1.executor.abstract import Executor

    assert callable(Executor.shutdown)
    assert "model_executor.shutdown" not in source(EngineCore.__init__)


def test_scale_out_facts():
    from prometheus_fastapi_instrumentator import Instrumentator
    from vllm.config import ParallelConfig
    from vllm.distributed import get_pp_group, get_tensor_model_parallel_rank  # noqa: F401
    from vllm.distributed.parallel_state import GroupCoordinator
    from vllm.entrypoints.launchers.api_server import entry
    from vllm.entrypoints.serve.instrumentator import metrics as metrics_router
    from vllm.v1.engine import core

    # Dump names carry the stage's rank in the PP group.
    assert "self.rank_in_group" in source(GroupCoordinator.__init__)
    # The scheduler labels its counts with the DP index: independent (non-MoE) DP engines have
    # their rank reset to 0 and keep the index.
    assert "data_parallel_index" in {f.name for f in dataclasses.fields(ParallelConfig)}
    assert "reconfigure_for_independent_dp_rank" in source(core.EngineCoreProc.run_engine_core)
    assert "parallel_config.data_parallel_index = dp_rank" in source(
        core.EngineCoreProc.run_engine_core
    )
    # Extra API server processes parse the namespace with from_cli_args before plugins load
    # (the plugin writes its merged config back into the namespace).
    assert "AsyncEngineArgs.from_cli_args(args)" in source(entry.build_async_engine_client)
    # With PROMETHEUS_MULTIPROC_DIR, /metrics is served from a fresh multiprocess registry per
    # scrape, never from the registry vLLM passes (so engines publish multiprocess metrics).
    assert "Instrumentator(" in source(metrics_router.attach_router)
    expose = source(Instrumentator.expose)
    assert "PROMETHEUS_MULTIPROC_DIR" in expose and "MultiProcessCollector" in expose


def test_microbatching_switches_the_refusal_reads():
    from vllm.config import ParallelConfig

    fields = {field.name for field in dataclasses.fields(ParallelConfig)}
    assert {"enable_dbo", "ubatch_size"} <= fields
    assert "self.enable_dbo or self.ubatch_size > 1" in source(ParallelConfig.use_ubatching.fget)


def test_output_projection_facts_the_value_rules_read():
    """``adapter.output_projection``: RowParallelLinear keeps its per-rank input width and its
    quant method, whose ``apply(layer, x, bias)`` is the rank's partial product."""
    from vllm.model_executor.layers.linear import RowParallelLinear, UnquantizedLinearMethod

    assert params(UnquantizedLinearMethod.apply) == ["self", "layer", "x", "bias"]
    init = source(RowParallelLinear.__init__)
    assert "self.input_size_per_partition = divide(input_size, self.tp_size)" in init
    assert "self.quant_method" in source(RowParallelLinear.forward)


def test_draft_model_facts_the_drafter_hooks_read():
    """``adapter.drafter``: the CPU runner and the draft-model proposer run the patched base
    methods; the drafter's metadata can take new slots; what the hooks read exists."""
    from vllm.v1.attention.backend import CommonAttentionMetadata
    from vllm.v1.spec_decode.draft_model import DraftModelProposer
    from vllm.v1.spec_decode.llm_base_proposer import SpecDecodeBaseProposer
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    assert "sample_tokens" not in CPUModelRunner.__dict__
    for name in ("set_inputs_first_pass", "_update_positions_dependent_metadata"):
        assert name not in DraftModelProposer.__dict__
    assert "cad" in params(inspect.unwrap(SpecDecodeBaseProposer.set_inputs_first_pass))
    assert params(inspect.unwrap(SpecDecodeBaseProposer._update_positions_dependent_metadata)) == [
        "self", "positions", "common_attn_metadata", "batch_size", "input_batch_size",
        "block_size",
    ]
    assert "slot_mapping" in {f.name for f in dataclasses.fields(CommonAttentionMetadata)}
    assert callable(CommonAttentionMetadata.replace)
    init = source(SpecDecodeBaseProposer.__init__)
    for attribute in ("self.needs_extra_input_slots =", "self.net_num_new_slots_per_request =",
                      "self._slot_mapping_buffer =", "self.max_model_len ="):
        assert attribute in init
    # The drafter's positions buffer holds the target's RoPE (logical) positions, in both
    # first-pass paths; the draft model's slots are derived from it.
    first_pass = source(SpecDecodeBaseProposer.set_inputs_first_pass)
    assert "self._set_positions(num_tokens, target_positions)" in first_pass
    assert "out_positions_ptr=self.positions," in first_pass
