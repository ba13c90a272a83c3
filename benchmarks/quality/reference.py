"""Dense SnapKV reference on transformers, independent of the plugin's code path.

One full forward per prompt (post-RoPE queries and keys captured from the Llama layers), the
first token from the full cache (rule 8), then for each budget: the selection computed here from
the captured tensors, a compressed ``DynamicCache`` built from the kept K/V, and greedy decoding
with logical position ids (L, L+1, ...) up to the stop token. Rule 1 uses vLLM's block size:
where compression would not free a block, the full cache decodes, as in the plugin.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import TypeVar

import torch
import torch.nn.functional as F

Captured = TypeVar("Captured")


@contextmanager
def post_rope_capture(
    modeling: ModuleType, keep: Callable[[torch.Tensor, torch.Tensor], Captured]
) -> Iterator[list[Captured]]:
    """Within the block, each call of ``modeling.apply_rotary_pos_emb`` (a transformers modeling
    module: llama, gemma3, ...) appends ``keep(q, k)`` of its post-RoPE ``[B, H, T, D]`` queries
    and keys to the yielded list, one entry per layer in forward order. transformers' own rotary
    code rotates them, so the references do not re-implement RoPE; the original function is back
    in place after the block, also on error."""
    captured: list[Captured] = []
    original = modeling.apply_rotary_pos_emb

    def capture(q, k, *args, **kwargs):
        q, k = original(q, k, *args, **kwargs)
        captured.append(keep(q, k))
        return q, k

    modeling.apply_rotary_pos_emb = capture
    try:
        yield captured
    finally:
        modeling.apply_rotary_pos_emb = original


def queries_and_keys(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A :func:`post_rope_capture` ``keep``: the one sequence's ``[H, L, D]`` queries and keys."""
    return q[0].detach(), k[0].detach()


class DenseSnapKVReference:
    def __init__(
        self, model_dir: str, window_size: int = 32, kernel_size: int = 7, block_size: int = 128
    ):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32, attn_implementation="sdpa"
        ).eval()
        self.window_size = window_size
        self.kernel_size = kernel_size
        self.block_size = block_size
        eos = self.model.generation_config.eos_token_id
        self.stop_token_ids = set(eos if isinstance(eos, list) else [eos])

    def _prefill(self, ids: list[int]):
        import transformers.models.llama.modeling_llama as llama

        window = self.window_size

        def window_queries_and_keys(q, k):
            return q[0, :, -window:].clone(), k[0].clone()

        with post_rope_capture(llama, window_queries_and_keys) as captured, torch.no_grad():
            out = self.model(torch.tensor([ids]), use_cache=True)
        return out, captured

    def _kept(self, q_win: torch.Tensor, keys: torch.Tensor, budget: int) -> torch.Tensor:
        """``q_win [H_q, W, D]``, ``keys [H_kv, L, D]`` -> kept positions ``[H_kv, budget]``."""
        num_q, window, dim = q_win.shape
        num_kv, length, _ = keys.shape
        group = num_q // num_kv
        prefix = length - window
        logits = torch.einsum("hwd,hld->hwl", q_win, keys.repeat_interleave(group, 0)) / dim**0.5
        query_pos = prefix + torch.arange(window)
        logits = logits.masked_fill(torch.arange(length)[None, :] > query_pos[:, None], -torch.inf)
        scores = logits.softmax(-1)[:, :, :prefix].sum(1)
        pooled = F.max_pool1d(scores[:, None], self.kernel_size, 1, self.kernel_size // 2)[:, 0]
        per_kv = pooled.view(num_kv, group, prefix).mean(1)
        top = per_kv.topk(budget - window, dim=-1).indices
        window_positions = torch.arange(prefix, length).expand(num_kv, -1)
        return torch.cat([top, window_positions], 1).sort(-1).values

    def compresses(self, length: int, budget: int) -> bool:
        """Rule 1: compress only when fewer blocks of ``block_size`` would hold the kept entries."""
        return -(-budget // self.block_size) < -(-length // self.block_size)

    def generate(self, prompt: str, budgets: list[int], max_new_tokens: int) -> dict[int, str]:
        """Greedy completion per budget; where rule 1 does not compress, the full cache."""
        from transformers import DynamicCache

        ids = self.tokenizer(prompt).input_ids
        length = len(ids)
        out, captured = self._prefill(ids)
        first = int(out.logits[0, -1].argmax())
        full_cache = out.past_key_values
        texts = {}
        for budget in budgets:
            cache = DynamicCache()
            for layer, (q_win, _) in enumerate(captured):
                keys, values = full_cache.layers[layer].keys, full_cache.layers[layer].values
                if self.compresses(length, budget):
                    kept = self._kept(q_win, keys[0], budget)
                    index = kept[None, :, :, None].expand(-1, -1, -1, keys.shape[-1])
                    keys, values = keys.gather(2, index), values.gather(2, index)
                cache.update(keys.clone(), values.clone(), layer)
            tokens = [first]
            with torch.no_grad():
                for step in range(max_new_tokens - 1):
                    if tokens[-1] in self.stop_token_ids:
                        break
                    logits = self.model(
                        torch.tensor([[tokens[-1]]]),
                        position_ids=torch.tensor([[length + step]]),
                        past_key_values=cache,
                        use_cache=True,
                    ).logits
                    tokens.append(int(logits[0, -1].argmax()))
            # As vLLM's defaults: the stop token ends the text and is not shown.
            texts[budget] = self.tokenizer.decode(tokens, skip_special_tokens=True)
        return texts
