"""Losses on edge cases (MTP on short sequences, `num_items_in_batch`, all-ignored labels) and clear errors for
masks, positions and empty inputs that would otherwise change the logits silently or crash deep inside."""
import pytest
import torch
import torch.nn.functional as F

from seekv4 import SeekV4Config, SeekV4ForCausalLM

V = 256


def make(preset="tiny", **kw):
    torch.manual_seed(0)
    return SeekV4ForCausalLM(SeekV4Config.from_preset(preset, **kw)).eval()


@pytest.fixture(scope="module")
def mtp2():
    return make(num_nextn_predict_layers=2)


def ids(b, s, seed=0):
    return torch.randint(3, V, (b, s), generator=torch.Generator().manual_seed(seed))


def hand_mtp_sums(model, x, labels):
    """Per MTP depth k: (sum of CE over valid targets, their count); position t predicts labels[t+1+k]."""
    base = model.model(x, use_cache=False, output_mtp_hidden_states=True)
    out = []
    for k, h in enumerate(base.mtp_hidden_states, start=1):
        logits = model.lm_head(h)[:, : max(x.shape[1] - 1 - k, 0)].reshape(-1, V).float()
        target = labels[:, 1 + k:].reshape(-1)
        out.append((F.cross_entropy(logits, target, reduction="sum"), int((target != -100).sum())))
    return out


# ---- MTP ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seq_len", [2, 3, 4])
def test_mtp_loss_is_finite_when_a_depth_has_no_targets(mtp2, seq_len):
    """S <= D + 1 leaves depth D without targets: it adds nothing (the paper's 1/D sum of the depth losses)."""
    x = ids(2, seq_len)
    with torch.no_grad():
        out = mtp2(x, labels=x)
        sums = hand_mtp_sums(mtp2, x, x)
    expect = torch.stack([s / n if n else s * 0 for s, n in sums]).mean()
    assert torch.isfinite(out.loss) and torch.isfinite(out.mtp_loss)
    torch.testing.assert_close(out.mtp_loss, expect)
    torch.testing.assert_close(out.loss, out.lm_loss + 0.3 * out.mtp_loss)


def test_mtp_loss_on_a_single_token_keeps_a_graph():
    model = make(num_nextn_predict_layers=2).train()
    x = ids(1, 2)
    out = model(x, labels=x)
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.mtp_loss.item() == 0.0
    grads = [p.grad for p in model.model.mtp.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_mtp_loss_with_num_items_in_batch_uses_its_own_target_count(mtp2):
    """One micro-batch with Trainer's count (main targets, labels[..., 1:]): every loss is a plain mean."""
    x = ids(2, 7)
    labels = x.clone()
    labels[0, :3] = -100  # prompt masking: the depths lose different numbers of targets
    n_main = (labels[:, 1:] != -100).sum()
    with torch.no_grad():
        plain = mtp2(x, labels=labels)
        counted = mtp2(x, labels=labels, num_items_in_batch=n_main)
        sums = hand_mtp_sums(mtp2, x, labels)
    expect = torch.stack([s / n for s, n in sums]).mean()
    torch.testing.assert_close(plain.mtp_loss, expect)
    torch.testing.assert_close(counted.mtp_loss, expect)
    torch.testing.assert_close(counted.lm_loss, plain.lm_loss)


def test_mtp_loss_under_gradient_accumulation_is_the_mean_over_the_accumulated_batch(mtp2):
    """Trainer sums the micro-batch losses, each normalised by the accumulated main-target count. The MTP term of
    each micro-batch is scaled by its own share, so the sum is the mean over all MTP targets when the micro-batches
    lose the same share of targets to the shift (here: no masked labels), and a convex combination of the
    micro-batch means otherwise (documented in SeekV4ForCausalLM.forward)."""
    xs = [ids(2, 6, seed=1), ids(3, 6, seed=2)]
    total = sum((x[:, 1:] != -100).sum() for x in xs)
    with torch.no_grad():
        outs = [mtp2(x, labels=x, num_items_in_batch=total) for x in xs]
        sums = [hand_mtp_sums(mtp2, x, x) for x in xs]
    lm = torch.cat([F.cross_entropy(mtp2(x).logits[:, :-1].reshape(-1, V), x[:, 1:].reshape(-1), reduction="none")
                    for x in xs]).mean()
    torch.testing.assert_close(sum(o.lm_loss for o in outs), lm)
    expect = torch.stack([sum(s[k][0] for s in sums) / sum(s[k][1] for s in sums) for k in range(2)]).mean()
    torch.testing.assert_close(sum(o.mtp_loss for o in outs), expect)

    masked = [x.clone() for x in xs]
    masked[0][:, :4] = -100  # the first micro-batch loses more targets: weights n_main_i / N
    total = sum((m[:, 1:] != -100).sum() for m in masked)
    with torch.no_grad():
        outs = [mtp2(x, labels=m, num_items_in_batch=total) for x, m in zip(xs, masked)]
        means = [torch.stack([s / n for s, n in hand_mtp_sums(mtp2, x, m)]).mean() for x, m in zip(xs, masked)]
    weights = [(m[:, 1:] != -100).sum() / total for m in masked]
    torch.testing.assert_close(sum(o.mtp_loss for o in outs), sum(w * m for w, m in zip(weights, means)))


def test_mtp_loss_with_shift_labels_shifts_them_per_depth(mtp2):
    """Padding-free collators pass `shift_labels` (labels already shifted by one): depth k shifts k further."""
    x = ids(2, 8)
    shift = F.pad(x[:, 1:], (0, 1), value=-100)
    with torch.no_grad():
        ref = mtp2(x, labels=x)
        out = mtp2(x, labels=x, shift_labels=shift)
    torch.testing.assert_close(out.lm_loss, ref.lm_loss)
    torch.testing.assert_close(out.mtp_loss, ref.mtp_loss)


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2)).eval()


