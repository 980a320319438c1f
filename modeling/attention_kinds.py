"""What each attention kind keeps in the KV cache, derived from the config alone (no weights, no tensors).

One `AttentionKind` per (attention type, sparsity) pair of the per-layer schedules answers, for a config: which
transformers cache layer holds it, how many elements and bytes it adds per token (model dtype, or the FP8 records
of `kv_cache_dtype="fp8_e4m3"`), and whether its kernel needs transformers' dense [B, 1, S, T] mask. Summaries,
`seekv4 info`, `SeekV4Config.layer_types` and the model's mask logic read these facts instead of re-deriving them.

The kinds live here rather than on the attention modules: V4Attention serves three layouts, GQA and MLA two each,
and these facts need no module instance. The cache-layer names are data in the configuration, which cannot
import modeling (see `CACHE_LAYER_TYPES`).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..configuration.configuration_seekv4 import CACHE_LAYER_TYPES
from .fp8 import record_bytes

FP8 = "fp8_e4m3"


def _fp8(config) -> bool:
    return config.kv_cache_dtype == FP8


def figure(x: int | float) -> str:
    """A size as `seekv4 info` prints it: integers with thousands separators, fractions to one decimal."""
    return f"{x:,}" if isinstance(x, int) else f"{x:,.1f}"


@dataclass(frozen=True)
class AttentionKind:
    attention: str  # "gqa" | "mla" | "v4"
    sparsity: str  # "dense" | "dsa" for gqa and mla; "sliding" | "csa" | "hca" for v4

    @property
    def name(self) -> str:
        """Label in `seekv4 info`: the attention type, plus its sparsity unless dense."""
        return self.attention if self.sparsity == "dense" else f"{self.attention}/{self.sparsity}"

    @property
    def cache_layer_type(self) -> str:
        """transformers' layer type that `DynamicCache(config=...)` builds for this kind."""
        return CACHE_LAYER_TYPES[self.attention, self.sparsity]

    def cache_elements_per_token(self, config) -> int | float:
        """Cache elements each new token adds to one layer, in the model dtype (fractional for pooled entries;
        fixed-size state such as a sliding window counts nothing)."""
        raise NotImplementedError

    def cache_bytes_per_token(self, config, dtype_bytes: int) -> int | float:
        """Cache bytes each new token adds to one layer of a model whose dtype has `dtype_bytes` bytes; with
        `kv_cache_dtype="fp8_e4m3"` the FP8 records' bytes. Plain caches: elements x dtype_bytes."""
        return self.cache_elements_per_token(config) * dtype_bytes

    def fp8_dims(self, config) -> int:
        """Dims of each cached record stored as e4m3 (0: nothing of this kind is stored in FP8)."""
        return 0

    def needs_dense_mask(self, config) -> bool:
        """Whether this kind's kernel reads the [B, 1, S, T] mask (O(S·T) to build); sparse kinds mask
        padding from the 2-D mask themselves."""
        raise NotImplementedError

    def describe(self, config) -> str:
        """One line for `seekv4 info`: what a token adds to one layer's cache in a bf16 model."""
        raise NotImplementedError


class _FullKVKind(AttentionKind):
    """gqa and mla: every token's keys stay cached; `dsa` adds its lightning indexer's key per token, kept in the
    model dtype even with an FP8 cache (only the MLA latent has an FP8 record here)."""

    def index_dims(self, config) -> int:
        return config.index_head_dim if self.sparsity == "dsa" else 0

    def needs_dense_mask(self, config) -> bool:
        # DSA's dense warm-up runs the full main attention (whose probabilities the indexer learns)
        return self.sparsity == "dense" or config.dsa_mode == "dense_warmup"

    def _index_part(self, config, unit: str) -> str:
        return f" + DSA index key {config.index_head_dim}{unit}" if self.sparsity == "dsa" else ""


class GQAKind(_FullKVKind):
    def cache_elements_per_token(self, config) -> int:
        return 2 * config.num_key_value_heads * config.head_dim + self.index_dims(config)  # keys + values

    def describe(self, config) -> str:
        return (f"{self.cache_elements_per_token(config):,} elements per token per layer: keys + values 2 x "
                f"{config.num_key_value_heads} heads x {config.head_dim} dims{self._index_part(config, '')}")


