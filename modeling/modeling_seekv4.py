"""Composition only: decoder layer, PreTrainedModel, SeekV4Model and SeekV4ForCausalLM.

Each layer takes its attention and FFN implementation from the config's per-layer schedules; the
layer itself only knows their interfaces (see ARCHITECTURE.md).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache, StaticLayer
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput

from ..configuration import SeekV4Config
from .attention_common import past_length
from .attention_gqa import GQAAttention
from .attention_mla import MLAAttention
from .attention_v4 import V4Attention
from .engram import Engram, EngramCacheLayer, EngramMemory, NgramHasher, engram_cache
from .engram_table import EngramTable
from .moe import DenseFFN, Experts, HashRouter, MoE, Router
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

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None,
                input_ids=None, engram_rows=None, engram_state=None, engram_mask=None, **kwargs):
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

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, Router):
            init.normal_(module.weight, mean=0.0, std=std)
            init.zeros_(module.e_score_correction_bias)
            init.zeros_(module.expert_load)
            if isinstance(module, HashRouter):
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
            init.normal_(module.weight, mean=0.0, std=1.0)  # nn.Embedding's default, as in the Engram demo
            init.zeros_(module.row_sum_sq)
        elif isinstance(module, EngramMemory):
            init.copy_(module.token_map, torch.arange(module.token_map.shape[0]))

    def create_masks_for_generate(self, attention_mask=None, **kwargs):
        """`generate` pre-builds 4-D masks for static caches; our forward builds its own masks (the sparse
        kinds need the 2-D padding mask, and a static cache's mask is always materialised there), so hand the
        2-D mask through unchanged."""
        return attention_mask

    @classmethod
    def from_pretrained(cls, *args, strict: bool = True, **kwargs):
        """As `PreTrainedModel.from_pretrained`, but weights that do not match the model (missing,
        unexpected or wrongly shaped keys) are an error naming them, unless `strict=False` (then they are
        re-initialised / ignored, as transformers does by default)."""
        want_info = kwargs.pop("output_loading_info", False)
        check_shapes = strict and not kwargs.get("ignore_mismatched_sizes", False)
        if check_shapes:  # let transformers report the mismatches instead of raising a generic error
            kwargs["ignore_mismatched_sizes"] = True
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        for module in model.modules():
            if isinstance(module, EngramTable):
                module.restore_storage()
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
        # one RoPE table per attention kind present (their rotary widths differ), plus the DSA indexer's
        # (v4 layers own theirs: sliding and compressed layers use different RoPE parameters)
        rope_dims = {kind: ATTENTION_CLASSES[kind].rope_dim(config) for kind in set(config.attention_types) - {"v4"}}
        if "dsa" in config.attention_sparsity:
            rope_dims["indexer"] = config.index_rope_head_dim
        self.rotary_emb = nn.ModuleDict({
            name: RotaryEmbedding(config.rope_parameters, dim) for name, dim in sorted(rope_dims.items())
        })
        self._needs_dense_mask = any(
            kind != "v4" and (sparsity == "dense" or config.dsa_mode == "dense_warmup")
            for kind, sparsity in zip(config.attention_types, config.attention_sparsity)
        )
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def _check_inputs(self, input_ids, inputs_embeds, past_len: int):
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
        seq_len = (input_ids if input_ids is not None else inputs_embeds).shape[1]
        if past_len + seq_len > self.config.max_position_embeddings:
            raise ValueError(
                f"Input of {past_len + seq_len} tokens ({past_len} cached + {seq_len} new) exceeds "
                f"max_position_embeddings={self.config.max_position_embeddings}; truncate the input or use a config "
                "with a longer context (e.g. YaRN rope_parameters and a larger max_position_embeddings)."
            )

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, output_attentions=None, output_hidden_states=None,
                output_router_logits=None, output_mtp_hidden_states=False, **kwargs) -> SeekV4ModelOutput:
        use_cache = self.config.use_cache if use_cache is None else use_cache
        output_router_logits = self.config.output_router_logits if output_router_logits is None else output_router_logits
        if self.gradient_checkpointing and self.training:
            use_cache = False
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        if not use_cache:
            past_key_values = None
        past_len = past_length(past_key_values)  # an int, read before any layer updates the cache
        self._check_inputs(input_ids, inputs_embeds, past_len)
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
        rope = {kind: emb(position_ids, inputs_embeds.dtype) for kind, emb in self.rotary_emb.items()}
        layer_kwargs = {"output_attentions": True} if output_attentions else {}
        if padded:
            layer_kwargs["key_padding"] = attention_mask.bool()  # [B, T]: sparse kinds mask padding themselves
        if "v4" in self.config.attention_types:
            layer_kwargs["position_ids"] = position_ids  # v4 compressors pool windows of each sample's positions
        engram_rows, engram_state, engram_ids = self._engram_prefetch(input_ids, attention_mask, past_key_values)
        if getattr(past_key_values, "offloading", False) and engram_cache(past_key_values) is not None:
            # the Engram layer sits after the attention layers: the cache's circular prefetch after the last one
            # lands on it and never wraps around to layer 0, which would then be read while offloaded
            past_key_values.prefetch(0, past_key_values.only_non_sliding)

        hidden = expand(inputs_embeds, self.config.hc_mult)  # residual streams [B, S, n, H]
        all_hidden, all_attn, all_router, aux_losses, indexer_losses, recalls = [], [], [], [], [], []
        for layer in self.layers:
            if output_hidden_states:
                all_hidden.append(hidden.squeeze(2))  # [B, S, H] for `plain`, the streams otherwise
            engram_kwargs = {}
            if layer.engram is not None:  # rows were requested up front; wait here, outside any checkpointing
                engram_kwargs = dict(engram_rows=engram_rows[layer.layer_idx].wait(), engram_state=engram_state,
                                     engram_mask=attention_mask)
            hidden, attn_aux, router_aux = layer(
                hidden, position_embeddings=rope, attention_mask=mask, past_key_values=past_key_values,
                input_ids=input_ids, **engram_kwargs, **layer_kwargs,
            )
            if output_attentions:
                all_attn.append(attn_aux.weights)
            if attn_aux.indexer_loss is not None:
                indexer_losses.append(attn_aux.indexer_loss)
            if attn_aux.indexer_recall is not None:
                recalls.append(attn_aux.indexer_recall)
            if router_aux is not None:
                if output_router_logits:
                    all_router.append(router_aux.router_logits)
                if router_aux.aux_loss is not None:
                    aux_losses.append(router_aux.aux_loss)
        if engram_ids is not None:
            EngramMemory.remember(past_key_values, engram_ids, engram_state)
        mtp_hidden = None
        if output_mtp_hidden_states and len(self.mtp):
            mtp_kwargs = {k: v for k, v in layer_kwargs.items() if k != "output_attentions"}
            mtp_hidden = self._mtp_forward(hidden, input_ids, rope, mask, mtp_kwargs)
        hidden = self.norm(self.hc_head(hidden))
        if output_hidden_states:
            all_hidden.append(hidden)
        return SeekV4ModelOutput(
            last_hidden_state=hidden,
            past_key_values=past_key_values,
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
            attentions=tuple(all_attn) if output_attentions else None,
            router_logits=tuple(all_router) if output_router_logits else None,
            aux_loss=torch.stack(aux_losses).sum() if aux_losses else None,
            indexer_loss=torch.stack(indexer_losses).mean() if indexer_losses else None,
            indexer_recall=torch.stack(recalls).mean() if recalls else None,
            mtp_hidden_states=mtp_hidden,
        )

    def _engram_prefetch(self, input_ids, attention_mask, past_key_values):
        """Hash every Engram layer's rows for the whole forward and start fetching them (spec §6.5)."""
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
        device = self.embed_tokens.weight.device
        rows = {i: self.layers[i].engram.table.prefetch(idx, device) for i, idx in indices.items()}
        return rows, state, ids_c

    def _mtp_forward(self, streams, input_ids, rope, mask, block_kwargs) -> tuple[torch.Tensor, ...]:
        """Module k sees the embedding of token t+k (ids shifted left by k; the tail is padding whose
        predictions the loss ignores)."""
        if input_ids is None:
            raise ValueError("MTP needs `input_ids` (it embeds the following tokens).")
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
                if isinstance(layer.mlp, MoE) and not isinstance(layer.mlp.gate, HashRouter)}


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

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, output_attentions=None,
                output_hidden_states=None, output_router_logits=None, return_dict=None, **kwargs):
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states,
            output_router_logits=output_router_logits,
            output_mtp_hidden_states=labels is not None and self.config.num_nextn_predict_layers > 0,
        )
        hidden = out.last_hidden_state
        if isinstance(logits_to_keep, int):
            hidden = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
        else:
            hidden = hidden[:, logits_to_keep]
        logits = self.lm_head(hidden)
        loss = lm_loss = mtp_loss = None
        if out.mtp_hidden_states is not None:
            mtp_loss = torch.stack([
                self.loss_function(logits=self.lm_head(h), labels=shift_left(labels, k, -100),
                                   vocab_size=self.config.vocab_size, **kwargs)
                for k, h in enumerate(out.mtp_hidden_states, start=1)
            ]).mean()
        if labels is not None:
            lm_loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
            loss = lm_loss + out.aux_loss if out.aux_loss is not None else lm_loss
            if out.indexer_loss is not None:
                loss = loss + self.config.indexer_loss_weight * out.indexer_loss
            if mtp_loss is not None:
                loss = loss + self.config.mtp_loss_weight * mtp_loss
        result = SeekV4CausalLMOutput(
            loss=loss, lm_loss=lm_loss, aux_loss=out.aux_loss, indexer_loss=out.indexer_loss, mtp_loss=mtp_loss,
            indexer_recall=out.indexer_recall, logits=logits, past_key_values=out.past_key_values,
            hidden_states=out.hidden_states, attentions=out.attentions, router_logits=out.router_logits,
        )
        return result.to_tuple() if return_dict is False else result