@pytest.mark.parametrize("num_items", [None, 0, 5])
def test_all_ignored_labels_match_llama(mtp2, num_items):
    """Every label -100: NaN (0/0) as LlamaForCausalLM without a count or with a zero count, 0 when Trainer's
    count comes from other micro-batches. The MTP term has no targets either and adds nothing."""
    x = ids(2, 6)
    labels = torch.full_like(x, -100)
    kw = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    with torch.no_grad():
        llama = _llama()(x, labels=labels, **kw).loss
        out = mtp2(x, labels=labels, **kw)
    assert torch.isnan(llama) == torch.isnan(out.loss) == torch.isnan(out.lm_loss)
    if not torch.isnan(llama):
        torch.testing.assert_close(out.loss, llama)
    assert out.mtp_loss.item() == 0.0


# ---- masks ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    return make(max_position_embeddings=64)


@pytest.mark.parametrize("mask, match", [
    (torch.tensor([[float("-inf"), 0, 0, 0, 0, 0]] * 2), "additive"),
    (torch.tensor([[0.0] * 6] * 2), "additive"),
    (torch.full((2, 6), 2), "only 0"),
    (torch.ones(2, 5, dtype=torch.long), r"shape \(2, 5\).*\(2, 6\)"),
    (torch.ones(2, 7, dtype=torch.long), r"shape \(2, 7\).*\(2, 6\)"),
    (torch.ones(1, 6, dtype=torch.long), r"shape \(1, 6\).*\(2, 6\)"),
    (torch.ones(2, 1, 6, dtype=torch.long), "2-D"),
])
def test_bad_2d_masks_are_refused(tiny, mask, match):
    with pytest.raises(ValueError, match=f"attention_mask.*{match}"):
        tiny(ids(2, 6), attention_mask=mask)


def test_float_and_bool_0_1_masks_match_the_integer_mask(tiny):
    x, mask = ids(2, 6), torch.tensor([[0, 0, 1, 1, 1, 1], [1] * 6])
    with torch.no_grad():
        ref = tiny(x, attention_mask=mask).logits
        for other in (mask.float(), mask.bool()):
            torch.testing.assert_close(tiny(x, attention_mask=other).logits, ref)


def test_mask_with_a_cache_covers_past_and_new_tokens(tiny):
    x, mask = ids(2, 6), torch.tensor([[0, 1, 1, 1, 1, 1], [1] * 6])
    with torch.no_grad():
        full = tiny(x, attention_mask=mask, use_cache=False).logits
        past = tiny(x[:, :4], attention_mask=mask[:, :4], use_cache=True).past_key_values
        with pytest.raises(ValueError, match=r"attention_mask.*\(2, 2\).*\(2, 6\).*4 cached \+ 2 new"):
            tiny(x[:, 4:], attention_mask=mask[:, 4:], past_key_values=past, use_cache=True)
        step = tiny(x[:, 4:], attention_mask=mask, past_key_values=past, use_cache=True).logits
    torch.testing.assert_close(step, full[:, 4:], atol=1e-5, rtol=1e-4)


