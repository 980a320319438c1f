"""Multi-token prediction: loss against an independent recomputation, save/load, and training."""
import torch

from seekv4 import SeekV4Config, SeekV4ForCausalLM


def make(**kw):
    torch.manual_seed(0)
    return SeekV4ForCausalLM(SeekV4Config.from_preset("tiny", num_nextn_predict_layers=2, **kw)).eval()


def test_mtp_loss_matches_manual_recomputation():
    model, x = make(residual_kind="mhc"), torch.randint(3, 256, (2, 12))
    with torch.no_grad():
        out = model(x, labels=x)
        base = model.model(x, use_cache=False, output_mtp_hidden_states=True)
        ce = torch.nn.functional.cross_entropy
        losses = []
        for k, h in enumerate(base.mtp_hidden_states, start=1):
            logits = model.lm_head(h)[:, : 12 - 1 - k]  # position t predicts token t+1+k
            losses.append(ce(logits.reshape(-1, 256).float(), x[:, 1 + k:].reshape(-1)))
        expect = torch.stack(losses).mean()
    torch.testing.assert_close(out.mtp_loss, expect)
    torch.testing.assert_close(out.loss, out.lm_loss + 0.3 * out.mtp_loss)
    assert model(x).mtp_loss is None  # no labels: no MTP work


def test_mtp_module_reads_the_next_token_embedding():
    model, x = make(), torch.randint(3, 256, (1, 10))
    y = x.clone()
    y[0, 6] = (x[0, 6] + 1) % 256
    with torch.no_grad():
        a = model.model(x, use_cache=False, output_mtp_hidden_states=True).mtp_hidden_states[0]
        b = model.model(y, use_cache=False, output_mtp_hidden_states=True).mtp_hidden_states[0]
    diff = (a - b).abs().amax(-1)[0]
    assert diff[:5].max() < 1e-5 and diff[5] > 1e-3  # position 5 embeds token 6 (t + k, k = 1)


def test_mtp_weights_save_load_and_loss_falls(tmp_path):
    model = make(residual_kind="mhc")
    assert any(k.startswith("model.mtp.1.block.") for k in model.state_dict())
    model.save_pretrained(tmp_path)
    loaded = SeekV4ForCausalLM.from_pretrained(tmp_path).eval()  # strict: MTP keys must match
    x = torch.randint(3, 256, (2, 8), generator=torch.Generator().manual_seed(0)).repeat(1, 2)
    with torch.no_grad():
        torch.testing.assert_close(model(x, labels=x).mtp_loss, loaded(x, labels=x).mtp_loss)
    loaded.train()
    opt = torch.optim.AdamW(loaded.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        out = loaded(x, labels=x)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.mtp_loss.item())
    assert losses[-1] < 0.7 * losses[0]


def _v4(last_sparsity: str, last_ffn: str):
    return SeekV4Config.from_preset("tiny-deepseek-v4-flash",
                                    attention_sparsity=["sliding", "csa", "hca", last_sparsity],
                                    ffn_types=["hash_moe", "moe", "moe", last_ffn], num_nextn_predict_layers=1)


def test_v4_mtp_block_is_sliding_with_score_routed_moe():
    """Spec §4.11: V4's MTP block attends over the window only and routes by score, whatever the last layer is.
    Reference: a model whose last layer already is sliding + moe (there the MTP copy of its kinds is right)."""
    from seekv4.modeling.moe import HashRouter

    torch.manual_seed(0)
    model = SeekV4ForCausalLM(_v4("csa", "hash_moe")).eval()
    ref = SeekV4ForCausalLM(_v4("sliding", "moe")).eval()
    block = model.model.mtp[0].block
    assert block.self_attn.sparsity == "sliding" and block.self_attn.compressor is None
    assert block.self_attn.indexer is None and block.mlp.kind == "moe" and not isinstance(block.mlp.gate, HashRouter)
    assert model.model.layers[3].self_attn.sparsity == "csa"  # the main model's schedule is untouched
    ref.model.mtp.load_state_dict(model.model.mtp.state_dict())  # strict: same parameters as the reference
    x = torch.randint(3, 256, (2, 40), generator=torch.Generator().manual_seed(1))
    cfg = model.config  # stream count follows the preset's residual kind (mHC: hc_mult streams)
    streams = torch.randn(2, 40, cfg.hc_mult if cfg.residual_kind == "mhc" else 1, cfg.hidden_size)
    pos = torch.arange(40)[None]
    rope = model.model.position_embeddings(pos, torch.float32)  # the MTP block reads its `v4` table
    kw = dict(position_embeddings=rope, attention_mask=None, position_ids=pos)
    with torch.no_grad():
        emb = model.model.embed_tokens(x)
        a = model.model.mtp[0](streams, emb, x, **kw)[1]
        b = ref.model.mtp[0](streams, emb, x, **kw)[1]
        torch.testing.assert_close(a, b)
        assert torch.isfinite(model(x, labels=x).mtp_loss)


def test_non_v4_mtp_block_keeps_the_last_layer_kinds():
    model = make(ffn_types=["dense", "moe", "moe", "hash_moe"])
    block = model.model.mtp[0].block
    assert block.attention_kind == "mla" and block.mlp.kind == "hash_moe"
