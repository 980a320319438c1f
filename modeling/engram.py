"""Engram: conditional memory by hashed n-gram lookup (arXiv 2601.07372; docs/engram.md).

* `NgramHasher` (model level): compressed ids -> per-layer row indices for every position of a forward,
  computed up front (addresses depend on token ids only, so rows can be fetched before the layer runs).
  Layer l hashes the suffix n-grams (n = 2..N) of compressed ids with odd multipliers r_{l,k} drawn from
  `numpy.default_rng(seed + 10007·l)`: mix = XOR_k (x'_{t-k} · r_{l,k}); head j of order n reads row
  `mix mod p_{l,n,j}` of its own sub-table, the p being distinct primes (over all heads, orders, layers).
* `Engram` (per layer): concatenated retrieved rows e_t -> shared value and one key per stream; a
  context-aware gate per stream α_m = σ(sgnsqrt(RMSNorm(h_m)·RMSNorm(k_m) / sqrt(d))); the gated value,
  optionally through a short causal depthwise convolution (paper demo; none in V4.1), is added to every
  stream (it bypasses the residual pre/post mixing, docs/engram.md).
* `EngramCacheLayer`: the compressed-id history (and conv inputs) that decoding needs, stored as an extra
  layer of the transformers Cache so beam reordering, batch selection and cropping keep it consistent.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import CacheLayerMixin

from .engram_table import EngramTable
from .norm import rms_normalize

_LAYER_SEED_PRIME = 10007


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    return all(n % f for f in range(3, math.isqrt(n) + 1, 2))


def next_prime(start: int, seen: set[int]) -> int:
    """Smallest prime > start that is not in `seen` (the demo's `find_next_prime`)."""
    candidate = start + 1
    while not _is_prime(candidate) or candidate in seen:
        candidate += 1
    return candidate


class NgramHasher:
    """Pure function of the config: multipliers and table sizes of every Engram layer (no tensors kept)."""

    def __init__(self, config):
        self.layer_ids = list(config.engram_layer_ids)
        self.max_n, self.n_heads = config.engram_max_ngram_size, config.engram_n_heads
        compressed = config.engram_compressed_vocab_size or config.vocab_size
        half_bound = max(1, (np.iinfo(np.int64).max // compressed) // 2)  # x'·r never overflows int64
        self.multipliers: dict[int, list[int]] = {}
        self.primes: dict[int, list[list[int]]] = {}  # layer -> order -> head -> p
        seen: set[int] = set()
        for layer in self.layer_ids:
            rng = np.random.default_rng(config.engram_seed + _LAYER_SEED_PRIME * layer)
            r = rng.integers(low=0, high=half_bound, size=(self.max_n,), dtype=np.int64)
            self.multipliers[layer] = [int(v) * 2 + 1 for v in r]
            per_order = []
            for base in config.engram_vocab_size:
                start, heads = base - 1, []
                for _ in range(self.n_heads):
                    start = next_prime(start, seen)
                    seen.add(start)
                    heads.append(start)
                per_order.append(heads)
            self.primes[layer] = per_order

    def table_sizes(self, layer: int) -> list[int]:
        return [p for order in self.primes[layer] for p in order]

    def hash(self, context: torch.Tensor, layer: int) -> torch.Tensor:
        """context [B, N-1+S] compressed ids (N-1 columns of history/pad first) -> [B, S, (N-1)·heads]
        row indices into the layer's concatenated table (sub-table offsets added)."""
        n_max, s = self.max_n, context.shape[1] - (self.max_n - 1)
        shifted = [context[:, n_max - 1 - k : n_max - 1 - k + s] for k in range(n_max)]  # x'_{t-k}, [B, S]
        r = self.multipliers[layer]
        offsets = [0] + list(np.cumsum(self.table_sizes(layer))[:-1])
        out, column = [], 0
        mix = shifted[0] * r[0]
        for n in range(2, n_max + 1):
            mix = torch.bitwise_xor(mix, shifted[n - 1] * r[n - 1])
            for p in self.primes[layer][n - 2]:
                out.append(torch.remainder(mix, p) + int(offsets[column]))
                column += 1
        return torch.stack(out, dim=-1)


class EngramCacheLayer(CacheLayerMixin):
    """Decoding state of all Engram layers, appended after the attention layers of a transformers Cache:
    `ids` [B, T] compressed (padding -> pad) ids seen so far, and per Engram layer with a convolution the
    conv inputs `conv[l]` [B, T, n·H] so far (full history, so `crop` stays exact)."""

    is_compileable = False
    is_croppable = True
    supports_early_init = False

    def __init__(self):
        super().__init__()
        self.ids: torch.Tensor | None = None
        self.conv: dict[int, torch.Tensor] = {}
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states=None):
        pass

    def update(self, key_states, value_states=None, *args, **kwargs):
        raise TypeError("EngramCacheLayer holds Engram history; attention layers never write to it.")

    def get_mask_sizes(self, query_length: int):
        raise TypeError("EngramCacheLayer is not an attention layer.")

    def get_seq_length(self) -> int:
        return 0 if self.ids is None else self.ids.shape[1]

    def get_max_length(self) -> int:
        return -1

    def _each(self, fn):
        if self.ids is not None:
            self.ids = fn(self.ids)
        self.conv = {k: fn(v) for k, v in self.conv.items()}

    def reorder_cache(self, beam_idx):
        self._each(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices):
        self._each(lambda t: t[indices])

    def batch_repeat_interleave(self, repeats: int):
        self._each(lambda t: t.repeat_interleave(repeats, dim=0))

    def crop(self, tokens_to_remove: int):
        """As transformers' layers: a negative count of tokens to drop from the end."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop({tokens_to_remove}): pass a negative number of tokens to remove.")
        keep = self.get_seq_length() + tokens_to_remove
        self._each(lambda t: t[:, :keep])

    def reset(self):
        self.ids, self.conv = None, {}

    def offload(self):
        pass

    def prefetch(self):
        pass


def engram_cache(past_key_values) -> EngramCacheLayer | None:
    if past_key_values is None:
        return None
    return next((layer for layer in past_key_values.layers if isinstance(layer, EngramCacheLayer)), None)


class EngramMemory(nn.Module):
    """Model-level part: the token compression map and the hashing of a whole forward."""

    def __init__(self, config):
        super().__init__()
        self.hasher = NgramHasher(config)
        self.max_n = config.engram_max_ngram_size
        self.pad_id = config.pad_token_id if config.engram_pad_id is None else config.engram_pad_id
        # P: V -> V' (identity until `set_token_map(build_engram_map(tokenizer))`); saved with the weights
        self.register_buffer("token_map", torch.arange(config.vocab_size))

    @torch.no_grad()
    def set_token_map(self, mapping: torch.Tensor):
        if mapping.shape != self.token_map.shape:
            raise ValueError(f"Engram token map has shape {tuple(mapping.shape)}, the model's vocabulary needs "
                             f"{tuple(self.token_map.shape)}; build it with "
                             "build_engram_map(tokenizer, config.vocab_size).")
        self.token_map.copy_(mapping)

    def compress(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """[B, S] raw ids -> compressed ids, padded positions (attention_mask == 0) -> compressed pad id."""
        ids = self.token_map[input_ids]
        if attention_mask is not None and attention_mask.dim() == 2:
            pad = self.token_map[self.pad_id]
            ids = torch.where(attention_mask[:, -input_ids.shape[1]:].bool(), ids, pad)
        return ids

    def indices(self, ids_c: torch.Tensor, history: torch.Tensor | None) -> dict[int, torch.Tensor]:
        """ids_c [B, S] compressed ids of this forward, history [B, T] or None -> {layer: [B, S, K] rows}."""
        b, keep = ids_c.shape[0], self.max_n - 1
        prefix = self.token_map[self.pad_id].expand(b, keep)
        if history is not None and history.shape[1]:
            prefix = torch.cat([prefix, history], dim=1)[:, -keep:]
        context = torch.cat([prefix, ids_c], dim=1)  # [B, N-1+S]
        return {layer: self.hasher.hash(context, layer) for layer in self.hasher.layer_ids}

    @staticmethod
    def remember(past_key_values, ids_c: torch.Tensor, state: EngramCacheLayer | None):
        """Append this forward's compressed ids to `state` and put `state` into the cache after the
        attention layers (at the end of the first forward, so attention layer indices are untouched even
        for a cache that grows its layers lazily)."""
        if past_key_values is None:
            return
        state.ids = ids_c if state.ids is None else torch.cat([state.ids, ids_c], dim=1)
        if engram_cache(past_key_values) is None:
            past_key_values.layers.append(state)


class Float32DepthwiseConv(nn.Conv1d):
    """The short convolution in float32 (weights upcast), applied by calling the module so that hooks wrapping
    `forward` (accelerate's offload loads the weight there) see its weight."""

    def forward(self, x):
        return F.conv1d(x, self.weight.float(), groups=self.groups, dilation=self.dilation)


class Engram(nn.Module):
    """One Engram layer: table lookup -> gated value per stream (+ short conv) -> added to the streams."""

    def __init__(self, config, layer_idx: int, table_rows: int):
        super().__init__()
        n, d = config.hc_mult, config.hidden_size
        self.layer_idx, self.n, self.d, self.eps = layer_idx, n, d, config.rms_norm_eps
        self.n_columns = (config.engram_max_ngram_size - 1) * config.engram_n_heads
        e_dim = self.n_columns * config.engram_head_dim
        path = None
        if config.engram_storage == "disk":
            path = f"{config.engram_table_dir}/engram_layer{layer_idx}.bin"
        self.table = EngramTable(table_rows, config.engram_head_dim, config.engram_storage, path,
                                 config.engram_write_buffer_mib * 2**20 // (4 * config.engram_head_dim))
        self.wkv = nn.Linear(e_dim, (n + 1) * d, bias=False)  # n keys (one per stream) + 1 shared value (V4.1 layout)
        self.q_norm = nn.Parameter(torch.ones(n, d))  # RMSNorm weights on the stream queries h_m
        self.k_norm = nn.Parameter(torch.ones(n, d))  # ... and on the keys k_m
        self.kernel_size, self.dilation = config.engram_kernel_size, config.engram_max_ngram_size
        if self.kernel_size:
            self.conv_norm = nn.Parameter(torch.ones(n, d))
            self.conv = Float32DepthwiseConv(n * d, n * d, self.kernel_size, groups=n * d, dilation=self.dilation,
                                             bias=False)

    def forward(self, streams: torch.Tensor, rows: torch.Tensor, cache=None, attention_mask=None) -> torch.Tensor:
        """streams [B, S, n, H], rows [B, S, K, D_h] -> streams + Y."""
        b, s, n, d = streams.shape
        e = rows.flatten(2).to(streams.dtype)  # [B, S, K·D_h]; not wkv.weight's dtype: 4-bit layers store uint8
        kv = self.wkv(e).float().view(b, s, n + 1, d)
        k, v = kv[:, :, :n], kv[:, :, n]  # [B, S, n, H], [B, S, H]
        q = rms_normalize(streams.float(), self.eps) * self.q_norm.float()
        k = rms_normalize(k, self.eps) * self.k_norm.float()
        a = (q * k).sum(-1) / math.sqrt(d)  # [B, S, n]
        gate = torch.sigmoid(a.sign() * a.abs().clamp_min(1e-6).sqrt())
        y = gate.unsqueeze(-1) * v.unsqueeze(2)  # [B, S, n, H]
        if self.kernel_size:
            y = y + self._short_conv(y, cache, attention_mask)
        return (streams.float() + y).to(streams.dtype)

    def _short_conv(self, y, cache, attention_mask):
        """SiLU(causal depthwise conv(RMSNorm_m(ṽ))) over time, dilation N; padded positions and positions
        before the sequence start contribute zeros (as the demo's zero padding does)."""
        b, s, n, d = y.shape
        x = (rms_normalize(y, self.eps) * self.conv_norm.float()).flatten(2)  # [B, S, n·H]
        if attention_mask is not None and attention_mask.dim() == 2:
            x = x * attention_mask[:, -s:, None].to(x.dtype)
        reach = (self.kernel_size - 1) * self.dilation
        past = None
        if cache is not None:
            past = cache.conv.get(self.layer_idx)
            cache.conv[self.layer_idx] = x.detach() if past is None else torch.cat([past, x.detach()], dim=1)
        if past is not None and past.shape[1]:
            x = torch.cat([past[:, -reach:].to(x.dtype), x], dim=1)
        x = F.pad(x, (0, 0, reach - (x.shape[1] - s), 0))  # left zeros up to the receptive field
        out = self.conv(x.transpose(1, 2))
        return F.silu(out.transpose(1, 2)).view(b, s, n, d)
