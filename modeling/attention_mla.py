"""`mla` attention: Multi-head Latent Attention (DeepSeek-V2 §2.1, V3).

Per token the cache holds only the normalised KV latent c_kv [r] and the shared RoPE key k_rope [d_r]
(stored as the cache layer's keys and values). Two equivalent ways to attend:

* expanded (prefill, training): k = [W_UK c_kv ; k_rope], v = W_UV c_kv per head, then a standard
  kernel. For sdpa, v is zero-padded to the q/k head dim so torch uses its fused (flash) CPU kernel
  instead of the quadratic-memory math fallback it takes when the head dims differ.
* absorbed (decode): W_UK is folded into the query and W_UV applied after attention, so the latent cache
  is read directly as one shared 'MQA' head and never re-expanded (cost per step O(T·(r + d_r)) per
  head instead of O(T·r·H·(d_nope + d_v)) for re-expansion).
The cheaper path is chosen per call from the FLOP counts (see `_use_absorbed`).

With DeepSeek Sparse Attention (`attention_sparsity[i] == "dsa"`, V3.2) the layer runs in the absorbed
(MQA) form over only the top-k latent entries its lightning indexer selects (see `sparsity.py`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention_common import AttentionAux, apply_mask, attention_kernel, causal_bool_mask, past_length
from .cache_append import cache_update
from .fp8 import pack_fp8, packed_bytes, reinterpret, unpack_fp8
from .indexer import LightningIndexer
from .linear_weight import effective_weight, plain_linear
from .norm import RMSNorm
from .rope import apply_rope, softmax_scale
from .sparse_attention import query_chunk, sparse_attention
from .sparsity import build_selector


class MLAAttention(nn.Module):
    kind = "mla"

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.num_heads = config.num_attention_heads
        self.q_lora_rank, self.kv_lora_rank = config.q_lora_rank, config.kv_lora_rank
        self.nope_dim, self.rope_head_dim = config.qk_nope_head_dim, config.qk_rope_head_dim
        self.v_dim = config.v_head_dim
        self.qk_dim = self.nope_dim + self.rope_head_dim
        self.num_key_value_groups = 1  # keys/values are per head once expanded
        self.scaling = softmax_scale(config.rope_parameters, self.qk_dim)
        self.is_causal = True
        h, bias = config.hidden_size, config.attention_bias
        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(h, self.num_heads * self.qk_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(h, self.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, eps=config.rms_norm_eps)
            self.q_b_proj = nn.Linear(self.q_lora_rank, self.num_heads * self.qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(h, self.kv_lora_rank + self.rope_head_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, eps=config.rms_norm_eps)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, self.num_heads * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.v_dim, h, bias=bias)
        # the indexer reads the query latent c^Q; it stays registered here (`self_attn.indexer.*`)
        dsa = config.attention_sparsity[layer_idx] == "dsa"
        self.indexer = LightningIndexer(config, self.q_lora_rank or h) if dsa else None
        self.selector = build_selector(config, layer_idx, self.indexer)

    @staticmethod
    def rope_dim(config) -> int:
        return config.qk_rope_head_dim

    def forward(self, hidden_states: torch.Tensor, position_embeddings: dict, attention_mask, past_key_values=None,
                key_padding: torch.Tensor | None = None, **kwargs) -> tuple[torch.Tensor, AttentionAux]:
        b, s, _ = hidden_states.shape
        if self.q_lora_rank is None:
            q_latent = hidden_states
            q = self.q_proj(hidden_states)
        else:
            q_latent = self.q_a_layernorm(self.q_a_proj(hidden_states))  # c^Q, also the indexer's query input
            q = self.q_b_proj(q_latent)
        q = q.view(b, s, self.num_heads, self.qk_dim).transpose(1, 2)  # [B, H, S, dn + dr]
        q_nope, q_rope = q.split([self.nope_dim, self.rope_head_dim], dim=-1)
        c_kv, k_rope = self.kv_a_proj_with_mqa(hidden_states).split([self.kv_lora_rank, self.rope_head_dim], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv).unsqueeze(1)  # [B, 1, S, r]
        cos, sin = position_embeddings[self.kind]
        interleaved = self.config.rope_interleave
        q_rope = apply_rope(q_rope, cos, sin, interleaved)
        k_rope = apply_rope(k_rope.unsqueeze(1), cos, sin, interleaved)  # [B, 1, S, dr]
        # before this layer's update; only DSA positions its queries by it (a static layer's length is a device
        # tensor: reading it costs a sync, so dense layers skip it)
        past_len = past_length(past_key_values, self.layer_idx) if self.indexer is not None else 0
        if self.config.kv_cache_dtype == "fp8_e4m3":
            c_kv, k_rope = self._fp8_cache(c_kv, k_rope, past_key_values)
        elif past_key_values is not None:
            c_kv, k_rope = cache_update(past_key_values, self.layer_idx, c_kv, k_rope)  # [B, 1, T, r], [B, 1, T, dr]
        selection = self.selector(hidden_states, q_latent, position_embeddings.get("indexer"), past_key_values,
                                  past_len, key_padding)
        if selection.idx is not None:  # absorbed (MQA) attention over the selected latent entries only
            out, weights = self._sparse(q_nope, q_rope, c_kv, k_rope, selection.idx,
                                        return_probs=selection.return_probs or bool(kwargs.get("output_attentions")))
        # dense warm-up needs the full probabilities, which the indexer learns: absorbed path
        elif selection.return_probs or self._use_absorbed(s, c_kv.shape[2], attention_mask):
            out, weights = self._absorbed(q_nope, q_rope, c_kv, k_rope, attention_mask)
        else:
            out, weights = self._expanded(q_nope, q_rope, c_kv, k_rope, attention_mask, **kwargs)
        return self.o_proj(out.reshape(b, s, -1)), self.selector.aux(selection, weights, self.training)

    def _fp8_cache(self, c_kv, k_rope, past_key_values):
        """Cache one byte record per token, [e4m3 latent | float32 scales | RoPE key in the model dtype] (FlashMLA's
        V3.2 layout), and attend with the dequantised latent whether cached or not, so both paths agree."""
        dtype = k_rope.dtype
        record = torch.cat((pack_fp8(c_kv, self.config.kv_cache_fp8_block),
                            k_rope.contiguous().view(torch.float8_e4m3fn)), dim=-1)
        if past_key_values is not None:
            record, _ = cache_update(past_key_values, self.layer_idx, record, record[..., :0])
        latent_bytes = packed_bytes(self.kv_lora_rank, self.config.kv_cache_fp8_block)
        c_kv = unpack_fp8(record[..., :latent_bytes], self.kv_lora_rank, dtype)
        return c_kv, reinterpret(record[..., latent_bytes:], dtype)

    def _use_absorbed(self, q_len: int, kv_len: int, attention_mask) -> bool:
        if self.training or not (attention_mask is None or isinstance(attention_mask, torch.Tensor)):
            return False  # training keeps one path for autograd; flex BlockMasks only fit the kernel path
        if self.config._attn_implementation not in ("sdpa", "eager"):
            return False
        r, dn, dr, dv = self.kv_lora_rank, self.nope_dim, self.rope_head_dim, self.v_dim
        expanded = kv_len * r * (dn + dv) + q_len * kv_len * (dn + dr + dv)
        absorbed = q_len * r * (dn + dv) + q_len * kv_len * (2 * r + dr)
        if not plain_linear(self.kv_b_proj):  # its effective weight costs one r-row call (see `_absorbed_weights`)
            absorbed += r * r * (dn + dv)
        return absorbed < expanded

    def _expanded(self, q_nope, q_rope, c_kv, k_rope, attention_mask, **kwargs):
        b, h, t = q_nope.shape[0], self.num_heads, c_kv.shape[2]
        kv = self.kv_b_proj(c_kv.squeeze(1)).view(b, t, h, self.nope_dim + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)  # [B, H, T, dn], [B, H, T, dv]
        q = torch.cat((q_nope, q_rope), dim=-1)
        k = torch.cat((k_nope, k_rope.expand(b, h, t, self.rope_head_dim)), dim=-1)
        pad = self.qk_dim - self.v_dim if self.config._attn_implementation == "sdpa" else 0
        if pad > 0:
            v = F.pad(v, (0, pad))
        elif pad < 0:
            q, k = F.pad(q, (0, -pad)), F.pad(k, (0, -pad))  # zero dims change no score
        out, weights = attention_kernel(self.config)(
            self, q, k, v, attention_mask, scaling=self.scaling,
            dropout=self.config.attention_dropout if self.training else 0.0, **kwargs,
        )
        return out[..., : self.v_dim], weights  # [B, S, H, dv]

    def _absorbed_weights(self, like):
        """W_UK, W_UV as `kv_b_proj` applies them (adapters, quantisation and offload hooks included)."""
        w = effective_weight(self.kv_b_proj, like).view(self.num_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
        return w[:, : self.nope_dim], w[:, self.nope_dim :]  # W_UK [H, dn, r], W_UV [H, dv, r]

    def _sparse(self, q_nope, q_rope, c_kv, k_rope, idx, return_probs: bool):
        """Absorbed (MQA) attention over the selected latent entries only: O(S·k), never O(S·T).

        Query chunks go through the whole absorbed pipeline (q·W_UK, attention, ·W_UV) one at a time, so no
        full-length latent-sized intermediate exists: at 32k tokens each would be a 64 MiB fresh mapping whose
        page faults cost more than the chunk's gathers."""
        w_uk, w_uv = self._absorbed_weights(c_kv)
        b, h, s, _ = q_nope.shape
        k, r = idx.shape[-1], c_kv.shape[-1]
        step = query_chunk(s, 4 * (k * (r + k_rope.shape[-1] + 3 * h) + 3 * h * r))
        keep_graph = torch.is_grad_enabled() and (q_nope.requires_grad or w_uv.requires_grad)
        outs, probs_all, out = [], [], None
        for start in range(0, s, step):
            sl = slice(start, start + step)
            q_lat = torch.einsum("bhsd,hdr->bshr", q_nope[:, :, sl], w_uk)[:, :, None]  # [B, Sc, 1, H, r]
            o, probs = sparse_attention([q_lat, q_rope[:, :, sl].transpose(1, 2)[:, :, None]],
                                        [c_kv[:, 0], k_rope[:, 0]], 0, idx[:, sl], self.scaling,
                                        return_probs=return_probs)
            o = torch.einsum("bshr,hvr->bshv", o[:, :, 0], w_uv)  # [B, Sc, H, dv]
            if probs is not None:
                probs_all.append(probs[:, :, 0])  # [B, Sc, H, k]
            if keep_graph or step >= s:
                outs.append(o)
                continue
            if out is None:
                out = o.new_empty(b, s, *o.shape[2:])
            out[:, sl] = o
        if out is None:
            out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
        return out, torch.cat(probs_all, dim=1) if probs_all else None

    def _absorbed(self, q_nope, q_rope, c_kv, k_rope, attention_mask):
        b, h, s, _ = q_nope.shape
        t = c_kv.shape[2]
        w_uk, w_uv = self._absorbed_weights(c_kv)
        q_lat = torch.einsum("bhsd,hdr->bhsr", q_nope, w_uk)
        # heads fold into the row dimension so the shared latent cache is read once, never copied per head
        scores = torch.bmm(q_lat.reshape(b, h * s, -1), c_kv[:, 0].transpose(1, 2))
        scores = scores + torch.bmm(q_rope.reshape(b, h * s, -1), k_rope[:, 0].transpose(1, 2))
        scores = scores.view(b, h, s, t) * self.scaling
        if attention_mask is None and s > 1:
            attention_mask = causal_bool_mask(s, t, scores.device)
        if attention_mask is not None:
            scores = apply_mask(scores, attention_mask)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q_nope.dtype)
        o_lat = torch.bmm(probs.view(b, h * s, t), c_kv[:, 0]).view(b, h, s, -1)  # [B, H, S, r]
        out = torch.einsum("bhsr,hvr->bshv", o_lat, w_uv)  # [B, S, H, dv]
        return out, probs
