"""Tiny random-weight models of several architectures, and a dense SnapKV reference for them.

The plugin must keep the same positions as SnapKV on every family vLLM serves, and refuse the
families it cannot compress. Real checkpoints of most of them are out of reach here, so each family
is a small model built from its transformers config class (hidden 256, 6 layers, 4 query / 2 KV
heads, head_dim 64, see shared/docs/models.md) with seeded random weights and the demo model's
tokenizer. The reference selection is computed from transformers' eager forward of the same
weights, independently of ``vllm_snapkv.selection``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import (
    AttentionInterface,
    AutoConfig,
    AutoModelForCausalLM,
    BloomConfig,
    FalconConfig,
    Gemma3TextConfig,
    GptOssConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    PretrainedConfig,
    Qwen3Config,
    Qwen3NextConfig,
)
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from vllm_snapkv.demo_model import DEFAULT_CACHE, build_demo_model, make_world_readable

SEED = 0
#: Large enough that random q/k give peaked attention: with transformers' default 0.02 the logits
#: of a 256-wide model are ~0.1 apart and the SnapKV scores of a prompt are a near-uniform tie-fest.
INITIALIZER_RANGE = 0.1
#: gpt-oss sinks, in logits. Random init leaves them near 0, negligible next to the hundreds of
#: keys of a prompt; near a row's log-sum-exp they reweight rows and heads: a reference ignoring
#: them keeps 5-10 % other positions (measured on a 653-token prompt, budget 256).
SINK_MEAN, SINK_STD = 6.0, 2.0
#: Added to QK-norm weights (mean, std): the norms make q and k unit-RMS, so random projections
#: alone give logits of std ~1 and flat scores; this makes the gain ~2 for both ``weight * x`` and
#: Gemma-style ``(1 + weight) * x`` norms, with random per-channel variation.
QK_NORM_SHIFT_MEAN, QK_NORM_SHIFT_STD = 1.0, 0.5

_COMMON = dict(
    vocab_size=49152,  # the demo tokenizer's
    hidden_size=256,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=512,
    max_position_embeddings=8192,
    initializer_range=INITIALIZER_RANGE,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
)
_HEAD_DIM = dict(head_dim=64)
_SLIDING, _FULL, _LINEAR = "sliding_attention", "full_attention", "linear_attention"


def _config(family: str) -> PretrainedConfig:
    """The family's tiny config (a fresh object each call: configs are mutable)."""
    makers: dict[str, Callable[[], PretrainedConfig]] = {
        "llama": lambda: LlamaConfig(**_COMMON, **_HEAD_DIM),
        "qwen3": lambda: Qwen3Config(**_COMMON, **_HEAD_DIM),
        "mistral": lambda: MistralConfig(**_COMMON, **_HEAD_DIM, sliding_window=None),
        # head_dim is hidden / heads; longrope would switch on past original_max_position_embeddings
        "phi3": lambda: Phi3Config(
            **_COMMON, sliding_window=None, original_max_position_embeddings=8192
        ),
        # Gemma 3's pattern (full layer last), RoPE base 1e4 local / 1e6 global, and its
        # query_pre_attn_scalar (256): the layer's scale is 1/16, not 1/sqrt(head_dim).
        "gemma3": lambda: Gemma3TextConfig(
            **_COMMON,
            **_HEAD_DIM,
            sliding_window=256,
            layer_types=[_SLIDING] * 5 + [_FULL],
            rope_parameters={
                _SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
                _FULL: {"rope_type": "default", "rope_theta": 1_000_000.0},
            },
        ),
        # gpt-oss keeps its YaRN RoPE (scaled to this context), q/k/v bias, sliding/full
        # alternation and learned sinks.
        "gpt_oss": lambda: GptOssConfig(
            **_COMMON,
            **_HEAD_DIM,
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 150_000.0,
                "factor": 2.0,
                "original_max_position_embeddings": 4096,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "truncate": False,
            },
            sliding_window=128,
            layer_types=[_SLIDING, _FULL] * 3,
            num_local_experts=4,
            num_experts_per_tok=2,
        ),
        "qwen3_next": lambda: Qwen3NextConfig(
            **_COMMON,
            **_HEAD_DIM,
            layer_types=[_LINEAR, _LINEAR, _FULL] * 2,
            linear_num_key_heads=2,
            linear_num_value_heads=4,
            linear_key_head_dim=64,
            linear_value_head_dim=64,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=128,
            shared_expert_intermediate_size=128,
        ),
        # ALiBi families: the plugin must refuse them (physical key indices would feed the slopes).
        "bloom": lambda: BloomConfig(
            vocab_size=49152,
            hidden_size=256,
            n_layer=6,
            n_head=4,
            initializer_range=INITIALIZER_RANGE,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=2,
        ),
        "falcon_alibi": lambda: FalconConfig(
            vocab_size=49152,
            hidden_size=256,
            num_hidden_layers=6,
            num_attention_heads=4,
            alibi=True,
            max_position_embeddings=8192,
            initializer_range=INITIALIZER_RANGE,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=2,
        ),
    }
    if family not in makers:
        raise KeyError(f"unknown family {family!r}; known: {sorted(makers)}")
    return makers[family]()


