"""``vllm.general_plugins`` entry point. vLLM calls it in every process it starts, before models,
schedulers or workers are built; the patches it installs stay inert unless compression is on."""

from __future__ import annotations


def register() -> None:
    from vllm_snapkv import adapter

    adapter.install()
