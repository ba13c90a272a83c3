"""Decode-time SnapKV reference on transformers, independent of the plugin's code path.

The rule (docs/algorithm.md, "Compressing while decoding"), applied to a Llama model stepped one
token at a time with a ``DynamicCache``:

- the prompt is compressed to ``budget`` at the end of its prefill when that frees a block of
  ``block_size`` (rule 1), scored by the last ``window`` prompt queries;
- every time a forward leaves ``threshold = max(budget + interval, ceil(budget / bs) * bs + 1)``
  entries per KV head in the cache, they are compressed back to ``budget``: the queries of the
  last ``window`` tokens (post-RoPE, captured as each token is computed) score the stored keys
  with the same pooling/GQA/top-k rule as the prompt, and the window is always kept;
- the logits of that forward come from the cache before the compression; RoPE positions stay
  logical (``position_ids`` count every token), only the cache shrinks.

``run`` generates greedily, or scores a forced continuation (teacher forcing) and returns the
log-probability of every forced token, and reports each compression's kept positions as logical
token positions per layer and KV head.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from benchmarks.quality.reference import post_rope_capture


@dataclass
class Compression:
    """One compression: ``window_end`` is the logical position after its window's last token;
    ``kept[layer]`` the logical positions kept per KV head, ``[H_kv, budget]``, ascending;
    ``kept_entries[layer]`` the same as indices of the entries the cache held before it."""

    phase: str
    window_end: int
    kept: dict[int, torch.Tensor]
    kept_entries: dict[int, torch.Tensor]


@dataclass
class DecodeRun:
    tokens: list[int]
    compressions: list[Compression] = field(default_factory=list)
    #: Per step, the number of entries per KV head the cache held after it.
    cache_lengths: list[int] = field(default_factory=list)
    #: Teacher forcing: log p(forced token | everything before) for each forced token, and the
    #: greedy pick at each step.
    forced_log_probs: list[float] = field(default_factory=list)
    argmax: list[int] = field(default_factory=list)


def snapkv_kept(q_win: torch.Tensor, keys: torch.Tensor, budget: int, kernel_size: int) -> torch.Tensor:
    """``q_win [H_q, W, D]`` (the last W entries' queries), ``keys [H_kv, N, D]`` -> kept entry
    indices ``[H_kv, budget]``, ascending. Plain float32, written out per head."""
    num_q, window, dim = q_win.shape
    num_kv, length, _ = keys.shape
    group = num_q // num_kv
    prefix = length - window
    logits = torch.einsum("hwd,hld->hwl", q_win.float(), keys.float().repeat_interleave(group, 0))
    logits = logits / dim**0.5
    query_pos = prefix + torch.arange(window)
    logits = logits.masked_fill(torch.arange(length)[None, :] > query_pos[:, None], -torch.inf)
    scores = logits.softmax(-1)[:, :, :prefix].sum(1)
    pooled = F.max_pool1d(scores[:, None], kernel_size, 1, kernel_size // 2)[:, 0]
    per_kv = pooled.view(num_kv, group, prefix).mean(1)
    # Ties (max pooling plateaus): the earlier entry wins, as in the plugin.
    top = per_kv.sort(dim=-1, descending=True, stable=True).indices[:, : budget - window]
    window_entries = torch.arange(prefix, length).expand(num_kv, -1)
    return torch.cat([top, window_entries], 1).sort(-1).values


class DecodeSnapKVReference:
    def __init__(
        self,
        model_dir: str,
        budget: int,
        window_size: int = 32,
        decode_interval: int = 0,
        kernel_size: int = 7,
        block_size: int = 128,
        lora_dir: str | None = None,
    ):
        """``lora_dir``: a peft LoRA adapter the model runs with (queries and keys are then the
        adapted projections')."""
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32, attn_implementation="sdpa"
        ).eval()
        if lora_dir is not None:
            import peft

            self.model = peft.PeftModel.from_pretrained(self.model, lora_dir).eval()
        self.budget, self.window, self.kernel_size = budget, window_size, kernel_size
        self.block_size = block_size
        self.interval = decode_interval
        fits = -(-budget // block_size) * block_size + 1
        self.threshold = max(budget + decode_interval, fits) if decode_interval else None

    def _frees_a_block(self, length: int) -> bool:
        return -(-self.budget // self.block_size) < -(-length // self.block_size)

    def _forward(self, ids: list[int], positions: list[int], cache) -> tuple[torch.Tensor, list]:
        """Logits of the last token, and each layer's post-RoPE queries ``[H_q, T, D]``."""
        import transformers.models.llama.modeling_llama as llama

        window = self.window

        def window_queries(q, k):
            return q[0, :, -window:].clone()

        with post_rope_capture(llama, window_queries) as queries, torch.no_grad():
            out = self.model(
                torch.tensor([ids]),
                position_ids=torch.tensor([positions]),
                past_key_values=cache,
                use_cache=True,
            )
        return out.logits[0, -1], queries

    def _compress(self, cache, windows: list[torch.Tensor], logical: list[torch.Tensor]):
        """Compress every layer of ``cache`` to ``budget`` entries; returns the kept logical
        positions and entry indices per layer (``logical`` is updated in place)."""
        kept_positions, kept_entries = {}, {}
        for layer, q_win in enumerate(windows):
            cached = cache.layers[layer]
            kept = snapkv_kept(q_win, cached.keys[0], self.budget, self.kernel_size)
            index = kept[None, :, :, None].expand(-1, -1, -1, cached.keys.shape[-1])
            cached.keys = cached.keys.gather(2, index).contiguous()
            cached.values = cached.values.gather(2, index).contiguous()
            logical[layer] = logical[layer].gather(1, kept)
            kept_positions[layer] = logical[layer].clone()
            kept_entries[layer] = kept
        return kept_positions, kept_entries

    def run(
        self,
        prompt_ids: list[int],
        max_new_tokens: int,
        forced: list[int] | None = None,
        stop_token_ids: set[int] = frozenset(),
    ) -> DecodeRun:
        """Greedy generation (or the forced continuation ``forced``) with SnapKV at the prompt's
        end and, with ``decode_interval``, every time the cache reaches the threshold."""
        from transformers import DynamicCache

        cache = DynamicCache()
        length = len(prompt_ids)
        logits, queries = self._forward(prompt_ids, list(range(length)), cache)
        num_kv = cache.layers[0].keys.shape[1]
        logical = [torch.arange(length).expand(num_kv, -1).clone() for _ in queries]
        # Per layer, the queries of the last `window` entries the cache holds.
        windows = [q.clone() for q in queries]
        run = DecodeRun(tokens=[])
        if length > self.budget and self._frees_a_block(length):
            kept = self._compress(cache, windows, logical)
            run.compressions.append(Compression("prompt", length, *kept))
        position = length
        for step in range(max_new_tokens):
            log_probs = logits.log_softmax(-1)
            run.argmax.append(int(logits.argmax()))
            token = forced[step] if forced is not None else run.argmax[-1]
            if forced is not None:
                run.forced_log_probs.append(float(log_probs[token]))
            run.tokens.append(token)
            if token in stop_token_ids or step == max_new_tokens - 1:
                break
            logits, queries = self._forward([token], [position], cache)
            position += 1
            for layer, query in enumerate(queries):
                windows[layer] = torch.cat([windows[layer], query], dim=1)[:, -self.window :]
                logical[layer] = torch.cat(
                    [logical[layer], torch.full((num_kv, 1), position - 1)], dim=1
                )
            stored = cache.layers[0].keys.shape[2]
            if self.threshold is not None and stored >= self.threshold:
                kept = self._compress(cache, windows, logical)
                run.compressions.append(Compression("decode", position, *kept))
            run.cache_lengths.append(cache.layers[0].keys.shape[2])
        return run
