"""`v4` attention: DeepSeek-V4's hybrid attention (V4 `Attention`; docs/attention.md#v4-deepseek-v4-hybrid-attention).

Shared by all three layer kinds (`attention_sparsity[i]`):
  low-rank queries with a weightless per-head RMS norm; one shared K=V head (`head_dim`, 512 at full
  size) with partial interleaved RoPE on its last `qk_rope_head_dim` dims; a per-head attention sink;
  inverse RoPE on the output's rope dims; grouped low-rank output projection (o_a per group, then o_b).
Key set of the query at position t:
  `sliding`: the last `sliding_window` tokens (itself included);
  `hca`: the window + every compressed entry i < ⌊(t+1)/m⌋ (non-overlapping windows of m = 128);
  `csa`: the window + the `index_topk` entries (m = 4, overlapping windows) a lightning indexer picks.
Attention runs on those keys only (gather kernel, queries in chunks): memory O(S·(window + k)).
Compressed layers use their own RoPE (`compress_rope_parameters`, θ = 160000 + YaRN at full size).

The key sets are built by the layer's selector (`sparsity.py`: `SlidingSelector`, `HCASelector`, `CSASelector`).
CSA indexer training (V4's objective is not published): the V3.2 sparse-stage recipe carried over to
compressed entries (`sparsity.indexer_kl`). While training with `indexer_loss_weight > 0`, KL(p || softmax(I)) over
the selected entries, p = the main attention's mass on each selected entry summed over heads and L1-normalised; the
indexer's inputs are detached so it learns only from this loss. Unverified against DeepSeek's recipe.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers.cache_utils import DynamicLayer, StaticLayer

from .attention_common import AttentionAux, past_length
from .compressor import Compressor, CompressorState
from .fp8 import fp8_round_head
from .indexer import head_weights, select_topk
from .linear_weight import grouped_linear
from .norm import RMSNorm, inverse_rms
from .rope import apply_rope_tail
from .sparse_attention import query_chunk, sparse_attention
from .sparsity import CSASelector, HCASelector, SlidingSelector, indexer_kl


class V4CacheLayer(DynamicLayer):
    """Per-layer V4 cache: the last `sliding_window - 1` K=V rows plus the compressors' states.

    Compressor state cannot be rewound, so the layer is not croppable (no assisted decoding), like the
    official demo's ring buffers.
    """

    _layer_type = "seekv4_v4"
    is_croppable = False

    def __init__(self, sliding_window: int | None = None, **kwargs):
        super().__init__()
        self.window = sliding_window  # `DynamicCache(config=...)` passes none for our layer type: see `update`
        self.cumulative_length = 0
        self.states: dict[str, CompressorState] = {}

    def update(self, key_states, value_states=None, *args, sliding_window: int | None = None, **kwargs):
        """Append K=V rows [B, 1, S, D]; return past window + new rows; keep only the last window - 1.
        `sliding_window`: the attention layer's window, given with every update."""
        if sliding_window is not None:
            self.window = sliding_window
        if self.window is None:
            raise ValueError("V4CacheLayer.update needs the layer's sliding_window (V4Attention passes it).")
        if not self.is_initialized:
            self.lazy_initialization(key_states, key_states)
            self.keys = key_states[:, :, :0]
        full = torch.cat((self.keys, key_states), dim=-2)
        self.cumulative_length += key_states.shape[-2]
        self.keys = full[:, :, -(self.window - 1):] if self.window > 1 else full[:, :, :0]
        self.values = self.keys
        return full, full

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cumulative_length + query_length, 0

    def _batch_op(self, fn):
        if self.is_initialized:
            self.keys = self.values = fn(self.keys)
        for state in self.states.values():
            state.apply(fn)

    def reorder_cache(self, beam_idx):
        self._batch_op(lambda x: x.index_select(0, beam_idx.to(x.device)))

    def batch_repeat_interleave(self, repeats: int):
        self._batch_op(lambda x: x.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices):
        self._batch_op(lambda x: x[indices])

    def crop(self, tokens_to_remove: int):
        raise ValueError("The V4 attention cache holds compressor state that cannot be rewound: cropping (as used by "
                         "assisted/speculative decoding) is not supported.")

    def reset(self):
        self.states = {}
        self.cumulative_length = 0
        self.keys = self.values = None
        self.is_initialized = False


