"""Ray Serve application: the demo model with SnapKV on, behind Ray Serve, N replicas.

Ray Serve LLM (``ray.serve.llm``) cannot be installed next to vLLM 0.32 (``ray[llm]==2.60.0`` pins
``vllm==0.29.0``), so this is the nearest configuration that runs: a plain Ray Serve deployment
(FastAPI ingress, route prefix ``/``) whose every replica runs vLLM's own OpenAI-compatible server
(``vllm serve``, mp executor, the plugin's ``--kv-compression snapkv`` flags) as a child process on
a free loopback port and forwards to it:

    GET  /health, /v1/models, /metrics (the replica's own vLLM metrics, SnapKV's included)
    POST /v1/completions, /v1/chat/completions ("stream": true -> Server-Sent Events, streamed)

Every response carries ``x-replica: <replica id>``. Clients use ``http://HOST:8000/v1`` as with
``vllm serve``. Ray Serve routes each request to one replica (power of two choices), /metrics
included: every replica's vLLM labels itself ``engine="0"``, so the proxy would hand a Prometheus
job one random replica's counters per scrape, jumping between them. /metrics therefore adds
``replica="<replica id>"`` to every sample: each replica's counters are their own series
(monotonic), and ``sum without (replica) (rate(...))`` adds the replicas up. A scrape still
returns one replica's series; ``rate`` over a range covering a few scrapes sees all of them.

Run it (this folder must be on the replicas' ``sys.path``; ``serve run`` adds its working
directory when it starts the local Ray cluster itself, or pass ``--working-dir``):

    cd deploy/ray-serve && serve run config.yaml
    # or from the repository root:
    serve run --working-dir deploy/ray-serve deploy/ray-serve/config.yaml
    # or without a config file, arguments as key=value:
    cd deploy/ray-serve && serve run app:build_app num_replicas=1

``build_app`` arguments (all optional): ``model`` (default: the demo model folder,
``python -m vllm_snapkv.demo_model``), ``served_model_name``, ``num_replicas``, ``vllm_args`` (extra
``vllm serve`` flags), ``env`` (variables for the vLLM child), ``omp_threads_bind_per_replica``
(list: replica of local rank r gets ``VLLM_CPU_OMP_THREADS_BIND`` = item r mod len),
``max_ongoing_requests``, ``startup_timeout_s``, ``num_cpus`` and ``num_gpus`` (Ray resources per
replica).

Resources: the replica actor only forwards HTTP; the work happens in its vLLM child, which Ray
does not account for. So a replica asks Ray for ``num_cpus`` = 0 by default: 2 replicas then fit on
a 2-core machine, whose CPUs the vLLM children share (bind them to separate cores with
``omp_threads_bind_per_replica: ["0", "1"]``). Ray starts its worker processes at niceness 15
(seen with Ray 2.60 here) and the vLLM child inherits it: on a node where other processes keep
the child's cores busy, it gets a small share of them (a replica beside another engine on its
core took 4 minutes to start its worker). On GPUs, give each replica ``num_gpus`` (e.g. the
child's tensor-parallel size) so Ray sets ``CUDA_VISIBLE_DEVICES`` for it; the child inherits it
(not run: no GPU here).

Child environment: the replica's environment (Ray's worker environment: the driver's, plus what
Ray sets) minus ``VLLM_ENABLE_V1_MULTIPROCESSING`` (the tests set it to 0 in-process; the server
must keep its engine-core process) and minus ``OMP_NUM_THREADS`` (Ray sets it to the actor's CPU
count, 1 for num_cpus=0, when the driver had none; vLLM's CPU build sizes its threads from the
binding instead), plus ``env``.

The child's output goes to ``vllm_<app>_<replica id>.log`` in the Ray session's serve log folder
(``/tmp/ray/session_latest/logs/serve/``), next to the replica's own log.

Lifetime: the child runs in its own process group. Ray Serve awaits the replica's ``__del__`` on
shutdown (``serve.shutdown()``, scale-down, redeploy): it sends SIGTERM to the group and SIGKILL
after 20 s. If the replica process dies without it, the child gets SIGTERM from the kernel
(``PR_SET_PDEATHSIG``) and stops its engine core. ``check_health`` fails once the child has
exited, so Ray Serve replaces the replica (and starts a new server).
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from ray import serve
from ray.serve import Application
from starlette.background import BackgroundTask

logger = logging.getLogger("ray.serve")

SERVED_MODEL_NAME = "SmolLM2-135M-Instruct"
#: SnapKV on, plus the CPU build's settings for the demo model (float32: bf16 gives garbage on CPU).
DEFAULT_VLLM_ARGS = [
    "--kv-compression", "snapkv", "--snapkv-budget", "256",
    "--dtype", "float32", "--max-model-len", "8192", "--enforce-eager",
    "--kv-cache-memory-bytes", "536870912", "--gpu-memory-utilization", "0.3",
]
#: Environment variables the vLLM child must not inherit from the replica.
DROPPED_ENV = ("VLLM_ENABLE_V1_MULTIPROCESSING", "OMP_NUM_THREADS")
#: Response headers not copied from the vLLM server (the ASGI server sets its own).
HOP_HEADERS = {"content-length", "transfer-encoding", "connection", "keep-alive", "date", "server"}
PR_SET_PDEATHSIG = 1

fastapi_app = FastAPI(title="vllm-snapkv on Ray Serve")


#: A Prometheus/OpenMetrics sample line: metric name, then its label set if it has one.
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{)?")


def label_samples(exposition: str, label: str, value: str) -> str:
    """Prometheus text (or OpenMetrics) with ``label="value"`` added to every sample's labels.
    Comment lines (``# HELP``, ``# TYPE``, ``# EOF``) and exemplars after a sample stay as they
    are; only the sample's own label set (right after its name) changes."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    pair = f'{label}="{escaped}"'
    lines = []
    for line in exposition.split("\n"):
        match = None if line.startswith("#") else _SAMPLE.match(line)
        if match is None:
            lines.append(line)
        elif match.group(2) is None:  # no labels: `name value`
            lines.append(f"{match.group(1)}{{{pair}}}{line[match.end():]}")
        else:
            rest = line[match.end():]
            separator = "" if rest.startswith("}") else ","
            lines.append(f"{match.group(1)}{{{pair}{separator}{rest}")
    return "\n".join(lines)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the replica process (its forking thread) dies."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass  # not Linux: __del__ remains


def _log_dir() -> Path:
    """The Ray session's serve log folder (next to the replica's own log), else a temp folder."""
    try:
        from ray._private.worker import _global_node

        folder = Path(_global_node.get_logs_dir_path()) / "serve"
        folder.mkdir(parents=True, exist_ok=True)
        return folder
    except Exception:  # private API: fall back
        return Path(tempfile.mkdtemp(prefix="vllm-snapkv-ray-serve-"))


def _vllm_script() -> str:
    script = Path(sys.executable).parent / "vllm"
    return str(script) if script.exists() else "vllm"


@serve.deployment(
    name="VLLMSnapKV",
    # The controller waits this long for __del__ (SIGTERM, up to 20 s, SIGKILL) before killing.
    graceful_shutdown_timeout_s=30,
    health_check_period_s=10,
)
@serve.ingress(fastapi_app)
class VLLMServer:
    """One `vllm serve` child per replica, proxied."""

    async def __init__(self, model: str, served_model_name: str, vllm_args: list[str],
                     env: dict[str, str], omp_threads_bind_per_replica: list[str] | None,
                     startup_timeout_s: float):
        context = serve.get_replica_context()
        self.replica_id = context.replica_id.unique_id
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        child_env = {k: v for k, v in os.environ.items() if k not in DROPPED_ENV}
        if omp_threads_bind_per_replica:
            rank = context.rank.local_rank if context.rank is not None else 0
            bind = omp_threads_bind_per_replica[rank % len(omp_threads_bind_per_replica)]
            child_env["VLLM_CPU_OMP_THREADS_BIND"] = bind
        child_env.update({k: str(v) for k, v in env.items()})
        args = [_vllm_script(), "serve", model, "--served-model-name", served_model_name,
                "--host", "127.0.0.1", "--port", str(self.port), *vllm_args]
        self.log = _log_dir() / f"vllm_{context.app_name}_{self.replica_id}.log"
        with open(self.log, "w") as log_file:
            # Own process group: __del__ reaches the engine-core process too.
            self.process = subprocess.Popen(
                args, stdout=log_file, stderr=subprocess.STDOUT, env=child_env,
                start_new_session=True, preexec_fn=_die_with_parent,
            )
        logger.info("replica %s: vllm serve pid %d on port %d, log %s",
                    self.replica_id, self.process.pid, self.port, self.log)
        self.client = httpx.AsyncClient(
            base_url=self.base, timeout=httpx.Timeout(None, connect=10.0),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=32),
        )
        try:
            await self._wait_healthy(startup_timeout_s)
        except BaseException:
            await self._stop_child()
            raise

    def _tail(self, chars: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    async def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"vllm serve exited {self.process.returncode} during start-up "
                    f"(log {self.log}):\n{self._tail()}"
                )
            try:
                if (await self.client.get("/health", timeout=5)).status_code == 200:
                    logger.info("replica %s: vllm serve is healthy", self.replica_id)
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(2)
        raise RuntimeError(f"vllm serve not healthy after {timeout} s (log {self.log}):\n"
                           + self._tail())

    async def _stop_child(self) -> None:
        process = getattr(self, "process", None)
        if process is None or process.poll() is not None:
            return
        logger.info("replica %s: stopping vllm serve (pid %d)", self.replica_id, process.pid)
        for sig, wait_s in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + wait_s
            while process.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            if process.poll() is not None:
                break
        try:
            os.killpg(process.pid, signal.SIGKILL)  # stragglers of the group (engine core)
        except ProcessLookupError:
            pass

    async def __del__(self):
        """Ray Serve awaits this on replica shutdown."""
        await self._stop_child()
        client = getattr(self, "client", None)
        if client is not None:
            await client.aclose()

    async def check_health(self) -> None:
        """Ray Serve calls this every health_check_period_s; raising marks the replica unhealthy
        (after 3 failures in a row) and Ray Serve replaces it."""
        if self.process.poll() is not None:
            raise RuntimeError(
                f"vllm serve (pid {self.process.pid}) exited {self.process.returncode}:\n"
                + self._tail(2000)
            )

    def _headers(self, upstream: httpx.Response) -> dict[str, str]:
        headers = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_HEADERS}
        headers["x-replica"] = self.replica_id
        return headers

    async def _forward(self, request: Request, path: str) -> Response:
        body = await request.body()
        headers = {k: v for k, v in request.headers.items()
                   if k.lower() in ("content-type", "accept", "authorization")}
        upstream_request = self.client.build_request(
            request.method, path, content=body, headers=headers, params=request.query_params
        )
        try:
            upstream = await self.client.send(upstream_request, stream=True)
        except httpx.HTTPError as error:
            return Response(f"vllm serve unreachable: {error!r}", status_code=502,
                            headers={"x-replica": self.replica_id})
        if upstream.headers.get("content-type", "").startswith("text/event-stream"):
            return StreamingResponse(
                upstream.aiter_raw(), status_code=upstream.status_code,
                headers=self._headers(upstream), background=BackgroundTask(upstream.aclose),
            )
        try:
            content = await upstream.aread()
        finally:
            await upstream.aclose()
        headers = self._headers(upstream)
        headers.pop("content-encoding", None)  # aread() decoded it
        return Response(content, status_code=upstream.status_code, headers=headers)

    @fastapi_app.get("/health")
    async def health(self, request: Request) -> Response:
        return await self._forward(request, "/health")

    @fastapi_app.get("/v1/models")
    async def models(self, request: Request) -> Response:
        return await self._forward(request, "/v1/models")

    @fastapi_app.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._forward(request, "/v1/completions")

    @fastapi_app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._forward(request, "/v1/chat/completions")

    @fastapi_app.get("/metrics")
    async def metrics(self, request: Request) -> Response:
        """This replica's vLLM metrics (Prometheus text), every sample labelled
        ``replica="<replica id>"`` (see the module docstring)."""
        response = await self._forward(request, "/metrics")
        if response.status_code != 200:
            return response
        text = label_samples(response.body.decode(), "replica", self.replica_id)
        headers = {k: v for k, v in response.headers.items() if k.lower() != "content-length"}
        return Response(text, status_code=200, headers=headers)


