"""Engine start: bad settings and unservable models fail at once, naming what is wrong."""

from __future__ import annotations

import pytest

from conftest import make_llm

pytestmark = pytest.mark.engine


@pytest.mark.parametrize(
    "settings,field",
    [
        ({"budget": 16}, "kv_compression.budget"),
        ({"budget": 0}, "kv_compression.budget"),
        ({"window_size": 0}, "kv_compression.window_size"),
        ({"kernel_size": 6}, "kv_compression.kernel_size"),
        ({"pooling": "median"}, "kv_compression.pooling"),
        ({"method": "streamingllm"}, "kv_compression.method"),
        ({"budget_tokens": 256}, "kv_compression.budget_tokens"),
    ],
)
def test_bad_setting_fails_at_start_naming_its_field(model_dir, settings, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        make_llm(model_dir, enforce_eager=True, additional_config={"kv_compression": settings})


def _spec(method: str, num_speculative_tokens: int = 3, **options):
    from types import SimpleNamespace

    return SimpleNamespace(
        method=method, num_speculative_tokens=num_speculative_tokens, **options
    )


def _config_with(**changes):
    """A stand-in VllmConfig of a plain Llama on CPU, with ``changes`` applied."""
    from types import SimpleNamespace

    model = SimpleNamespace(
        runner_type="generate",
        is_encoder_decoder=False,
        use_mla=False,
        is_attention_free=False,
        attention_chunk_size=None,
        hf_text_config=SimpleNamespace(**changes.pop("hf_config", {"model_type": "llama"})),
        get_total_num_kv_heads=lambda: 3,
    )
    config = SimpleNamespace(
        model_config=model,
        parallel_config=SimpleNamespace(
            pipeline_parallel_size=changes.pop("pp", 1),
            tensor_parallel_size=changes.pop("tp", 1),
            enable_dbo=changes.pop("enable_dbo", False),
            decode_context_parallel_size=changes.pop("dcp", 1),
            prefill_context_parallel_size=changes.pop("pcp", 1),
            ubatch_size=changes.pop("ubatch_size", 0),
        ),
        cache_config=SimpleNamespace(cache_dtype=changes.pop("kv_cache_dtype", "auto")),
        speculative_config=changes.pop("speculative_config", None),
        kv_transfer_config=None,
        additional_config={"kv_compression": {"method": "snapkv", "window_size": 32}},
        use_v2_model_runner=changes.pop("v2", False),
    )
    for key, value in changes.items():
        setattr(model, key, value)
    return config


@pytest.mark.parametrize(
    "changes,reason",
    [
        ({}, None),
        ({"speculative_config": _spec("eagle")}, "speculative decoding method 'eagle'"),
        ({"speculative_config": _spec("eagle3")}, "method 'eagle3'"),
        ({"speculative_config": _spec("mtp")}, "method 'mtp'"),
        ({"speculative_config": _spec("draft_model")}, None),
        ({"speculative_config": _spec("draft_model", 31)}, "num_speculative_tokens=31"),
        ({"speculative_config": _spec("draft_model", parallel_drafting=True)},
         "draft_model with parallel_drafting"),
        ({"speculative_config": _spec("draft_model"), "pp": 2},
         "draft_model with pipeline_parallel_size=2"),
        ({"speculative_config": _spec("ngram_gpu")}, "method 'ngram_gpu'"),
        ({"speculative_config": _spec("ngram", 8)}, None),
        ({"speculative_config": _spec("ngram", 30)}, None),  # window_size 32
        ({"speculative_config": _spec("ngram", 31)}, "num_speculative_tokens=31 with window_"),
        ({"use_mla": True}, "MLA attention"),
        ({"is_attention_free": True}, "attention-free"),
        ({"is_encoder_decoder": True}, "encoder-decoder"),
        ({"attention_chunk_size": 8192}, "chunked local attention"),
        ({"hf_config": {"model_type": "bloom"}}, "ALiBi position biases (Bloom"),
        ({"hf_config": {"model_type": "mpt", "attn_config": {"alibi": True}}}, "ALiBi"),
        ({"hf_config": {"model_type": "mpt", "attn_config": {"alibi": False}}}, None),
        ({"hf_config": {"model_type": "falcon", "alibi": True}}, "Falcon with alibi"),
        ({"hf_config": {"model_type": "falcon", "alibi": False}}, None),
        ({"enable_dbo": True}, "microbatching"),
        ({"ubatch_size": 2}, "microbatching"),
        ({"ubatch_size": 1}, None),
        ({"dcp": 2}, "context parallelism"),
        ({"pcp": 2}, "context parallelism"),
        ({"kv_cache_dtype": "fp8"}, None),
        ({"kv_cache_dtype": "fp8_e5m2"}, None),
        ({"kv_cache_dtype": "bfloat16"}, None),
        ({"kv_cache_dtype": "fp8_inc"}, "kv_cache_dtype='fp8_inc'"),
        ({"runner_type": "pooling"}, "only generative models"),
        ({"pp": 2}, None),
        ({"tp": 4}, "tensor_parallel_size=4 > 3 KV heads"),
        ({"tp": 3}, None),
        ({"v2": True}, "the V2 model runner"),
    ],
)
def test_unservable_features_are_named(changes, reason):
    from vllm_snapkv.adapter.engine import unsupported_features

    reasons = unsupported_features(_config_with(**changes))
    if reason is None:
        assert reasons == []
    else:
        assert len(reasons) == 1 and reason in reasons[0]


def test_engine_refuses_to_start_when_a_worker_lacks_the_plugin(model_dir, monkeypatch):
    # As if the plugin's import had failed in the worker process: vLLM only logs that and goes on,
    # while the scheduler would free blocks that worker still uses.
    from vllm_snapkv.adapter import worker as worker_module

    monkeypatch.setattr(worker_module, "_create_state", lambda runner: None)
    with pytest.raises(RuntimeError, match="rank 0 has no SnapKV worker state"):
        make_llm(model_dir, enforce_eager=True, additional_config={"kv_compression": {}})
