"""kvpress's SnapKVPress on the very RULER samples the plugin answered (``samples.jsonl`` from
``ruler_eval.py``), for a per-sample comparison. Runs in kvpress's own virtualenv
(``.venv-kvpress``, ``scripts/setup --bench``: kvpress 0.5.5 needs transformers<5.3).

    .venv-kvpress/bin/python -m benchmarks.quality.ruler_kvpress --model MODEL_DIR \\
        --samples DIR/samples.jsonl --budgets 1024,512,256 --out DIR/kvpress.jsonl

Set up like the plugin, so that only the two implementations differ:

- the same token ids (the server's ``/tokenize`` of the prompt lm_eval sent), no chat template;
- the question inside the compressed context (the plugin compresses the whole prompt): the press
  hooks the prefill of the whole prompt, and the first token is sampled from that prefill's
  full-cache logits, as the plugin samples it;
- exactly ``C`` entries per KV head (``compression_ratio = 1 - (C + 0.5) / L``, so kvpress's
  ``int(L * (1 - ratio))`` is ``C``; checked), window and pooling kernel as the plugin's, and the
  plugin's rule 1 (a prompt is compressed only if that frees a block);
- greedy decoding at the logical positions ``L, L + 1, ...`` (kvpress's pipeline does the same),
  stopping at the model's EOS tokens and at lm_eval's stop strings, as the server does.

On a hybrid model (``config.layer_types``, e.g. Gemma 3) the press hooks only the full-attention
layers, as the plugin compresses only those (sliding-window layers keep their window). kvpress
does the same for ``Gemma3ForConditionalGeneration`` but not for the text-only
``Gemma3ForCausalLM``, where it would compress the sliding layers too.

What stays different is kvpress's own scoring: average pooling over positions (kvpress has no
max pooling; the plugin's default, the paper's, is max), window scores averaged rather than
summed (same ranking), ``topk`` rather than a stable sort among equal scores; and transformers'
attention kernels instead of vLLM's (measured by the ``full`` mode: both sides keep every entry).
``--presses snapkv-maxpool`` adds kvpress's SnapKVPress with max pooling, which isolates the
first one.

``--presses criticalkv,chunkkv`` adds kvpress's other presses that keep the same number of entries
in every KV head (equal per-head memory, the plugin's constraint), each on kvpress's own
SnapKVPress: ``CriticalKVPress`` (exactly ``C``: half by SnapKV's score, the rest by that score
times the L1 norm of the value projected through ``o_proj``) and ``ChunkKVPress`` (whole chunks of
``--chunk-length`` positions, the same chunks for every head of a layer, ranked by the score summed
over heads: at most ``C``, more than ``C - chunk_length``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from kvpress import ChunkKVPress, CriticalKVPress, SnapKVPress
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from vllm_snapkv.plan import frees_blocks


@dataclass
class MaxPoolSnapKVPress(SnapKVPress):
    """kvpress's SnapKVPress with max instead of average pooling over positions (the paper's
    pooling and the plugin's default): the window attention is kvpress's own."""

    def score(self, module, hidden_states, keys, values, attentions, kwargs) -> torch.Tensor:
        bsz, num_kv_heads, k_len, _ = keys.shape
        group = module.config.num_attention_heads // num_kv_heads
        weights = self.compute_window_attention(
            module, hidden_states, keys, self.window_size, kwargs["position_embeddings"]
        )
        scores = F.max_pool1d(weights.mean(dim=-2), kernel_size=self.kernel_size,
                              padding=self.kernel_size // 2, stride=1)
        scores = scores.view(bsz, num_kv_heads, group, k_len - self.window_size).mean(2)
        return F.pad(scores, (0, self.window_size), value=scores.max().item() + 1)


def build_press(name: str, prompt_len: int, budget: int, window_size: int, kernel_size: int,
                chunk_length: int):
    """kvpress's press ``name`` set to keep ``budget`` entries per KV head of ``prompt_len``."""
    ratio = compression_ratio(prompt_len, budget)
    pooling = MaxPoolSnapKVPress if name == "snapkv-maxpool" else SnapKVPress
    snapkv = pooling(compression_ratio=ratio, window_size=window_size, kernel_size=kernel_size)
    if name in ("snapkv", "snapkv-maxpool"):
        return snapkv
    if name == "criticalkv":
        return CriticalKVPress(press=snapkv)
    if name == "chunkkv":
        # ChunkKVPress keeps int(chunks * (1 - ratio)) whole chunks: budget // chunk_length.
        chunks = -(-prompt_len // chunk_length)
        snapkv.compression_ratio = 1 - (budget // chunk_length + 0.5) / chunks
        return ChunkKVPress(press=snapkv, chunk_length=chunk_length)
    raise ValueError(f"unknown press {name!r}")


PRESSES = ("snapkv", "snapkv-maxpool", "criticalkv", "chunkkv")


@contextlib.contextmanager
def press_full_attention_layers(press, model):
    """``press(model)``, its hooks on the full-attention layers only when the model names its
    layer types (kvpress hooks every layer it finds in ``model.model.layers`` at entry)."""
    types = getattr(model.config, "layer_types", None)
    layers = model.model.layers
    if types is not None:
        model.model.layers = torch.nn.ModuleList(
            [layer for layer, kind in zip(layers, types) if kind == "full_attention"])
    context = press(model)
    try:
        context.__enter__()
    finally:
        model.model.layers = layers
    try:
        yield
    finally:
        context.__exit__(None, None, None)


def compression_ratio(prompt_len: int, budget: int) -> float:
    """The ratio at which kvpress keeps exactly ``budget`` entries of ``prompt_len``."""
    return 1 - (budget + 0.5) / prompt_len


def mode_name(budget: int | None, press: str) -> str:
    """The row's mode: ``full``, ``snapkv-512`` (kvpress's SnapKVPress), ``snapkv-512-maxpool``,
    ``criticalkv-512``, ``chunkkv-512``."""
    if budget is None:
        return "full"
    if press == "snapkv-maxpool":
        return f"snapkv-{budget}-maxpool"
    return f"{press}-{budget}"


def kept_as_asked(press: str, kept: int, budget: int, chunk_length: int) -> bool:
    if press == "chunkkv":  # whole chunks; the last, partial one may be among them
        return budget - chunk_length < kept <= budget
    return kept == budget


@torch.inference_mode()
def generate(model, tokenizer, prompt_ids: list[int], press, max_tokens: int,
             stop: list[str], eos: set[int]) -> tuple[str, int]:
    """Greedy completion and the entries per KV head the cache kept after the prefill."""
    ids = torch.tensor([prompt_ids])
    cache = DynamicCache()
    with (press_full_attention_layers(press, model) if press is not None
          else contextlib.nullcontext()):
        # Attention runs over the full prompt; the press compresses afterwards (forward hook):
        # the first token comes from full-cache logits, as in the plugin.
        logits = model(input_ids=ids, past_key_values=cache, logits_to_keep=1).logits
    types = getattr(model.config, "layer_types", None) or ["full_attention"]
    kept = cache.get_seq_length(types.index("full_attention"))  # a sliding layer keeps its window
    generated: list[int] = []
    token = int(logits[0, -1].argmax())
    for step in range(max_tokens):
        if token in eos:
            break
        generated.append(token)
        text = tokenizer.decode(generated, skip_special_tokens=True)
        if any(s in text for s in stop) or step == max_tokens - 1:
            break
        position = torch.tensor([[len(prompt_ids) + step]])
        logits = model(input_ids=torch.tensor([[token]]), past_key_values=cache,
                       position_ids=position).logits
        token = int(logits[0, -1].argmax())
    text = tokenizer.decode(generated, skip_special_tokens=True)
    for s in stop:
        text = text.split(s)[0] if s else text
    return text, kept


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="Hugging Face model folder")
    parser.add_argument("--samples", type=Path, required=True, help="ruler_eval's samples.jsonl")
    parser.add_argument("--budgets", required=True, help="entries per KV head, comma-separated")
    parser.add_argument("--skip-full", action="store_true",
                        help="no full-cache completion (by default each sample has one)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the rows --out holds and add only the missing ones")
    parser.add_argument("--window-size", type=int, default=32)
    parser.add_argument("--kernel-size", type=int, default=7)
    parser.add_argument("--presses", default="snapkv",
                        help=f"kvpress presses at every budget, comma-separated: {', '.join(PRESSES)}"
                        " (snapkv: kvpress's SnapKVPress; snapkv-maxpool: with max pooling)")
    parser.add_argument("--chunk-length", type=int, default=16,
                        help="chunkkv's chunk (16: the plugin's chunk rule's)")
    parser.add_argument("--tasks", default=None, help="only these tasks of --samples")
    parser.add_argument("--block-size", type=int, default=128, help="the server's (rule 1)")
    parser.add_argument("--limit", type=int, default=None, help="samples per task (first N)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", type=Path, required=True)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(os.cpu_count() or 1)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(
        args.model, dtype=getattr(torch, args.dtype), attn_implementation="sdpa"
    ).eval()
    if getattr(model.config, "head_dim", None) is None:
        # kvpress 0.5.5's CriticalKVPress reads config.head_dim, which Qwen2's config does not
        # define; transformers' Qwen2 attention uses hidden_size // num_attention_heads instead.
        model.config.head_dim = model.config.hidden_size // model.config.num_attention_heads
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}
    budgets = [int(b) for b in args.budgets.split(",") if b]  # none: --kvpress-modes full
    presses = args.presses.split(",")
    for name in presses:
        if name not in PRESSES:
            raise SystemExit(f"--presses: unknown press {name!r}; choose from {', '.join(PRESSES)}")
    tasks = None if args.tasks is None else set(args.tasks.split(","))
    samples = [json.loads(line) for line in open(args.samples)]
    per_task: dict[str, int] = {}
    done = set()
    if args.resume and args.out.exists():
        done = {(r["task"], r["doc_id"], r["mode"]) for r in map(json.loads, open(args.out))}
    # A row per completion as it is made: a stopped run keeps them (and --resume goes on).
    out = open(args.out, "a" if args.resume else "w")
    for sample in samples:
        if tasks is not None and sample["task"] not in tasks:
            continue
        per_task[sample["task"]] = per_task.get(sample["task"], 0) + 1
        if args.limit is not None and per_task[sample["task"]] > args.limit:
            continue
        length = sample["prompt_tokens"]
        modes = [] if args.skip_full else [(None, "snapkv")]
        modes += [(b, name) for b in budgets for name in presses]
        for budget, name in modes:
            if (sample["task"], sample["doc_id"], mode_name(budget, name)) in done:
                continue
            press = None
            if budget is not None and frees_blocks(length, budget, 0, args.block_size):
                press = build_press(name, length, budget, args.window_size, args.kernel_size,
                                    args.chunk_length)
            began = time.monotonic()
            text, kept = generate(model, tokenizer, sample["prompt_token_ids"], press,
                                  sample["max_tokens"], sample["stop"], eos)
            if press is not None and not kept_as_asked(name, kept, budget, args.chunk_length):
                raise RuntimeError(f"kvpress {name} kept {kept} entries, not {budget} "
                                   f"({length} tokens)")
            row = {
                "task": sample["task"], "doc_id": sample["doc_id"],
                "mode": mode_name(budget, name), "text": text, "kept": kept,
                "prompt_tokens": length, "seconds": round(time.monotonic() - began, 2),
            }
            out.write(json.dumps(row) + "\n")
            out.flush()
            print(f"{row['task']} {row['doc_id']} {row['mode']}: {kept} kept, {row['seconds']} s",
                  flush=True)
    out.close()


if __name__ == "__main__":
    main()
