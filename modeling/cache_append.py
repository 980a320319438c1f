"""Amortised appends for transformers' dynamic cache layers.

`DynamicLayer.update` / `DynamicIndexedLayer.update_indexer` grow the cache with `torch.cat`, which copies the
whole cache on every decoded token: O(T) per step however sparse the attention is (at 32k context that copy
alone was half of a DSA decode step). Here the first append allocates spare capacity (25%, at least 256
rows) and later appends write into it; the layer's `keys` / `values` / `indexer_keys` stay plain views of the
buffer, so every transformers method that reads or replaces them (crop, beam reorder, batch select,
`get_seq_length`) keeps working: when a tensor is no longer a prefix view of our buffer (it was replaced),
the next append adopts it into a fresh buffer (one copy, as `cat` would have done).

Only the exact transformers classes are handled; subclasses (sliding windows, our V4 layer), offloaded
caches, static caches and appends that need autograd take the normal `Cache` path.
"""
from __future__ import annotations

import math

import torch
from transformers.cache_utils import DynamicIndexedLayer, DynamicLayer

SLACK, MIN_SLACK = 0.25, 256


def amortised_capacity(needed: int, min_slack: int = MIN_SLACK) -> int:
    """Rows to allocate when a growing buffer must hold `needed` rows: 25% spare (at least `min_slack`), so n appends
    copy O(n) rows in total instead of O(n²). Shared by the cache layers here and V4's compressor state."""
    return needed + max(min_slack, math.ceil(needed * SLACK))


def _append(layer, name: str, new: torch.Tensor, dim: int) -> torch.Tensor:
    cur, buf = getattr(layer, name), layer.__dict__.get("_append_buf_" + name)
    n = cur.shape[dim] if cur is not None and cur.dim() == new.dim() else 0
    s = new.shape[dim]
    reuse = (buf is not None and n > 0 and buf.dtype == new.dtype and buf.device == new.device
             and cur.data_ptr() == buf.data_ptr() and cur.stride() == buf.stride()
             and cur.shape[:dim] == buf.shape[:dim] == new.shape[:dim] and cur.shape[dim + 1:] == new.shape[dim + 1:]
             and n + s <= buf.shape[dim])
    if not reuse:
        shape = list(new.shape)
        shape[dim] = amortised_capacity(n + s)
        buf = new.new_empty(shape)
        if n:
            buf.narrow(dim, 0, n).copy_(cur)
        layer.__dict__["_append_buf_" + name] = buf
    buf.narrow(dim, n, s).copy_(new)
    view = buf.narrow(dim, 0, n + s)
    setattr(layer, name, view)
    return view


def _handled(cache, layer_idx: int, *tensors) -> bool:
    layers = getattr(cache, "layers", None)
    if layers is None or layer_idx >= len(layers) or getattr(cache, "offloading", False):
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    return type(layers[layer_idx]) in (DynamicLayer, DynamicIndexedLayer)


def cache_update(cache, layer_idx: int, keys: torch.Tensor, values: torch.Tensor):
    """`cache.update(keys, values, layer_idx)` with amortised appends (states [B, H, S, D], S = dim -2)."""
    if not _handled(cache, layer_idx, keys, values):
        return cache.update(keys, values, layer_idx)
    layer = cache.layers[layer_idx]
    if not layer.is_initialized:
        layer.lazy_initialization(keys, values)
    return _append(layer, "keys", keys, -2), _append(layer, "values", values, -2)


def cache_update_indexer(cache, layer_idx: int, index_keys: torch.Tensor) -> torch.Tensor:
    """`cache.update_indexer(index_keys, layer_idx)` with amortised appends (index keys [B, S, D])."""
    if getattr(cache, "offloading", False):
        return _update_indexer_offloaded(cache, layer_idx, index_keys)
    if not _handled(cache, layer_idx, index_keys):
        return cache.update_indexer(index_keys, layer_idx)
    layer = cache.layers[layer_idx]
    if not layer.is_indexer_initialized:
        layer.lazy_initialization_indexer(index_keys)
    return _append(layer, "indexer_keys", index_keys, 1)


def _update_indexer_offloaded(cache, layer_idx: int, index_keys: torch.Tensor) -> torch.Tensor:
    """`Cache.update` has just offloaded this layer, indexer keys included, and `update_indexer` neither fetches
    them back nor offloads again: move them to the new keys' device, append, and offload them once more."""
    layer = cache.layers[layer_idx]
    if getattr(layer, "is_indexer_initialized", False) and layer.indexer_keys.device != index_keys.device:
        layer.indexer_keys = layer.indexer_keys.to(index_keys.device)
    keys = cache.update_indexer(index_keys, layer_idx)
    cache.offload(layer_idx, cache.only_non_sliding)
    return keys
