"""Component numerics against independent references (transformers' RoPE tables, complex-number rotation)."""
import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from seekv4 import SeekV4Config
from seekv4.modeling.attention_gqa import GQAAttention
from seekv4.modeling.norm import RMSNorm
from seekv4.modeling.rope import RotaryEmbedding, apply_rope, compute_inv_freq


@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "rope_theta": 5e5, "factor": 3.0},
    {"rope_type": "yarn", "rope_theta": 1e4, "factor": 40.0, "original_max_position_embeddings": 4096,
     "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.8},
    {"rope_type": "yarn", "rope_theta": 1e4, "factor": 8.0, "original_max_position_embeddings": 512},
])
def test_inv_freq_matches_transformers(rope):
    cfg = LlamaConfig(hidden_size=256, num_attention_heads=4, head_dim=64, max_position_embeddings=163840,
                      rope_parameters=dict(rope))
    ref, ref_factor = ROPE_INIT_FUNCTIONS[rope["rope_type"]](cfg, "cpu")
    ours, factor = compute_inv_freq(rope, 64)
    assert torch.allclose(ours, ref, rtol=1e-6) and abs(factor - ref_factor) < 1e-7


def test_interleaved_rope_is_complex_rotation_of_pairs():
    x = torch.randn(2, 3, 5, 8, dtype=torch.float64)
    pos = torch.arange(5)[None].expand(2, 5)
    emb = RotaryEmbedding({"rope_type": "default", "rope_theta": 100.0}, 8)
    cos, sin = emb(pos, torch.float64)
    ours = apply_rope(x, cos, sin, interleaved=True)
    angles = pos[..., None].double() * (1.0 / 100.0 ** (torch.arange(0, 8, 2).double() / 8))
    ref = torch.view_as_real(torch.view_as_complex(x.reshape(2, 3, 5, 4, 2)) * torch.polar(
        torch.ones_like(angles), angles)[:, None]).flatten(-2)
    assert torch.allclose(ours, ref, atol=1e-6)


def test_partial_rotary_rotates_only_the_leading_dims():
    cfg = SeekV4Config.from_preset("tiny-gqa", partial_rotary_factor=0.5)
    attn = GQAAttention(cfg, 0)
    assert attn.rotary_dim == 8 and GQAAttention.rope_dim(cfg) == 8
    x = torch.randn(1, 4, 6, 16)
    emb = RotaryEmbedding(cfg.rope_parameters, 8)
    cos, sin = emb(torch.arange(6)[None], torch.float32)
    out = attn._rope(x, cos, sin)
    assert torch.equal(out[..., 8:], x[..., 8:])
    assert torch.allclose(out[..., :8], apply_rope(x[..., :8], cos, sin, interleaved=False))
    # relative-position property of the rotated half: scores depend only on the position offset
    q, k = torch.randn(1, 1, 1, 16).expand(1, 1, 6, 16), torch.randn(1, 1, 1, 16).expand(1, 1, 6, 16)
    rq, rk = attn._rope(q, cos, sin), attn._rope(k, cos, sin)
    assert torch.allclose(rq[0, 0, 3] @ rk[0, 0, 1], rq[0, 0, 4] @ rk[0, 0, 2], atol=1e-5)


def test_rmsnorm_matches_float64():
    norm = RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(3, 16)
    ref = x.double() / torch.sqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight.double()
    assert torch.allclose(norm(x).double(), ref, atol=1e-6)
