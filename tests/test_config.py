"""Configuration: defaults, validation messages that name the field, per-request rules."""

from __future__ import annotations

import pytest

from vllm_snapkv.config import (
    KVCompressionConfigError,
    SnapKVConfig,
    config_from_additional,
    parse_config,
    request_budget,
    request_score,
)


def test_defaults_are_the_longbench_setting():
    config = parse_config({})
    assert (config.method, config.budget, config.window_size) == ("snapkv", 1024, 32)
    assert (config.kernel_size, config.pooling, config.dump_selections_to) == (7, "max", None)
    assert config.decode_interval == 0  # decode compression off: prompt-only SnapKV
    assert config.score == "snapkv"  # the paper's rule: plugin = reference


@pytest.mark.parametrize(
    "raw,field,allowed",
    [
        ({"budget": 32}, "budget", "greater than window_size (32)"),
        ({"budget": 16, "window_size": 16}, "budget", "greater than window_size (16)"),
        ({"window_size": 0}, "window_size", "greater than or equal to 1"),
        ({"kernel_size": 4}, "kernel_size", "odd"),
        ({"kernel_size": 0}, "kernel_size", "greater than or equal to 1"),
        ({"pooling": "min"}, "pooling", "'max' or 'avg'"),
        ({"score": "h2o"}, "score", "must be one of snapkv, critical, chunk, snapkv-chunk, continuation, snapkv-continuation, snapkv-scaled-continuation, snapkv-rare-continuation, snapkv-rare-long-continuation, snapkv-rare-step-continuation, snapkv-rare-tail-continuation, snapkv-rare-path-continuation"),
        ({"score": 1}, "score", "valid string"),
        ({"method": "h2o"}, "method", "'snapkv' or 'none'"),
        ({"budget": "lots"}, "budget", "valid integer"),
        ({"decode_interval": -1}, "decode_interval", "greater than or equal to 0"),
        ({"decode_interval": 31}, "decode_interval", "0 (off) or at least window_size (32)"),
        ({"decode_interval": 8, "window_size": 16, "budget": 64}, "decode_interval",
         "at least window_size (16)"),
        ({"windowsize": 8}, "windowsize", "unknown key; allowed keys: method, window_size, budget"),
    ],
)
def test_invalid_values_name_field_and_allowed_range(raw, field, allowed):
    with pytest.raises(KVCompressionConfigError) as error:
        parse_config(raw)
    message = str(error.value)
    assert f"kv_compression.{field}: " in message
    assert allowed in message


def test_decode_interval_of_a_window_or_more_is_accepted():
    assert parse_config({"decode_interval": 32}).decode_interval == 32
    assert parse_config({"decode_interval": 4096, "budget": 256}).decode_interval == 4096


def test_error_shows_the_rejected_value():
    with pytest.raises(KVCompressionConfigError) as error:
        parse_config({"budget": 64, "window_size": 64})
    assert str(error.value) == (
        "Invalid KV-cache compression config: kv_compression.budget: "
        "must be greater than window_size (64) (got 64)"
    )


def test_string_shorthand_and_off_switches():
    assert parse_config("snapkv") == SnapKVConfig()
    assert config_from_additional({"kv_compression": "none"}) is None
    assert config_from_additional({"kv_compression": {"method": "none", "budget": 64}}) is None
    assert config_from_additional({}) is None
    assert config_from_additional(None) is None
    assert config_from_additional({"kv_compression": {"budget": 256}}).budget == 256
    with pytest.raises(KVCompressionConfigError, match="must be a mapping"):
        parse_config(5)


def test_config_is_immutable():
    with pytest.raises(Exception):
        SnapKVConfig().budget = 5  # type: ignore[misc]


SERVER = SnapKVConfig(budget=512, window_size=32)


@pytest.mark.parametrize(
    "extra_args,budget",
    [
        (None, 512),
        ({}, 512),
        ({"other_plugin": 1}, 512),
        ({"snapkv_budget": 256}, 256),
        ({"snapkv_budget": "128"}, 128),
        ({"snapkv_budget": 512}, 512),
        ({"kv_compression": "none"}, None),
        ({"kv_compression": "snapkv", "snapkv_budget": 64}, 64),
        ({"kv_compression": "snapkv"}, 512),  # the server's setting, as if left out
        ({"snapkv_budget": " 100 "}, 100),
        ({"kv_transfer_params": {"x": 1}, "other_plugin_budget": 9}, 512),
    ],
)
def test_request_may_lower_its_budget_or_opt_out(extra_args, budget):
    assert request_budget(SERVER, extra_args) == budget


