"""Engine set-up: validate the compression config, reject what SnapKV cannot serve correctly, and
make sure every worker really runs the plugin.

Patched (vLLM 0.32):
- ``EngineArgs.create_engine_config`` (pre and post). It runs in the process that builds the
  engine (``LLM(...)``, the API server), so a bad setting fails there with its field named, before
  any engine process starts. Pre: select the V1 model runner (the one the worker patches hook).
- ``EngineCore._initialize_kv_caches`` (post): ask every worker (``collective_rpc``) what it runs;
  a rank without the plugin's worker side, on another runner, or on an unsupported attention
  backend stops the engine start, named. Without this, a worker whose plugin failed to load would
  keep the full KV layout while the scheduler frees blocks.
"""

from __future__ import annotations

import functools
import os
from typing import Any

from vllm.config import VllmConfig
from vllm.engine.arg_utils import EngineArgs
from vllm.logger import init_logger
from vllm.platforms import current_platform
from vllm.v1.engine.core import EngineCore

from vllm_snapkv.config import SnapKVConfig, config_from_additional
from vllm_snapkv.adapter.worker import worker_report
from vllm_snapkv.metrics import serve_metrics_from_this_process

# Under the "vllm" logger tree so vLLM's handlers and VLLM_LOGGING_LEVEL apply.
logger = init_logger(f"vllm.{__name__}")


#: KV cache dtypes the layouts read and write: the model's dtype, an explicit 16-bit dtype (not a
#: quantised cache), and per-tensor-scaled fp8, whose stored bytes compaction copies unchanged.
SUPPORTED_KV_CACHE_DTYPES = ("auto", "bfloat16", "float16", "fp8", "fp8_e4m3", "fp8_e5m2")


def unsupported_features(vllm_config: VllmConfig) -> list[str]:
    """Every configured feature the compaction cannot serve correctly, as readable reasons."""
    model = vllm_config.model_config
    parallel = vllm_config.parallel_config
    reasons = []
    if not (current_platform.is_cpu() or current_platform.is_cuda()):
        reasons.append(
            f"platform {current_platform.device_name!r} (this release supports CPU and CUDA)"
        )
    if vllm_config.speculative_config is not None:
        reasons += speculative_reasons(
            vllm_config.speculative_config,
            vllm_config.additional_config,
            parallel.pipeline_parallel_size,
        )
    if vllm_config.kv_transfer_config is not None:
        reasons.append("KV transfer connectors")
    if model.runner_type != "generate":
        reasons.append(f"runner {model.runner_type!r} (only generative models)")
    if model.is_encoder_decoder:
        reasons.append("encoder-decoder models")
    elif getattr(model, "is_multimodal_model", False):
        # Not verified: no multimodal checkpoint is available offline here (README, "Models").
        reasons.append(
            f"multimodal models ({', '.join(model.architectures)}: image, audio and video "
            "prompts and M-RoPE positions are not verified with SnapKV)"
        )
    if model.use_mla:
        reasons.append("MLA attention")
    if model.is_attention_free:
        reasons.append("attention-free models (nothing to compress)")
    if getattr(model, "attention_chunk_size", None):
        reasons.append(
            "chunked local attention (Llama 4's attention_chunk_size: its chunks are counted in "
            "key positions, which compaction changes)"
        )
    alibi = alibi_family(model.hf_text_config)
    if alibi:
        reasons.append(
            f"ALiBi position biases ({alibi}: computed from key indices, which compaction changes)"
        )
    cache_dtype = vllm_config.cache_config.cache_dtype
    if cache_dtype not in SUPPORTED_KV_CACHE_DTYPES:
        reasons.append(
            f"kv_cache_dtype={cache_dtype!r} (supported: {', '.join(SUPPORTED_KV_CACHE_DTYPES)})"
        )
    if getattr(parallel, "enable_dbo", False) or getattr(parallel, "ubatch_size", 0) > 1:
        reasons.append(
            "microbatching (--enable-dbo / --ubatch-size > 1: a step's tokens run as separate "
            "microbatches, while window rows and compaction are planned per step)"
        )
    if (
        getattr(parallel, "decode_context_parallel_size", 1) > 1
        or getattr(parallel, "prefill_context_parallel_size", 1) > 1
    ):
        reasons.append(
            "context parallelism (a request's KV is interleaved across ranks by token position, "
            "while compaction keeps per-head positions on every rank)"
        )
    num_kv_heads = model.get_total_num_kv_heads()
    if parallel.tensor_parallel_size > num_kv_heads:
        reasons.append(
            f"tensor_parallel_size={parallel.tensor_parallel_size} > {num_kv_heads} KV heads "
            "(replicated KV heads would select from a subset of their query heads)"
        )
    if vllm_config.use_v2_model_runner:
        reasons.append(
            "the V2 model runner (VLLM_USE_V2_MODEL_RUNNER=1 or a feature that requires it; "
            "SnapKV hooks the V1 runner)"
        )
    return reasons


