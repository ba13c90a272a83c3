"""Frontend: ``--kv-compression``/``--snapkv-*`` flags and per-request validation.

Patched (vLLM 0.32; contract tests in tests/test_contract.py):
- ``EngineArgs.add_cli_args`` (post): add the flags in their own argument group. vLLM loads
  general plugins before it builds any engine parser, so every entry point built from the engine
  args (``vllm serve``, the OpenAI api_server module, ``--config FILE``) gets them.
- ``EngineArgs.from_cli_args`` (post): merge the flags into ``additional_config["kv_compression"]``
  (argparse values outside the dataclass fields are otherwise dropped) and validate them, naming
  the flag; the merged config is written back to the namespace for extra API server processes.
- ``InputProcessor._validate_params`` (post): reject a bad ``snapkv_budget``/``snapkv_score``/
  ``kv_compression`` in a request's ``extra_args`` (``vllm_xargs``) with vLLM's validation
  error, which the OpenAI server answers with HTTP 400 while it keeps serving everyone else.
- ``SamplingParams._verify_extra_args`` (pre): vLLM rejects integers outside 64 bits while it builds
  the sampling params, before any plugin sees them, naming only ``extra_args``; an out-of-range
  ``snapkv_*`` value is named by its own key instead.
"""

from __future__ import annotations

import argparse
import functools
from typing import Any

from vllm.engine.arg_utils import EngineArgs
from vllm.exceptions import VLLMValidationError
from vllm.sampling_params import SamplingParams
from vllm.v1.engine.input_processor import InputProcessor

from vllm_snapkv.config import (
    CONFIG_KEY,
    REQUEST_KEY_PREFIX,
    KVCompressionConfigError,
    SnapKVConfig,
    config_from_additional,
    parse_config,
    request_budget,
)
from vllm_snapkv.scoring import SCORE_NAMES

#: config field -> (flag, argparse options). ``kv_compression`` maps to ``method``.
FLAGS: dict[str, tuple[str, dict[str, Any]]] = {
    "method": ("--kv-compression", {"choices": ["none", "snapkv"]}),
    "budget": ("--snapkv-budget", {"type": int, "metavar": "N"}),
    "window_size": ("--snapkv-window-size", {"type": int, "metavar": "N"}),
    "kernel_size": ("--snapkv-kernel-size", {"type": int, "metavar": "N"}),
    "pooling": ("--snapkv-pooling", {"choices": ["max", "avg"]}),
    "decode_interval": ("--snapkv-decode-interval", {"type": int, "metavar": "N"}),
    "score": ("--snapkv-score", {"choices": list(SCORE_NAMES)}),
    "dump_selections_to": ("--snapkv-dump-selections-to", {"metavar": "DIR"}),
}
#: vLLM's ``--help=KEYWORD`` prints a whole group when its title equals the keyword (case
#: ignored): ``vllm serve --help=snapkv`` then lists every flag, ``--kv-compression`` included.
GROUP_TITLE = "SnapKV"


class SnapKVRequestError(VLLMValidationError, ValueError):
    """A request's SnapKV ``extra_args`` are invalid: HTTP 400 in the server, ``ValueError``
    for offline callers."""


def _dest(flag: str) -> str:
    return flag.removeprefix("--").replace("-", "_")


def add_snapkv_arguments(parser: argparse.ArgumentParser) -> None:
    if any(GROUP_TITLE == group.title for group in parser._action_groups):
        return
    group = parser.add_argument_group(
        GROUP_TITLE,
        description="KV-cache compression by vllm-snapkv. Compress each long prompt's KV cache at the "
        "end of its prefill (and, with --snapkv-decode-interval, again while it generates): "
        "every KV head keeps its top positions for the observation window, the rest of its "
        "blocks go back to the pool. Same settings as additional_config['kv_compression'].",
    )
    for field, (flag, options) in FLAGS.items():
        info = SnapKVConfig.model_fields[field]
        default = "none" if field == "method" else info.default
        group.add_argument(
            flag,
            dest=_dest(flag),
            # Unset flags leave no attribute: --additional-config keys then stay in force.
            default=argparse.SUPPRESS,
            help=f"{info.description} Default: {default}.",
            **options,
        )


