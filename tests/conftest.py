"""Shared fixtures: the real test model and in-process vLLM engines (inspectable schedulers)."""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator

import pytest

# The engine core runs in this process, so tests can read its scheduler and block pool.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

from vllm_snapkv.demo_model import build_demo_model  # noqa: E402

#: KV cache per engine: ~87 blocks of 128 tokens for SmolLM2-135M in float32.
KV_CACHE_BYTES = 512 * 1024 * 1024


@pytest.fixture(scope="session")
def model_dir() -> str:
    return str(build_demo_model())


def make_llm(model_dir: str, **kwargs):
    from vllm import LLM

    options = dict(
        dtype="float32",
        max_model_len=8192,
        seed=0,
        kv_cache_memory_bytes=KV_CACHE_BYTES,
        gpu_memory_utilization=0.3,
    )
    options.update(kwargs)
    return LLM(model_dir, **options)


def close_llm(llm) -> None:
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def scheduler_of(llm):
    return llm.llm_engine.engine_core.engine_core.scheduler


@pytest.fixture(scope="session")
def dense_llm(model_dir: str) -> Iterator:
    """Stock vLLM: the plugin is installed but compression is off."""
    llm = make_llm(model_dir)
    yield llm
    close_llm(llm)
