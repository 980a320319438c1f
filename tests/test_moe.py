"""MoE: grouped dispatch vs the loop reference, routing rules, bias balancing, hash routing."""
import math

import pytest
import torch

from seekv4 import SeekV4Config
from references import experts_loop_reference
from seekv4.modeling.moe import MoE, Router, balanced_hash_table


def moe_config(**kw):
    base = dict(hidden_size=32, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=3,
                n_group=1, topk_group=1, vocab_size=64)
    return SeekV4Config.from_preset("tiny", **{**base, **kw})


def make_moe(dtype=torch.float32, **kw):
    torch.manual_seed(0)
    moe = MoE(moe_config(**kw)).to(dtype)
    with torch.no_grad():
        moe.gate.weight.normal_(0, 0.5)
        moe.experts.gate_up_proj.normal_(0, 0.2)
        moe.experts.down_proj.normal_(0, 0.2)
    return moe


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("limit", [None, 0.05])
def test_grouped_dispatch_matches_loop_reference_forward_and_grads(dtype, limit):
    moe = make_moe(dtype, swiglu_limit=limit)
    x = torch.randn(40, 32, dtype=dtype, requires_grad=True)
    weights, indices, _ = moe.gate(x, None, (4, 10))
    out = moe.experts(x, indices, weights)
    ref = experts_loop_reference(moe.experts, x, indices, weights)
    assert (out - ref).abs().max().item() <= 1e-5
    g = torch.randn_like(out)
    grads = torch.autograd.grad((out * g).sum(), [x, moe.experts.gate_up_proj, moe.experts.down_proj, moe.gate.weight],
                                retain_graph=True)
    grads_ref = torch.autograd.grad((ref * g).sum(),
                                    [x, moe.experts.gate_up_proj, moe.experts.down_proj, moe.gate.weight])
    for a, b in zip(grads, grads_ref):
        assert (a - b).abs().max().item() <= 1e-5
    assert grads[1].abs().sum() > 0


def test_experts_without_tokens_are_skipped():
    moe = make_moe()
    x = torch.randn(5, 32)
    indices = torch.tensor([[0, 1, 2]] * 5)  # experts 3..7 get nothing
    weights = torch.full((5, 3), 1 / 3)
    ref = experts_loop_reference(moe.experts, x, indices, weights)
    assert torch.allclose(moe.experts(x, indices, weights), ref, atol=1e-6)


