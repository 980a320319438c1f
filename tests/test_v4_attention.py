"""DeepSeek-V4 hybrid attention (sliding / CSA / HCA): float64 reference, cache correctness, padding."""
import pytest
import torch
from transformers import DynamicCache

from seekv4 import SeekV4Config, SeekV4ForCausalLM
from seekv4.modeling.attention_v4 import V4Attention

V4 = dict(attention_types=["v4"] * 4, attention_sparsity=["sliding", "csa", "hca", "csa"], head_dim=32,
          qk_rope_head_dim=8, sliding_window=8, csa_compress_ratio=4, hca_compress_ratio=8, o_groups=2,
          o_lora_rank=16, index_n_heads=2, index_head_dim=16, index_topk=3,
          compress_rope_parameters={"rope_type": "yarn", "rope_theta": 160000.0, "factor": 4.0,
                                    "original_max_position_embeddings": 256})


def config(**kw):
    return SeekV4Config.from_preset("tiny", **{**V4, **kw})


def make(**kw):
    torch.manual_seed(0)
    model = SeekV4ForCausalLM(config(**kw)).eval()
    with torch.no_grad():  # non-trivial sinks and compressor position biases
        for layer in model.model.layers:
            layer.self_attn.sinks.normal_()
            for module in layer.self_attn.modules():
                if hasattr(module, "position_bias"):
                    module.position_bias.normal_()
    return model


