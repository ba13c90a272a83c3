"""`vllm serve` subprocesses for the soak and server tests: start, wait for /health, read
/metrics, stop. Loopback only."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

#: Bytes of one 128-token KV block of the demo model in float32 (30 layers, 3 KV heads, head 64).
DEMO_BLOCK_BYTES = 30 * 3 * 128 * 2 * 64 * 4


def vllm_command() -> list[str]:
    """The `vllm` console script of this interpreter's environment."""
    script = Path(sys.executable).parent / "vllm"
    return [str(script)] if script.exists() else [shutil.which("vllm") or "vllm"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def demo_server_args(model_dir: str, port: int, name: str, kv_cache_bytes: int,
                     *extra: str, max_model_len: int = 8192) -> list[str]:
    return [
        *vllm_command(), "serve", model_dir, "--served-model-name", name,
        "--host", "127.0.0.1", "--port", str(port),
        "--dtype", "float32", "--max-model-len", str(max_model_len),
        "--gpu-memory-utilization", "0.3", "--kv-cache-memory-bytes", str(kv_cache_bytes),
        "--enforce-eager", *extra,
    ]


def server_env(without_plugin: bool = False) -> dict[str, str]:
    """The environment for a server process; ``without_plugin`` excludes vllm-snapkv the way a
    user would (``VLLM_PLUGINS`` is vLLM's allow-list of general plugins)."""
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    if without_plugin:
        env["VLLM_PLUGINS"] = ""
    return env


class ServerProcess:
    """One `vllm serve` process on 127.0.0.1, its log in ``log``."""

    def __init__(self, args: list[str], port: int, log: Path, env: dict[str, str]):
        self.port, self.log = port, log
        self.base = f"http://127.0.0.1:{port}"
        with open(log, "w") as log_file:
            # Own process group: stop() also reaches the engine-core child.
            self.process = subprocess.Popen(args, stdout=log_file, stderr=subprocess.STDOUT,
                                            env=env, start_new_session=True)

    def wait_healthy(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited {self.process.returncode}:\n{self.tail()}")
            if self.healthy():
                return
            time.sleep(2)
        self.stop()
        raise RuntimeError("server did not come up:\n" + self.tail())

    def healthy(self) -> bool:
        try:
            return urllib.request.urlopen(self.base + "/health", timeout=5).status == 200
        except OSError:
            return False

    def tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def metrics(self) -> dict[str, float]:
        return parse_metrics(urllib.request.urlopen(self.base + "/metrics", timeout=30).read().decode())

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def parse_metrics(text: str) -> dict[str, float]:
    """vLLM and SnapKV sample values summed over labels (histogram buckets keep their ``le``)."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        match = re.match(r"^(vllm:\w+)(\{[^}]*\})? (\S+)$", line)
        if match:
            name, labels, value = match.groups()
            if "le=" in (labels or ""):
                name += "{" + re.search(r'le="([^"]+)"', labels).group(1) + "}"
            values[name] = values.get(name, 0.0) + float(value)
    return values
