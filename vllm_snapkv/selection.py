"""SnapKV position selection: pure torch, no vLLM import.

Implements rules 2-7 of shared/docs/snapkv-algorithm.md for one attention layer of one request:
window-attention scores -> 1-D pooling -> mean over each GQA group -> top positions per KV head,
plus the observation window, in ascending order.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

Pooling = Literal["max", "avg"]


def window_attention_scores(
    window_queries: torch.Tensor,
    keys: torch.Tensor,
    scale: float,
    sinks: torch.Tensor | None = None,
    soft_cap: float | None = None,
) -> torch.Tensor:
    """Attention mass each prefix position receives from the observation window, normalised as
    the layer's own attention normalises it.

    Args:
        window_queries: ``[W, H_q, D]`` queries of the last ``W`` prompt tokens, after RoPE.
        keys: ``[L, H_kv, D]`` keys of the whole prompt, after RoPE. ``H_q % H_kv == 0``.
        scale: the layer's softmax scale.
        sinks: ``[H_q]`` learned sink logits (gpt-oss): each query head's softmax denominator
            also holds ``exp(sink)``, so the keys share less than all of the mass.
        soft_cap: logit soft-capping ``cap * tanh(logits / cap)`` (Gemma 2), applied after the
            scale as the attention kernels do.

    Returns:
        ``[H_q, L - W]`` float32: softmax(Q_win K^T) over all ``L`` keys (causal inside the window),
        summed over the ``W`` window queries, restricted to the prefix ``[0, L - W)``.
    """
    num_window, num_q_heads, head_dim = window_queries.shape
    prompt_len, num_kv_heads, _ = keys.shape
    if num_q_heads % num_kv_heads:
        raise ValueError(f"H_q={num_q_heads} is not a multiple of H_kv={num_kv_heads}")
    if num_window > prompt_len:
        raise ValueError(f"window ({num_window}) longer than the prompt ({prompt_len})")
    group = num_q_heads // num_kv_heads
    # [H_kv, G, W, D] x [H_kv, D, L] -> [H_kv, G, W, L]; K is never expanded to H_q heads.
    q = window_queries.float().permute(1, 0, 2).reshape(num_kv_heads, group, num_window, head_dim)
    # [H_kv, 1, D, L]: contiguous when the caller's keys are a view of [H_kv, D, L] storage.
    k = keys.float().permute(1, 2, 0).unsqueeze(1)
    logits = torch.matmul(q * scale, k)
    if soft_cap:
        logits = torch.tanh(logits / soft_cap) * soft_cap
    prefix_len = prompt_len - num_window
    # Window query i sits at position prefix_len + i and must not see window keys after it.
    causal = torch.ones(num_window, num_window, dtype=torch.bool, device=keys.device).triu(1)
    logits[..., prefix_len:].masked_fill_(causal, float("-inf"))
    if sinks is not None:
        # One extra column per query head: the sink takes its share of the softmax mass.
        sink_column = sinks.float().view(num_kv_heads, group, 1, 1).expand(-1, -1, num_window, 1)
        logits = torch.cat([logits, sink_column], dim=-1)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    return probs[..., :prefix_len].sum(dim=2).reshape(num_q_heads, prefix_len)


def pool_scores(scores: torch.Tensor, kernel_size: int, pooling: Pooling) -> torch.Tensor:
    """1-D pooling along positions (stride 1, same length), so neighbours of a hit survive too."""
    if kernel_size % 2 != 1:
        raise ValueError(f"kernel_size must be odd, got {kernel_size}")
    if kernel_size == 1:
        return scores
    padding = kernel_size // 2
    if pooling == "max":
        return F.max_pool1d(scores, kernel_size, stride=1, padding=padding)
    if pooling == "avg":
        # count_include_pad=True (F's default) matches the official code's AvgPool1d.
        return F.avg_pool1d(scores, kernel_size, stride=1, padding=padding)
    raise ValueError(f"pooling must be 'max' or 'avg', got {pooling!r}")


def group_mean(scores: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """``[H_q, N]`` -> ``[H_kv, N]``: mean over the query heads that share one KV head."""
    num_q_heads, length = scores.shape
    return scores.reshape(num_kv_heads, num_q_heads // num_kv_heads, length).mean(dim=1)


def top_positions(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Per row, the ``count`` highest-scoring positions, ascending; among equal scores the earlier
    position wins (max pooling creates plateaus of equal scores, and topk's tie order is
    unspecified). A stable sort keeps ties in position order and, unlike selecting by a threshold
    and ``nonzero``, never waits for the device to know how many entries qualify."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :count]
    return order.sort(dim=-1).values


def select_kept_positions(
    window_queries: torch.Tensor,
    keys: torch.Tensor,
    budget: int,
    scale: float,
    kernel_size: int = 7,
    pooling: Pooling = "max",
    sinks: torch.Tensor | None = None,
    soft_cap: float | None = None,
) -> torch.Tensor:
    """Positions each KV head keeps: its top ``budget - W`` prefix positions plus the window.
    ``sinks`` and ``soft_cap`` as in :func:`window_attention_scores`.

    Returns a ``LongTensor[H_kv, budget]``, each row ascending; among equal scores the earlier
    position is kept. The caller skips prompts with
    ``L <= budget`` (nothing to evict); they are rejected here.
    """
    num_window = window_queries.shape[0]
    prompt_len, num_kv_heads, _ = keys.shape
    if not num_window < budget < prompt_len:
        raise ValueError(
            f"need window ({num_window}) < budget ({budget}) < prompt length ({prompt_len})"
        )
    scores = window_attention_scores(window_queries, keys, scale, sinks, soft_cap)
    scores = group_mean(pool_scores(scores, kernel_size, pooling), num_kv_heads)
    top = top_positions(scores, budget - num_window)
    window = torch.arange(prompt_len - num_window, prompt_len, device=keys.device)
    # top is ascending and every window position is after the prefix: already sorted.
    return torch.cat([top, window.expand(num_kv_heads, -1)], dim=-1)