def _mask_4d(mask_2d, dtype):
    s = mask_2d.shape[1]
    keep = torch.ones(s, s).tril().bool()[None, None] & mask_2d.bool()[:, None, None, :]
    if dtype == torch.bool:
        return keep
    return torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)


@pytest.mark.parametrize("preset", ["tiny", "tiny-gqa"])
@pytest.mark.parametrize("dtype", [torch.bool, torch.float32])
def test_4d_mask_on_dense_attention_matches_the_2d_mask(preset, dtype):
    model, x, mask = make(preset), ids(2, 6), torch.tensor([[0, 0, 1, 1, 1, 1], [1] * 6])
    with torch.no_grad():
        ref = model(x, attention_mask=mask).logits
        out = model(x, attention_mask=_mask_4d(mask, dtype)).logits
    torch.testing.assert_close(out[0, 2:], ref[0, 2:])  # padded queries differ: their rows are all masked
    torch.testing.assert_close(out[1], ref[1])


def test_bad_4d_masks_on_dense_attention_are_refused():
    model, x = make("tiny-gqa"), ids(2, 6)
    good = _mask_4d(torch.ones(2, 6), torch.bool)
    with pytest.raises(ValueError, match=r"attention_mask.*shape \(2, 1, 6, 5\)"):
        model(x, attention_mask=good[..., :5])
    with pytest.raises(ValueError, match="attention_mask.*bool.*additive"):
        model(x, attention_mask=good.long())
    with pytest.raises(ValueError, match="attention_mask.*additive.*<= 0"):
        model(x, attention_mask=good.float())  # a 0/1 float mask is not additive


@pytest.mark.parametrize("preset", ["tiny-deepseek-v3.2", "tiny-deepseek-v4-flash", "tiny-seed-v4"])
def test_4d_mask_on_sparse_attention_or_engram_is_refused(preset):
    model, x = make(preset), ids(2, 6)
    with pytest.raises(ValueError, match="4-D attention_mask.*2-D padding mask"):
        model(x, attention_mask=_mask_4d(torch.ones(2, 6), torch.bool))


# ---- positions and empty inputs -------------------------------------------------------------------------------


@pytest.mark.parametrize("position_ids, error, match", [
    (torch.arange(6)[None] + 60, ValueError, r"position_ids.*max 65.*max_position_embeddings=64"),
    (torch.arange(6)[None] - 1, ValueError, r"position_ids.*min -1"),
    (torch.arange(6), ValueError, r"position_ids.*shape \(6,\)"),
    (torch.arange(5)[None], ValueError, r"position_ids.*shape \(1, 5\)"),
    (torch.arange(6)[None].float(), TypeError, "position_ids.*integer"),
])
def test_bad_position_ids_are_refused(tiny, position_ids, error, match):
    with pytest.raises(error, match=match):
        tiny(ids(2, 6), position_ids=position_ids)


def test_explicit_position_ids_within_range_are_used(tiny):
    x = ids(2, 6)
    with torch.no_grad():
        ref = tiny(x).logits
        torch.testing.assert_close(tiny(x, position_ids=torch.arange(6)[None].expand(2, 6)).logits, ref)


@pytest.mark.parametrize("shape", [(1, 0), (0, 5), (0, 0)])
def test_empty_input_ids_are_refused(tiny, shape):
    with pytest.raises(ValueError, match=r"empty input.*at least one token"):
        tiny(torch.zeros(shape, dtype=torch.long))


def test_empty_inputs_embeds_and_prompt_are_refused(tiny):
    with pytest.raises(ValueError, match=r"empty input.*at least one token"):
        tiny(inputs_embeds=torch.zeros(1, 0, 64))
    with pytest.raises(ValueError, match=r"empty input.*at least one token"):
        tiny.generate(torch.zeros(1, 0, dtype=torch.long), max_new_tokens=2)