def build_app(args: dict[str, Any] | None = None) -> Application:
    """The application for ``serve run``/``serve deploy`` (``import_path: app:build_app``)."""
    args = dict(args or {})
    model = args.pop("model", None)
    if model is None:
        from vllm_snapkv.demo_model import build_demo_model

        model = str(build_demo_model())
    served_model_name = args.pop("served_model_name", SERVED_MODEL_NAME)
    num_replicas = int(args.pop("num_replicas", 2))
    vllm_args = args.pop("vllm_args", DEFAULT_VLLM_ARGS)
    if isinstance(vllm_args, str):  # `serve run app:build_app vllm_args="--a b"`
        vllm_args = vllm_args.split()
    env = args.pop("env", None) or {}
    omp_bind = args.pop("omp_threads_bind_per_replica", None)
    max_ongoing_requests = int(args.pop("max_ongoing_requests", 64))
    startup_timeout_s = float(args.pop("startup_timeout_s", 300))
    num_cpus = float(args.pop("num_cpus", 0))
    num_gpus = float(args.pop("num_gpus", 0))
    if args:
        raise ValueError(f"unknown build_app arguments: {sorted(args)}")
    return VLLMServer.options(
        num_replicas=num_replicas,
        max_ongoing_requests=max_ongoing_requests,
        ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus},
    ).bind(str(model), served_model_name, [str(a) for a in vllm_args], dict(env), omp_bind,
           startup_timeout_s)
