"""DeepSeek-V4 KV compressors (V4 `Compressor`, docs/attention.md#compressors-v4-compressor) and their per-sequence
decoding state.

Every `m` consecutive positions of a sequence are pooled into one entry with a per-channel softmax over
learned gate logits (+ a per-slot bias, `position_bias`, the official `ape`). CSA (`overlap=True`) pools
the a-half of window i-1 together with the b-half of window i (width 2m, stride m); HCA pools window i
alone. Entry i is RMS-normalised and rotated to position i·m.

Windows are laid out in *position* space (the sequence's own positions, padding excluded), so a
left-padded sample compresses exactly as it would alone. A `CompressorState` carries what decoding needs:
the finished entries, a ring buffer with the projections of the last 2m positions, and each sample's next
position. Per-sample work is a short loop over the batch; inside it everything is vectorised.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .norm import RMSNorm
from .cache_append import amortised_capacity
from .fp8 import fp8_round_head, pack_fp8, packed_bytes, record_bytes, reinterpret, unpack_fp8
from .rope import apply_rope_tail


class CompressorState:
    """Decode-time state of one compressor for a batch: the finished entries (zeros past each sample's count),
    a ring buffer with the last 2m projections, and each sample's next position.

    With `fp8_block` the entries are *stored* as FP8 records (`uint8` [B, N, bytes]): the non-RoPE dims as e4m3
    with one float32 power-of-two scale per block, then the RoPE dims' raw bytes in the model dtype (V4 keeps
    RoPE dims out of FP8). `entries` always reads back [B, N, D] in the model dtype.
    """

    def __init__(self, batch: int, ratio: int, proj_dim: int, dim: int, dtype, device,
                 fp8_block: int | None = None, rope_dim: int = 0):
        self.ring_kv = torch.zeros(batch, 2 * ratio, proj_dim, dtype=dtype, device=device)
        self.ring_gate = torch.full((batch, 2 * ratio, proj_dim), float("-inf"), dtype=dtype, device=device)
        self.dim, self.dtype, self.fp8_block, self.rope_dim = dim, dtype, fp8_block, rope_dim
        width = record_bytes(dim - rope_dim, rope_dim, fp8_block, dtype.itemsize) if fp8_block else dim
        self.store = torch.zeros(batch, 0, width, dtype=torch.uint8 if fp8_block else dtype, device=device)
        self.length = 0  # entries in use; `store` has spare capacity past it (appends must not copy it all)
        self.next_pos = torch.zeros(batch, dtype=torch.long, device=device)

    TENSORS = ("ring_kv", "ring_gate", "store", "next_pos")

    @property
    def entries(self) -> torch.Tensor:
        store = self.store[:, : self.length]
        if self.fp8_block is None:
            return store
        split = packed_bytes(self.dim - self.rope_dim, self.fp8_block)
        nope = unpack_fp8(store[..., :split].view(torch.float8_e4m3fn), self.dim - self.rope_dim, self.dtype)
        return torch.cat((nope, reinterpret(store[..., split:], self.dtype)), dim=-1)

    def grow(self, total: int) -> None:
        """Make room for `total` entries with amortised spare capacity, so decoding appends do not copy every entry
        each time a window completes."""
        if total > self.store.shape[1]:
            extra = amortised_capacity(total, min_slack=64) - self.store.shape[1]
            self.store = F.pad(self.store, (0, 0, 0, extra))
        self.length = max(self.length, total)

    def write(self, i: int, index: torch.Tensor, entries: torch.Tensor) -> None:
        """entries [n, D] -> slots `index` of sample i."""
        if self.fp8_block is not None:
            nope, rope = entries.split([self.dim - self.rope_dim, self.rope_dim], dim=-1)
            entries = torch.cat((pack_fp8(nope, self.fp8_block).view(torch.uint8),
                                 rope.to(self.dtype).contiguous().view(torch.uint8)), dim=-1)
        self.store[i, index] = entries

    def apply(self, fn):
        """Apply a batch-dimension operation (beam reorder, select, repeat) to every tensor."""
        for name in self.TENSORS:
            setattr(self, name, fn(getattr(self, name)))


class Compressor(nn.Module):
    def __init__(self, hidden_size: int, dim: int, ratio: int, overlap: bool, eps: float,
                 fp8_block: int | None = None):
        super().__init__()
        self.dim, self.ratio, self.overlap = dim, ratio, overlap
        self.fp8_block = fp8_block  # FP8-round the non-RoPE dims of each entry (V4 demo's cache simulation)
        coff = 2 if overlap else 1
        self.kv_proj = nn.Linear(hidden_size, coff * dim, bias=False)
        self.gate_proj = nn.Linear(hidden_size, coff * dim, bias=False)
        self.position_bias = nn.Parameter(torch.zeros(ratio, coff * dim))
        self.kv_norm = RMSNorm(dim, eps=eps)

    def new_state(self, batch: int, dtype, device, rope_dim: int = 0, cached: bool = False) -> CompressorState:
        """`cached`: the state lives in a cache, so FP8 entries are really stored as FP8 records; a cache-less
        forward (training) rounds them the same way but keeps them in the model dtype, differentiable."""
        return CompressorState(batch, self.ratio, self.kv_proj.out_features, self.dim, dtype, device,
                               fp8_block=self.fp8_block if cached else None, rope_dim=rope_dim)

    def _pool(self, kv: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """kv/gate [n + overlap, m, C] consecutive windows (the first is only the overlap source) -> [n, D]."""
        if self.overlap:
            d = self.dim
            kv = torch.cat((kv[:-1, :, :d], kv[1:, :, d:]), dim=1)  # a-half of i-1 | b-half of i: [n, 2m, D]
            gate = torch.cat((gate[:-1, :, :d], gate[1:, :, d:]), dim=1)
        weights = torch.softmax(gate.float(), dim=1).to(kv.dtype)
        return (kv * weights).sum(dim=1)

    def forward(self, hidden, positions, real, state: CompressorState, rotary) -> CompressorState:
        """Fold new tokens into `state` and emit every window they complete.

        hidden [B, S, H]; positions [B, S] (each sample's own positions); real [B, S] bool (False = padding);
        rotary: the RoPE module whose tables rotate entry i to position i·m.
        """
        b, s, _ = hidden.shape
        m, span = self.ratio, 2 * self.ratio
        kv = self.kv_proj(hidden)
        gate = self.gate_proj(hidden) + self.position_bias[positions % m].to(hidden.dtype)
        new_entries = []  # per sample: (first window index, [n, D] pooled entries)
        for i in range(b):
            count = int(real[i].sum())
            p0 = int(state.next_pos[i])
            if count == 0:
                new_entries.append((0, kv.new_zeros(0, self.dim)))
                continue
            pos = positions[i][real[i]]
            if int(pos[0]) != p0 or int(pos[-1]) != p0 + count - 1:
                raise ValueError(f"Compressed attention needs consecutive positions per sequence: sample {i} "
                                 f"continues at position {p0} but got positions {pos[0].item()}..{pos[-1].item()}.")
            p1 = p0 + count
            first, last = p0 // m, p1 // m  # windows [first, last) complete now
            start = max(first - int(self.overlap), 0) * m
            held = torch.arange(start, p0, device=hidden.device) % span
            seq_kv = torch.cat((state.ring_kv[i, held], kv[i][real[i]]))  # positions [start, p1)
            seq_gate = torch.cat((state.ring_gate[i, held], gate[i][real[i]]))
            if last > first:
                lo = (first * m - start) - (m if self.overlap else 0)
                win_kv, win_gate = seq_kv[max(lo, 0): last * m - start], seq_gate[max(lo, 0): last * m - start]
                win_kv, win_gate = win_kv.view(-1, m, win_kv.shape[-1]), win_gate.view(-1, m, win_gate.shape[-1])
                if lo < 0:  # window 0 has no predecessor: empty slots (zero value, -inf logit)
                    win_kv = torch.cat((torch.zeros_like(win_kv[:1]), win_kv))
                    win_gate = torch.cat((torch.full_like(win_gate[:1], float("-inf")), win_gate))
                new_entries.append((first, self._pool(win_kv, win_gate)))
            else:
                new_entries.append((first, kv.new_zeros(0, self.dim)))
            tail = torch.arange(max(p1 - span, start), p1, device=hidden.device)  # keep the last 2m positions
            state.ring_kv[i, tail % span] = seq_kv[tail - start]
            state.ring_gate[i, tail % span] = seq_gate[tail - start]
            state.next_pos[i] = p1
        self._store(state, new_entries, rotary)
        return state

    def _store(self, state, new_entries, rotary):
        state.grow(max([first + e.shape[0] for first, e in new_entries] + [state.length]))
        for i, (first, pooled) in enumerate(new_entries):
            if pooled.shape[0]:
                index = torch.arange(first, first + pooled.shape[0], device=pooled.device)
                cos, sin = rotary(index[None] * self.ratio, pooled.dtype)
                entries = apply_rope_tail(self.kv_norm(pooled)[None, None], cos, sin)[0, 0]
                if state.fp8_block is None:
                    entries = fp8_round_head(entries, 2 * cos.shape[-1], self.fp8_block)
                elif state.rope_dim != 2 * cos.shape[-1]:
                    raise ValueError(f"CompressorState was built for {state.rope_dim} RoPE dims, entries have "
                                     f"{2 * cos.shape[-1]}: pass rope_dim to new_state.")
                state.write(i, index, entries)