#: Speculative decoding methods served with SnapKV: n-gram (no KV of its own) and a draft model
#: whose attention layers compress with the target's (``adapter.drafter``).
SUPPORTED_SPECULATIVE_METHODS = ("ngram", "draft_model")


def speculative_reasons(
    speculative_config: Any, additional_config: Any, pipeline_parallel_size: int = 1
) -> list[str]:
    """Why a speculative decoding configuration cannot run with SnapKV (empty: it can).

    N-gram speculation proposes drafts from the request's own tokens on the host: the target
    model verifies them in the compressed cache like any multi-token step (README, "Speculative
    decoding"). A draft model's layers sit in the target's KV cache group: they keep the
    entries the target keeps, at the same stored positions, and compute their slots from
    physical positions (docs/architecture.md, "Speculative decoding with a draft model").
    EAGLE/EAGLE-3, MTP, DFlash and the other hidden-state drafters also run attention layers of
    their own, but have not run with SnapKV (no such checkpoint here); ``ngram_gpu``, suffix
    decoding, Medusa and MLP speculators keep no KV, but have not run with SnapKV either.
    """
    method = getattr(speculative_config, "method", None)
    if method not in SUPPORTED_SPECULATIVE_METHODS:
        return [
            f"speculative decoding method {method!r} (supported with SnapKV: "
            f"{', '.join(SUPPORTED_SPECULATIVE_METHODS)}; eagle, eagle3, mtp, dflash and the "
            "other drafters have not run with compression)"
        ]
    if method == "draft_model":
        if getattr(speculative_config, "parallel_drafting", False):
            return [
                "draft_model with parallel_drafting (all drafts in one pass, with padding "
                "slots; not run with SnapKV)"
            ]
        if pipeline_parallel_size > 1:
            return [
                f"draft_model with pipeline_parallel_size={pipeline_parallel_size} (vLLM runs "
                "the whole draft model on the last stage, whose drafter layers would share the "
                "selection of target layers on other stages)"
            ]
    config = config_from_additional(additional_config)
    num_drafts = getattr(speculative_config, "num_speculative_tokens", None) or 0
    if config is not None and num_drafts > config.window_size - 2:
        # A resumed request whose chunk vLLM pads with placeholder drafts (one known token + k
        # placeholders) starts at least window_size tokens before its next compression point;
        # its placeholders stay before the point's last position only for k <= window_size - 2.
        return [
            f"num_speculative_tokens={num_drafts} with window_size={config.window_size} "
            f"(at most window_size - 2 = {config.window_size - 2} draft tokens per step)"
        ]
    return []


def alibi_family(hf_config: Any) -> str | None:
    """The ALiBi model family a Hugging Face config describes, or None. The worker also refuses
    any layer with ALiBi slopes (exact); this names the usual families before anything loads."""
    model_type = getattr(hf_config, "model_type", "")
    attn_config = getattr(hf_config, "attn_config", None)
    if model_type == "bloom":
        return "Bloom"
    if model_type == "mpt" and (
        attn_config.get("alibi") if isinstance(attn_config, dict) else getattr(attn_config, "alibi", False)
    ):
        return "MPT"
    if model_type == "falcon" and getattr(hf_config, "alibi", False):
        return "Falcon with alibi"
    if model_type == "jais" and getattr(hf_config, "position_embedding_type", None) == "alibi":
        return "JAIS"
    return None


#: vLLM's switch between the V1 and V2 model runners (``VllmConfig.use_v2_model_runner``).
V2_RUNNER_ENV = "VLLM_USE_V2_MODEL_RUNNER"


def select_v1_model_runner() -> None:
    """Use the V1 model runner unless the user chose one: the worker patches hook it (see
    docs/architecture.md, "Model runner"). Set in this process's environment before the engine
    config is built, so the engine core and every worker (spawned, or Ray workers, which copy the
    driver's environment) make the same choice; ``worker_report`` verifies it."""
    if os.environ.get(V2_RUNNER_ENV) is None:
        os.environ[V2_RUNNER_ENV] = "0"
        if not current_platform.is_cpu():  # the CPU worker always runs V1
            logger.info("SnapKV: using the V1 model runner (%s=0): SnapKV hooks it.", V2_RUNNER_ENV)


