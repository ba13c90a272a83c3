"""SnapKV configuration: the server-wide settings and the rules a single request may apply.

Read from ``additional_config["kv_compression"]`` (offline ``LLM(..., additional_config=...)``), which
vLLM pickles into every engine-core and worker process with the ``VllmConfig``.
"""

from __future__ import annotations

from typing import Any, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

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
    budget: int = Field(
        1024,
        ge=2,
        description="C: KV entries kept per KV head after prefill, observation window included.",
    )
    window_size: int = Field(
        32, ge=1, description="W: last prompt tokens whose queries score the prefix."
    )
    kernel_size: int = Field(7, ge=1, description="Odd width of the 1-D pooling over positions.")
    pooling: Literal["max", "avg"] = Field("max", description="Pooling of the window scores.")
    dump_selections_to: str | None = Field(
        None,
        description="Debug: a directory; each compressed request writes <request id>.pt there.",
    )

    @model_validator(mode="after")
    def _check_ranges(self) -> "SnapKVConfig":
        if self.budget <= self.window_size:
            raise ValueError(
                f"budget must be greater than window_size ({self.window_size}); got {self.budget}"
            )
        if self.kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be an odd integer >= 1; got {self.kernel_size}")
        return self

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
