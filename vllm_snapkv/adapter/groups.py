"""Which KV cache groups SnapKV compresses: decided once per engine from vLLM's KV cache config,
then carried by the scheduler and every worker instead of testing group kinds at each use.

vLLM 0.32 puts layers of one attention kind in a KV cache group (hybrid models get several, all
sharing one block pool, each with its own block table). Full-attention groups grow with the
sequence: those are compressed. Sliding-window groups (Gemma 2/3, gpt-oss, Mistral variants) and
recurrent-state groups (Mamba, Gated DeltaNet, linear attention: Qwen3-Next) are already bounded,
so vLLM keeps managing them exactly as without the plugin: logical lengths, their own blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm.v1.kv_cache_interface import (
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheSpec,
    MambaSpec,
    SlidingWindowSpec,
)


class UnsupportedKVCacheGroups(ValueError):
    """The model has a KV cache group SnapKV can neither compress nor leave alone correctly."""


def _left_alone(spec: KVCacheSpec) -> bool:
    """Groups that are bounded by construction and never read a compressed group's entries."""
    return type(spec) is SlidingWindowSpec or isinstance(spec, MambaSpec)


@dataclass(frozen=True)
class CompressedGroups:
    """Invariant: ``group_ids`` are exactly the plain full-attention groups, in vLLM's group
    order; every other group is left alone; all compressed groups share ``block_size``."""

    group_ids: tuple[int, ...]
    block_size: int
    #: Attention layer name -> its (compressed) group id.
    group_of_layer: dict[str, int]
    #: Some group is left alone (a hybrid model): its lengths stay logical.
    hybrid: bool

    @classmethod
    def of(cls, kv_cache_config: KVCacheConfig) -> "CompressedGroups":
        compressed, others = [], []
        for group_id, group in enumerate(kv_cache_config.kv_cache_groups):
            spec = group.kv_cache_spec
            if type(spec) is FullAttentionSpec:
                compressed.append(group_id)
            elif _left_alone(spec):
                others.append(group_id)
            else:
                raise UnsupportedKVCacheGroups(
                    f"kv_compression: this model's KV cache group {group_id} "
                    f"({', '.join(group.layer_names[:2])}{', ...' if len(group.layer_names) > 2 else ''}) "
                    f"has spec {type(spec).__name__}; SnapKV compresses plain full-attention "
                    "groups and leaves sliding-window and recurrent-state groups alone, nothing "
                    "else (MLA, cross-attention, chunked local, sink or other attention kinds). "
                    "Turn compression off for this model."
                )
        if not compressed:
            raise UnsupportedKVCacheGroups(
                "kv_compression: this model has no full-attention layer (its KV cache is already "
                "bounded); there is nothing for SnapKV to compress. Turn compression off."
            )
        groups = kv_cache_config.kv_cache_groups
        block_sizes = {groups[g].kv_cache_spec.block_size for g in compressed}
        if len(block_sizes) != 1:
            raise UnsupportedKVCacheGroups(
                "kv_compression: the model's full-attention KV cache groups have different block "
                f"sizes {sorted(block_sizes)}; SnapKV needs one."
            )
        return cls(
            group_ids=tuple(compressed),
            block_size=block_sizes.pop(),
            group_of_layer={name: g for g in compressed for name in groups[g].layer_names},
            hybrid=bool(others),
        )

    @property
    def num_layers(self) -> int:
        return len(self.group_of_layer)