class V4StaticCacheLayer(StaticLayer):
    """Registered as the static cache layer of `v4` attention only to refuse static caches with a clear error
    (instead of transformers' KeyError): a static layer is one preallocated [B, H, max_len, D] buffer, while a
    `v4` layer keeps a sliding window of K=V rows plus compressor state that no such buffer holds."""

    _layer_type = "seekv4_v4"

    def __init__(self, *args, **kwargs):
        raise ValueError(
            "A static cache (cache_implementation='static' or 'offloaded_static', or StaticCache) preallocates fixed "
            "key/value buffers, which `v4` attention layers cannot use: they keep a sliding window plus compressor "
            "state. Use the dynamic cache instead: leave cache_implementation unset (or 'dynamic' / 'offloaded'), or "
            "pass past_key_values=DynamicCache(config=model.config)."
        )


class V4Indexer(nn.Module):
    """CSA's lightning indexer: DSA's scorer and selection (modeling/indexer.py) over compressed index entries."""

    def __init__(self, config):
        super().__init__()
        self.config = config  # read at call time: `indexer_implementation` may be switched on a loaded model
        self.n_heads, self.head_dim, self.topk = config.index_n_heads, config.index_head_dim, config.index_topk
        self.compressor = Compressor(config.hidden_size, self.head_dim, config.csa_compress_ratio, overlap=True,
                                     eps=config.rms_norm_eps)
        self.q_b_proj = nn.Linear(config.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.weights_proj = nn.Linear(config.hidden_size, self.n_heads, bias=False)

    def queries(self, hidden, q_latent, cos, sin):
        b, s, _ = hidden.shape
        q = self.q_b_proj(q_latent).view(b, s, self.n_heads, self.head_dim).transpose(1, 2)
        q = apply_rope_tail(q, cos, sin).transpose(1, 2)  # [B, S, Hi, D]
        return q, head_weights(self.weights_proj(hidden), self.n_heads, self.head_dim)

    def select(self, q, w, keys, limit) -> torch.Tensor:
        """keys [B, N, D] compressed entries, limit [B, L] (entries i < limit are complete) -> idx [B, L, k]."""
        return select_topk(q, w, keys, limit, self.topk, self.config.indexer_implementation)


class V4Attention(nn.Module):
    kind = "v4"

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.sparsity = config.attention_sparsity[layer_idx]  # sliding | csa | hca
        self.num_heads, self.head_dim, self.window = config.num_attention_heads, config.head_dim, config.sliding_window
        self.scaling = self.head_dim**-0.5
        h, eps = config.hidden_size, config.rms_norm_eps
        self.q_a_proj = nn.Linear(h, config.q_lora_rank, bias=False)
        self.q_a_norm = RMSNorm(config.q_lora_rank, eps=eps)
        self.q_b_proj = nn.Linear(config.q_lora_rank, self.num_heads * self.head_dim, bias=False)
        self.kv_proj = nn.Linear(h, self.head_dim, bias=False)
        self.kv_norm = RMSNorm(self.head_dim, eps=eps)
        self.o_groups, self.o_lora_rank = config.o_groups, config.o_lora_rank
        # grouped low-rank output: group g maps its H·D/G inputs to o_lora_rank (rows g·r:(g+1)·r)
        self.o_a_proj = nn.Linear(self.num_heads * self.head_dim // self.o_groups, self.o_groups * self.o_lora_rank,
                                  bias=False)
        self.o_b_proj = nn.Linear(self.o_groups * self.o_lora_rank, h, bias=False)
        self.sinks = nn.Parameter(torch.zeros(self.num_heads))
        compressed = self.sparsity != "sliding"
        self.rope_key = "v4_compress" if compressed else "v4"  # its tables in the model's position embeddings
        self.ratio = {"csa": config.csa_compress_ratio, "hca": config.hca_compress_ratio}.get(self.sparsity)
        self.fp8_block = config.kv_cache_fp8_block if config.kv_cache_dtype == "fp8_e4m3" else None
        self.compressor = (Compressor(h, self.head_dim, self.ratio, overlap=self.sparsity == "csa", eps=eps,
                                      fp8_block=self.fp8_block) if compressed else None)
        self.indexer = V4Indexer(config) if self.sparsity == "csa" else None
        # the compressors and the indexer stay registered here (`self_attn.compressor.*`, `self_attn.indexer.*`)
        if self.sparsity == "csa":
            self.selector = CSASelector(self.window, self.compressor, self.ratio, self.indexer, config)
        elif self.sparsity == "hca":
            self.selector = HCASelector(self.window, self.compressor, self.ratio)
        else:
            self.selector = SlidingSelector(self.window)

    @staticmethod
    def rope_dim(config) -> int:
        return config.qk_rope_head_dim

    def _states(self, past_key_values, batch, dtype, device):
        layer = past_key_values.layers[self.layer_idx] if past_key_values is not None else None
        states = layer.states if layer is not None else {}
        if "kv" not in states:
            states["kv"] = self.compressor.new_state(batch, dtype, device, rope_dim=self.config.qk_rope_head_dim,
                                                     cached=layer is not None)
            if self.indexer is not None:
                states["index"] = self.indexer.compressor.new_state(batch, dtype, device)
        return states

    def forward(self, hidden_states: torch.Tensor, position_embeddings: dict, attention_mask, past_key_values=None,
                key_padding: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                **kwargs) -> tuple[torch.Tensor, AttentionAux]:
        b, s, _ = hidden_states.shape
        past_len = past_length(past_key_values, self.layer_idx)  # before this layer's update
        if position_ids is None:
            position_ids = (torch.arange(s, device=hidden_states.device) + past_len)[None]
        position_ids = position_ids.expand(b, s)  # the compressors pool windows of each sample's positions
        needed = [self.rope_key] + (["v4_compress_table"] if self.compressor is not None else [])
        if missing := [key for key in needed if key not in position_embeddings]:
            raise ValueError(f"V4Attention (layer {self.layer_idx}) reads its RoPE from position_embeddings{missing}: "
                             "pass SeekV4Model.position_embeddings(position_ids, dtype).")
        cos, sin = position_embeddings[self.rope_key]  # [B or 1, S, dr/2]
        q_latent = self.q_a_norm(self.q_a_proj(hidden_states))
        q = self.q_b_proj(q_latent).view(b, s, self.num_heads, self.head_dim)
        q = q * inverse_rms(q, self.config.rms_norm_eps).to(q.dtype)  # per-head RMS norm without a weight
        q = apply_rope_tail(q.transpose(1, 2), cos, sin).transpose(1, 2)  # [B, S, H, D]
        kv = apply_rope_tail(self.kv_norm(self.kv_proj(hidden_states))[:, None], cos, sin)  # [B, 1, S, D]
        kv = fp8_round_head(kv, 2 * cos.shape[-1], self.fp8_block)
        if past_key_values is not None:
            kv, _ = past_key_values.update(kv, kv, self.layer_idx, sliding_window=self.window)
        window_kv = kv[:, 0]  # [B, P + S, D]: up to window-1 past rows, then the new ones
        padding = (key_padding[:, -window_kv.shape[1]:] if key_padding is not None
                   else torch.ones(b, window_kv.shape[1], dtype=torch.bool, device=kv.device))

        states = (self._states(past_key_values, b, hidden_states.dtype, hidden_states.device)
                  if self.compressor is not None else {})
        rope = (cos, sin, position_embeddings.get("v4_compress_table"))  # compressed entries: the table itself
        key_set = self.selector(hidden_states, q_latent, window_kv, padding, position_ids, rope, states)
        out, kl_sum, kl_count = [], 0.0, 0
        step = query_chunk(s, 4 * (self.window + key_set.num_compressed) * 4)
        for start in range(0, s, step):
            rows = torch.arange(start, min(start + step, s), device=kv.device)
            selection = key_set.rows(rows)  # idx [B, Lc, W (+ k)] into key_set.keys, HCA: + a dense block
            o, probs = sparse_attention([q[:, rows, None]], [key_set.keys], 0, selection.idx, self.scaling,
                                        sink=self.sinks, return_probs=selection.return_probs, dense=selection.dense)
            out.append(o[:, :, 0])  # [B, Lc, H, D]
            if selection.wants_loss:
                count = int(selection.indexer.query_valid.sum())
                if count:  # none before the first window completes (S < csa_compress_ratio): no KL term
                    mass = probs[:, :, 0, :, self.window:].sum(2)  # on the chosen entries, summed over heads [B, Lc, k]
                    kl_sum = kl_sum + indexer_kl(mass, selection.indexer)[0] * count
                    kl_count += count
        out = torch.cat(out, dim=1)
        # values carry RoPE (K = V): rotating the output back by -t leaves relative positions only
        out = apply_rope_tail(out.transpose(1, 2), cos, -sin).transpose(1, 2)
        grouped = out.reshape(b, s, self.o_groups, -1)  # [B, S, G, H·D/G]
        low = grouped_linear(self.o_a_proj, grouped).flatten(2)
        return self.o_b_proj(low), AttentionAux(indexer_loss=kl_sum / kl_count if kl_count else None)
