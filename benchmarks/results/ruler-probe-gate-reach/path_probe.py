"""Selection-level screen 3 (a probe record, not a benchmark; README here, "Screen 3"): the
prompts where ``snapkv-rare-tail-continuation``'s completions lost a needle that
``snapkv-rare-continuation``'s kept (Gemma 3's 3-task x 16 run, niah_single_2 docs 10 and 13, with
docs 2 and 15 where both failed), and Qwen's first multi-key prompt, for runs that go past the
short reach only through frequent tokens (``path``: the plugin's ``snapkv-rare-path-continuation``;
``pathT.8``: that with the tail rule's 0.8). Same measure as ``tail_probe.py``.

    P=benchmarks/results/ruler-probe-gate-reach
    .venv/bin/python $P/path_probe.py gemma-3-270m 256 ruler-snapkv-chunk-gemma-3-270m-4096 \\
        niah_single_2 16 2,10,13,15 > $P/gemma-path-1-16.txt
    .venv/bin/python $P/path_probe.py Qwen2.5-Coder-1.5B-Instruct 256 \\
        ruler-Qwen2.5-Coder-1.5B-Instruct-4096 niah_multikey_2 1 > $P/qwen-path-1-16.txt
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tail_probe  # noqa: E402

from vllm_snapkv.scoring import SnapKVRarePathContinuationScore  # noqa: E402

tail_probe.RULES = {
    "snapkv": "snapkv", "rare32": "snapkv-rare-continuation", "rare16": "snapkv-rare-long-continuation",
    "stepT.8": "snapkv-rare-tail-continuation", "path": "snapkv-rare-path-continuation",
    "pathT.8": type("PathTail", (SnapKVRarePathContinuationScore,), {"tail_decay": 0.8})(),
}

if __name__ == "__main__":
    tail_probe.main()