def flags_to_config(args: argparse.Namespace, additional_config: dict) -> dict:
    """``additional_config`` with the flags merged into its ``kv_compression`` section; flags
    win over keys given in ``--additional-config``. Raises naming the flag."""
    given = {
        field: getattr(args, _dest(flag))
        for field, (flag, _) in FLAGS.items()
        if getattr(args, _dest(flag), None) is not None
    }
    if not given:
        return additional_config
    section = additional_config.get(CONFIG_KEY)
    if "method" not in given and section is None:
        flags = ", ".join(FLAGS[field][0] for field in given)
        raise KVCompressionConfigError(f"{flags} need --kv-compression snapkv")
    section = {"method": section} if isinstance(section, str) else dict(section or {})
    section.update(given)
    try:
        parse_config(section)
    except KVCompressionConfigError as error:
        message = str(error)
        for field, (flag, _) in FLAGS.items():
            if field in given:
                message = message.replace(f"{CONFIG_KEY}.{field}:", f"{flag}:")
        raise KVCompressionConfigError(message) from None
    return {**additional_config, CONFIG_KEY: section}


def _patch_add_cli_args(original: staticmethod) -> staticmethod:
    function = original.__func__

    @functools.wraps(function)
    def add_cli_args(parser, *args: Any, **kwargs: Any):
        parser = function(parser, *args, **kwargs)
        add_snapkv_arguments(parser)
        return parser

    return staticmethod(add_cli_args)


def _patch_from_cli_args(original: classmethod) -> classmethod:
    function = original.__func__

    @functools.wraps(function)
    def from_cli_args(cls, args: argparse.Namespace):
        engine_args = function(cls, args)
        engine_args.additional_config = flags_to_config(
            args, dict(engine_args.additional_config or {})
        )
        # Extra API server processes (--api-server-count, the default under data parallelism)
        # get this namespace and call from_cli_args before they load plugins, i.e. unpatched:
        # without the merged config there, they would neither validate requests nor serve the
        # compression metrics.
        args.additional_config = engine_args.additional_config
        return engine_args

    return classmethod(from_cli_args)


def _patch_validate_params(original):
    @functools.wraps(original)
    def _validate_params(self: InputProcessor, params: Any, *args: Any, **kwargs: Any):
        result = original(self, params, *args, **kwargs)
        if isinstance(params, SamplingParams) and params.extra_args:
            config = config_from_additional(self.vllm_config.additional_config)
            if config is not None:
                try:
                    request_budget(config, params.extra_args)
                except KVCompressionConfigError as error:
                    field = str(error).split(":", 1)[0]
                    raise SnapKVRequestError(
                        str(error), parameter=field, value=params.extra_args.get(field)
                    ) from None
        return result

    return _validate_params


def _patch_verify_extra_args(original):
    @functools.wraps(original)
    def _verify_extra_args(self: SamplingParams) -> None:
        for key, value in (self.extra_args or {}).items():
            if (
                str(key).startswith(REQUEST_KEY_PREFIX)
                and isinstance(value, int)
                and not -(2**63) <= value < 2**64
            ):
                raise SnapKVRequestError(
                    f"{key}: must be an integer no larger than the server's budget; got an "
                    f"integer of {len(str(abs(value)))} digits",
                    parameter=str(key),
                    value=None,
                )
        original(self)

    return _verify_extra_args


SERVING_PATCHES = (
    (EngineArgs, "add_cli_args", _patch_add_cli_args),
    (EngineArgs, "from_cli_args", _patch_from_cli_args),
    (InputProcessor, "_validate_params", _patch_validate_params),
    (SamplingParams, "_verify_extra_args", _patch_verify_extra_args),
)
