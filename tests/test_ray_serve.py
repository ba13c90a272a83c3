"""Ray Serve (deploy/ray-serve/app.py): two replicas, each a `vllm serve` child with SnapKV on,
behind Ray Serve's HTTP proxy. Answers equal to one in-process SnapKV engine's, both replicas
serving, SSE streaming, a bad per-request budget refused with 400, and the replicas' own SnapKV
metrics counting every request, each replica's samples labelled with its own ``replica``."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from benchmarks.servers import free_port, parse_metrics
from lanes import local_ray_cluster_slot
from vllm_snapkv.tasks import passkey_prompt

pytestmark = pytest.mark.engine

APP_DIR = Path(__file__).resolve().parent.parent / "deploy" / "ray-serve"
NAME = "smollm2-ray"
PASSKEYS = [34748 + 1111 * i for i in range(6)]
NUM_PASSKEYS = len(PASSKEYS)
BUDGET = 256  # the replicas' --snapkv-budget (app.py's default flags)


def pgrep(*args: str) -> set[int]:
    found = subprocess.run(["pgrep", *args], capture_output=True, text=True)
    return {int(pid) for pid in found.stdout.split()}


def our_process_groups() -> set[int]:
    """Process groups of this test's `vllm serve` children (each leads its own group, which
    holds its engine-core process too). Matched by served name: other vLLM servers may run."""
    return {os.getpgid(pid) for pid in pgrep("-f", f"vllm serve .*--served-model-name {NAME} ")
            if _alive(pid)}


def _alive(pid: int) -> bool:
    try:
        os.getpgid(pid)
        return True
    except ProcessLookupError:
        return False


def http(method: str, url: str, body: dict | None = None, timeout: float = 300):
    """(status, headers, body text) of one request; HTTP errors are returned, not raised."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.headers, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read().decode()


def passkey_request(key: int) -> str:
    return passkey_prompt(1500, key, 0.5)


@pytest.fixture(scope="module")
def reference_answers(snap_llm) -> list[str]:
    """The same requests on the session's in-process SnapKV engine, before Ray starts. (The
    demo model misreads some keys at this budget, e.g. 34748 -> 3478, Ray or not: the replicas
    must answer what one engine answers, right or wrong.)"""
    from conftest import greedy

    outputs = snap_llm.generate([passkey_request(k) for k in PASSKEYS], greedy(BUDGET, 8))
    return [output.outputs[0].text for output in outputs]


def replica_cores() -> list[str]:
    """A core per replica; in a test lane (tests/lanes.py), the lane's own core(s) for both.
    Ray runs its workers at niceness 15 and the replicas' vLLM children inherit it: a replica
    bound to the other lane's core got a few percent of it beside that lane's engine (4 minutes
    to start its worker, past the 300 s start timeout, then a restart)."""
    lane = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
    return [lane, lane] if lane else ["0", "1"]


@pytest.fixture(scope="module")
def serve_app(model_dir: str):
    with local_ray_cluster_slot():
        yield from serve_app_on_a_local_cluster(model_dir)


def serve_app_on_a_local_cluster(model_dir: str):
    import ray
    from ray import serve

    groups: set[int] = set()
    # The replicas import `app` from APP_DIR: Ray puts the driver's current directory on its
    # workers' sys.path (what `cd deploy/ray-serve && serve run config.yaml` relies on).
    cwd = os.getcwd()
    os.chdir(APP_DIR)
    sys.path.insert(0, str(APP_DIR))
    try:
        # address="local": a new cluster, never one someone started with `ray start`.
        ray.init(address="local", num_cpus=2, include_dashboard=False,
                 object_store_memory=200 * 2**20, log_to_driver=False)
    finally:
        os.chdir(cwd)
    try:
        import app as ray_serve_app

        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(
            ray_serve_app.build_app({
                "model": model_dir,
                "served_model_name": NAME,
                "num_replicas": 2,
                # Ray Serve's router picks by cached queue lengths, which may be stale or tied:
                # CI once saw all six concurrent passkeys on one replica. At half of them per
                # replica, a replica at capacity refuses the rest and the router sends them to
                # the other one, so both serve by construction, not by chance.
                "max_ongoing_requests": NUM_PASSKEYS // 2,
                "omp_threads_bind_per_replica": replica_cores(),
            }),
            name="snapkv", route_prefix="/",
        )
        groups = our_process_groups()
        assert len(groups) == 2, groups
        yield f"http://127.0.0.1:{port}"
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            sys.path.remove(str(APP_DIR))
            sys.modules.pop("app", None)
    # Replica shutdown (__del__) stopped each child's whole group: server and engine core.
    deadline, left = time.monotonic() + 60, groups
    while left and time.monotonic() < deadline:
        left = {group for group in left if pgrep("-g", str(group))}
        if left:
            time.sleep(1)
    assert not left, f"vllm processes left behind in groups {left}"


def replica_metrics(base: str) -> dict[str, dict[str, float]]:
    """Each replica's vLLM metrics, by replica id (/metrics answers for whichever replica Ray
    Serve picks: poll until both have answered). Every sample of a scrape carries that replica's
    own ``replica`` label (both vLLM children call themselves engine="0")."""
    seen: dict[str, dict[str, float]] = {}
    for _ in range(100):
        status, headers, text = http("GET", base + "/metrics")
        assert status == 200
        replica = headers["x-replica"]
        samples = [line for line in text.splitlines() if line and not line.startswith("#")]
        assert samples
        labelled = [line for line in samples if f'replica="{replica}"' in line.split(" ")[0]]
        assert labelled == samples, [line for line in samples if line not in labelled][:3]
        seen.setdefault(replica, parse_metrics(text))
        if len(seen) == 2:
            return seen
    pytest.fail(f"/metrics reached only replicas {sorted(seen)}")


