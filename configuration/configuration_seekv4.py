"""SeekV4Config: one config for the whole family, with per-layer schedules for every sparsity axis."""
from __future__ import annotations

import types
import typing

from transformers import PreTrainedConfig

ATTENTION_KINDS = ("gqa", "mla", "v4")
FFN_KINDS = ("dense", "moe", "hash_moe")
SCORING_FUNCS = ("softmax", "sigmoid", "sqrtsoftplus")
ROPE_TYPES = ("default", "linear", "yarn")
SPARSITY_KINDS = {"gqa": ("dense", "dsa"), "mla": ("dense", "dsa"), "v4": ("sliding", "csa", "hca")}
# transformers cache layer type of each (attention type, sparsity) pair: `DynamicCache(config=...)` builds it from
# `layer_types`. Data here (not in modeling/attention_kinds.py, which reads it) because modeling imports configuration.
CACHE_LAYER_TYPES = {
    ("gqa", "dense"): "full_attention", ("gqa", "dsa"): "indexed_attention",  # + the lightning indexer's keys
    ("mla", "dense"): "full_attention", ("mla", "dsa"): "indexed_attention",
    ("v4", "sliding"): "seekv4_v4", ("v4", "csa"): "seekv4_v4", ("v4", "hca"): "seekv4_v4",  # V4CacheLayer
}
DSA_MODES = ("sparse", "dense_warmup")
INDEXER_IMPLEMENTATIONS = ("auto", "eager", "fused")
KV_CACHE_DTYPES = ("auto", "fp8_e4m3")
RESIDUAL_KINDS = ("plain", "hc", "mhc")
MHC_INITS = ("identity", "uniform")
ENGRAM_STORAGES = ("device", "host", "disk")


def _fail(field: str, value, allowed: str):
    raise ValueError(f"SeekV4Config.{field}={value!r} is invalid: {allowed}.")


def _has_type(value, hint) -> bool:
    """`value` fits the field annotation `hint` as JSON gives it: an int is a float, a bool is not an int, a tuple
    is a list."""
    if hint is type(None):
        return value is None
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return any(_has_type(value, arg) for arg in typing.get_args(hint))
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, (list, tuple)) and all(_has_type(v, item) for v in value)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