def float64_routing(router: Router, x: torch.Tensor):
    """Independent re-computation of DeepSeek-V3 routing in float64 with explicit loops over tokens/groups."""
    w = router.weight.double()
    bias = router.e_score_correction_bias.double()
    e, k, g, tg = router.num_experts, router.top_k, router.n_group, router.topk_group
    per = e // g
    out_idx, out_w = [], []
    for row in x.double():
        logits = w @ row
        s = {"softmax": torch.softmax(logits, 0), "sigmoid": torch.sigmoid(logits),
             "sqrtsoftplus": torch.nn.functional.softplus(logits).sqrt()}[router.scoring_func]
        biased = s + bias
        groups = sorted(range(g), key=lambda j: -sorted(biased[j * per:(j + 1) * per].tolist())[-1] -
                        (sorted(biased[j * per:(j + 1) * per].tolist())[-2] if per > 1 else 0))[:tg]
        allowed = [i for i in range(e) if i // per in groups]
        chosen = sorted(allowed, key=lambda i: -biased[i].item())[:k]
        wt = s[chosen]
        if router.norm_topk_prob and k > 1:
            wt = wt / wt.sum()
        out_idx.append(sorted(chosen))
        out_w.append(dict(zip(chosen, (wt * router.routed_scaling_factor).tolist())))
    return out_idx, out_w


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid", "sqrtsoftplus"])
@pytest.mark.parametrize("groups", [(1, 1), (4, 2)])
def test_routing_matches_float64_recomputation(scoring, groups):
    moe = make_moe(scoring_func=scoring, n_group=groups[0], topk_group=groups[1], routed_scaling_factor=1.7)
    with torch.no_grad():
        moe.gate.e_score_correction_bias.normal_(0, 0.1)
    x = torch.randn(30, 32)
    weights, indices, _ = moe.gate(x, None, (3, 10))
    ref_idx, ref_w = float64_routing(moe.gate, x)
    for t in range(30):
        assert sorted(indices[t].tolist()) == ref_idx[t]
        for j, e in enumerate(indices[t].tolist()):
            assert math.isclose(weights[t, j].item(), ref_w[t][e], rel_tol=1e-5)


def test_bias_only_affects_selection_not_weights():
    moe = make_moe(norm_topk_prob=False)
    x = torch.randn(20, 32)
    with torch.no_grad():
        moe.gate.e_score_correction_bias.zero_()
        moe.gate.e_score_correction_bias[5] = 10.0  # expert 5 always selected
        weights, indices, aux = moe.gate(x, None, (2, 10))
    assert (indices == 5).any(-1).all()
    scores = torch.sigmoid(aux.router_logits)
    assert torch.allclose(weights, scores.gather(1, indices) * moe.gate.routed_scaling_factor)


def test_bias_update_moves_loads_toward_uniform():
    torch.manual_seed(0)
    moe = make_moe(router_bias_update_rate=0.02).train()
    with torch.no_grad():  # a strongly skewed router: experts 0 and 1 win for most tokens
        moe.gate.weight[:2] += 2.0 * torch.randn(1, 32).sign()
    x = torch.randn(512, 32).abs()

    def imbalance():
        moe.gate.expert_load.zero_()
        with torch.no_grad():
            moe.gate(x, None, (1, 512))
        load = moe.gate.expert_load
        return (load.max() / load.mean()).item()

    start = imbalance()
    for _ in range(150):
        with torch.no_grad():
            moe.gate(x, None, (1, 512))
        moe.gate.update_bias()
    end = imbalance()
    assert start >= 1.9
    print("imbalance", start, end)
    assert end < 0.6 * start, (start, end)


def test_hash_table_is_balanced_seeded_and_distinct():
    t = balanced_hash_table(1000, 8, 3, seed=7)
    assert t.shape == (1000, 3)
    assert torch.equal(t, balanced_hash_table(1000, 8, 3, seed=7))
    assert not torch.equal(t, balanced_hash_table(1000, 8, 3, seed=8))
    assert all(len(set(row)) == 3 for row in t.tolist())
    counts = torch.bincount(t.flatten(), minlength=8)
    assert counts.max() - counts.min() <= 3  # V·k/E ± 1 per slot


def test_hash_moe_routes_by_token_id():
    moe = MoE(moe_config(), hashed=True)
    ids = torch.tensor([[5, 9, 5]])
    x = torch.randn(3, 32)
    _, indices, _ = moe.gate(x, ids, (1, 3))
    assert torch.equal(indices, moe.gate.tid2eid[ids[0]])
    with pytest.raises(ValueError, match="input_ids"):
        moe.gate(x, None, (1, 3))


def test_shared_expert_is_clamped_like_the_routed_ones():
    """Spec Q3: the official V4 clamps the shared expert's SwiGLU too (the transformers port does not; SGLang
    traced garbage tokens to that omission). We follow the reference; checked against a float64 recomputation."""
    moe = make_moe(swiglu_limit=0.5)
    with torch.no_grad():
        for p in moe.shared_experts.parameters():
            p.normal_(0, 1.0)  # activations well beyond the limit
    x = torch.randn(6, 32, dtype=torch.float64)
    shared = moe.shared_experts.double()
    gate, up = x @ shared.gate_proj.weight.T, x @ shared.up_proj.weight.T
    assert gate.abs().max() > 0.5 and up.abs().max() > 0.5
    ref = (torch.nn.functional.silu(gate.clamp(max=0.5)) * up.clamp(-0.5, 0.5)) @ shared.down_proj.weight.T
    unclamped = (torch.nn.functional.silu(gate) * up) @ shared.down_proj.weight.T
    out = shared(x)[0]
    assert torch.allclose(out, ref, atol=1e-12) and not torch.allclose(out, unclamped, atol=1e-3)


def test_hash_router_has_no_balancing_state_and_old_checkpoints_with_it_load(tmp_path):
    """Hash routing is fixed: no bias, load count or balance loss; a checkpoint that still stores the unused bias of
    a hash layer (written before it was dropped) loads strictly with the same logits."""
    from safetensors.torch import load_file, save_file

    from seekv4 import SeekV4Config, SeekV4ForCausalLM
    from seekv4.modeling.moe import HashRouter

    config = SeekV4Config.from_preset("tiny-deepseek-v4-flash", aux_loss_alpha=0.01)
    model = SeekV4ForCausalLM(config)
    hashed = [m for m in model.modules() if isinstance(m, HashRouter)]
    assert hashed
    for gate in hashed:
        assert not hasattr(gate, "e_score_correction_bias") and not hasattr(gate, "expert_load")
    ids = torch.randint(0, config.vocab_size, (2, 9))
    model.train()
    out = model(input_ids=ids, labels=ids)
    n_score_layers = sum(isinstance(layer.mlp, MoE) and not isinstance(layer.mlp.gate, HashRouter)
                         for layer in model.model.layers)
    assert len(model.update_router_biases()) == n_score_layers
    assert torch.isfinite(out.loss)
    model.eval()
    model.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    state = load_file(weights)
    for name in [n for n in state if n.endswith("mlp.gate.tid2eid")]:
        state[name.replace("tid2eid", "e_score_correction_bias")] = torch.zeros(config.n_routed_experts)
    save_file(state, weights, metadata={"format": "pt"})
    loaded = SeekV4ForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
