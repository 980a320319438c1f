"""Residual kinds: mHC math against a float64 transcription of V4's released hc_pre / hc_post (docs/residual.md),
Sinkhorn, depth stability, errors."""
import pytest
import torch

from seekv4 import SeekV4Config, SeekV4ForCausalLM
from references import composite_gain
from seekv4.modeling.residual import HCSite, HyperHead, MHCSite, PlainSite, expand, sinkhorn


def cfg(**kw):
    base = dict(residual_kind="mhc", hidden_size=32, num_attention_heads=4)
    return SeekV4Config.from_preset("tiny", **{**base, **kw})


def site(kind, config, idx=0):
    m = (MHCSite if kind == "mhc" else HCSite)(config, idx)
    m.reset_parameters()
    return m


def perturb(module, sigma, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * sigma)


def reference_mhc(fn, base, scale, X, iters, eps, norm_eps):
    """Spec §4.9 written out per token in float64 with explicit loops. X [n, d]."""
    n = X.shape[0]
    x = X.reshape(-1)
    mix = (fn @ x) / torch.sqrt((x * x).mean() + norm_eps)
    pre = torch.sigmoid(mix[:n] * scale[0] + base[:n]) + eps
    post = 2 * torch.sigmoid(mix[n:2 * n] * scale[1] + base[n:2 * n])
    R = (mix[2 * n:] * scale[2] + base[2 * n:]).reshape(n, n)
    comb = torch.exp(R) / torch.exp(R).sum(1, keepdim=True) + eps
    comb = comb / (comb.sum(0, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(1, keepdim=True) + eps)
        comb = comb / (comb.sum(0, keepdim=True) + eps)
    x_in = sum(pre[j] * X[j] for j in range(n))
    return pre, post, comb, x_in


@pytest.mark.parametrize("init", ["identity", "uniform"])
def test_mhc_matches_float64_reference_and_is_doubly_stochastic(init):
    config = cfg(mhc_init=init)
    m = site("mhc", config, idx=3)
    perturb(m, 0.3, seed=1)
    streams = torch.randn(2, 5, 4, 32, dtype=torch.float64)
    m.double()
    pre, post, comb = m.coefficients(streams)
    x, coeffs = m.pre(streams)
    y = torch.randn(2, 5, 32, dtype=torch.float64)
    out = m.post(streams, y, coeffs)
    for b in range(2):
        for s in range(5):
            X = streams[b, s]
            r_pre, r_post, r_comb, r_x = reference_mhc(m.fn, m.base, m.scale, X, config.hc_sinkhorn_iters,
                                                       config.hc_eps, config.rms_norm_eps)
            torch.testing.assert_close(pre[b, s], r_pre, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(post[b, s], r_post, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(comb[b, s], r_comb, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(x[b, s], r_x, rtol=1e-10, atol=1e-12)
            # expand: X'_k = post_k · y + Σ_j comb[j, k] X_j  (comb used transposed)
            for k in range(4):
                expect = r_post[k] * y[b, s] + sum(r_comb[j, k] * X[j] for j in range(4))
                torch.testing.assert_close(out[b, s, k], expect, rtol=1e-10, atol=1e-12)
    assert (comb.sum(-2) - 1).abs().max() < 1e-4 and comb.min() >= 0  # the last step normalises columns


@pytest.mark.parametrize("init", ["identity", "uniform"])
def test_model_mixing_matrices_doubly_stochastic_after_configured_iterations(init):
    """Every site's comb in a forward of a tiny mHC model, with the configured 20 iterations."""
    torch.manual_seed(0)
    model = SeekV4ForCausalLM(cfg(mhc_init=init, hidden_size=64)).eval()
    combs = []
    for layer in model.model.layers:
        for s in (layer.attn_hc, layer.ffn_hc):
            orig = s.coefficients
            s.coefficients = lambda x, orig=orig: (lambda c: combs.append(c[2]) or c)(orig(x))
    with torch.no_grad():
        model(torch.randint(3, 256, (2, 16)))
    assert len(combs) == 8
    comb = torch.stack(combs)
    assert (comb.sum(-1) - 1).abs().max() < 1e-4 and (comb.sum(-2) - 1).abs().max() < 1e-4
    assert comb.min() >= 0


def test_sinkhorn_converges_with_iterations():
    """Columns are exact after every iteration; rows reach 1e-4 at 20 iterations for logits of std 0.5,
    while strongly skewed logits converge slowly (std 2: still ~3e-2 at 20 iterations; see RESULTS.md)."""
    logits = torch.randn(4096, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    m = sinkhorn(0.5 * logits, 20, 1e-6)
    assert (m.sum(-1) - 1).abs().max() < 1e-4 and (m.sum(-2) - 1).abs().max() < 1e-4
    errors = [(sinkhorn(2 * logits, it, 1e-6).sum(-1) - 1).abs().max().item() for it in (5, 20, 80)]
    assert errors[0] > errors[1] > errors[2]


def test_plain_site_is_bit_exact_residual_add():
    h, y = torch.randn(2, 7, 16), torch.randn(2, 7, 16)
    s = PlainSite()
    streams = expand(h, 1)
    x, c = s.pre(streams)
    assert torch.equal(x, h)
    assert torch.equal(s.post(streams, y, c)[:, :, 0], h + y)


def test_identity_init_starts_as_prenorm_residual():
    """identity init: pre reads stream (site mod n), post = 1, comb ≈ I; identical streams stay identical."""
    config = cfg()
    m = site("mhc", config, idx=6)
    with torch.no_grad():
        m.fn.zero_()  # only the static part
    pre, post, comb = m.coefficients(torch.randn(1, 3, 4, 32))
    assert pre[0, 0].argmax() == 6 % 4 and pre[0, 0].max() > 0.98
    torch.testing.assert_close(post, torch.ones_like(post))
    assert (comb.diagonal(dim1=-2, dim2=-1) > 0.9).all()


def _stack_gain(kind, layers, sigma, seed=0):
    config = cfg(residual_kind=kind)
    torch.manual_seed(seed)
    streams = expand(torch.randn(2, 8, 32), 4) + 0.1 * torch.randn(2, 8, 4, 32)
    mixes = []
    with torch.no_grad():
        for i in range(layers):
            m = site(kind, config, idx=i)
            perturb(m, sigma, seed=seed + i)
            coeffs = m.pre(streams)[1]
            mixes.append(coeffs[1])
            y = torch.tanh(streams.mean(2) @ torch.randn(32, 32) / 32 ** 0.5)
            streams = m.post(streams, y, coeffs)
    return composite_gain(mixes).max().item(), streams


def test_64_layer_composite_gain_bounded_for_mhc_and_grows_for_hc():
    mhc_gain, mhc_streams = _stack_gain("mhc", 64, 0.2)
    hc_gain, _ = _stack_gain("hc", 64, 0.2)
    assert mhc_gain <= 2.0 and torch.isfinite(mhc_streams).all()
    assert hc_gain > 10.0, hc_gain


def test_identity_init_64_layers_stable_forward_backward():
    config = cfg(num_hidden_layers=64, attention_types=["mla"] * 64, ffn_types=["dense"] * 64,
                 attention_sparsity=["dense"] * 64, hidden_size=32, intermediate_size=32, kv_lora_rank=16,
                 q_lora_rank=None, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)
    torch.manual_seed(0)
    model = SeekV4ForCausalLM(config)
    ids = torch.randint(3, 256, (2, 16))
    out = model(ids, labels=ids, output_hidden_states=True)
    out.loss.backward()
    norms = [h.float().pow(2).mean().sqrt().item() for h in out.hidden_states[:-1]]
    assert all(n < 50 for n in norms) and torch.isfinite(out.loss)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert all(torch.isfinite(g).all() for g in grads)
    assert model.model.layers[0].attn_hc.fn.grad.abs().sum() > 0


def test_hc_and_mhc_models_save_load_and_keep_fp32(tmp_path):
    for kind in ("hc", "mhc"):
        torch.manual_seed(0)
        model = SeekV4ForCausalLM(cfg(residual_kind=kind)).eval()
        model.save_pretrained(tmp_path / kind)
        loaded = SeekV4ForCausalLM.from_pretrained(tmp_path / kind).eval()
        ids = torch.randint(3, 256, (2, 9))
        saved = model.state_dict()
        for name, tensor in loaded.state_dict().items():  # the round trip itself is bit-exact
            assert torch.equal(tensor, saved[name]), name
        with torch.no_grad():  # logits to a tolerance: kernels may take another path on loaded tensors
            torch.testing.assert_close(model(ids).logits, loaded(ids).logits)
    half = SeekV4ForCausalLM.from_pretrained(tmp_path / "mhc", dtype=torch.bfloat16)
    assert half.model.layers[0].attn_hc.fn.dtype == torch.float32
    assert half.model.hc_head.hc_fn.dtype == torch.float32
    assert half.model.layers[0].mlp.gate_proj.weight.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.isfinite(half(torch.randint(3, 256, (1, 5))).logits).all()


@pytest.mark.parametrize("kw, field", [
    (dict(residual_kind="mhc", hc_mult=0), "hc_mult"),
    (dict(residual_kind="hc", hc_mult=-1), "hc_mult"),
    (dict(residual_kind="plain", hc_mult=4), "hc_mult"),
    (dict(residual_kind="deep"), "residual_kind"),
    (dict(residual_kind="mhc", hc_sinkhorn_iters=0), "hc_sinkhorn_iters"),
    (dict(residual_kind="mhc", mhc_init="zeros"), "mhc_init"),
])
def test_bad_residual_config_names_field(kw, field):
    with pytest.raises(ValueError, match=f"SeekV4Config.{field}="):
        SeekV4Config.from_preset("tiny", **kw)
