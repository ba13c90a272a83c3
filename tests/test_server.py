"""The OpenAI-compatible server: `vllm serve` with the plugin's flags, the openai client, /metrics."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import time
import urllib.request

import pytest
import torch

from benchmarks.servers import free_port, parse_metrics, server_env, vllm_command
from conftest import prompt_of_length
from model_zoo import LORA_RANK, build_lora_adapter, reference_kept_positions_for
from vllm_snapkv.plan import cdiv
from vllm_snapkv.tasks import passkey_prompt

pytestmark = pytest.mark.engine

SERVER_BUDGET = 512
#: Decode compression: budget + 256 entries (768, or 512 for a request's budget of 256).
DECODE_INTERVAL = 256
MODEL_NAME = "smollm2"
#: The served name of the demo model's random-weight LoRA adapter (``--lora-modules``).
LORA_NAME = "smollm2-lora"


def server_args(model_dir: str, port: int, *extra: str) -> list[str]:
    return [
        *vllm_command(), "serve", model_dir,
        "--served-model-name", MODEL_NAME,
        "--host", "127.0.0.1", "--port", str(port),
        "--dtype", "float32", "--max-model-len", "8192",
        "--gpu-memory-utilization", "0.3", "--kv-cache-memory-bytes", str(512 * 2**20),
        "--enforce-eager",
        *extra,
    ]


@pytest.fixture(scope="module")
def lora_dir(model_dir: str) -> str:
    return build_lora_adapter(model_dir, seed=1)


@pytest.fixture(scope="module")
def server_dump_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("server-selections"))


@pytest.fixture(scope="module")
def server(model_dir: str, lora_dir: str, server_dump_dir: str, tmp_path_factory):
    """SnapKV on, decode compression on, and LoRA on with one adapter (``LORA_NAME``): the
    LoRA test shares this server rather than starting its own."""
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    with open(log, "w") as log_file:
        process = subprocess.Popen(
            server_args(
                model_dir, port,
                "--kv-compression", "snapkv",
                "--snapkv-budget", str(SERVER_BUDGET),
                "--snapkv-window-size", "32",
                "--snapkv-kernel-size", "7",
                "--snapkv-pooling", "max",
                "--snapkv-decode-interval", str(DECODE_INTERVAL),
                "--snapkv-dump-selections-to", server_dump_dir,
                "--enable-lora", "--max-lora-rank", str(LORA_RANK),
                "--lora-modules", f"{LORA_NAME}={lora_dir}",
            ),
            stdout=log_file, stderr=subprocess.STDOUT, env=server_env(),
        )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"server exited {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if urllib.request.urlopen(base + "/health", timeout=2).status == 200:
                break
        except OSError:
            time.sleep(2)
    else:
        process.kill()
        pytest.fail("server did not come up:\n" + log.read_text()[-4000:])
    yield base
    process.terminate()
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)


def metrics(server: str) -> dict[str, float]:
    """Sample values of vLLM's and the plugin's series, keyed by metric name."""
    return parse_metrics(urllib.request.urlopen(server + "/metrics").read().decode())


def test_completion_answers_a_passkey_with_compression_on(client, server):
    before = metrics(server)
    prompt = passkey_prompt(2000, 27182, 0.5)
    response = client.completions.create(
        model=MODEL_NAME, prompt=prompt, max_tokens=8, temperature=0
    )
    assert "27182" in response.choices[0].text
    after = metrics(server)
    assert after["vllm:snapkv_compressed_requests_total"] == (
        before.get("vllm:snapkv_compressed_requests_total", 0) + 1
    )


def test_chat_and_streaming(client):
    chat = client.chat.completions.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=16,
        temperature=0,
    )
    assert "Paris" in chat.choices[0].message.content
    stream = client.completions.create(
        model=MODEL_NAME, prompt=passkey_prompt(1500, 16180, 0.2), max_tokens=8,
        temperature=0, stream=True,
    )
    pieces = [chunk.choices[0].text for chunk in stream if chunk.choices]
    assert len(pieces) >= 2 and "16180" in "".join(pieces)


def test_metrics_count_only_real_compressions(client, server):
    prompt = passkey_prompt(3000, 14142, 0.7)
    request = urllib.request.Request(
        server + "/tokenize",
        data=json.dumps({"model": MODEL_NAME, "prompt": prompt}).encode(),
        headers={"Content-Type": "application/json"},
    )
    prompt_len = json.loads(urllib.request.urlopen(request).read())["count"]
    before = metrics(server)
    client.completions.create(
        model=MODEL_NAME, prompt=prompt, max_tokens=4, temperature=0,
        extra_body={"vllm_xargs": {"snapkv_budget": 256}},
    )
    # Neither a short prompt nor an opted-out request is a compression.
    client.completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=4)
    client.completions.create(
        model=MODEL_NAME, prompt=prompt, max_tokens=4,
        extra_body={"vllm_xargs": {"kv_compression": "none"}},
    )
    after = metrics(server)

    def delta(name: str) -> float:
        return after[name] - before.get(name, 0.0)

    assert delta("vllm:snapkv_compressed_requests_total") == 1
    assert delta("vllm:snapkv_evicted_tokens_total") == prompt_len - 256
    assert delta("vllm:snapkv_freed_blocks_total") == cdiv(prompt_len, 128) - cdiv(256, 128)
    assert delta("vllm:snapkv_compression_ratio_count") == 1
    assert delta("vllm:snapkv_compression_ratio_sum") == pytest.approx(prompt_len / 256)
    assert delta("vllm:snapkv_skipped_compressions_total") == 0


def test_long_generation_is_compressed_while_decoding(client, server):
    """A prompt within the budget generating past budget + interval: compressed once while
    decoding (at 512 stored entries, budget 256), counted in the decode series only."""
    before = metrics(server)
    prompt = passkey_prompt(150, 14142, 0.5)  # ~200 tokens: within the budget
    completion = client.completions.create(
        model=MODEL_NAME, prompt=prompt, max_tokens=400, temperature=0,
        extra_body={"vllm_xargs": {"snapkv_budget": 256}, "ignore_eos": True},
    )
    assert completion.usage.completion_tokens == 400
    prompt_len = completion.usage.prompt_tokens
    assert prompt_len <= 256 and 512 <= prompt_len + 400 < 512 + 256
    after = metrics(server)

    def delta(name: str) -> float:
        return after.get(name, 0) - before.get(name, 0)

    assert delta("vllm:snapkv_decode_compressions_total") == 1
    assert delta("vllm:snapkv_decode_evicted_tokens_total") == 512 - 256
    assert delta("vllm:snapkv_decode_freed_blocks_total") == cdiv(512, 128) - cdiv(256, 128)
    assert delta("vllm:snapkv_compressed_requests_total") == 0  # the prompt was not compressed


def test_lora_request_is_compressed_with_the_adapters_queries_and_keys(
    client, server, server_dump_dir, model_dir, lora_dir
):
    """A completion for the adapter's served name (``--lora-modules``) is compressed, and its
    kept positions are the transformers+peft reference's with that adapter in every layer and
    KV head. Without the adapter the reference keeps over 1 % other positions in 88 of the 90
    heads (measured on this prompt), so base-model scores would fail here; that the adapter
    builder makes adapters that matter is asserted in tests/test_lora.py."""
    from transformers import AutoTokenizer

    assert LORA_NAME in [model.id for model in client.models.list().data]
    prompt_ids = prompt_of_length(AutoTokenizer.from_pretrained(model_dir), 1000, 27182)
    before_dumps = set(glob.glob(os.path.join(server_dump_dir, "*.pt")))
    before = metrics(server)
    reply = client.completions.create(
        model=LORA_NAME, prompt=prompt_ids, max_tokens=8, temperature=0
    )
    assert reply.usage.prompt_tokens == len(prompt_ids)
    assert metrics(server)["vllm:snapkv_compressed_requests_total"] == (
        before["vllm:snapkv_compressed_requests_total"] + 1
    )
    (path,) = set(glob.glob(os.path.join(server_dump_dir, "*.pt"))) - before_dumps
    dump = torch.load(path)
    assert dump["prompt_len"] == len(prompt_ids) and sorted(dump["layers"]) == list(range(30))
    reference = reference_kept_positions_for(
        model_dir, prompt_ids, SERVER_BUDGET, 32, lora_dir=lora_dir
    )
    for layer, kept in dump["layers"].items():
        for head in range(kept.shape[0]):
            overlap = len(set(kept[head].tolist()) & reference[layer][head]) / SERVER_BUDGET
            assert overlap >= 0.99, (layer, head, overlap)


def _usage_while_streaming(client, server, prompt: str, xargs: dict) -> float:
    stream = client.completions.create(
        model=MODEL_NAME, prompt=prompt, max_tokens=64, temperature=0, stream=True,
        extra_body={"vllm_xargs": xargs},
    )
    usage = None
    for index, _ in enumerate(stream):
        if index == 8:
            usage = metrics(server)["vllm:kv_cache_usage_perc"]
    assert usage is not None
    return usage


def test_kv_cache_usage_is_lower_while_a_compressed_request_decodes(client, server):
    prompt = passkey_prompt(4000, 57721, 0.5)
    compressed = _usage_while_streaming(client, server, prompt, {"snapkv_budget": 256})
    full = _usage_while_streaming(client, server, prompt, {"kv_compression": "none"})
    assert 0 < compressed < full / 4


@pytest.mark.parametrize(
    "xargs,field",
    [
        ({"snapkv_budget": 100000}, "snapkv_budget"),
        ({"snapkv_budget": 8}, "snapkv_budget"),
        ({"kv_compression": "zip"}, "kv_compression"),
        # Fuzzing through HTTP: what JSON can carry.
        ({"snapkv_budget": -1}, "snapkv_budget"),
        ({"snapkv_budget": 10**40}, "snapkv_budget"),
        ({"snapkv_budget": 256.5}, "snapkv_budget"),
        ({"snapkv_budget": True}, "snapkv_budget"),
        ({"snapkv_budget": ""}, "snapkv_budget"),
        ({"snapkv_budget": "9" * 5000}, "snapkv_budget"),
        ({"snapkv_budget": [256]}, "snapkv_budget"),
        ({"snapkv_budget": {"nested": 256}}, "snapkv_budget"),
        ({"kv_compression": ["none"]}, "kv_compression"),
        ({"kv_compression": None}, "kv_compression"),
        ({"snapkv_bugdet": 256}, "snapkv_bugdet"),
        ({"snapkv_dump_selections_to": "/tmp/x"}, "snapkv_dump_selections_to"),
    ],
)
def test_bad_request_gets_400_naming_the_field_and_server_keeps_serving(client, xargs, field):
    import openai

    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(
            model=MODEL_NAME, prompt="Hello", max_tokens=4, extra_body={"vllm_xargs": xargs}
        )
    assert error.value.status_code == 400
    assert field in str(error.value)
    ok = client.completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=4)
    assert ok.choices[0].text


@pytest.mark.parametrize(
    "xargs",
    [{"kv_compression": "snapkv"}, {"other_plugin_key": 7, "my_flag": "x"}, {}],
)
def test_server_setting_and_other_plugins_keys_are_accepted(client, server, xargs):
    before = metrics(server)
    reply = client.completions.create(
        model=MODEL_NAME, prompt=passkey_prompt(1500, 16180, 0.5), max_tokens=8, temperature=0,
        extra_body={"vllm_xargs": xargs},
    )
    assert "16180" in reply.choices[0].text
    assert metrics(server)["vllm:snapkv_compressed_requests_total"] == (
        before["vllm:snapkv_compressed_requests_total"] + 1
    )


@pytest.mark.parametrize(
    "flags,named",
    [
        # One of each way out: a value the config rejects (raised in from_cli_args) and a choice
        # argparse rejects. Every flag's message is asserted in-process in test_cli.py, through
        # the same parser and from_cli_args; a real process per flag only repeated the import.
        (["--kv-compression", "snapkv", "--snapkv-budget", "8"], "--snapkv-budget"),
        (["--kv-compression", "snapkv", "--snapkv-pooling", "median"], "--snapkv-pooling"),
    ],
)
def test_invalid_flag_makes_the_server_exit_naming_it(model_dir, flags, named):
    result = subprocess.run(
        server_args(model_dir, free_port(), *flags),
        capture_output=True, text=True, timeout=300, env=server_env(),
    )
    assert result.returncode != 0
    assert named in result.stderr + result.stdout


def test_yaml_config_file_sets_the_same_settings(tmp_path):
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    config = tmp_path / "serve.yaml"
    config.write_text(
        "kv-compression: snapkv\nsnapkv-budget: 768\nsnapkv-window-size: 16\n"
        "snapkv-pooling: avg\n"
    )
    parser = make_arg_parser(FlexibleArgumentParser())
    args = parser.parse_args(["serve", "some/model", "--config", str(config)][1:])
    engine_args = AsyncEngineArgs.from_cli_args(args)
    assert engine_args.additional_config["kv_compression"] == {
        "method": "snapkv", "budget": 768, "window_size": 16, "pooling": "avg"
    }