def ids_of(length, batch=2, seed=1):
    return torch.randint(3, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def rope_tail(x, positions, params, rope_dim, sign=1.0):
    """float64 interleaved rotation of the last rope_dim dims at the given positions (independent of seekv4)."""
    from seekv4.modeling.rope import compute_inv_freq

    inv_freq, factor = compute_inv_freq(params, rope_dim)
    angles = positions.double()[:, None] * inv_freq.double()  # [S, r/2]
    rot = torch.polar(torch.full_like(angles, factor), sign * angles)
    tail = torch.view_as_complex(x[..., -rope_dim:].reshape(*x.shape[:-1], rope_dim // 2, 2).contiguous())
    return torch.cat((x[..., :-rope_dim], torch.view_as_real(tail * rot).flatten(-2)), dim=-1)


def compress64(comp, hidden, params, rope_dim):
    """Entries of a compressor over one whole sequence, per docs/attention.md's equations, in float64."""
    m, d, n = comp.ratio, comp.dim, hidden.shape[0] // comp.ratio
    kv, gate = hidden @ comp.kv_proj.weight.double().T, hidden @ comp.gate_proj.weight.double().T
    gate = gate + comp.position_bias.double()[torch.arange(hidden.shape[0]) % m]
    entries = []
    for i in range(n):
        cur = slice(i * m, (i + 1) * m)
        if comp.overlap:
            prev = slice((i - 1) * m, i * m)
            vals = torch.cat((kv[prev, :d] if i else kv[:0, :d], kv[cur, d:]))
            logits = torch.cat((gate[prev, :d] if i else gate[:0, :d], gate[cur, d:]))
        else:
            vals, logits = kv[cur], gate[cur]
        pooled = (torch.softmax(logits, 0) * vals).sum(0)
        normed = (pooled / torch.sqrt(pooled.pow(2).mean() + comp.kv_norm.variance_epsilon)
                  * comp.kv_norm.weight.double())
        entries.append(normed)
    entries = torch.stack(entries) if entries else hidden.new_zeros(0, d)
    return rope_tail(entries, torch.arange(n) * m, params, rope_dim)


def attention64(attn: V4Attention, x: torch.Tensor) -> torch.Tensor:
    """One sequence [S, H] through a V4 attention layer, written from docs/attention.md with dense masks, float64."""
    cfg, s = attn.config, x.shape[0]
    x = x.double()
    pos = torch.arange(s)
    params = cfg.rope_parameters if attn.sparsity == "sliding" else cfg.compress_rope_parameters
    r = cfg.qk_rope_head_dim
    ql = x @ attn.q_a_proj.weight.double().T
    ql = ql / torch.sqrt(ql.pow(2).mean(-1, keepdim=True) + 1e-6) * attn.q_a_norm.weight.double()
    q = (ql @ attn.q_b_proj.weight.double().T).view(s, attn.num_heads, -1)
    q = q / torch.sqrt(q.pow(2).mean(-1, keepdim=True) + 1e-6)
    q = rope_tail(q.transpose(0, 1), pos, params, r).transpose(0, 1)  # [S, H, D]
    kv = x @ attn.kv_proj.weight.double().T
    kv = kv / torch.sqrt(kv.pow(2).mean(-1, keepdim=True) + 1e-6) * attn.kv_norm.weight.double()
    kv = rope_tail(kv, pos, params, r)  # [S, D]
    keys = kv
    visible = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - cfg.sliding_window)  # [S, S]
    if attn.compressor is not None:
        entries = compress64(attn.compressor, x, params, r)
        m = attn.ratio
        ok = torch.arange(entries.shape[0])[None, :] < ((pos + 1) // m)[:, None]  # [S, N]
        if attn.indexer is not None:
            ind = attn.indexer
            ikeys = compress64(ind.compressor, x, params, r)
            iq = (ql @ ind.q_b_proj.weight.double().T).view(s, ind.n_heads, -1)
            iq = rope_tail(iq.transpose(0, 1), pos, params, r).transpose(0, 1)
            w = (x @ ind.weights_proj.weight.double().T) * ind.n_heads**-0.5 * ind.head_dim**-0.5
            scores = torch.einsum("sh,shn->sn", w, torch.relu(torch.einsum("shd,nd->shn", iq, ikeys)))
            scores = scores.masked_fill(~ok, float("-inf"))
            chosen = torch.zeros_like(ok)
            for t in range(s):
                order = sorted(range(entries.shape[0]), key=lambda i: (-scores[t, i].item(), -i))
                chosen[t, [i for i in order[: ind.topk] if ok[t, i]]] = True
            ok = chosen
        keys = torch.cat((kv, entries))
        visible = torch.cat((visible, ok), dim=1)
    logits = torch.einsum("shd,td->sht", q, keys) * attn.scaling
    logits = logits.masked_fill(~visible[:, None, :], float("-inf"))
    sink = attn.sinks.double()[None, :, None].expand(s, -1, 1)
    probs = torch.softmax(torch.cat((logits, sink), -1), -1)[..., :-1]
    out = torch.einsum("sht,td->shd", probs, keys)
    out = rope_tail(out.transpose(0, 1), pos, params, r, sign=-1.0).transpose(0, 1)
    groups = out.reshape(s, attn.o_groups, -1)
    w_a = attn.o_a_proj.weight.double().view(attn.o_groups, attn.o_lora_rank, -1)
    low = torch.einsum("sgi,gri->sgr", groups, w_a).flatten(1)
    return low @ attn.o_b_proj.weight.double().T


def rope_of(model, s: int) -> dict:
    """The position embeddings the model hands its layers for positions 0..s-1."""
    return model.model.position_embeddings(torch.arange(s)[None], torch.float32)


@pytest.mark.parametrize("layer", [0, 1, 2])  # sliding, csa, hca
def test_layer_matches_float64_spec_recomputation(layer):
    model = make()
    attn = model.model.layers[layer].self_attn
    x = torch.randn(1, 37, 64)
    with torch.no_grad():
        ours = attn(x, rope_of(model, x.shape[1]), None)[0][0]
        ref = attention64(attn, x[0])
    assert (ours.double() - ref).abs().max().item() < 1e-5


IMPLS = ["eager", "fused"]  # fused: the compiled CPU selection kernel (tests/test_indexer_kernel.py)


@pytest.mark.parametrize("impl", IMPLS)
def test_incremental_and_chunked_prefill_match_full_forward(impl):
    model, ids = make(indexer_implementation=impl), ids_of(45)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        for splits in ([30], [13, 22], [1, 2, 3]):
            cache, pieces, start = DynamicCache(config=model.config), [], 0
            for end in [*splits, *range(splits[-1] + 1, 46)]:
                pieces.append(model(ids[:, start:end], past_key_values=cache).logits)
                start = end
            assert (torch.cat(pieces, 1) - full).abs().max().item() <= 1e-5


@pytest.mark.parametrize("impl", IMPLS)
def test_cached_generation_equals_uncached(impl):
    model, ids = make(indexer_implementation=impl), ids_of(29)
    kw = dict(max_new_tokens=20, min_new_tokens=20, do_sample=False)
    assert torch.equal(model.generate(ids, **kw), model.generate(ids, use_cache=False, **kw))


@pytest.mark.parametrize("impl", IMPLS)
def test_left_padded_batch_equals_each_alone_prompts_ending_mid_block(impl):
    model = make(indexer_implementation=impl)
    a, b = ids_of(303, 1, seed=5)[0], ids_of(258, 1, seed=6)[0]  # 303 % 4 == 3, 258 % 8 == 2
    batch = torch.zeros(2, 303, dtype=torch.long)
    mask = torch.zeros(2, 303, dtype=torch.long)
    batch[0], mask[0] = a, 1
    batch[1, 45:], mask[1, 45:] = b, 1
    kw = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
    together = model.generate(batch, attention_mask=mask, **kw)
    assert torch.equal(together[0, 303:], model.generate(a[None], **kw)[0, 303:])
    assert torch.equal(together[1, 303:], model.generate(b[None], **kw)[0, 258:])


def test_beam_search_reorders_compressor_state():
    model, ids = make(), ids_of(21)
    beams = model.generate(ids, num_beams=3, max_new_tokens=10, do_sample=False)
    assert beams.shape == (2, 31)
    with pytest.raises(ValueError, match="cannot be rewound"):
        cache = DynamicCache(config=model.config)
        model(ids, past_key_values=cache)
        cache.crop(-2)


@pytest.mark.parametrize("overrides, field", [
    (dict(attention_sparsity=["sliding", "dsa", "hca", "csa"]), r"attention_sparsity\[1\]"),
    (dict(attention_sparsity=["sliding", "csa", "hca", "dense"]), r"attention_sparsity\[3\]"),
    (dict(csa_compress_ratio=1), "csa_compress_ratio"),
    (dict(o_groups=3), "o_groups"),
    (dict(q_lora_rank=None), "q_lora_rank"),
    (dict(qk_rope_head_dim=64), "qk_rope_head_dim"),
    (dict(index_topk=600, max_position_embeddings=2048), "index_topk"),
    (dict(compress_rope_parameters={"rope_type": "yarn", "rope_theta": 1e5}), r"compress_rope_parameters\['factor'\]"),
])
def test_invalid_v4_config_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=rf"SeekV4Config\.{field}.*invalid"):
        config(**overrides)


def test_csa_indexer_learns_only_from_its_kl():
    """V3.2's sparse-stage recipe on compressed entries (docs/decisions.md#d1-csa-indexer-objective): LM loss gives
    the indexer no gradient; its KL reaches every indexer parameter and nothing else; a few steps on the KL alone
    lower it."""
    model = make().train()
    ids = ids_of(48)
    out = model(ids, labels=ids)
    assert out.indexer_loss is not None and out.indexer_loss > 0
    names = [n for n, _ in model.named_parameters() if ".indexer." in n]
    assert len(names) == 2 * 6  # two CSA layers x (q_b_proj, weights_proj, compressor.{kv,gate}_proj, bias, norm)
    model.zero_grad()
    out.lm_loss.backward(retain_graph=True)
    params = dict(model.named_parameters())
    assert all(params[n].grad is None or params[n].grad.abs().sum() == 0 for n in names)
    model.zero_grad()
    out.indexer_loss.backward()
    assert all(params[n].grad is not None and params[n].grad.abs().sum() > 0 for n in names)
    assert all(p.grad is None or p.grad.abs().sum() == 0 for n, p in params.items() if n not in names)
    opt = torch.optim.Adam([params[n] for n in names], lr=3e-2)
    first = out.indexer_loss.item()
    for _ in range(15):
        opt.zero_grad()
        loss = model(ids, labels=ids).indexer_loss
        loss.backward()
        opt.step()
    assert loss.item() < 0.7 * first


def test_fp8_simulation_of_window_and_compressed_entries_matches_float64_reference():
    """kv_cache_dtype="fp8_e4m3" on v4: the non-RoPE dims of window K=V and of compressed entries are rounded to
    e4m3 with power-of-two scales per block (the official demo's simulation, docs/decisions.md#d7-v4-fp8-simulation)."""
    model = make(kv_cache_dtype="fp8_e4m3", kv_cache_fp8_block=8)
    plain = make()
    x = torch.randn(1, 37, 64)
    for layer in (0, 2):  # sliding, hca
        attn, ref_attn = model.model.layers[layer].self_attn, plain.model.layers[layer].self_attn
        ref_attn.load_state_dict(attn.state_dict())
        def round_trip(t, rope_dim, block):  # independent: torch's e4m3 cast with power-of-two scales
            nope, rope = t[..., :-rope_dim], t[..., -rope_dim:]
            blocks = nope.unflatten(-1, (-1, block))
            scale = torch.exp2(torch.ceil(torch.log2(blocks.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 448)))
            q = (blocks / scale).to(torch.float32).to(torch.float8_e4m3fn).to(torch.float64) * scale
            return torch.cat((q.flatten(-2), rope), dim=-1)

        with torch.no_grad():
            ours = attn(x, rope_of(model, x.shape[1]), None)[0][0].double()
            plain_out = ref_attn(x, rope_of(plain, x.shape[1]), None)[0][0].double()
        assert (ours - plain_out).abs().max() > 1e-4  # the rounding is really applied
        import seekv4.modeling.attention_v4 as v4mod
        import seekv4.modeling.compressor as compmod

        original = v4mod.fp8_round_head
        fake = lambda t, rope_dim, block: t if block is None else round_trip(t.double(), rope_dim, block).to(t.dtype)
        v4mod.fp8_round_head, compmod.fp8_round_head = fake, fake
        try:
            with torch.no_grad():
                expected = attn(x, rope_of(model, x.shape[1]), None)[0][0].double()
        finally:
            v4mod.fp8_round_head = compmod.fp8_round_head = original
        assert (ours - expected).abs().max() < 1e-5


def test_fp8_v4_cache_decoding_matches_full_forward():
    model, ids = make(kv_cache_dtype="fp8_e4m3", kv_cache_fp8_block=8), ids_of(41)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache = DynamicCache(config=model.config)
        steps = [model(ids[:, :30], past_key_values=cache).logits]
        steps += [model(ids[:, t: t + 1], past_key_values=cache).logits for t in range(30, 41)]
    assert (torch.cat(steps, 1) - full).abs().max().item() <= 1e-5  # cache-less forward: same rounding, no storage
    # compressed entries are really stored as FP8 records: e4m3 non-RoPE dims | fp32 scales | RoPE dims' bytes
    for layer in (1, 2):  # csa, hca
        ratio = model.model.layers[layer].self_attn.ratio
        state = cache.layers[layer].states["kv"]
        d, rope = model.config.head_dim, model.config.qk_rope_head_dim
        assert state.store.dtype == torch.uint8
        assert state.length == 41 // ratio and state.store.shape[1] >= state.length  # spare capacity for appends
        assert state.store.shape[::2] == (2, (d - rope) + 4 * (d - rope) // 8 + 4 * rope)
        assert state.entries.shape == (2, 41 // ratio, d) and state.entries.dtype == torch.float32


@pytest.mark.parametrize("layer", [0, 1, 2])  # sliding, csa, hca
def test_layer_without_the_models_rope_tables_is_a_clear_error(layer):
    model = make()
    attn, x = model.model.layers[layer].self_attn, torch.randn(1, 8, 64)
    with pytest.raises(ValueError, match=r"position_embeddings\[.*SeekV4Model.position_embeddings"):
        attn(x, {}, None)
    if layer:  # compressed layers also need the table their compressors rotate entries with
        rope = rope_of(model, 8)
        del rope["v4_compress_table"]
        with pytest.raises(ValueError, match=r"v4_compress_table"):
            attn(x, rope, None)