#: Every family :func:`build_tiny_model` knows, in a stable order.
FAMILIES = ("llama", "qwen3", "mistral", "phi3", "gemma3", "gpt_oss", "qwen3_next", "bloom",
            "falcon_alibi")
#: Families the plugin must refuse (ALiBi).
REFUSED_FAMILIES = ("bloom", "falcon_alibi")


def serving_dtype(family: str) -> str:
    """The dtype ``family`` is built in and must be served in: float32 for exact comparisons,
    except Qwen3-Next, whose gated-delta-net kernel in vLLM's CPU build asserts bfloat16 (its
    reference still runs in float32, on the same bf16 weights)."""
    return "bfloat16" if family == "qwen3_next" else "float32"


def _fingerprint(config: PretrainedConfig, dtype: str) -> str:
    """Short hash of everything that determines the weights: the config and the recipe."""
    recipe = {
        "config": config.to_dict(),
        "dtype": dtype,
        "seed": SEED,
        "sinks": [SINK_MEAN, SINK_STD],
        "qk_norm": [QK_NORM_SHIFT_MEAN, QK_NORM_SHIFT_STD],
        "torch": torch.__version__.split("+")[0],
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]


def _is_built(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def build_tiny_model(family: str) -> str:
    """The folder of ``family``'s tiny model, built once into ``<cache>/tiny/<family>-<hash>``.

    Weights are seeded and stored in :func:`serving_dtype`.
    Processes racing to build it each write a private folder and rename it into place; the loser
    drops its copy.
    """
    config = _config(family)
    dtype = serving_dtype(family)
    target = DEFAULT_CACHE / "tiny" / f"{family}-{_fingerprint(config, dtype)}"
    if _is_built(target):
        return str(target)
    tokenizer_dir = build_demo_model()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        torch.manual_seed(SEED)
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith(".sinks"):
                    param.normal_(SINK_MEAN, SINK_STD)
                elif name.endswith(("q_norm.weight", "k_norm.weight")):
                    param.add_(torch.randn_like(param) * QK_NORM_SHIFT_STD + QK_NORM_SHIFT_MEAN)
        model.save_pretrained(staging)
        for path in tokenizer_dir.iterdir():
            if path.name.startswith(("tokenizer", "special_tokens", "chat_template")):
                shutil.copy(path, staging / path.name)
        make_world_readable(staging)
        try:
            os.replace(staging, target)
        except OSError:
            if not _is_built(target):  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(target)


def full_attention_layers(model_dir: str) -> list[int]:
    """0-based indices of the layers SnapKV compresses: full attention, neither sliding-window nor
    linear attention (``layer_types`` where the config has it, else all layers unless the whole
    model uses a sliding window)."""
    config = AutoConfig.from_pretrained(model_dir).get_text_config()
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return [i for i, kind in enumerate(layer_types) if kind == _FULL]
    if getattr(config, "sliding_window", None) is not None:
        return []
    return list(range(config.num_hidden_layers))


# --- reference selection ------------------------------------------------------------------------

_CAPTURE = "snapkv_reference_capture"
_CAPTURED = "_snapkv_reference_captured"


def _capture_then_eager(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Record what the attention layer received, then run the model's own eager attention, so the
    forward is exactly transformers' eager one."""
    setattr(module, _CAPTURED, (query.detach(), key.detach(), kwargs))
    eager = sys.modules[type(module).__module__].eager_attention_forward
    return eager(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(_CAPTURE, _capture_then_eager)
AttentionMaskInterface.register(_CAPTURE, eager_mask)


def _window_scores(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    kwargs: dict[str, Any],
    window: int,
) -> torch.Tensor:
    """Softmax probabilities of the window queries over all keys, float32, ``[H_q, W, L]``,
    normalised as the layer's eager attention does: its own scale, the logit soft-cap it passes
    (Gemma 2 does; Gemma 3 does not), its learned sinks (gpt-oss)."""
    query, key = query[0].float(), key[0].float()  # [H, L, D]
    group = query.shape[0] // key.shape[0]
    length = key.shape[1]
    keys = key.repeat_interleave(group, dim=0)
    logits = query[:, -window:] @ keys.transpose(1, 2) * module.scaling
    softcap = kwargs.get("softcap")
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    future = torch.arange(length)[None, :] > torch.arange(length - window, length)[:, None]
    logits = logits.masked_fill(future, float("-inf"))
    sinks = getattr(module, "sinks", None)
    if sinks is None:
        return logits.softmax(-1)
    # gpt-oss: one learned logit per query head joins every row's softmax, then is dropped.
    sink_column = sinks.float().view(-1, 1, 1).expand(-1, window, 1)
    return torch.cat([logits, sink_column], dim=-1).softmax(-1)[..., :-1]


def _select(
    probs: torch.Tensor, num_kv_heads: int, budget: int, window: int, kernel_size: int
) -> list[set[int]]:
    """SnapKV rules 4-7 (shared/docs/snapkv-algorithm.md) on ``[H_q, W, L]`` probabilities."""
    num_q_heads, _, length = probs.shape
    prefix = length - window
    votes = probs[..., :prefix].sum(1)
    pooled = torch.nn.functional.max_pool1d(votes[:, None], kernel_size, 1, kernel_size // 2)[:, 0]
    per_kv = pooled.view(num_kv_heads, num_q_heads // num_kv_heads, prefix).mean(1)
    # Max pooling makes plateaus of equal scores: the earlier position wins a tie.
    order = per_kv.sort(dim=-1, descending=True, stable=True).indices
    window_positions = set(range(prefix, length))
    return [set(row.tolist()) | window_positions for row in order[:, : budget - window]]


def reference_kept_positions_for(
    model_dir: str,
    prompt_ids: list[int],
    budget: int,
    window: int,
    kernel_size: int = 7,
    lora_dir: str | None = None,
) -> dict[int, list[set[int]]]:
    """Dense SnapKV selection per full-attention layer (keyed by layer index, as vLLM's
    ``extract_layer_index`` gives it): per KV head, the set of kept prompt positions.

    Query and key states are captured where transformers hands them to the attention function,
    so they are post-RoPE and post-QK-norm for every family without per-family code. Models whose
    attention does not dispatch through ``AttentionInterface`` (the ALiBi ones) are refused.
    With ``lora_dir``, the model runs with that peft LoRA adapter applied (its queries and keys
    are the adapted projections').
    """
    if len(prompt_ids) <= budget or budget <= window:
        raise ValueError(f"need window < budget < prompt length, got {window}, {budget}, "
                         f"{len(prompt_ids)}")
    architecture = AutoConfig.from_pretrained(model_dir).architectures[0]
    modeling = sys.modules[getattr(transformers, architecture).__module__]
    if not hasattr(modeling, "eager_attention_forward"):
        raise ValueError(
            f"{architecture} does not dispatch through transformers' AttentionInterface "
            f"(transformers {transformers.__version__}): no reference"
        )
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation=_CAPTURE
    )
    if lora_dir is not None:
        import peft

        model = peft.PeftModel.from_pretrained(model, lora_dir)
    with torch.no_grad():
        model(torch.tensor([prompt_ids]), use_cache=False)
    by_layer = {
        module.layer_idx: module for module in model.modules() if hasattr(module, _CAPTURED)
    }
    kept: dict[int, list[set[int]]] = {}
    for layer in full_attention_layers(model_dir):
        module = by_layer[layer]
        query, key, kwargs = getattr(module, _CAPTURED)
        probs = _window_scores(module, query, key, kwargs, window)
        kept[layer] = _select(probs, key.shape[1], budget, window, kernel_size)
    return kept


# --- LoRA adapters ------------------------------------------------------------------------------

#: Modules a test adapter adapts: the attention projections, so the adapter changes the queries
#: and keys SnapKV scores with (vLLM applies an adapter to its fused ``qkv_proj``).
LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
LORA_RANK = 8
LORA_ALPHA = 16
#: Standard deviation of the random LoRA A and B factors (peft initialises B to zero, which
#: would make the adapter a no-op). Chosen so that ``alpha / r * B @ A`` moves the projections
#: by a visible fraction of the base weights (the selection differs from the base model's),
#: without drowning them.
LORA_INIT_STD = {"A": 0.05, "B": 0.05}


def _lora_fingerprint(base_dir: str, seed: int) -> str:
    import peft

    base = json.loads((Path(base_dir) / "config.json").read_text())
    recipe = {
        "base": base,
        "base_weights": (Path(base_dir) / "model.safetensors").stat().st_size,
        "seed": seed,
        "rank": LORA_RANK,
        "alpha": LORA_ALPHA,
        "targets": LORA_TARGET_MODULES,
        "init": LORA_INIT_STD,
        "peft": peft.__version__,
        "torch": torch.__version__.split("+")[0],
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]


def build_lora_adapter(base_dir: str, seed: int) -> str:
    """A random-weight LoRA adapter (peft format) for the model in ``base_dir``, built once into
    ``<cache>/lora/<base folder name>-<hash>``: rank :data:`LORA_RANK` on
    :data:`LORA_TARGET_MODULES`, A and B drawn from a normal of :data:`LORA_INIT_STD` with
    ``seed``. Races resolve as in :func:`build_tiny_model`."""
    import peft

    target = DEFAULT_CACHE / "lora" / f"{Path(base_dir).name}-{_lora_fingerprint(base_dir, seed)}"
    if (target / "adapter_config.json").is_file():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        config = peft.LoraConfig(
            r=LORA_RANK,
            lora_alpha=LORA_ALPHA,
            target_modules=list(LORA_TARGET_MODULES),
            lora_dropout=0.0,
            bias="none",
            init_lora_weights=False,
        )
        adapted = peft.get_peft_model(model, config)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in adapted.named_parameters():
                for factor, std in LORA_INIT_STD.items():
                    if f".lora_{factor}." in name:
                        param.copy_(torch.randn(param.shape, generator=generator) * std)
        adapted.save_pretrained(staging)
        make_world_readable(staging)
        try:
            os.replace(staging, target)
        except OSError:
            if not (target / "adapter_config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(target)