def log_cudagraph_policy(vllm_config: VllmConfig) -> None:
    mode = vllm_config.compilation_config.cudagraph_mode
    if mode is not None and mode.has_full_cudagraphs():
        logger.info(
            "SnapKV: cudagraph_mode=%s kept; steps that capture window queries or compact a "
            "request run without a full CUDA graph (piecewise, or eager where only full graphs "
            "exist). Other steps, decode included, use the configured graphs.",
            mode.name,
        )


def check_and_adjust(vllm_config: VllmConfig) -> SnapKVConfig | None:
    """Validate ``additional_config["kv_compression"]``; raise on anything unservable."""
    config = config_from_additional(vllm_config.additional_config)
    if config is None:
        return None
    reasons = unsupported_features(vllm_config)
    if reasons:
        raise ValueError(
            "kv_compression=snapkv cannot be used with: " + "; ".join(reasons) + ". Turn "
            "compression off for this setup (leave out --kv-compression, or set kv_compression "
            "to 'none')."
        )
    serve_metrics_from_this_process(vllm_config.model_config.served_model_name)
    if vllm_config.scheduler_config.async_scheduling:
        # Plans are built from schedule-time state only, but overlapping steps (the next step
        # scheduled while this one's compaction runs) have never run on a GPU here.
        vllm_config.scheduler_config.async_scheduling = False
        logger.warning(
            "SnapKV: async scheduling disabled (not validated with KV compaction); the CPU "
            "scheduling work of each step is no longer overlapped with the GPU's."
        )
    log_cudagraph_policy(vllm_config)
    return config


def check_worker_reports(reports: list[dict[str, Any]]) -> None:
    """Every worker must run the patched V1 runner with SnapKV state; raise naming the ranks."""
    problems = []
    for report in reports:
        if not report["v1_runner"]:
            problems.append(
                f"rank {report['rank']} runs {report['runner']}, not vLLM's V1 model runner"
            )
        elif not report["compression"]:
            problems.append(
                f"rank {report['rank']} has no SnapKV worker state (was the vllm-snapkv plugin "
                "loaded in that process? check its log for 'Failed to load plugin' and "
                "VLLM_PLUGINS)"
            )
    if problems:
        raise RuntimeError(
            "kv_compression: refusing to start, since compressed requests would corrupt the KV "
            "cache on: " + "; ".join(problems)
        )


def collect_worker_reports(executor: Any) -> list[dict[str, Any]]:
    """Every worker's :func:`worker_report`; raise naming the cause when the check cannot run."""
    try:
        return executor.collective_rpc(worker_report)
    except Exception as error:
        # E.g. vllm_snapkv missing or broken in a worker's environment (another node): the
        # check itself cannot be unpickled there.
        raise RuntimeError(
            "kv_compression: refusing to start: could not run the SnapKV start-up check on "
            "every worker (is vllm-snapkv installed and importable in each worker's "
            f"environment, on every node?): {error}"
        ) from error


def _patch_create_engine_config(original):
    @functools.wraps(original)
    def create_engine_config(self: EngineArgs, *args: Any, **kwargs: Any) -> VllmConfig:
        if config_from_additional(self.additional_config) is not None:
            select_v1_model_runner()
        vllm_config = original(self, *args, **kwargs)
        check_and_adjust(vllm_config)
        return vllm_config

    return create_engine_config


def _patch_initialize_kv_caches(original):
    @functools.wraps(original)
    def _initialize_kv_caches(self: EngineCore, *args: Any, **kwargs: Any):
        result = original(self, *args, **kwargs)
        if config_from_additional(self.vllm_config.additional_config) is not None:
            try:
                reports = collect_worker_reports(self.model_executor)
                check_worker_reports(reports)
            except Exception:
                # vLLM's engine core does not shut its executor down when its start fails: an
                # in-process engine core (VLLM_ENABLE_V1_MULTIPROCESSING=0) would leave the
                # worker processes it spawned running (and holding their memory) in the caller.
                self.model_executor.shutdown()
                raise
            logger.info(
                "SnapKV: compression active on %d worker(s); attention backends: %s",
                len(reports),
                ", ".join(sorted({b for report in reports for b in report["backends"]})),
            )
        return result

    return _initialize_kv_caches


ENGINE_PATCHES = (
    (EngineArgs, "create_engine_config", _patch_create_engine_config),
    (EngineCore, "_initialize_kv_caches", _patch_initialize_kv_caches),
)