def test_two_replicas_serve_compressed_passkeys_and_stream(reference_answers, serve_app):
    base = serve_app
    status, headers, text = http("GET", base + "/v1/models")
    assert status == 200 and NAME in [m["id"] for m in json.loads(text)["data"]]
    assert headers["x-replica"]
    before = replica_metrics(base)

    keys = PASSKEYS

    def ask(key: int):
        return http("POST", base + "/v1/completions", {
            "model": NAME, "prompt": passkey_request(key),
            "max_tokens": 8, "temperature": 0,
        })

    with ThreadPoolExecutor(NUM_PASSKEYS) as pool:
        replies = list(pool.map(ask, keys))
    replicas = set()
    for (status, headers, text) in replies:
        assert status == 200, text
        replicas.add(headers["x-replica"])
    assert [json.loads(text)["choices"][0]["text"] for _, _, text in replies] == reference_answers
    assert all(answer.strip() for answer in reference_answers)
    assert len(replicas) == 2, replicas

    # Streaming: Server-Sent Events through the proxy. A short prompt, below the budget: not
    # compressed, so the count below is the passkeys'.
    request = urllib.request.Request(
        base + "/v1/completions", headers={"Content-Type": "application/json"},
        data=json.dumps({"model": NAME, "prompt": "Count: 1, 2, 3,", "max_tokens": 8,
                         "temperature": 0, "stream": True}).encode(),
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.read().decode().splitlines() if line]
    assert len(events) >= 3 and all(line.startswith("data: ") for line in events)
    assert events[-1] == "data: [DONE]"
    assert "".join(json.loads(e[6:])["choices"][0]["text"] for e in events[:-1])

    # A per-request budget below the window: refused by the replica's vLLM server, named.
    status, _, text = http("POST", base + "/v1/completions", {
        "model": NAME, "prompt": "Hello", "max_tokens": 4,
        "vllm_xargs": {"snapkv_budget": 3},
    })
    assert status == 400 and "snapkv_budget" in text, (status, text)

    # Compression happened in the replicas: their own counters, summed.
    after = replica_metrics(base)
    assert sorted(after) == sorted(before)
    name = "vllm:snapkv_compressed_requests_total"
    compressed = sum(after[r].get(name, 0.0) - before[r].get(name, 0.0) for r in after)
    assert compressed == NUM_PASSKEYS
    assert all(after[r].get(name, 0.0) > before[r].get(name, 0.0) for r in after)


def test_metrics_label_adds_the_replica_to_every_sample():
    sys.path.insert(0, str(APP_DIR))
    try:
        from app import label_samples
    finally:
        sys.path.remove(str(APP_DIR))
        sys.modules.pop("app", None)
    exposition = "\n".join([
        "# HELP vllm:snapkv_compressed_requests_total Requests compressed.",
        "# TYPE vllm:snapkv_compressed_requests_total counter",
        'vllm:snapkv_compressed_requests_total{engine="0",model_name="m"} 6.0',
        "process_open_fds 12.0",
        "empty_labels{} 1.0",
        'vllm:e2e_request_latency_seconds_bucket{le="0.3",engine="0"} 2.0 # {trace_id="a"} 0.2',
        "# EOF",
        "",
    ])
    assert label_samples(exposition, "replica", 'r"1').split("\n") == [
        "# HELP vllm:snapkv_compressed_requests_total Requests compressed.",
        "# TYPE vllm:snapkv_compressed_requests_total counter",
        'vllm:snapkv_compressed_requests_total{replica="r\\"1",engine="0",model_name="m"} 6.0',
        'process_open_fds{replica="r\\"1"} 12.0',
        'empty_labels{replica="r\\"1"} 1.0',
        'vllm:e2e_request_latency_seconds_bucket{replica="r\\"1",le="0.3",engine="0"} 2.0'
        ' # {trace_id="a"} 0.2',
        "# EOF",
        "",
    ]


def test_config_file_builds_the_application():
    import yaml
    from ray.serve import Application

    config = yaml.safe_load((APP_DIR / "config.yaml").read_text())
    # The file binds what the README's Ray Serve section tells users to open, loopback (the
    # replicas serve without an API key; opening it is the user's choice, see config.yaml).
    host, port = config["http_options"]["host"], config["http_options"]["port"]
    assert host == "127.0.0.1"
    readme = (APP_DIR.parent.parent / "README.md").read_text()
    section = readme[readme.index("### Ray Serve"):]
    section = section[: section.index("\n## ")]
    assert set(re.findall(r"http://([\d.]+:\d+)", section)) == {f"{host}:{port}"}
    (application,) = config["applications"]
    assert application["import_path"] == "app:build_app" and application["route_prefix"] == "/"
    sys.path.insert(0, str(APP_DIR))
    try:
        import app as ray_serve_app

        # build_app refuses unknown arguments: every key in the file is one it reads.
        assert isinstance(ray_serve_app.build_app(application["args"]), Application)
    finally:
        sys.path.remove(str(APP_DIR))
        sys.modules.pop("app", None)
