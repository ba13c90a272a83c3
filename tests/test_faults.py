"""Faults under load: the engine core dies while requests stream. With the plugin the API server
must do exactly what stock vLLM does (here: exit, failing the in-flight requests; never hang), so
a supervisor (compose's ``restart: unless-stopped``) restarts it; the restarted server compresses
again. No Docker engine runs here: the restart is the same command started again."""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor, wait

import pytest

from benchmarks.soak.run import MODEL_NAME, SoakRequest, send, start

pytestmark = pytest.mark.engine


def engine_core_of(server) -> int:
    import psutil

    for child in psutil.Process(server.process.pid).children(recursive=True):
        if "EngineCore" in child.name() or "EngineCore" in " ".join(child.cmdline()):
            return child.pid
    raise AssertionError("no EngineCore process under the API server")


def load(tokenizer, count: int) -> list[SoakRequest]:
    from benchmarks.soak.run import exact_prompt

    return [SoakRequest(index=i, kind="completion", prompt=exact_prompt(tokenizer, 900, 100 + i, 0.5),
                        stream=True, n=1, max_tokens=400, xargs={}) for i in range(4)]


def kill_engine_under_load(server, tokenizer) -> dict:
    import openai

    client = openai.OpenAI(base_url=server.base + "/v1", api_key="-", max_retries=0, timeout=120)
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(send, client, request) for request in load(tokenizer, 4)]
        time.sleep(8)  # prefills done, streams decoding
        os.kill(engine_core_of(server), signal.SIGKILL)
        killed = time.monotonic()
        done, pending = wait(futures, timeout=120)
    deadline = killed + 90
    while time.monotonic() < deadline and server.process.poll() is None and server.healthy():
        time.sleep(1)
    results = [future.result() for future in done]
    return {
        "requests_hung": len(pending),
        "requests_failed": sum(result.error is not None for result in results),
        "server": "exited" if server.process.poll() is not None
        else "unhealthy" if not server.healthy() else "healthy",
    }


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def test_engine_core_death_is_handled_as_stock_vllm_and_a_restart_serves_again(
    model_dir, tokenizer, tmp_path
):
    outcomes = {}
    for name, with_plugin in (("plain", False), ("snapkv", True)):
        server = start(model_dir, tmp_path, name, kv_blocks=40, with_plugin=with_plugin)
        try:
            server.wait_healthy()
            outcomes[name] = kill_engine_under_load(server, tokenizer)
        finally:
            server.stop()
    assert outcomes["snapkv"] == outcomes["plain"], outcomes
    assert outcomes["snapkv"]["requests_hung"] == 0
    assert outcomes["snapkv"]["server"] in ("exited", "unhealthy")

    # What compose's restart policy does: the same command again.
    import openai

    server = start(model_dir, tmp_path, "restarted", kv_blocks=40, with_plugin=True)
    try:
        server.wait_healthy()
        client = openai.OpenAI(base_url=server.base + "/v1", api_key="-", max_retries=0)
        from benchmarks.soak.run import exact_prompt

        reply = client.completions.create(model=MODEL_NAME, prompt=exact_prompt(
            tokenizer, 1000, 27182, 0.5), max_tokens=8, temperature=0)
        assert "27182" in reply.choices[0].text
        assert server.metrics()["vllm:snapkv_compressed_requests_total"] == 1
    finally:
        server.stop()
