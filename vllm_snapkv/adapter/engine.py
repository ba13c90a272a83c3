"""Frontend side: validate the compression config and reject what SnapKV cannot serve correctly.

Patched (vLLM 0.32): ``EngineArgs.create_engine_config`` (post). It runs in the process that
builds the engine (``LLM(...)``, the API server), so a bad setting fails there with its field named,
before any engine process starts.
"""

from __future__ import annotations

import functools
from typing import Any

from vllm.config import VllmConfig
from vllm.engine.arg_utils import EngineArgs
from vllm.logger import init_logger
from vllm.platforms import current_platform

from vllm_snapkv.config import SnapKVConfig, config_from_additional
from vllm_snapkv.metrics import serve_metrics_from_this_process

# Under the "vllm" logger tree so vLLM's handlers and VLLM_LOGGING_LEVEL apply.
logger = init_logger(f"vllm.{__name__}")


def unsupported_features(vllm_config: VllmConfig) -> list[str]:
    """Every configured feature the compaction cannot serve correctly, as readable reasons."""
    model = vllm_config.model_config
    parallel = vllm_config.parallel_config
    reasons = []
    if not current_platform.is_cpu():
        reasons.append(
            f"platform {current_platform.device_name!r}: this release compacts the KV cache of "
            "vLLM's CPU attention backend only"
        )
    if vllm_config.speculative_config is not None:
        reasons.append("speculative decoding (the drafter computes its own positions and slots)")
    if vllm_config.kv_transfer_config is not None:
        reasons.append("KV transfer connectors")
    if model.runner_type != "generate":
        reasons.append(f"runner {model.runner_type!r} (only generative models)")
    if model.is_encoder_decoder:
        reasons.append("encoder-decoder models")
    if model.use_mla:
        reasons.append("MLA attention")
    if model.is_hybrid or model.is_attention_free:
        reasons.append("hybrid or attention-free models")
    if model.get_sliding_window() is not None:
        reasons.append("sliding-window attention")
    if vllm_config.cache_config.cache_dtype != "auto":
        reasons.append(f"kv_cache_dtype={vllm_config.cache_config.cache_dtype!r} (quantized KV)")
    if parallel.pipeline_parallel_size > 1:
        reasons.append("pipeline parallelism")
    num_kv_heads = model.get_total_num_kv_heads()
    if parallel.tensor_parallel_size > num_kv_heads:
        reasons.append(
            f"tensor_parallel_size={parallel.tensor_parallel_size} > {num_kv_heads} KV heads "
            "(replicated KV heads would select from a subset of their query heads)"
        )
    if vllm_config.use_v2_model_runner:
        reasons.append("the V2 model runner (set VLLM_USE_V2_MODEL_RUNNER=0)")
    return reasons


def check_and_adjust(vllm_config: VllmConfig) -> SnapKVConfig | None:
    """Validate ``additional_config["kv_compression"]``; raise on anything unservable."""
    config = config_from_additional(vllm_config.additional_config)
    if config is None:
        return None
    reasons = unsupported_features(vllm_config)
    if reasons:
        raise ValueError(
            "kv_compression=snapkv cannot be used with: " + "; ".join(reasons) + "."
        )
    serve_metrics_from_this_process(vllm_config.model_config.served_model_name)
    if vllm_config.scheduler_config.async_scheduling:
        # Plans are built from schedule-time state only, but overlapping steps were never run
        # with compaction; correctness first.
        vllm_config.scheduler_config.async_scheduling = False
        logger.warning("SnapKV: async scheduling disabled (not validated with KV compaction).")
    return config


def _patch_create_engine_config(original):
    @functools.wraps(original)
    def create_engine_config(self: EngineArgs, *args: Any, **kwargs: Any) -> VllmConfig:
        vllm_config = original(self, *args, **kwargs)
        check_and_adjust(vllm_config)
        return vllm_config

    return create_engine_config


ENGINE_PATCHES = ((EngineArgs, "create_engine_config", _patch_create_engine_config),)
