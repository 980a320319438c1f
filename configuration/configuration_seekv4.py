"""SeekV4Config: one config for the whole family, with per-layer schedules for every sparsity axis."""
from __future__ import annotations

from transformers import PreTrainedConfig

ATTENTION_KINDS = ("gqa", "mla")
FFN_KINDS = ("dense", "moe", "hash_moe")
SCORING_FUNCS = ("softmax", "sigmoid", "sqrtsoftplus")
ROPE_TYPES = ("default", "linear", "yarn")


def _fail(field: str, value, allowed: str):
    raise ValueError(f"SeekV4Config.{field}={value!r} is invalid: {allowed}.")


class SeekV4Config(PreTrainedConfig):
    r"""
    Configuration of a seekv4 causal LM.

    Per-layer schedules (one entry per decoder layer) choose the implementation on each sparsity axis:
      * `attention_types[i]` in `ATTENTION_KINDS`: `gqa` (multi-head / grouped-query, hosts dense
        pretrained models) or `mla` (Multi-head Latent Attention, DeepSeek-V2/V3).
      * `ffn_types[i]` in `FFN_KINDS`: `dense` (SwiGLU), `moe` (shared + routed experts, learned router),
        `hash_moe` (routed by a frozen token-id -> experts table).
    Left as `None`, `attention_types` is all `mla` and `ffn_types` is `first_k_dense_replace` dense
    layers followed by `moe` layers (DeepSeek-V3's layout).

    The schedules are deliberately not called `layer_types`: transformers re-validates that name with
    its own allowed values when a Trainer checkpoint is resumed (see hf-integration.md §1.2).
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

    def __post_init__(self, **kwargs):
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
        self.attention_types = list(self.attention_types)
        self.ffn_types = list(self.ffn_types)
        super().__post_init__(**kwargs)
        self._check()

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

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
        if any(k in ("moe", "hash_moe") for k in self.ffn_types):
            self._check_moe()

    def _check_rope(self):
        rp = self.rope_parameters
        if not isinstance(rp, dict):
            _fail("rope_parameters", rp, "expected a dict with 'rope_type' and 'rope_theta'")
        rope_type = rp.get("rope_type", "default")
        if rope_type not in ROPE_TYPES:
            _fail("rope_parameters['rope_type']", rope_type, f"allowed: {list(ROPE_TYPES)}")
        theta = rp.get("rope_theta")
        if not isinstance(theta, (int, float)) or theta <= 0:
            _fail("rope_parameters['rope_theta']", theta, "expected a positive number")
        if rope_type in ("linear", "yarn"):
            factor = rp.get("factor")
            if not isinstance(factor, (int, float)) or factor < 1:
                _fail("rope_parameters['factor']", factor, f"rope_type={rope_type!r} needs a factor >= 1")
        if rope_type == "yarn" and not isinstance(rp.get("original_max_position_embeddings"), int):
            _fail("rope_parameters['original_max_position_embeddings']", rp.get("original_max_position_embeddings"),
                  "rope_type='yarn' needs the pretraining context length as an integer")

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
