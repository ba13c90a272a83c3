"""The entry point: registered, idempotent, and inert unless compression is configured."""

from __future__ import annotations

import importlib.metadata

from vllm_snapkv import adapter
from vllm_snapkv.plugin import register


def test_registered_as_a_vllm_general_plugin():
    entry_points = importlib.metadata.entry_points(group="vllm.general_plugins")
    assert {(ep.name, ep.value) for ep in entry_points} >= {
        ("snapkv", "vllm_snapkv.plugin:register")
    }


def test_register_is_idempotent():
    register()
    first = {(owner, name): owner.__dict__[name] for owner, name, _ in adapter.all_patches()}
    register()
    register()
    for (owner, name), wrapper in first.items():
        assert owner.__dict__[name] is wrapper
        original = getattr(wrapper, "__vllm_snapkv_original__")
        assert not hasattr(original, "__vllm_snapkv_original__"), f"{name} wrapped twice"
    assert adapter.is_installed()
