"""SnapKV configuration: the server-wide settings and the rules a single request may apply.

Read from ``additional_config["kv_compression"]`` (offline ``LLM(..., additional_config=...)``), which
vLLM pickles into every engine-core and worker process with the ``VllmConfig``.
"""

from __future__ import annotations

import re
from typing import Any, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from vllm_snapkv.scoring import DEFAULT_SCORE, SCORE_NAMES, score_rule

#: Key of the plugin's section inside vLLM's ``additional_config``.
CONFIG_KEY = "kv_compression"


class KVCompressionConfigError(ValueError):
    """A ``kv_compression`` setting is invalid; the message names the field and its allowed range."""


class SnapKVConfig(BaseModel):
    """Server-wide KV-cache compression settings (``additional_config["kv_compression"]``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["snapkv", "none"] = Field(
        "snapkv", description="'snapkv' compresses long prompts; 'none' turns the plugin off."
    )
    window_size: int = Field(
        32, ge=1, description="W: last prompt tokens whose queries score the prefix."
    )
    budget: int = Field(
        1024,
        ge=2,
        description="C: KV entries kept per KV head after prefill, observation window included.",
    )
    kernel_size: int = Field(7, ge=1, description="Odd width of the 1-D pooling over positions.")
    pooling: Literal["max", "avg"] = Field("max", description="Pooling of the window scores.")
    decode_interval: int = Field(
        0,
        ge=0,
        description="Compress while decoding too: when a request's stored KV entries per KV head "
        "reach budget + N, compress them back to budget (the last window_size tokens' queries "
        "score them). 0 turns it off; otherwise N >= window_size.",
    )
    score: str = Field(
        DEFAULT_SCORE,
        description="Selection rule (vllm_snapkv.scoring): 'snapkv' (the paper's window "
        "attention, the default) or another rule of SCORE_NAMES, e.g. 'critical' (value-aware, "
        "after CriticalKV) or 'snapkv-scaled-continuation'. Every rule keeps budget entries per "
        "KV head; a request may pick another with snapkv_score. The 'snapkv-rare-*' rules "
        "read the prompt's token ids and are refused with decode_interval.",
    )
    dump_selections_to: str | None = Field(
        None,
        description="Debug: a directory; each compressed request writes <request id>.pt there.",
    )

    @field_validator("budget")
    @classmethod
    def _budget_exceeds_window(cls, budget: int, info: ValidationInfo) -> int:
        window_size = info.data.get("window_size")
        if window_size is not None and budget <= window_size:
            raise ValueError(f"must be greater than window_size ({window_size})")
        return budget

    @field_validator("decode_interval")
    @classmethod
    def _interval_holds_a_window(cls, interval: int, info: ValidationInfo) -> int:
        # A decode compression's observation window must be tokens generated since the previous
        # compression: their queries are captured while they are computed, and the prompt's
        # window queries exist only in the step that compresses the prompt.
        window_size = info.data.get("window_size")
        if interval and window_size is not None and interval < window_size:
            raise ValueError(f"must be 0 (off) or at least window_size ({window_size})")
        return interval

    @field_validator("score")
    @classmethod
    def _score_is_known(cls, score: str, info: ValidationInfo) -> str:
        if score not in SCORE_NAMES:
            raise ValueError(f"must be one of {', '.join(SCORE_NAMES)}")
        refusal = prompt_only_refusal(score, info.data.get("decode_interval", 0))
        if refusal:
            raise ValueError(refusal)
        return score

    @field_validator("kernel_size")
    @classmethod
    def _kernel_is_odd(cls, kernel_size: int) -> int:
        if kernel_size % 2 != 1:
            raise ValueError("must be an odd integer >= 1")
        return kernel_size

    @property
    def enabled(self) -> bool:
        return self.method == "snapkv"


def _format_validation_error(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"])
        where = f"{CONFIG_KEY}.{field}" if field else CONFIG_KEY
        message = item["msg"].removeprefix("Value error, ")
        got = f" (got {item['input']!r})" if field and item["type"] != "extra_forbidden" else ""
        if item["type"] == "extra_forbidden":
            message = f"unknown key; allowed keys: {', '.join(SnapKVConfig.model_fields)}"
        lines.append(f"{where}: {message}{got}")
    return "Invalid KV-cache compression config: " + "; ".join(lines)


def parse_config(raw: Any) -> SnapKVConfig:
    """Validate a ``kv_compression`` value (mapping, ``SnapKVConfig`` or the string shorthand)."""
    if isinstance(raw, SnapKVConfig):
        return raw
    if isinstance(raw, str):
        raw = {"method": raw}
    if not isinstance(raw, Mapping):
        raise KVCompressionConfigError(
            f"{CONFIG_KEY} must be a mapping of settings or 'snapkv'/'none'; got {type(raw).__name__}"
        )
    try:
        return SnapKVConfig.model_validate(dict(raw))
    except ValidationError as error:
        raise KVCompressionConfigError(_format_validation_error(error)) from None


def config_from_additional(additional_config: Any) -> SnapKVConfig | None:
    """The enabled compression config inside vLLM's ``additional_config``, or None when off."""
    if not isinstance(additional_config, Mapping) or CONFIG_KEY not in additional_config:
        return None
    config = parse_config(additional_config[CONFIG_KEY])
    return config if config.enabled else None


