"""FP8 (e4m3) cache storage with per-block power-of-two scales (FlashMLA's V3.2 format).

A block of `block` values shares one float32 scale 2^ceil(log2(amax / 448)), so every value fits e4m3's
range and dequantisation is exact scaling. The RoPE part of a cache entry stays in the model dtype.

A cache record is [e4m3 values | float32 scales | RoPE dims in the model dtype], fields back to back with no
padding, so the standard shapes keep FlashMLA's byte counts (512 + 4·4 + 64·2 = 656 bytes for V3.2's latent).
A field need not start at a multiple of its itemsize (6 values put the scales at byte 6): read fields with
`reinterpret`, never a bare `.view(dtype)`.
"""
from __future__ import annotations

import torch

E4M3_MAX = 448.0


def quantize_fp8(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (e4m3 values [..., D], float32 scales [..., D / block])."""
    blocks = x.float().unflatten(-1, (-1, block))
    amax = blocks.abs().amax(-1).clamp_min(1e-12)
    scales = torch.exp2(torch.ceil(torch.log2(amax / E4M3_MAX)))
    return (blocks / scales[..., None]).to(torch.float8_e4m3fn).flatten(-2), scales


def dequantize_fp8(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    block = q.shape[-1] // scales.shape[-1]
    return (q.float().unflatten(-1, (-1, block)) * scales[..., None].float()).flatten(-2).to(dtype)


def pack_fp8(x: torch.Tensor, block: int) -> torch.Tensor:
    """x [..., D] -> one e4m3 tensor [..., D + 4·D/block]: the values, then the float32 scales' bytes."""
    q, scales = quantize_fp8(x, block)
    return torch.cat((q, scales.contiguous().view(torch.float8_e4m3fn)), dim=-1)


def unpack_fp8(packed: torch.Tensor, dim: int, dtype: torch.dtype) -> torch.Tensor:
    return dequantize_fp8(packed[..., :dim], reinterpret(packed[..., dim:], torch.float32), dtype)


def reinterpret(field: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The bytes of a record field [..., n] (uint8 / e4m3) read as `dtype`.

    `Tensor.view(dtype)` to a wider type needs a contiguous tensor whose storage offset is a multiple of the
    itemsize. A field sliced out of a record satisfies neither in general (the scales after 6 e4m3 values
    start at byte 6), and `.contiguous()` is a no-op when every leading dim is 1, so such a field is copied to
    fresh storage first: reading a field as its dtype never depends on where the record lies in memory."""
    ratio = dtype.itemsize // field.element_size()
    if ratio > 1 and (not field.is_contiguous() or field.storage_offset() % ratio):
        field = field.clone(memory_format=torch.contiguous_format)
    return field.view(dtype)


def packed_bytes(dim: int, block: int) -> int:
    return dim + 4 * dim // block


def record_bytes(fp8_dims: int, rope_dims: int, block: int, dtype_bytes: int) -> int:
    """One cache record: `fp8_dims` e4m3 values + their float32 scales, then `rope_dims` in the model dtype."""
    return packed_bytes(fp8_dims, block) + rope_dims * dtype_bytes


def fp8_round_head(x: torch.Tensor, rope_dim: int, block: int | None) -> torch.Tensor:
    """FP8 round trip of the leading (non-RoPE) dims of x [..., D]; the last `rope_dim` dims stay exact."""
    if block is None:
        return x
    nope, rope = x.split([x.shape[-1] - rope_dim, rope_dim], dim=-1)
    return torch.cat((dequantize_fp8(*quantize_fp8(nope, block), x.dtype), rope), dim=-1)


def fp8_relative_error(dim: int, block: int, samples: int = 4096, seed: int = 0) -> float:
    """Relative RMS error of the round trip on unit-RMS Gaussian rows (what RMS-normalised latents look like)."""
    x = torch.randn(samples, dim, generator=torch.Generator().manual_seed(seed))
    y = dequantize_fp8(*quantize_fp8(x, block), torch.float32)
    return float((y - x).pow(2).mean().sqrt() / x.pow(2).mean().sqrt())