@pytest.mark.parametrize(
    "extra_args,field",
    [
        ({"snapkv_budget": 513}, "snapkv_budget"),
        ({"snapkv_budget": 32}, "snapkv_budget"),
        ({"snapkv_budget": 100.5}, "snapkv_budget"),
        ({"snapkv_budget": True}, "snapkv_budget"),
        ({"snapkv_budget": "all"}, "snapkv_budget"),
        ({"kv_compression": "pyramidkv"}, "kv_compression"),
        # Fuzzing: types, sizes and shapes a client can send.
        ({"snapkv_budget": -100}, "snapkv_budget"),
        ({"snapkv_budget": 0}, "snapkv_budget"),
        ({"snapkv_budget": 10**30}, "snapkv_budget"),
        ({"snapkv_budget": "9" * 5000}, "snapkv_budget"),
        ({"snapkv_budget": "1e3"}, "snapkv_budget"),
        ({"snapkv_budget": "٣٢٠"}, "snapkv_budget"),  # non-ASCII digits
        ({"snapkv_budget": ""}, "snapkv_budget"),
        ({"snapkv_budget": None}, "snapkv_budget"),
        ({"snapkv_budget": [256]}, "snapkv_budget"),
        ({"snapkv_budget": {"value": 256}}, "snapkv_budget"),
        ({"snapkv_budget": float("nan")}, "snapkv_budget"),
        ({"kv_compression": ""}, "kv_compression"),
        ({"kv_compression": ["none"]}, "kv_compression"),
        ({"kv_compression": {"budget": 4096}}, "kv_compression"),
        ({"kv_compression": False}, "kv_compression"),
        ({"kv_compression": "NONE"}, "kv_compression"),
        # Unknown keys of the plugin's own prefix: typos, and settings a request may not set.
        ({"snapkv_bugdet": 256}, "snapkv_bugdet"),
        ({"snapkv_dump_selections_to": "/tmp"}, "snapkv_dump_selections_to"),
        ({"snapkv_window_size": 8, "kv_compression": "none"}, "snapkv_window_size"),
        ({"snapkv_score": "h2o"}, "snapkv_score"),
        ({"snapkv_score": ["critical"]}, "snapkv_score"),
        ({"snapkv_score": "CRITICAL", "snapkv_budget": 64}, "snapkv_score"),
    ],
)
def test_request_cannot_raise_budget_or_pass_garbage(extra_args, field):
    with pytest.raises(KVCompressionConfigError, match=f"^{field}:") as error:
        request_budget(SERVER, extra_args)
    if field == "snapkv_budget":
        assert "window_size (32) < snapkv_budget <= the server's budget (512)" in str(error.value)
    if field == "snapkv_score":
        assert "must be one of snapkv, critical, chunk, snapkv-chunk, continuation, snapkv-continuation, snapkv-scaled-continuation, snapkv-rare-continuation, snapkv-rare-long-continuation, snapkv-rare-step-continuation, snapkv-rare-tail-continuation, snapkv-rare-path-continuation" in str(error.value)
    elif field.startswith("snapkv_") and field != "snapkv_budget":
        assert "unknown SnapKV request key; allowed: kv_compression, snapkv_budget" in str(
            error.value
        )
    assert len(str(error.value)) < 300


@pytest.mark.parametrize(
    "server,extra_args,score",
    [
        ({}, None, "snapkv"),
        ({}, {"snapkv_score": "critical"}, "critical"),
        ({"score": "critical"}, {}, "critical"),
        ({"score": "critical"}, {"snapkv_score": "snapkv", "snapkv_budget": 64}, "snapkv"),
    ],
)
def test_request_may_pick_a_selection_rule(server, extra_args, score):
    """Every rule keeps the same number of entries, so a request may pick any of them; its
    budget rules stay as they are."""
    config = parse_config(server)
    assert request_score(config, extra_args) == score
    assert request_budget(config, extra_args) == (extra_args or {}).get("snapkv_budget", 1024)


@pytest.mark.parametrize("rule", ["snapkv-rare-continuation", "snapkv-rare-long-continuation",
                                  "snapkv-rare-step-continuation", "snapkv-rare-tail-continuation",
                                  "snapkv-rare-path-continuation"])
def test_a_rule_reading_token_ids_is_refused_with_decode_compression(rule):
    """The 'snapkv-rare-*' rules score prompt compressions only: the server setting and a
    request's snapkv_score are refused on a server compressing while decoding, naming the
    field and both ways out; without decode compression both are accepted."""
    with pytest.raises(KVCompressionConfigError) as error:
        parse_config({"score": rule, "decode_interval": 64})
    assert f"kv_compression.score: '{rule}' reads the prompt's token ids" in str(error.value)
    assert "decode_interval (64)" in str(error.value)
    decoding = parse_config({"decode_interval": 64})
    with pytest.raises(KVCompressionConfigError, match=f"^snapkv_score: '{rule}'"
                       ".*choose another score or set decode_interval to 0"):
        request_budget(decoding, {"snapkv_score": rule})
    assert request_score(decoding, {"snapkv_score": "snapkv-scaled-continuation"})
    assert request_score(parse_config({"score": rule}), None) == rule
    assert request_score(parse_config({}), {"snapkv_score": rule}) == rule
