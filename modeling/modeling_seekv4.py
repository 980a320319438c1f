"""Composition only: decoder layer, PreTrainedModel, SeekV4Model and SeekV4ForCausalLM.

Each layer takes its attention and FFN implementation from the config's per-layer schedules; the
layer itself only knows their interfaces (docs/architecture.md).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache, StaticLayer
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import slice_logits_to_keep
from transformers.processing_utils import Unpack
from transformers.utils import ModelOutput, TransformersKwargs, auto_docstring, can_return_tuple
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import resolve_hidden_states_indices, selected_hidden_states

from ..configuration import SeekV4Config
from .attention_kinds import attention_kinds
from .attention_common import AttentionAux, past_length
from .attention_gqa import GQAAttention
from .attention_mla import MLAAttention
from .attention_v4 import V4Attention
from .checkpoint import check_checkpoint, save_checkpoint
from .engram import Engram, EngramCacheLayer, EngramMemory, NgramHasher, engram_cache
from .engram_table import EngramTable, restore_engram_tables
from .moe import DenseFFN, Experts, Gate, HashRouter, MoE, Router, RouterAux
from .mtp import MTPModule, mtp_block_config, shift_left
from .norm import RMSNorm
from .residual import HCSite, HyperHead, MHCSite, build_head, build_site, expand
from .rope import RotaryEmbedding, compute_inv_freq

ATTENTION_CLASSES = {"gqa": GQAAttention, "mla": MLAAttention, "v4": V4Attention}


def build_ffn(config, kind: str) -> nn.Module:
    if kind == "dense":
        return DenseFFN(config)
    return MoE(config, hashed=kind == "hash_moe")


def positions_for(padding_mask: torch.Tensor | None, past_len: int, seq_len: int, device) -> torch.Tensor:
    """Position ids of the `seq_len` new tokens. Without padding [1, S] from `past_len`; with a 2-D padding mask
    [B, past_len + S] each sample counts only its own real tokens (cumsum - 1, padding at 0, as `generate`
    derives them), so a left-padded sample is positioned as it would be alone: RoPE is relative, but V4's
    compressors pool fixed windows of absolute positions."""
    if padding_mask is None:
        return (torch.arange(seq_len, device=device) + past_len)[None]
    if padding_mask.shape[-1] != past_len + seq_len:
        raise ValueError(
            f"`attention_mask` has {padding_mask.shape[-1]} columns but the model sees {past_len} cached + {seq_len} "
            f"new = {past_len + seq_len} tokens: pass one column per cached and new token (1 = real, 0 = padding), "
            "or pass `position_ids` explicitly."
        )
    mask = padding_mask.long()
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    return positions[:, -seq_len:].to(device)


def has_static_layers(past_key_values) -> bool:
    """Whether the cache preallocates buffers longer than what it holds (unfilled slots must be masked)."""
    return any(isinstance(layer, StaticLayer) for layer in getattr(past_key_values, "layers", ()))


@dataclass
class SeekV4ModelOutput(ModelOutput):
    last_hidden_state: torch.Tensor | None = None
    past_key_values: Cache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    router_logits: tuple[torch.Tensor, ...] | None = None
    aux_loss: torch.Tensor | None = None
    indexer_loss: torch.Tensor | None = None
    indexer_recall: torch.Tensor | None = None
    mtp_hidden_states: tuple[torch.Tensor, ...] | None = None  # per MTP depth, normed [B, S, H]


@dataclass
class SeekV4CausalLMOutput(ModelOutput):
    """`loss` = LM loss + every enabled auxiliary term; each term is also returned on its own."""

    loss: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    indexer_loss: torch.Tensor | None = None  # mean DSA indexer KL over layers (unweighted)
    indexer_recall: torch.Tensor | None = None  # dense warm-up: attention mass captured by the top-k
    mtp_loss: torch.Tensor | None = None  # mean LM loss of the MTP modules (unweighted)
    logits: torch.Tensor | None = None
    past_key_values: Cache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    router_logits: tuple[torch.Tensor, ...] | None = None


class SeekV4LayerKwargs(TransformersKwargs, total=False):
    """What the model hands every layer besides its named arguments.

    key_padding (`torch.BoolTensor` [batch, cached + new tokens]): the padding mask (True = token), given only when
        the batch is padded; sparse attention kinds mask padded keys themselves instead of reading a dense mask.
    """

    key_padding: torch.BoolTensor


@dataclass
class LayerOutputs:
    """What the layer loop gathers: the per-layer outputs the caller asked for, and the auxiliary losses every
    layer reports (always, as they enter the training loss).

    A local stand-in for transformers' `capture_outputs` / `_can_record_outputs` forward hooks, which do not fit:
    our layers return `(streams, AttentionAux, RouterAux | None)` and hooks record a tuple item as it is, while we
    return the [B, S, H] hidden state of a `plain` model (the streams of an hc/mhc one), the attention weights and
    router logits held *inside* the aux records, and losses that must be gathered whatever was asked; the MTP
    blocks are decoder layers too, and must not be recorded.
    """

    hidden_states: list[torch.Tensor | None] | None = None  # each layer's input, then the final normed hidden
    attentions: list[torch.Tensor] | None = None
    router_logits: list[torch.Tensor] | None = None
    aux_losses: list[torch.Tensor] = field(default_factory=list)
    indexer_losses: list[torch.Tensor] = field(default_factory=list)
    indexer_recalls: list[torch.Tensor] = field(default_factory=list)
    hidden_states_kept: set[int] | None = None  # the indices `output_hidden_states` selects; None: all

    @classmethod
    def requested(cls, num_layers: int, output_hidden_states: bool | int | list[int], output_attentions: bool,
                  output_router_logits: bool):
        """`output_hidden_states` is a flag or, as in transformers, the index (or indices, negative ones counted
        from the end) of the hidden states to keep; the others are returned as None."""
        selected = selected_hidden_states(output_hidden_states)
        kept = None if selected is None else resolve_hidden_states_indices(None, selected, num_layers + 1)
        return cls(hidden_states=[] if selected is not None or output_hidden_states else None,
                   attentions=[] if output_attentions else None,
                   router_logits=[] if output_router_logits else None, hidden_states_kept=kept)

    def add_hidden_state(self, hidden: torch.Tensor):
        """hidden [B, S, H], or the residual streams [B, S, n, H] of an hc/mhc model."""
        if self.hidden_states is not None:
            kept = self.hidden_states_kept is None or len(self.hidden_states) in self.hidden_states_kept
            self.hidden_states.append(hidden if kept else None)

    def add_layer_aux(self, attn_aux: AttentionAux, router_aux: RouterAux | None):
        if self.attentions is not None:
            self.attentions.append(attn_aux.weights)
        if attn_aux.indexer_loss is not None:
            self.indexer_losses.append(attn_aux.indexer_loss)
        if attn_aux.indexer_recall is not None:
            self.indexer_recalls.append(attn_aux.indexer_recall)
        if router_aux is not None:
            if self.router_logits is not None:
                self.router_logits.append(router_aux.router_logits)
            if router_aux.aux_loss is not None:
                self.aux_losses.append(router_aux.aux_loss)

    def reduced_losses(self) -> dict[str, torch.Tensor | None]:
        """Balance losses add up over layers (each is already scaled by aux_loss_alpha); the indexer's KL and
        recall are means over the DSA layers."""
        return {
            "aux_loss": torch.stack(self.aux_losses).sum() if self.aux_losses else None,
            "indexer_loss": torch.stack(self.indexer_losses).mean() if self.indexer_losses else None,
            "indexer_recall": torch.stack(self.indexer_recalls).mean() if self.indexer_recalls else None,
        }


class SeekV4DecoderLayer(GradientCheckpointingLayer):
    """hidden_states are the residual streams [B, S, n, H] (n = 1 for `plain`), see residual.py."""

    def __init__(self, config, layer_idx: int, mtp: bool = False):
        super().__init__()
        self.layer_idx = layer_idx
        self.attention_kind, self.ffn_kind = config.attention_types[layer_idx], config.ffn_types[layer_idx]
        self.engram = None
        if layer_idx in config.engram_layer_ids and not mtp:
            self.engram = Engram(config, layer_idx, sum(NgramHasher(config).table_sizes(layer_idx)))
        self.attn_hc = build_site(config, layer_idx, 0)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = ATTENTION_CLASSES[self.attention_kind](config, layer_idx)
        self.ffn_hc = build_site(config, layer_idx, 1)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = build_ffn(config, self.ffn_kind)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        input_ids: torch.LongTensor | None = None,
        engram_rows: torch.Tensor | None = None,
        engram_state: EngramCacheLayer | None = None,
        engram_mask: torch.Tensor | None = None,
        **kwargs: Unpack[SeekV4LayerKwargs],
    ) -> tuple[torch.Tensor, AttentionAux, RouterAux | None]:
        """-> (the new residual streams, what the attention reports, what the router reports (None for dense))."""
        streams = hidden_states
        if self.engram is not None:
            streams = self.engram(streams, engram_rows, engram_state, engram_mask)
        x, coeffs = self.attn_hc.pre(streams)
        attn_out, attn_aux = self.self_attn(
            self.input_layernorm(x), position_embeddings, attention_mask, past_key_values, **kwargs,
        )
        streams = self.attn_hc.post(streams, attn_out, coeffs)
        x, coeffs = self.ffn_hc.pre(streams)
        ffn_out, router_aux = self.mlp(self.post_attention_layernorm(x), input_ids)
        return self.ffn_hc.post(streams, ffn_out, coeffs), attn_aux, router_aux


class SeekV4PreTrainedModel(PreTrainedModel):
    config_class = SeekV4Config
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["SeekV4DecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _keep_in_fp32_modules_strict = ["e_score_correction_bias", "attn_hc", "ffn_hc", "hc_head"]
    # checkpoints written before hash-routed layers lost their unused balancing bias still hold it
    _keys_to_ignore_on_load_unexpected = [r"\.mlp\.gate\.e_score_correction_bias$"]

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, Gate):
            init.normal_(module.weight, mean=0.0, std=std)
            if isinstance(module, Router):
                init.zeros_(module.e_score_correction_bias)
                init.zeros_(module.expert_load)
            else:
                init.copy_(module.tid2eid, module.default_table(module.tid2eid.shape[0]))
        elif isinstance(module, Experts):
            init.normal_(module.gate_up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)
        elif isinstance(module, RotaryEmbedding):
            init.copy_(module.inv_freq, compute_inv_freq(module.rope_parameters, module.dim)[0])
        elif isinstance(module, RMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, (HCSite, MHCSite, HyperHead)):
            module.reset_parameters()
        elif isinstance(module, Engram):
            init.ones_(module.q_norm)
            init.ones_(module.k_norm)
            if module.kernel_size:
                init.ones_(module.conv_norm)
                init.normal_(module.conv.weight, mean=0.0, std=std)
        elif isinstance(module, EngramTable):
            module.mark_dirty()  # disk: a whole-table write
            init.normal_(module.weight, mean=0.0, std=1.0)  # nn.Embedding's default, as in the Engram demo
            init.zeros_(module.row_sum_sq)
        elif isinstance(module, EngramMemory):
            init.copy_(module.token_map, torch.arange(module.token_map.shape[0]))

    def create_masks_for_generate(self, attention_mask=None, **kwargs):
        """`generate` pre-builds 4-D masks for static caches; our forward builds its own masks (the sparse
        kinds need the 2-D padding mask, and a static cache's mask is always materialised there), so hand the
        2-D mask through unchanged."""
        return attention_mask

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        """As `PreTrainedModel.save_pretrained` (same arguments), but atomic: a failed save leaves the folder as it
        was, a successful one leaves no stale weights files, and files it does not write are kept (checkpoint.py)."""
        return save_checkpoint(self, save_directory, push_to_hub=push_to_hub, **kwargs)

    @classmethod
    def from_pretrained(cls, *args, strict: bool = True, **kwargs):
        """As `PreTrainedModel.from_pretrained`, but weights that do not match the model (missing,
        unexpected or wrongly shaped keys) are an error naming them, unless `strict=False` (then they are
        re-initialised / ignored, as transformers does by default). A local checkpoint must also be whole and, if
        strict, written by one save (see checkpoint.py). Disk Engram tables are copied from the checkpoint into new
        files, never into a folder that holds a table (`engram_table.restore_engram_tables`)."""
        check_checkpoint(args[0] if args else kwargs.get("pretrained_model_name_or_path"), strict, **kwargs)
        want_info = kwargs.pop("output_loading_info", False)
        check_shapes = strict and not kwargs.get("ignore_mismatched_sizes", False)
        if check_shapes:  # let transformers report the mismatches instead of raising a generic error
            kwargs["ignore_mismatched_sizes"] = True
        explicit_table_dir = kwargs.get("engram_table_dir") is not None
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        restore_engram_tables(model, explicit_table_dir)  # disk tables: new files, never the config's live ones
        if strict:
            head_only = not hasattr(model, "lm_head")  # a base model may load a checkpoint with an LM head
            problems = {
                "missing keys": sorted(info["missing_keys"]),
                "unexpected keys": sorted(k for k in info["unexpected_keys"]
                                          if not (head_only and k.startswith("lm_head."))),
                "wrongly shaped keys": sorted(f"{k}: checkpoint {tuple(a)} vs model {tuple(b)}"
                                              for k, a, b in info.get("mismatched_keys", ())) if check_shapes else [],
            }
            found = {name: keys for name, keys in problems.items() if keys}
            if found:
                where = args[0] if args else kwargs.get("pretrained_model_name_or_path")
                listing = "; ".join(f"{name} {keys[:8]}{' ...' if len(keys) > 8 else ''}"
                                    for name, keys in found.items())
                raise ValueError(
                    f"Checkpoint {where!s} does not match {cls.__name__} built from its config: {listing}. Check "
                    "that config.json belongs to these weights, or pass strict=False to initialise missing weights "
                    "randomly and ignore the rest."
                )
        return (model, info) if want_info else model


class SeekV4Model(SeekV4PreTrainedModel):
    def __init__(self, config: SeekV4Config):
        super().__init__(config)
        self.padding_idx, self.vocab_size = config.pad_token_id, config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(SeekV4DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.engram = EngramMemory(config) if config.engram_layer_ids else None
        self.hc_head = build_head(config)
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        # MTP blocks take the last layer's kinds (V4: sliding attention, score-routed MoE) and never use the cache
        self.mtp = nn.ModuleList(
            MTPModule(config, SeekV4DecoderLayer(mtp_block_config(config), config.num_hidden_layers - 1, mtp=True))
            for _ in range(config.num_nextn_predict_layers)
        )
        # one RoPE table per attention kind present (their rotary widths differ), plus the DSA indexer's; v4 has
        # two RoPE parameter sets: `v4` (sliding layers and the MTP block) and `v4_compress` (csa / hca layers)
        rope_dims = {kind: ATTENTION_CLASSES[kind].rope_dim(config) for kind in set(config.attention_types) - {"v4"}}
        if "dsa" in config.attention_sparsity:
            rope_dims["indexer"] = config.index_rope_head_dim
        rope_params = dict.fromkeys(rope_dims, config.rope_parameters)
        if "v4" in config.attention_types:
            rope_dims["v4"], rope_params["v4"] = config.qk_rope_head_dim, config.rope_parameters
            if {"csa", "hca"} & set(config.attention_sparsity):
                rope_dims["v4_compress"] = config.qk_rope_head_dim
                rope_params["v4_compress"] = config.compress_rope_parameters
        self.rotary_emb = nn.ModuleDict({
            name: RotaryEmbedding(rope_params[name], dim) for name, dim in sorted(rope_dims.items())
        })
        self._needs_dense_mask = any(kind.needs_dense_mask(config) for kind in attention_kinds(config))
        self.gradient_checkpointing = False
        self.post_init()

    def position_embeddings(self, position_ids: torch.Tensor, dtype: torch.dtype) -> dict:
        """What every attention layer reads its RoPE from: {table name: (cos, sin) [B or 1, S, d/2]}."""
        rope = {kind: emb(position_ids, dtype) for kind, emb in self.rotary_emb.items()}
        if "v4_compress" in self.rotary_emb:  # v4 compressors rotate entry i to position i·m: they read the table
            rope["v4_compress_table"] = self.rotary_emb["v4_compress"]
        return rope

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def _check_inputs(self, input_ids, inputs_embeds, past_len: int, attention_mask=None, position_ids=None):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` or `inputs_embeds`.")
        if input_ids is not None:
            if input_ids.dtype.is_floating_point or input_ids.dtype in (torch.bool, torch.complex64, torch.complex128):
                raise TypeError(f"`input_ids` must hold integer token ids (torch.long), got dtype {input_ids.dtype}; "
                                "convert with `input_ids.long()` or pass float features as `inputs_embeds`.")
            if input_ids.dim() != 2:
                raise ValueError(f"`input_ids` must have shape [batch, seq_len], got {tuple(input_ids.shape)}.")
            if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= self.vocab_size):
                raise ValueError(f"`input_ids` holds ids outside [0, {self.vocab_size}) (min {int(input_ids.min())}, "
                                 f"max {int(input_ids.max())}); they do not fit this model's vocabulary.")
        hidden = self.config.hidden_size
        if inputs_embeds is not None and (inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != hidden):
            raise ValueError(f"`inputs_embeds` must have shape [batch, seq_len, hidden_size={hidden}], "
                             f"got {tuple(inputs_embeds.shape)}.")
        shape = tuple((input_ids if input_ids is not None else inputs_embeds).shape)
        batch, seq_len = shape[:2]
        if batch == 0 or seq_len == 0:
            raise ValueError(f"Got an empty input of shape {shape}: every call needs at least one sequence of at least "
                             "one token (for `generate`, a non-empty prompt, e.g. the BOS token).")
        if past_len + seq_len > self.config.max_position_embeddings:
            raise ValueError(
                f"Input of {past_len + seq_len} tokens ({past_len} cached + {seq_len} new) exceeds "
                f"max_position_embeddings={self.config.max_position_embeddings}; truncate the input or use a config "
                "with a longer context (e.g. YaRN rope_parameters and a larger max_position_embeddings)."
            )
        if attention_mask is not None:
            self._check_attention_mask(attention_mask, batch, seq_len, past_len)
        if position_ids is not None:
            self._check_position_ids(position_ids, batch, seq_len)

    def _check_attention_mask(self, mask, batch: int, seq_len: int, past_len: int):
        """2-D: the padding mask over cached + new tokens (generate's convention), 0/1 only; HF reads any nonzero as
        "attend", so an additive (0 / -inf) mask would silently attend to exactly the wrong tokens."""
        if not isinstance(mask, torch.Tensor) or mask.dim() == 4:
            return self._check_4d_mask(mask, batch, seq_len, past_len)
        expected = (batch, past_len + seq_len)
        if mask.dim() != 2:
            raise ValueError(f"`attention_mask` must be a 2-D padding mask {expected} [batch, cached + new tokens] "
                             "(1 = token, 0 = padding), or a 4-D mask for dense attention; got shape "
                             f"{tuple(mask.shape)}.")
        if tuple(mask.shape) != expected:
            raise ValueError(f"`attention_mask` has shape {tuple(mask.shape)}; expected {expected} (batch {batch}, "
                             f"{past_len} cached + {seq_len} new tokens): the 2-D mask covers the cached tokens and "
                             "the new ones, as `generate` passes it.")
        if mask.dtype == torch.bool:
            return
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("`attention_mask` must hold only 0 (padding) and 1 (token), got values "
                             f"{mask.unique()[:6].tolist()}. An additive mask (0 = attend, -inf = masked) converts "
                             "with `(mask == 0).long()`.")
        if mask.is_floating_point() and not bool(mask.any(-1).all()):
            raise ValueError("A floating-point `attention_mask` has a row of zeros (every token masked). If it is an "
                             "additive mask (0 = attend), pass `torch.ones_like(mask, dtype=torch.long)` (or "
                             "`(mask == 0).long()`) instead.")

    def _check_4d_mask(self, mask, batch: int, seq_len: int, past_len: int):
        """Only dense gqa/mla kernels read a 4-D mask (or a BlockMask); sparse, v4 and Engram layers need the 2-D
        padding mask, and would silently ignore a 4-D one."""
        if any(s != "dense" for s in self.config.attention_sparsity) or self.config.engram_layer_ids:
            raise ValueError("A 4-D attention_mask (or a BlockMask) is only read by dense attention; this model has "
                             "sparse (dsa / v4) attention or Engram layers, which need the 2-D padding mask "
                             "[batch, cached + new tokens] (1 = token, 0 = padding): pass that instead.")
        if not isinstance(mask, torch.Tensor):
            return
        expected = (batch, 1, seq_len, past_len + seq_len)
        if mask.shape[0] != batch or mask.shape[1] not in (1, self.config.num_attention_heads) or \
                tuple(mask.shape[2:]) != expected[2:]:
            raise ValueError(f"4-D `attention_mask` has shape {tuple(mask.shape)}; expected {expected} [batch, 1 or "
                             f"heads, new tokens, {past_len} cached + {seq_len} new tokens].")
        if mask.dtype == torch.bool:
            return
        if not mask.is_floating_point():
            raise ValueError("4-D `attention_mask` must be bool (True = attend) or an additive float mask (0 = "
                             f"attend, large negative = masked), got dtype {mask.dtype}.")
        if bool((mask > 0).any()):
            raise ValueError("4-D float `attention_mask` is additive (0 = attend, large negative = masked), so its "
                             "values must be <= 0; a 0/1 mask must be passed as bool (`mask.bool()`).")

    def _check_position_ids(self, position_ids, batch: int, seq_len: int):
        if not isinstance(position_ids, torch.Tensor) or position_ids.dtype.is_floating_point or \
                position_ids.dtype in (torch.bool, torch.complex64, torch.complex128):
            raise TypeError(f"`position_ids` must be an integer tensor (torch.long), got "
                            f"{getattr(position_ids, 'dtype', type(position_ids).__name__)}.")
        if position_ids.dim() != 2 or position_ids.shape[0] not in (1, batch) or position_ids.shape[1] != seq_len:
            raise ValueError(f"`position_ids` has shape {tuple(position_ids.shape)}; expected ({batch}, {seq_len}) "
                             f"or (1, {seq_len}) [batch, new tokens].")
        lo, hi, limit = int(position_ids.min()), int(position_ids.max()), self.config.max_position_embeddings
        if lo < 0 or hi >= limit:
            raise ValueError(f"`position_ids` holds positions outside [0, {limit}) (min {lo}, max {hi}): beyond "
                             f"max_position_embeddings={limit} the RoPE scaling is not defined; use a config with a "
                             "longer context.")

    @merge_with_config_defaults
    @can_return_tuple
    @auto_docstring
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        output_mtp_hidden_states: bool = False,
        **kwargs: Unpack[TransformersKwargs],
    ) -> SeekV4ModelOutput:
        r"""
        attention_mask (`torch.Tensor`, *optional*): the 2-D padding mask [batch, cached + new tokens] (1 = token,
            0 = padding), or for dense gqa/mla models a 4-D mask; see `_check_attention_mask`.
        output_mtp_hidden_states (`bool`, defaults to `False`): also run the MTP modules and return their normed
            hidden states, one per depth (the LM head's input for the MTP loss).

        `output_attentions`, `output_hidden_states` and `output_router_logits` are taken from `kwargs`, defaulting
        to the config's; other keyword arguments (the loss's `num_items_in_batch`, `shift_labels`) are ignored.
        """
        self._check_attention_kwargs(kwargs)
        output_attentions, output_hidden_states, output_router_logits = self._requested_outputs(kwargs)
        if not use_cache:
            past_key_values = None
        elif past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        past_len = past_length(past_key_values)  # an int, read before any layer updates the cache
        self._check_inputs(input_ids, inputs_embeds, past_len, attention_mask, position_ids)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        padded = attention_mask is not None and attention_mask.dim() == 2 and not bool(attention_mask.all())
        if position_ids is None:
            position_ids = positions_for(attention_mask if padded else None, past_len, inputs_embeds.shape[1],
                                         inputs_embeds.device)
        mask = None  # only kinds that call a dense kernel need the [B, 1, S, T] mask (O(S·T) to build)
        if self._needs_dense_mask:
            # transformers may return no mask and rely on sdpa's top-left `is_causal`; our eager and absorbed
            # kernels then align queries with the *last* keys, wrong for a static cache's unfilled tail
            mask = create_causal_mask(config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                      past_key_values=past_key_values, position_ids=position_ids,
                                      allow_is_causal_skip=not has_static_layers(past_key_values))
        rope = self.position_embeddings(position_ids, inputs_embeds.dtype)
        layer_kwargs = {"output_attentions": True} if output_attentions else {}
        if padded:
            layer_kwargs["key_padding"] = attention_mask.bool()  # [B, T]: sparse kinds mask padding themselves
        if "v4" in self.config.attention_types:
            layer_kwargs["position_ids"] = position_ids  # v4 compressors pool windows of each sample's positions

        engram = self._engram_prefetch(input_ids, attention_mask, past_key_values, inputs_embeds.device)
        outputs = LayerOutputs.requested(len(self.layers), output_hidden_states, output_attentions,
                                         output_router_logits)
        streams = self._decoder_layers(
            expand(inputs_embeds, self.config.hc_mult), rope, mask, past_key_values, input_ids, attention_mask,
            engram, layer_kwargs, outputs,
        )
        mtp_hidden_states = None
        if output_mtp_hidden_states and len(self.mtp):
            mtp_hidden_states = self._mtp_forward(streams, input_ids, rope, mask, layer_kwargs)
        hidden_states = self.norm(self.hc_head(streams))
        outputs.add_hidden_state(hidden_states)

        return SeekV4ModelOutput(
            last_hidden_state=hidden_states,
            past_key_values=past_key_values,
            hidden_states=tuple(outputs.hidden_states) if outputs.hidden_states is not None else None,
            attentions=tuple(outputs.attentions) if output_attentions else None,
            router_logits=tuple(outputs.router_logits) if output_router_logits else None,
            mtp_hidden_states=mtp_hidden_states,
            **outputs.reduced_losses(),
        )

    def _check_attention_kwargs(self, kwargs):
        """Packed-sequence (varlen) arguments are refused rather than ignored: every kind here attends causally over
        the whole row, so documents packed into one row would see each other."""
        packed = sorted(k for k in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")
                        if kwargs.get(k) is not None)
        if packed:
            raise ValueError(f"SeekV4 does not support packed sequences ({', '.join(packed)} given): pad the batch "
                             "and pass a 2-D `attention_mask` instead (e.g. a collator without flattening).")
        if kwargs.get("is_causal") is False:
            raise ValueError("SeekV4 is a causal decoder only: `is_causal=False` (bidirectional attention) is not "
                             "supported.")

    def _requested_outputs(self, kwargs) -> tuple[bool, bool | int | list[int], bool]:
        """(output_attentions, output_hidden_states, output_router_logits), each from `kwargs` or else the config,
        as transformers' `capture_outputs` reads them."""

        def requested(name):
            value = kwargs.get(name)
            return getattr(self.config, name, False) if value is None else value

        return (bool(requested("output_attentions")), requested("output_hidden_states"),
                bool(requested("output_router_logits")))

    def _decoder_layers(self, streams, rope, mask, past_key_values, input_ids, attention_mask, engram,
                        layer_kwargs, outputs: LayerOutputs) -> torch.Tensor:
        """Run every decoder layer on the residual streams [B, S, n, H], gathering into `outputs`; returns the
        last layer's streams."""
        engram_rows, engram_state, engram_ids = engram
        for layer in self.layers:
            outputs.add_hidden_state(streams.squeeze(2))  # [B, S, H] for `plain`, the streams otherwise
            engram_kwargs = {}
            if layer.engram is not None:  # rows were requested up front; wait here, outside any checkpointing
                engram_kwargs = dict(engram_rows=engram_rows[layer.layer_idx].wait(), engram_state=engram_state,
                                     engram_mask=attention_mask)
            streams, attn_aux, router_aux = layer(
                streams, position_embeddings=rope, attention_mask=mask, past_key_values=past_key_values,
                input_ids=input_ids, **engram_kwargs, **layer_kwargs,
            )
            outputs.add_layer_aux(attn_aux, router_aux)
        if engram_ids is not None:
            EngramMemory.remember(past_key_values, engram_ids, engram_state)
        return streams

    def _engram_prefetch(self, input_ids, attention_mask, past_key_values, device):
        """Hash every Engram layer's rows for the whole forward and start fetching them onto `device`, the
        embeddings' (not read from a weight, which an offload hook may keep on the meta device).
        -> (pending rows per Engram layer, the cache's Engram state, the compressed ids to remember), all None
        without Engram layers."""
        if self.engram is None:
            return None, None, None
        if input_ids is None:
            raise ValueError("Engram layers look up token ids: call the model with `input_ids`, not only "
                             "`inputs_embeds`.")
        state = None
        if past_key_values is not None:
            state = engram_cache(past_key_values) or EngramCacheLayer()
        ids_c = self.engram.compress(input_ids, attention_mask)
        indices = self.engram.indices(ids_c, state.ids if state is not None else None)
        rows = {i: self.layers[i].engram.table.prefetch(idx, device) for i, idx in indices.items()}
        if getattr(past_key_values, "offloading", False) and engram_cache(past_key_values) is not None:
            # the Engram layer sits after the attention layers: the cache's circular prefetch after the last one
            # lands on it and never wraps around to layer 0, which would then be read while offloaded
            past_key_values.prefetch(0, past_key_values.only_non_sliding)
        return rows, state, ids_c

    def _mtp_forward(self, streams, input_ids, rope, mask, layer_kwargs) -> tuple[torch.Tensor, ...]:
        """Module k sees the embedding of token t+k (ids shifted left by k; the tail is padding whose
        predictions the loss ignores). Its block gets the main layers' kwargs, less `output_attentions` (MTP
        attentions are not returned)."""
        if input_ids is None:
            raise ValueError("MTP needs `input_ids` (it embeds the following tokens).")
        block_kwargs = {k: v for k, v in layer_kwargs.items() if k != "output_attentions"}
        outs = []
        for k, module in enumerate(self.mtp, start=1):
            next_ids = shift_left(input_ids, k, self.config.pad_token_id or 0)
            streams, hidden = module(streams, self.embed_tokens(next_ids), next_ids, position_embeddings=rope,
                                     attention_mask=mask, **block_kwargs)
            outs.append(hidden)
        return tuple(outs)

    def step_engram_tables(self, lr: float) -> dict[int, torch.Tensor]:
        """Row-wise update of every Engram table from the gradients since the last call; returns touched rows."""
        return {layer.layer_idx: layer.engram.table.step(lr) for layer in self.layers if layer.engram is not None}

    def update_router_biases(self) -> dict[int, torch.Tensor]:
        """Apply the aux-loss-free bias update in every learned-router layer; returns per-layer expert loads."""
        return {i: layer.mlp.gate.update_bias() for i, layer in enumerate(self.layers)
                if isinstance(layer.mlp, MoE) and isinstance(layer.mlp.gate, Router)}


class SeekV4ForCausalLM(SeekV4PreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: SeekV4Config):
        super().__init__(config)
        self.model = SeekV4Model(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def resize_token_embeddings(self, *args, **kwargs):
        embeddings = super().resize_token_embeddings(*args, **kwargs)
        for module in self.modules():
            if isinstance(module, HashRouter):
                module.resize(embeddings.num_embeddings)
        self.model.vocab_size = self.config.vocab_size
        return embeddings

    def update_router_biases(self):
        return self.model.update_router_biases()

    def step_engram_tables(self, lr: float):
        return self.model.step_engram_tables(lr)

    @can_return_tuple
    @auto_docstring
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> SeekV4CausalLMOutput:
        r"""
        labels (`torch.LongTensor` [batch, seq_len], *optional*): targets, unshifted (position t predicts
            labels[t + 1]); -100 is ignored. `shift_labels` (already shifted, as padding-free collators pass) and
            `num_items_in_batch` (Trainer's count of valid shifted targets over all accumulated micro-batches and
            devices) are taken from `kwargs`, as transformers' `ForCausalLMLoss` takes them.

        `lm_loss` follows LlamaForCausalLM exactly: the mean CE over valid targets, or their sum divided by
        `num_items_in_batch`. Every label -100 therefore gives NaN (0/0) without a count or with a zero count, as
        in Llama; the Trainer's count from other micro-batches gives 0.

        `mtp_loss` is (1/D) sum_k L_k over the D MTP depths (DeepSeek-V3 §2.2), L_k the mean CE over depth k's own
        valid targets (labels[t + 1 + k]). A depth without targets (seq_len <= k + 1, or all ignored) has L_k = 0,
        kept in the graph. With `num_items_in_batch`, L_k is its sum divided by `num_items_in_batch * n_k / n`
        (n_k, n: this micro-batch's depth-k and main target counts), the depth's share of the accumulated count as
        far as this micro-batch can tell: summed over micro-batches this is exactly the mean over all depth-k
        targets when every micro-batch loses the same share of targets to the shift (e.g. rows of one length, no
        masked labels), and otherwise the micro-batch means weighted by n / num_items_in_batch (Trainer does not
        pass the other micro-batches' depth-k counts to the model).

        `loss` = lm_loss + aux_loss + indexer_loss_weight * indexer_loss + mtp_loss_weight * mtp_loss.
        """
        outputs: SeekV4ModelOutput = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_mtp_hidden_states=labels is not None and self.config.num_nextn_predict_layers > 0,
            return_dict=True,  # read by field below, whatever the caller (or config.return_dict) asks of us
            **kwargs,
        )

        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden_states)

        loss = lm_loss = mtp_loss = None
        if labels is not None:
            lm_loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
            if outputs.mtp_hidden_states is not None:
                mtp_loss = self._mtp_loss(outputs.mtp_hidden_states, labels, **kwargs)
            loss = self._total_loss(lm_loss, outputs.aux_loss, outputs.indexer_loss, mtp_loss)

        return SeekV4CausalLMOutput(
            loss=loss,
            lm_loss=lm_loss,
            aux_loss=outputs.aux_loss,
            indexer_loss=outputs.indexer_loss,
            indexer_recall=outputs.indexer_recall,
            mtp_loss=mtp_loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits,
        )

    def _total_loss(self, lm_loss, aux_loss, indexer_loss, mtp_loss) -> torch.Tensor:
        """lm_loss + aux_loss + indexer_loss_weight * indexer_loss + mtp_loss_weight * mtp_loss, over the terms
        that are enabled."""
        loss = lm_loss + aux_loss if aux_loss is not None else lm_loss
        if indexer_loss is not None:
            loss = loss + self.config.indexer_loss_weight * indexer_loss
        if mtp_loss is not None:
            loss = loss + self.config.mtp_loss_weight * mtp_loss
        return loss

    def _mtp_loss(self, mtp_hidden_states, labels, num_items_in_batch=None, shift_labels=None, ignore_index=-100,
                  **kwargs) -> torch.Tensor:
        """(1/D) sum_k L_k, each depth normalised by its own target count (see `forward`)."""
        if shift_labels is None:
            shift_labels = shift_left(labels, 1, ignore_index)
        n_main = (shift_labels != ignore_index).sum()
        losses = []
        for k, hidden in enumerate(mtp_hidden_states, start=1):
            logits = self.lm_head(hidden).float()
            target = shift_left(shift_labels, k, ignore_index).to(logits.device)
            total = nn.functional.cross_entropy(logits.reshape(-1, self.config.vocab_size), target.reshape(-1),
                                                ignore_index=ignore_index, reduction="sum")
            n_k = (target != ignore_index).sum().to(logits.device)
            norm = n_k.float()
            if num_items_in_batch is not None:
                norm = torch.as_tensor(num_items_in_batch, device=logits.device).float() * n_k / n_main.to(n_k.device)
            # no target: `total` is an exact 0 (a sum over nothing) that still carries the graph
            losses.append(total / torch.where(n_k > 0, norm, torch.ones_like(norm)))
        return torch.stack(losses).mean()