#: Per-request keys in ``SamplingParams.extra_args`` (the OpenAI API's ``vllm_xargs``).
REQUEST_BUDGET_KEY = "snapkv_budget"
REQUEST_METHOD_KEY = "kv_compression"
REQUEST_SCORE_KEY = "snapkv_score"
#: Every ``extra_args`` key that starts with this belongs to the plugin: an unknown one (a typo
#: such as ``snapkv_bugdet``) is an error, not silently ignored. Other plugins' keys pass.
REQUEST_KEY_PREFIX = "snapkv_"
REQUEST_KEYS = (REQUEST_METHOD_KEY, REQUEST_BUDGET_KEY, REQUEST_SCORE_KEY)


def _short(value: Any) -> str:
    """``repr`` of a client-sent value, cut so an error message stays readable."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def request_budget(config: SnapKVConfig, extra_args: Mapping[str, Any] | None) -> int | None:
    """The budget one request compresses with, or None when it opts out.

    A request may lower its budget (``snapkv_budget``) or opt out (``kv_compression: "none"``),
    never raise its memory use above the server's budget. ``kv_compression: "snapkv"`` means the
    server's setting (the same as leaving it out). Its selection rule (``snapkv_score``,
    :func:`request_score`) is checked here too, so one call validates every key. Nothing else
    (window, pooling, dump directory, ...) can be set per request.
    """
    if not extra_args:
        return config.budget
    unknown = sorted(
        str(key) for key in extra_args
        if str(key).startswith(REQUEST_KEY_PREFIX) and key not in REQUEST_KEYS
    )
    if unknown:
        raise KVCompressionConfigError(
            f"{unknown[0]}: unknown SnapKV request key; allowed: {', '.join(REQUEST_KEYS)}"
        )
    method = extra_args.get(REQUEST_METHOD_KEY, "snapkv")
    if not isinstance(method, str) or method not in ("snapkv", "none"):
        raise KVCompressionConfigError(
            f"{REQUEST_METHOD_KEY}: must be 'snapkv' or 'none'; got {_short(method)}"
        )
    if method == "none":
        return None
    request_score(config, extra_args)
    budget = extra_args.get(REQUEST_BUDGET_KEY, config.budget)
    # vllm_xargs values may arrive as strings (``--vllm-xargs`` style clients); only plain ASCII
    # digits convert, so no float, exponent or 4,300-digit string reaches int().
    if isinstance(budget, str) and re.fullmatch(r"\s*[0-9]{1,18}\s*", budget):
        budget = int(budget)
    if (
        isinstance(budget, bool)
        or not isinstance(budget, int)
        or not config.window_size < budget <= config.budget
    ):
        raise KVCompressionConfigError(
            f"{REQUEST_BUDGET_KEY}: must be an integer with window_size ({config.window_size}) < "
            f"{REQUEST_BUDGET_KEY} <= the server's budget ({config.budget}); got {_short(budget)}"
        )
    return budget


def request_score(config: SnapKVConfig, extra_args: Mapping[str, Any] | None) -> str:
    """The selection rule one request compresses with: ``snapkv_score`` (any of
    :data:`~vllm_snapkv.scoring.SCORE_NAMES`: every rule keeps the same number of entries, so
    memory is the same) or the server's ``score``."""
    score = (extra_args or {}).get(REQUEST_SCORE_KEY, config.score)
    if not isinstance(score, str) or score not in SCORE_NAMES:
        raise KVCompressionConfigError(
            f"{REQUEST_SCORE_KEY}: must be one of {', '.join(SCORE_NAMES)}; got {_short(score)}"
        )
    refusal = prompt_only_refusal(score, config.decode_interval)
    if refusal:
        raise KVCompressionConfigError(f"{REQUEST_SCORE_KEY}: {refusal}")
    return score


def prompt_only_refusal(score: str, decode_interval: int) -> str | None:
    """Why rule ``score`` cannot run on a server compressing while decoding (None: it can). A
    rule that reads the prompt's token ids cannot score a decode compression (the plugin does
    not track which prompt position each stored entry holds), and quietly scoring those with
    another rule would change answers unasked."""
    if decode_interval and score_rule(score).needs_token_ids:
        return (
            f"{score!r} reads the prompt's token ids and scores prompt compressions only; it "
            f"cannot be used with decode_interval ({decode_interval}): choose another score or "
            "set decode_interval to 0"
        )
    return None