class MLAKind(_FullKVKind):
    def cache_elements_per_token(self, config) -> int:
        return config.kv_lora_rank + config.qk_rope_head_dim + self.index_dims(config)  # latent + shared RoPE key

    def fp8_dims(self, config) -> int:
        return config.kv_lora_rank if _fp8(config) else 0

    def cache_bytes_per_token(self, config, dtype_bytes: int) -> int:
        if not _fp8(config):
            return super().cache_bytes_per_token(config, dtype_bytes)
        # one record [e4m3 latent | float32 scales | RoPE key in the model dtype] (FlashMLA's V3.2 layout)
        record = record_bytes(config.kv_lora_rank, config.qk_rope_head_dim, config.kv_cache_fp8_block, dtype_bytes)
        return record + self.index_dims(config) * dtype_bytes

    def describe(self, config) -> str:
        r, rope = config.kv_lora_rank, config.qk_rope_head_dim
        if not _fp8(config):
            return (f"{self.cache_elements_per_token(config):,} elements per token per layer: latent {r} + RoPE "
                    f"key {rope}{self._index_part(config, '')}")
        return (f"{self.cache_bytes_per_token(config, 2):,} bytes per token per layer: {r} e4m3 + "
                f"{r // config.kv_cache_fp8_block} float32 scales + {rope} bf16 RoPE dims"
                f"{self._index_part(config, ' bf16 dims')}")


class V4Kind(AttentionKind):
    """v4 (DeepSeek-V4): a fixed window of the last `sliding_window - 1` K=V rows (nothing per token), plus
    for csa/hca one pooled entry per `ratio` tokens (csa also one indexer key per entry). With an FP8 cache
    the entries are stored as FP8 records with the RoPE dims in the model dtype; the window and the index
    keys stay in the model dtype."""

    def ratio(self, config) -> int | None:
        return {"csa": config.csa_compress_ratio, "hca": config.hca_compress_ratio}.get(self.sparsity)

    def index_dims(self, config) -> int:
        return config.index_head_dim if self.sparsity == "csa" else 0

    def needs_dense_mask(self, config) -> bool:
        return False  # window and entries are gathered per query, padding masked from the 2-D mask

    def fp8_dims(self, config) -> int:
        return config.head_dim - config.qk_rope_head_dim if _fp8(config) and self.sparsity != "sliding" else 0

    def entry_bytes(self, config, dtype_bytes: int) -> int:
        """Bytes of one stored compressed entry (without its index key)."""
        if not _fp8(config):
            return config.head_dim * dtype_bytes
        rope = config.qk_rope_head_dim
        return record_bytes(config.head_dim - rope, rope, config.kv_cache_fp8_block, dtype_bytes)

    def cache_elements_per_token(self, config) -> int | float:
        if self.sparsity == "sliding":
            return 0
        return (config.head_dim + self.index_dims(config)) / self.ratio(config)

    def cache_bytes_per_token(self, config, dtype_bytes: int) -> int | float:
        if self.sparsity == "sliding":
            return 0
        return (self.entry_bytes(config, dtype_bytes) + self.index_dims(config) * dtype_bytes) / self.ratio(config)

    def describe(self, config) -> str:
        window = config.sliding_window - 1
        if self.sparsity == "sliding":
            return f"nothing per token: a window of the last {window} K=V rows ({config.head_dim} bf16 dims each)"
        fp8 = _fp8(config)
        if fp8:
            nope, block = config.head_dim - config.qk_rope_head_dim, config.kv_cache_fp8_block
            entry = (f"one FP8 entry ({self.entry_bytes(config, 2)} bytes per entry: {nope} e4m3 + {nope // block} "
                     f"float32 scales + {config.qk_rope_head_dim} bf16 RoPE dims)")
        else:
            entry = f"one {config.head_dim}-dim entry"
        index = ""
        if self.sparsity == "csa":
            index = f" + one {config.index_head_dim}-dim {'bf16 ' if fp8 else ''}index key"
        amount = self.cache_bytes_per_token(config, 2) if fp8 else self.cache_elements_per_token(config)
        return (f"{figure(amount)} {'bytes' if fp8 else 'elements'} per token per layer: {entry}{index} per "
                f"{self.ratio(config)} tokens; plus the {window}-row window")


KINDS = {(k.attention, k.sparsity): k for k in (
    GQAKind("gqa", "dense"), GQAKind("gqa", "dsa"), MLAKind("mla", "dense"), MLAKind("mla", "dsa"),
    V4Kind("v4", "sliding"), V4Kind("v4", "csa"), V4Kind("v4", "hca"),
)}


def attention_kind(config, layer_idx: int) -> AttentionKind:
    pair = config.attention_types[layer_idx], config.attention_sparsity[layer_idx]
    if pair not in KINDS:
        raise ValueError(f"Layer {layer_idx} has attention_types={pair[0]!r} with attention_sparsity={pair[1]!r}, "
                         f"which is no attention kind; allowed pairs: {sorted(KINDS)}.")
    return KINDS[pair]


def attention_kinds(config) -> list[AttentionKind]:
    """The kind of every decoder layer, in order."""
    return [attention_kind(config, i) for i in range(config.num_hidden_layers)]