class SeekV4Config(PreTrainedConfig):
    r"""
    Configuration of a seekv4 causal LM: one config for the whole DeepSeek-V3 / V3.2 / V4 family, with per-layer
    schedules for every sparsity axis (docs/architecture.md). `SeekV4Config.from_preset(name, **overrides)` fills it
    with a published shape (`seekv4.list_presets()`). Every invalid value raises a ValueError naming the field.

    Sizes and tokens:
        vocab_size, hidden_size, num_hidden_layers: vocabulary, model width, decoder layers.
        intermediate_size: width of `dense` FFN layers. hidden_act: only "silu" (SwiGLU).
        max_position_embeddings: the longest sequence (cached + new tokens) the model accepts.
        rms_norm_eps: epsilon of every RMSNorm. initializer_range: std of the normal weight init.
        tie_word_embeddings: share the input embedding with the LM head. use_cache: default of `forward(use_cache)`.
        pad_token_id, bos_token_id, eos_token_id: special token ids (eos may be a list).

    Schedules (one entry per layer):
        attention_types: "gqa" | "mla" | "v4" per layer; None -> all "mla".
        attention_sparsity: per layer, "dense" | "dsa" for gqa/mla, "sliding" | "csa" | "hca" for v4; None -> dense
            (sliding for v4).
        ffn_types: "dense" | "moe" | "hash_moe" per layer; None -> `first_k_dense_replace` dense layers, then moe.
        first_k_dense_replace: dense FFN layers at the start when `ffn_types` is None (DeepSeek-V3's layout).
        (Not called `layer_types`: transformers re-validates that name against its own cache kinds when a Trainer
        checkpoint is resumed; `config.layer_types` is derived from these schedules and never serialised.)

    Attention, shared:
        num_attention_heads: query heads. attention_bias: biases on the q/k/v/o projections.
        attention_dropout: dropout on attention probabilities while training.
        rope_parameters: {"rope_type": "default" | "linear" | "yarn", "rope_theta": ..., YaRN: "factor",
            "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
            "attention_factor"}.
    gqa:
        num_key_value_heads: shared K/V heads (None -> num_attention_heads). head_dim: per-head width (None ->
            hidden_size // num_attention_heads). partial_rotary_factor: share of head_dim that RoPE rotates.
    mla (docs/attention.md#mla):
        q_lora_rank: query latent width (None: full-rank queries). kv_lora_rank: cached KV latent width.
        qk_nope_head_dim, qk_rope_head_dim, v_head_dim: per-head widths of the non-rotated key part, the shared RoPE
            key and the value. rope_interleave: rotate adjacent pairs (DeepSeek's layout) rather than halves.
    KV cache precision:
        kv_cache_dtype: "auto" (model dtype) | "fp8_e4m3": the MLA latent is stored as FP8 records and V4's window
            K=V and compressed entries are FP8-rounded (docs/attention.md#fp8-cache-records).
        kv_cache_fp8_block: values per power-of-two float32 scale in those records.
    DeepSeek Sparse Attention and the lightning indexer (docs/indexer.md):
        index_n_heads, index_head_dim, index_rope_head_dim: indexer heads, their width, and the rotated dims.
        index_topk: keys (DSA) or compressed entries (CSA) each query selects.
        dsa_mode: "sparse" (attend over the top-k) | "dense_warmup" (dense attention; the indexer is distilled from it).
        indexer_loss_weight: weight of the indexer KL in `loss` while training (0 disables it).
        indexer_implementation: how DSA and CSA select their top-k (docs/indexer.md#implementations): "auto"
            (default: the fused CPU kernel for CPU tensors when it builds, else eager, logged once) | "fused" |
            "eager" (the float32 reference the transformers ports match); may be switched on a loaded model.
    v4 (docs/attention.md#v4-deepseek-v4-hybrid-attention):
        sliding_window: raw tokens every query sees, itself included.
        csa_compress_ratio, hca_compress_ratio: tokens pooled per compressed entry in CSA (overlapping windows) and
            HCA layers. compress_rope_parameters: RoPE of csa/hca layers (None -> rope_parameters).
        o_groups, o_lora_rank: groups of the grouped low-rank output projection and each group's rank.
        (v4 also uses num_attention_heads, head_dim — the single K=V head's width —, qk_rope_head_dim, q_lora_rank.)

    MoE (docs/ffn.md):
        moe_intermediate_size: width of each expert. n_routed_experts, n_shared_experts, num_experts_per_tok:
            routed experts, always-on shared experts, experts per token.
        scoring_func: "softmax" | "sigmoid" | "sqrtsoftplus". n_group, topk_group: group-limited routing (1: off).
        norm_topk_prob: renormalise the chosen experts' scores. routed_scaling_factor: multiplies routed weights.
        swiglu_limit: clamp of the SwiGLU gate / up projections (None: no clamp; V4: 10).
        router_bias_update_rate: step of the aux-loss-free bias update (`model.update_router_biases()`).
        aux_loss_alpha: weight of the sequence-wise balance loss (0: off). output_router_logits: return gate logits.
        hash_moe_seed: seed of the balanced token -> experts table of `hash_moe` layers.

    Residual streams (docs/residual.md):
        residual_kind: "plain" | "hc" (Hyper-Connections) | "mhc" (V4's manifold-constrained HC).
        hc_mult: streams (None -> 1 for plain, 4 otherwise). hc_sinkhorn_iters, hc_eps: mHC's Sinkhorn iterations and
            epsilon. mhc_init: "identity" (starts as a pre-norm residual network) | "uniform" (transformers' V4 init),
            docs/decisions.md#d2-mhc-init.

    Engram memory (docs/engram.md):
        engram_layer_ids: 0-based layers with an Engram module (None/[]: off).
        engram_max_ngram_size: n-gram orders 2..N. engram_n_heads: hash heads per order. engram_head_dim: row width.
        engram_vocab_size: per order, the base size of each head's table (rows = distinct primes above it).
        engram_kernel_size: short causal convolution width (0: none, as V4.1).
        engram_pad_id: raw id hashed before the sequence start and at padding (None -> pad_token_id).
        engram_seed: multipliers of layer l come from numpy default_rng(seed + 10007·l).
        engram_compressed_vocab_size: size of the compressed vocabulary (None -> vocab_size).
        engram_storage: tables in "device" memory, "host" memory or memory-mapped from "disk".
        engram_table_dir: folder of the disk tables. engram_write_buffer_mib: RAM buffer of updated disk-table rows.

    Multi-token prediction (docs/mtp.md):
        num_nextn_predict_layers: MTP modules (0: none); module k predicts token t+1+k.
        mtp_loss_weight: loss += weight · mean over modules of their LM losses.
    """

    model_type = "seekv4"
    keys_to_ignore_at_inference = ["past_key_values"]
    attribute_map = {"num_local_experts": "n_routed_experts"}

    # sizes
    vocab_size: int = 32000
    hidden_size: int = 1024
    num_hidden_layers: int = 8
    intermediate_size: int = 2816
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    # schedules
    attention_types: list[str] | None = None
    ffn_types: list[str] | None = None
    first_k_dense_replace: int = 1
    # attention, shared
    num_attention_heads: int = 16
    attention_bias: bool = False
    attention_dropout: float = 0.0
    rope_parameters: dict | None = None
    # gqa
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    partial_rotary_factor: float = 1.0
    # mla
    q_lora_rank: int | None = None
    kv_lora_rank: int = 256
    qk_nope_head_dim: int = 64
    qk_rope_head_dim: int = 32
    v_head_dim: int = 64
    rope_interleave: bool = True
    # "fp8_e4m3": the mla latent is stored (and, so cached and uncached runs agree, always used) in fp8 with one
    # power-of-two float32 scale per `kv_cache_fp8_block` values; the RoPE key stays in the model dtype.
    # For v4 attention the non-RoPE dims of the window K=V and of compressed entries are FP8-rounded the same way
    # (the official V4 demo's simulation, block 64; docs/decisions.md#d7-v4-fp8-simulation), while the cache itself
    # stays in the model dtype.
    # (FlashMLA's V3.2 layout: 656 B/token/layer at full size in bf16)
    kv_cache_dtype: str = "auto"
    kv_cache_fp8_block: int = 128
    # sparse attention: `attention_sparsity[i]` in SPARSITY_KINDS[attention_types[i]] (None: all "dense").
    # "dsa" = DeepSeek Sparse Attention (V3.2): a lightning indexer picks `index_topk` keys per query.
    attention_sparsity: list[str] | None = None
    index_n_heads: int = 4
    index_head_dim: int = 32
    index_rope_head_dim: int = 16
    index_topk: int = 64
    dsa_mode: str = "sparse"  # "dense_warmup": dense main attention, indexer distilled from it (V3.2 stage 1)
    indexer_loss_weight: float = 1.0  # weight of the indexer KL in `loss` while training
    # how DSA/CSA pick their top-k (modeling/indexer.py): "eager" = float32 torch ops streamed by query chunks,
    # the transformers ports' numerics (the reference: pin it to compare with them); "fused" = a compiled CPU
    # kernel (modeling/indexer_kernel.py) that scores bf16 q·k and ranks in one pass, several times faster on long
    # contexts, same picks except where bf16 rounding reorders near-equal scores (`python bench/indexer_costs.py`
    # prints the overlap); "auto" = fused for CPU tensors when the kernel builds, else eager (a kernel that cannot
    # be built is logged once). May be switched on a loaded model (`model.config.indexer_implementation = ...`).
    indexer_implementation: str = "auto"
    # v4 attention (DeepSeek-V4): one K=V head of `head_dim`, RoPE on its last `qk_rope_head_dim` dims,
    # sliding window + compressed entries (`csa`: ratio 4 with indexer top-k; `hca`: ratio 128, all entries)
    sliding_window: int = 128
    csa_compress_ratio: int = 4
    hca_compress_ratio: int = 128
    compress_rope_parameters: dict | None = None  # RoPE of csa/hca layers; None -> rope_parameters
    o_groups: int = 8
    o_lora_rank: int = 1024
    # moe
    moe_intermediate_size: int = 512
    n_routed_experts: int = 16
    n_shared_experts: int = 1
    num_experts_per_tok: int = 4
    scoring_func: str = "sigmoid"
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    swiglu_limit: float | None = None
    router_bias_update_rate: float = 1e-3
    aux_loss_alpha: float = 0.0
    output_router_logits: bool = False
    hash_moe_seed: int = 0
    # ---- residual (modeling/residual.py): `plain` | `hc` (Hyper-Connections) | `mhc` (V4's manifold-constrained HC)
    residual_kind: str = "plain"
    hc_mult: int | None = None  # streams n; None -> 1 for `plain`, 4 for `hc`/`mhc`
    hc_sinkhorn_iters: int = 20  # mhc: Sinkhorn–Knopp iterations on the mixing matrix
    hc_eps: float = 1e-6  # mhc: added to `pre` and to every Sinkhorn denominator
    # from-scratch init: `identity` (a pre-norm residual at init, decisions.md#d2) | `uniform` (HF V4)
    mhc_init: str = "identity"
    # ---- engram (modeling/engram.py): hashed n-gram memory added to the streams at the start of some layers
    engram_layer_ids: list[int] | None = None  # 0-based layers with an Engram module; None/[] = off
    engram_max_ngram_size: int = 3  # n-gram orders 2..N
    engram_n_heads: int = 8  # hash heads per order
    engram_head_dim: int = 64  # width of one table row
    # per order: base size of each head's table (rows = distinct primes >= it)
    engram_vocab_size: int | list[int] = 4096
    engram_kernel_size: int = 4  # short causal depthwise conv (paper demo); 0 = none (V4.1)
    engram_pad_id: int | None = None  # raw id hashed before the sequence start and at padding; None -> pad_token_id
    engram_seed: int = 0  # multipliers of layer l come from numpy default_rng(seed + 10007·l)
    # size of the compressed vocabulary (bounds the multipliers); None -> vocab_size
    engram_compressed_vocab_size: int | None = None
    engram_storage: str = "device"  # tables in `device` memory, in `host` memory, or memory-mapped from `disk`
    engram_table_dir: str | None = None  # `disk`: directory holding the table files
    engram_write_buffer_mib: int = 256  # `disk`: RAM buffer of updated rows, flushed to the file when full
    # ---- multi-token prediction (modeling/mtp.py)
    num_nextn_predict_layers: int = 0  # MTP modules; module k predicts token t+1+k
    mtp_loss_weight: float = 0.3  # loss += weight · mean over modules of their LM losses

    def __post_init__(self, **kwargs):
        kwargs.pop("seekv4_save_id", None)  # config.json's save id (modeling/checkpoint.py) belongs to the files
        self._check_types()
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None and isinstance(self.num_attention_heads, int) and self.num_attention_heads > 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.rope_parameters is None:
            self.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
        if self.attention_types is None:
            self.attention_types = ["mla"] * self.num_hidden_layers
        if self.ffn_types is None:
            n_dense = min(self.first_k_dense_replace, self.num_hidden_layers)
            self.ffn_types = ["dense"] * n_dense + ["moe"] * (self.num_hidden_layers - n_dense)
        if self.attention_sparsity is None:
            self.attention_sparsity = ["sliding" if k == "v4" else "dense" for k in self.attention_types]
        if self.compress_rope_parameters is None:
            self.compress_rope_parameters = dict(self.rope_parameters)
        self.attention_types = list(self.attention_types)
        self.ffn_types = list(self.ffn_types)
        self.attention_sparsity = list(self.attention_sparsity)
        if self.hc_mult is None:
            self.hc_mult = 1 if self.residual_kind == "plain" else 4
        self.engram_layer_ids = list(self.engram_layer_ids or [])
        if isinstance(self.engram_vocab_size, int) and not isinstance(self.engram_vocab_size, bool):
            self.engram_vocab_size = [self.engram_vocab_size] * max(self.engram_max_ngram_size - 1, 0)
        super().__post_init__(**kwargs)
        self._check()

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def layer_types(self) -> list[str]:
        """Cache layer kinds for `DynamicCache(config=...)`; derived, so never serialised (see class doc)."""
        # transformers reads this in `__post_init__`, before `_check`: a pair it will reject maps to None here
        return [CACHE_LAYER_TYPES.get(pair) for pair in zip(self.attention_types, self.attention_sparsity)]

    def validate(self):
        """transformers' class validators minus `validate_layer_type`: our derived `layer_types` names our own cache
        kinds (checked by `_check` through the schedules they come from), which its fixed list does not know.
        `validate_rope` runs without its even-`head_dim` test: only gqa layers rotate `head_dim` (times
        `partial_rotary_factor`); mla never uses it and v4 rotates its `qk_rope_head_dim` tail, and `_check` tests
        each kind's rotary width. (Otherwise e.g. mla with 3 heads builds and trains but fails to save.)"""
        for validator in PreTrainedConfig.__class_validators__:
            if validator.__name__ == "validate_rope":
                head_dim, self.head_dim = self.head_dim, None
                try:
                    validator(self)
                finally:
                    self.head_dim = head_dim
            elif validator.__name__ != "validate_layer_type":
                validator(self)

    def _check_types(self):
        """Each field declared above against its annotation (e.g. `routed_scaling_factor: "2.5"` in a config.json),
        before any value is used."""
        for name, (written, hint) in _FIELD_TYPES.items():
            value = getattr(self, name)
            if not _has_type(value, hint):
                _fail(name, value, f"expected {written}, got {type(value).__name__}")

    def _check(self):
        """Every invalid value names its field and what is allowed."""
        positive = (
            "vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size", "max_position_embeddings",
            "num_attention_heads", "num_key_value_heads", "head_dim",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                _fail(name, value, "expected a positive integer")
        if not (isinstance(self.rms_norm_eps, (int, float)) and self.rms_norm_eps > 0):
            _fail("rms_norm_eps", self.rms_norm_eps, "expected a positive number")
        if self.hidden_act not in ("silu", "swish"):
            _fail("hidden_act", self.hidden_act, "allowed: 'silu' (SwiGLU)")
        if not 0.0 <= float(self.attention_dropout) < 1.0:
            _fail("attention_dropout", self.attention_dropout, "expected a value in [0, 1)")
        for name, kinds in (("attention_types", ATTENTION_KINDS), ("ffn_types", FFN_KINDS)):
            schedule = getattr(self, name)
            if len(schedule) != self.num_hidden_layers:
                _fail(name, schedule, f"expected one entry per layer (num_hidden_layers={self.num_hidden_layers})")
            bad = sorted({k for k in schedule if k not in kinds})
            if bad:
                _fail(name, schedule, f"unknown kind(s) {bad}; allowed: {list(kinds)}")
        if "gqa" in self.attention_types:
            if self.num_attention_heads % self.num_key_value_heads:
                _fail("num_key_value_heads", self.num_key_value_heads,
                      f"must divide num_attention_heads={self.num_attention_heads}")
            if not 0.0 < self.partial_rotary_factor <= 1.0:
                _fail("partial_rotary_factor", self.partial_rotary_factor, "expected a value in (0, 1]")
            rotary = int(self.head_dim * self.partial_rotary_factor)
            if rotary % 2:
                _fail("partial_rotary_factor", self.partial_rotary_factor,
                      f"head_dim * partial_rotary_factor = {rotary} must be even")
        if "mla" in self.attention_types:
            for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
                value = getattr(self, name)
                if not isinstance(value, int) or value <= 0:
                    _fail(name, value, "expected a positive integer")
            if self.qk_rope_head_dim % 2:
                _fail("qk_rope_head_dim", self.qk_rope_head_dim, "must be even (RoPE rotates pairs)")
            if self.q_lora_rank is not None and (not isinstance(self.q_lora_rank, int) or self.q_lora_rank <= 0):
                _fail("q_lora_rank", self.q_lora_rank, "expected None (full-rank queries) or a positive integer")
        self._check_rope()
        self._check_sparsity()
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            _fail("kv_cache_dtype", self.kv_cache_dtype, f"allowed: {list(KV_CACHE_DTYPES)}")
        if self.kv_cache_dtype == "fp8_e4m3":
            if "gqa" in self.attention_types:
                _fail("kv_cache_dtype", self.kv_cache_dtype, "fp8 caches exist for 'mla' and 'v4' attention only")
            block = self.kv_cache_fp8_block
            widths = {"mla": ("kv_lora_rank", self.kv_lora_rank),
                      "v4": ("head_dim - qk_rope_head_dim", self.head_dim - self.qk_rope_head_dim)}
            if "v4" in self.attention_types and self.head_dim <= self.qk_rope_head_dim:
                _fail("qk_rope_head_dim", self.qk_rope_head_dim, f"with kv_cache_dtype='fp8_e4m3' it must be below "
                      f"head_dim={self.head_dim}: RoPE dims stay in the model dtype, so none would be stored in fp8")
            for kind in set(self.attention_types):
                name, width = widths[kind]
                if not isinstance(block, int) or block <= 0 or width % block:
                    _fail("kv_cache_fp8_block", block, f"expected a positive divisor of {name}={width}")
        if any(k in ("moe", "hash_moe") for k in self.ffn_types):
            self._check_moe()
        self._check_residual()
        if self.engram_layer_ids:
            self._check_engram()
        if not isinstance(self.num_nextn_predict_layers, int) or self.num_nextn_predict_layers < 0:
            _fail("num_nextn_predict_layers", self.num_nextn_predict_layers,
                  "expected an integer >= 0 (0 disables MTP)")
        if not (isinstance(self.mtp_loss_weight, (int, float)) and self.mtp_loss_weight >= 0):
            _fail("mtp_loss_weight", self.mtp_loss_weight, "expected a number >= 0")

    def _check_residual(self):
        if self.residual_kind not in RESIDUAL_KINDS:
            _fail("residual_kind", self.residual_kind, f"allowed: {list(RESIDUAL_KINDS)}")
        if not isinstance(self.hc_mult, int) or isinstance(self.hc_mult, bool) or self.hc_mult < 1:
            _fail("hc_mult", self.hc_mult, "expected an integer >= 1 (the number of residual streams)")
        if self.residual_kind == "plain" and self.hc_mult != 1:
            _fail("hc_mult", self.hc_mult, "residual_kind='plain' has exactly one stream; set hc_mult=1 or "
                  "residual_kind='hc'/'mhc'")
        if self.residual_kind == "mhc":
            if not isinstance(self.hc_sinkhorn_iters, int) or self.hc_sinkhorn_iters < 1:
                _fail("hc_sinkhorn_iters", self.hc_sinkhorn_iters, "expected an integer >= 1")
            if not (isinstance(self.hc_eps, (int, float)) and self.hc_eps > 0):
                _fail("hc_eps", self.hc_eps, "expected a positive number")
            if self.mhc_init not in MHC_INITS:
                _fail("mhc_init", self.mhc_init, f"allowed: {list(MHC_INITS)}")

    def _check_engram(self):
        ids = self.engram_layer_ids
        bad = [i for i in ids if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < self.num_hidden_layers]
        if bad or len(set(ids)) != len(ids):
            _fail("engram_layer_ids", ids, f"expected distinct layer indices in [0, {self.num_hidden_layers}) "
                  f"(num_hidden_layers={self.num_hidden_layers}); bad: {bad or 'duplicates'}")
        if not isinstance(self.engram_max_ngram_size, int) or self.engram_max_ngram_size < 2:
            _fail("engram_max_ngram_size", self.engram_max_ngram_size,
                  "expected an integer >= 2 (n-gram orders run from 2 to engram_max_ngram_size)")
        for name in ("engram_n_heads", "engram_head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                _fail(name, value, "expected a positive integer")
        sizes, orders = self.engram_vocab_size, self.engram_max_ngram_size - 1
        if not isinstance(sizes, list) or len(sizes) != orders:
            _fail("engram_vocab_size", sizes, f"expected one positive integer, or a list of {orders} (one per order "
                  f"2..{self.engram_max_ngram_size})")
        if any(not isinstance(v, int) or isinstance(v, bool) or v <= 0 for v in sizes):
            _fail("engram_vocab_size", sizes, "table sizes must be positive integers")
        if not isinstance(self.engram_kernel_size, int) or self.engram_kernel_size < 0:
            _fail("engram_kernel_size", self.engram_kernel_size, "expected an integer >= 0 (0: no short convolution)")
        pad = self.pad_token_id if self.engram_pad_id is None else self.engram_pad_id
        if not isinstance(pad, int) or not 0 <= pad < self.vocab_size:
            _fail("engram_pad_id", self.engram_pad_id, f"expected a token id in [0, {self.vocab_size}) (or set "
                  "pad_token_id): it is hashed before the sequence start and at padded positions")
        compressed = self.engram_compressed_vocab_size
        if compressed is not None and (not isinstance(compressed, int) or not 0 < compressed <= self.vocab_size):
            _fail("engram_compressed_vocab_size", compressed, f"expected None or an integer in [1, {self.vocab_size}]")
        if self.engram_storage not in ENGRAM_STORAGES:
            _fail("engram_storage", self.engram_storage, f"allowed: {list(ENGRAM_STORAGES)}")
        if self.engram_storage == "disk" and not self.engram_table_dir:
            _fail("engram_table_dir", self.engram_table_dir,
                  "engram_storage='disk' needs a directory for the table files")
        buf = self.engram_write_buffer_mib
        if not isinstance(buf, int) or isinstance(buf, bool) or buf <= 0:
            _fail("engram_write_buffer_mib", buf, "expected a positive integer (MiB of updated rows kept in RAM "
                  "before a disk table is written)")

    def _check_rope(self, field: str = "rope_parameters"):
        rp = getattr(self, field)
        if not isinstance(rp, dict):
            _fail(field, rp, "expected a dict with 'rope_type' and 'rope_theta'")
        rope_type = rp.get("rope_type", "default")
        if rope_type not in ROPE_TYPES:
            _fail(f"{field}['rope_type']", rope_type, f"allowed: {list(ROPE_TYPES)}")
        theta = rp.get("rope_theta")
        if not isinstance(theta, (int, float)) or theta <= 0:
            _fail(f"{field}['rope_theta']", theta, "expected a positive number")
        if rope_type in ("linear", "yarn"):
            factor = rp.get("factor")
            if not isinstance(factor, (int, float)) or factor < 1:
                _fail(f"{field}['factor']", factor, f"rope_type={rope_type!r} needs a factor >= 1")
        if rope_type == "yarn" and not isinstance(rp.get("original_max_position_embeddings"), int):
            _fail(f"{field}['original_max_position_embeddings']", rp.get("original_max_position_embeddings"),
                  "rope_type='yarn' needs the pretraining context length as an integer")

    def _check_sparsity(self):
        if len(self.attention_sparsity) != self.num_hidden_layers:
            _fail("attention_sparsity", self.attention_sparsity,
                  f"expected one entry per layer (num_hidden_layers={self.num_hidden_layers})")
        for i, (kind, sparsity) in enumerate(zip(self.attention_types, self.attention_sparsity)):
            if sparsity not in SPARSITY_KINDS[kind]:
                _fail(f"attention_sparsity[{i}]", sparsity,
                      f"allowed for {kind!r} attention: {list(SPARSITY_KINDS[kind])}")
        if "v4" in self.attention_types:
            self._check_v4()
        if "dsa" not in self.attention_sparsity and "csa" not in self.attention_sparsity:
            return
        for name in ("index_n_heads", "index_head_dim", "index_rope_head_dim", "index_topk"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                _fail(name, value, "expected a positive integer")
        if self.index_rope_head_dim % 2 or self.index_rope_head_dim > self.index_head_dim:
            _fail("index_rope_head_dim", self.index_rope_head_dim,
                  f"must be even and <= index_head_dim={self.index_head_dim}")
        if self.index_topk > self.max_position_embeddings:
            _fail("index_topk", self.index_topk,
                  f"top-k larger than the context (max_position_embeddings={self.max_position_embeddings})")
        if self.dsa_mode not in DSA_MODES:
            _fail("dsa_mode", self.dsa_mode, f"allowed: {list(DSA_MODES)}")
        if not self.indexer_loss_weight >= 0:
            _fail("indexer_loss_weight", self.indexer_loss_weight, "expected a value >= 0 (0 disables the loss)")
        if self.indexer_implementation not in INDEXER_IMPLEMENTATIONS:
            _fail("indexer_implementation", self.indexer_implementation, f"allowed: {list(INDEXER_IMPLEMENTATIONS)}")

    def _check_v4(self):
        if not isinstance(self.q_lora_rank, int) or self.q_lora_rank <= 0:
            _fail("q_lora_rank", self.q_lora_rank, "v4 attention needs low-rank queries: a positive integer")
        for name in ("sliding_window", "o_groups", "o_lora_rank", "qk_rope_head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                _fail(name, value, "expected a positive integer")
        if self.qk_rope_head_dim % 2 or self.qk_rope_head_dim > self.head_dim:
            _fail("qk_rope_head_dim", self.qk_rope_head_dim, f"must be even and <= head_dim={self.head_dim}")
        if (self.num_attention_heads * self.head_dim) % self.o_groups:
            _fail("o_groups", self.o_groups, f"must divide num_attention_heads * head_dim = "
                  f"{self.num_attention_heads * self.head_dim}")
        for name in ("csa_compress_ratio", "hca_compress_ratio"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 2:
                _fail(name, value, "expected an integer >= 2 (tokens pooled per compressed entry)")
        if ("csa" in self.attention_sparsity
                and self.index_topk > self.max_position_embeddings // self.csa_compress_ratio):
            _fail("index_topk", self.index_topk, "top-k larger than the compressed context (max_position_embeddings"
                  f" // csa_compress_ratio = {self.max_position_embeddings // self.csa_compress_ratio})")
        self._check_rope("compress_rope_parameters")

    def _check_moe(self):
        for name in ("moe_intermediate_size", "n_routed_experts", "num_experts_per_tok", "n_group", "topk_group"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                _fail(name, value, "expected a positive integer")
        if not isinstance(self.n_shared_experts, int) or self.n_shared_experts < 0:
            _fail("n_shared_experts", self.n_shared_experts, "expected an integer >= 0")
        if self.num_experts_per_tok > self.n_routed_experts:
            _fail("num_experts_per_tok", self.num_experts_per_tok,
                  f"must be <= n_routed_experts={self.n_routed_experts}")
        if self.scoring_func not in SCORING_FUNCS:
            _fail("scoring_func", self.scoring_func, f"allowed: {list(SCORING_FUNCS)}")
        if self.n_routed_experts % self.n_group:
            _fail("n_group", self.n_group, f"must divide n_routed_experts={self.n_routed_experts}")
        if self.topk_group > self.n_group:
            _fail("topk_group", self.topk_group, f"must be <= n_group={self.n_group}")
        if self.n_group > 1 and self.num_experts_per_tok > self.topk_group * (self.n_routed_experts // self.n_group):
            _fail("topk_group", self.topk_group,
                  "the selected groups must hold at least num_experts_per_tok experts")
        if self.swiglu_limit is not None and not self.swiglu_limit > 0:
            _fail("swiglu_limit", self.swiglu_limit, "expected None or a positive number")
        if self.aux_loss_alpha < 0:
            _fail("aux_loss_alpha", self.aux_loss_alpha, "expected a value >= 0 (0 disables the loss)")
        if self.router_bias_update_rate < 0:
            _fail("router_bias_update_rate", self.router_bias_update_rate, "expected a value >= 0")

    # ---- presets ---------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, **overrides) -> "SeekV4Config":
        """Build a config from a named preset (see `seekv4.list_presets()`), with field overrides."""
        from .presets import preset_kwargs

        return cls(**{**preset_kwargs(name), **overrides})


# the fields this class declares: {name: (annotation as written, evaluated)} (`from __future__ import annotations`)
_FIELD_TYPES = {name: (hint, eval(hint)) for name, hint in SeekV4Config.__annotations__.items()}
