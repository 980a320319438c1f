"""DeepSeek Sparse Attention: kernel, selection, cache correctness, padding, indexer training."""
import pytest
import torch
from transformers import DynamicCache

from seekv4 import SeekV4Config, SeekV4ForCausalLM
from seekv4.modeling.sparsity import freeze_all_but_indexers
from seekv4.modeling import indexer as indexer_module
from seekv4.modeling.indexer import LightningIndexer, deterministic_topk, select_topk, visible_keys
from references import sparse_attention_reference
from seekv4.modeling.sparse_attention import sparse_attention

DSA_PRESETS = {"mla": ("tiny-deepseek-v3.2", {}), "gqa": ("tiny-gqa", {"attention_sparsity": ["dsa"] * 4,
                                                                "index_n_heads": 2, "index_head_dim": 16,
                                                                "index_rope_head_dim": 8, "index_topk": 16})}


def make(kind="mla", **overrides):
    preset, extra = DSA_PRESETS[kind]
    torch.manual_seed(0)
    return SeekV4ForCausalLM(SeekV4Config.from_preset(preset, **{**extra, **overrides})).eval()


def ids_of(length, batch=2, seed=1):
    return torch.randint(3, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


# ---- kernel and selection ------------------------------------------------------------------------

@pytest.mark.parametrize("groups", [1, 2])
def test_sparse_kernel_matches_dense_masked_reference_in_float64(groups, monkeypatch):
    monkeypatch.setattr("seekv4.modeling.sparse_attention.CHUNK_BUDGET_BYTES", 4096)  # force many query chunks
    torch.manual_seed(0)
    b, l, t, hg, k = 2, 9, 20, 3, 5
    q1 = torch.randn(b, l, groups, hg, 6, dtype=torch.float64, requires_grad=True)
    q2 = torch.randn(b, l, groups, hg, 4, dtype=torch.float64, requires_grad=True)
    k1 = torch.randn(b, t, groups * 6, dtype=torch.float64, requires_grad=True)
    k2 = torch.randn(b, t, groups * 4, dtype=torch.float64, requires_grad=True)
    idx = torch.stack([torch.randperm(t)[:k] for _ in range(b * l)]).view(b, l, k)
    idx[0, 0, 2:] = -1  # fewer than k keys for some queries
    out, probs = sparse_attention([q1, q2], [k1, k2], 0, idx, 0.3, return_probs=True)
    ref = sparse_attention_reference([q1, q2], [k1, k2], 0, idx, 0.3)
    assert (out - ref).abs().max() < 1e-12
    assert torch.allclose(probs.sum(-1), torch.ones_like(probs.sum(-1)))
    assert (probs[0, 0, ..., 2:] == 0).all()
    grads = torch.autograd.grad(out.sum(), [q1, k1, k2])
    grads_ref = torch.autograd.grad(ref.sum(), [q1, k1, k2])
    for a, r in zip(grads, grads_ref):
        assert (a - r).abs().max() < 1e-12


def test_dense_block_joins_the_same_softmax_in_float64(monkeypatch):
    """HCA path: K=V rows given as `dense` (+ per-query visibility) == the same rows selected by index."""
    monkeypatch.setattr("seekv4.modeling.sparse_attention.CHUNK_BUDGET_BYTES", 4096)  # several query chunks
    torch.manual_seed(0)
    b, l, t, n, g, hg, d = 2, 11, 9, 6, 2, 3, 5
    q = torch.randn(b, l, g, hg, d, dtype=torch.float64, requires_grad=True)
    win = torch.randn(b, t, g * d, dtype=torch.float64, requires_grad=True)
    rows = torch.randn(b, n, g * d, dtype=torch.float64, requires_grad=True)
    idx = torch.rand(b, l, t).topk(4, dim=-1).indices  # distinct keys per query
    idx[:, ::3, 0] = -1
    visible = torch.rand(b, l, n) < 0.6
    visible[0, 0] = False  # a query that sees no dense row
    sink = torch.randn(g * hg, dtype=torch.float64)
    out, probs = sparse_attention([q], [win], 0, idx, 0.3, sink=sink, dense=(rows, visible), return_probs=True)
    full_idx = torch.cat((idx, torch.where(visible, torch.arange(n) + t, -1)), dim=-1)
    ref = sparse_attention_reference([q], [torch.cat((win, rows), 1)], 0, full_idx, 0.3, sink=sink)
    assert (out - ref).abs().max() < 1e-12 and probs.shape[-1] == 4 + n
    grads = torch.autograd.grad(out.square().sum(), (q, win, rows))
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, win, rows))
    for a, r in zip(grads, ref_grads):
        assert (a - r).abs().max() < 1e-12
    with pytest.raises(ValueError, match="K=V attention"):
        sparse_attention([q], [win], torch.randn(b, t, g * d, dtype=torch.float64), idx, 0.3, dense=(rows, visible))


def test_deterministic_topk_breaks_ties_toward_later_positions():
    scores = torch.tensor([[0.0, 2.0, 0.0, -0.0, 1.0, 0.0, float("-inf"), -3.0]])
    assert deterministic_topk(scores, 4).tolist() == [[1, 4, 5, 3]]  # 0.0 and -0.0 tie; later wins
    x = torch.randn(50, 300).relu()  # many exact zeros
    for k in (5, 100, 250):
        got = deterministic_topk(x, k)
        keys = [sorted(range(300), key=lambda j: (-row[j].item(), -j))[:k] for row in x]
        assert sorted(map(tuple, got.sort(-1).values.tolist())) == sorted(tuple(sorted(r)) for r in keys)


@pytest.mark.parametrize("kind", ["normal", "relu_zeros", "few_values", "masked"])
def test_long_row_topk_matches_composite_key_reference(kind):
    """Rows >= 4096 take the block-pruned path (and its fallbacks): same set as an exact (score, position) key
    computed independently in int64, for every k; -inf entries are never attended, so they are not compared."""
    g = torch.Generator().manual_seed(len(kind))
    for n, k in [(4096, 1), (5000, 16), (9001, 37), (20000, 64)]:
        s = torch.randn(2, 9, n, generator=g)
        if kind == "relu_zeros":
            s = s.clamp(max=0)  # massive exact ties at 0 (a row whose head weights are all negative)
            s[:, :4, ::97] = torch.rand(2, 4, len(range(0, n, 97)), generator=g)
        elif kind == "few_values":
            s = torch.randint(0, 5, s.shape, generator=g).float()
        elif kind == "masked":
            s = s.masked_fill(torch.rand(s.shape, generator=g) < 0.5, float("-inf"))
            s[0, 0, 10:] = float("-inf")  # fewer than k visible
        bits = (s + 0.0).view(torch.int32).long()
        ordered = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # int order == float order
        ref = torch.topk(ordered * 2**32 + torch.arange(n), k, dim=-1).indices
        got = deterministic_topk(s, k)
        finite = lambda idx: torch.where(torch.isfinite(s.gather(-1, idx)), idx, -1).sort(-1).values  # noqa: E731
        assert torch.equal(finite(got), finite(ref)), (kind, n, k)


def test_indexer_selection_matches_float64_recomputation():
    config = SeekV4Config.from_preset("tiny-deepseek-v3.2", index_topk=7, indexer_implementation="eager")
    torch.manual_seed(0)
    indexer = LightningIndexer(config, q_input_dim=48).double()
    hidden, q_in = torch.randn(2, 30, 64, dtype=torch.float64), torch.randn(2, 30, 48, dtype=torch.float64)
    cos, sin = torch.ones(1, 30, 4, dtype=torch.float64), torch.zeros(1, 30, 4, dtype=torch.float64)
    keys = indexer.keys(hidden, cos, sin)
    q, w = indexer.queries(hidden, q_in, cos, sin)
    padding = torch.ones(2, 30, dtype=torch.bool)
    padding[1, :4] = False
    idx = indexer.select(q, w, keys, torch.arange(1, 31)[None], padding)
    for bi in range(2):
        for t in range(30):
            scores = [sum(w[bi, t, h] * torch.relu(q[bi, t, h] @ keys[bi, s]) for h in range(4)).item()
                      for s in range(t + 1) if padding[bi, s]]
            positions = [s for s in range(t + 1) if padding[bi, s]]
            expect = sorted(sorted(zip(scores, positions), reverse=True)[:7], key=lambda x: x[1])
            got = sorted(i for i in idx[bi, t].tolist() if i >= 0)
            assert got == sorted(p for _, p in expect)


@pytest.mark.parametrize("ratio", [1, 4])  # 1: DSA (limit = cache index + 1); 4: CSA (complete entries)
def test_eager_selection_streams_query_chunks_within_the_budget(ratio, monkeypatch):
    """The eager path scores chunks of queries, each only against the keys below its largest limit, so no
    [L, T] score matrix exists; the picked sets are those of one unchunked pass (padding included)."""
    g = torch.Generator().manual_seed(ratio)
    b, l, hi, d, k = 2, 90, 4, 16, 8
    n = l // ratio
    q, w = torch.randn(b, l, hi, d, generator=g), torch.randn(b, l, hi, generator=g)
    keys = torch.randn(b, n, d, generator=g)
    limit = (torch.arange(1, l + 1)[None] // ratio).expand(b, l)
    pad = torch.ones(b, n, dtype=torch.bool)
    pad[1, : n // 3] = False  # a left-padded row
    ref = select_topk(q, w, keys, limit, k, "eager", pad)  # the default budget holds all 90 queries: one chunk
    scored = []
    score = indexer_module.index_scores
    monkeypatch.setattr(indexer_module, "index_scores", lambda q, w, keys, *a, **kw: scored.append(
        (q.shape[1], keys.shape[1])) or score(q, w, keys, *a, **kw))
    monkeypatch.setattr("seekv4.modeling.sparse_attention.CHUNK_BUDGET_BYTES", 4 * n * (hi + 1) * b * 16)
    got = select_topk(q, w, keys, limit, k, "eager", pad)
    assert torch.equal(got.sort(-1).values, ref.sort(-1).values)  # the order among tied scores is torch.topk's
    expect = [(min(16, l - s), min(n, int(limit[:, s : s + 16].max()))) for s in range(0, l, 16)]
    assert scored == [x for x in expect if x[1] > 0]  # chunks that see no key are not scored


# ---- model-level cache correctness ---------------------------------------------------------------

IMPLS = ["eager", "fused"]  # fused: the compiled CPU selection kernel (tests/test_indexer_kernel.py)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["mla", "gqa"])
def test_incremental_and_chunked_prefill_match_full_forward(kind, impl):
    model, ids = make(kind, indexer_implementation=impl), ids_of(64)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        for splits in ([40], [17, 30, 31], [1, 2, 3]):  # any split of the prompt, then token by token
            cache, pieces, start = DynamicCache(config=model.config), [], 0
            for end in [*splits, *range(splits[-1] + 1, 65)]:
                pieces.append(model(ids[:, start:end], past_key_values=cache).logits)
                start = end
            assert (torch.cat(pieces, 1) - full).abs().max().item() <= 1e-5


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["mla", "gqa"])
def test_cached_generation_equals_uncached(kind, impl):
    model, ids = make(kind, indexer_implementation=impl), ids_of(40)
    kw = dict(max_new_tokens=24, min_new_tokens=24, do_sample=False)
    assert torch.equal(model.generate(ids, **kw), model.generate(ids, use_cache=False, **kw))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["mla", "gqa"])
def test_left_padded_batch_equals_each_alone_long_prompts(kind, impl):
    model = make(kind, indexer_implementation=impl)
    a, b = ids_of(300, 1, seed=5)[0], ids_of(213, 1, seed=6)[0]
    batch = torch.zeros(2, 300, dtype=torch.long)
    mask = torch.zeros(2, 300, dtype=torch.long)
    batch[0], mask[0] = a, 1
    batch[1, 87:], mask[1, 87:] = b, 1
    kw = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0)
    together = model.generate(batch, attention_mask=mask, **kw)
    assert torch.equal(together[0, 300:], model.generate(a[None], **kw)[0, 300:])
    assert torch.equal(together[1, 300:], model.generate(b[None], **kw)[0, 213:])


def test_kernel_never_reads_unselected_keys():
    """Truly sparse: keys/values outside every query's index set can be anything, even NaN."""
    torch.manual_seed(0)
    q = torch.randn(1, 6, 1, 2, 8)
    keys = torch.randn(1, 30, 8)
    idx = torch.randint(0, 10, (1, 6, 4))  # only positions < 10 are ever selected
    out, _ = sparse_attention([q], [keys], 0, idx, 0.5)
    poisoned = keys.clone()
    poisoned[:, 10:] = float("nan")
    torch.testing.assert_close(sparse_attention([q], [poisoned], 0, idx, 0.5)[0], out)  # a NaN read would show


def test_dense_warmup_and_sparse_modes_agree_when_topk_covers_the_context():
    ids = ids_of(30)
    sparse = make(index_topk=64)
    dense = make(index_topk=64, dsa_mode="dense_warmup")
    with torch.no_grad():
        assert (sparse(ids).logits - dense(ids).logits).abs().max().item() < 1e-5


# ---- indexer training ----------------------------------------------------------------------------

def _grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward(retain_graph=True)
    return {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("mode", ["sparse", "dense_warmup"])
def test_gradients_reach_indexers_only_through_their_loss(mode):
    model = make(dsa_mode=mode).train()
    ids = ids_of(40)
    out = model(ids, labels=ids)
    indexer_names = [n for n, _ in model.named_parameters() if ".indexer." in n]
    n_indexers = sum(isinstance(m, LightningIndexer) for m in model.modules())
    assert n_indexers >= 4 and len(indexer_names) == 5 * n_indexers  # wq_b, wk, k_norm.{weight,bias}, weights_proj
    from_lm = _grads(model, out.lm_loss)
    assert all(from_lm[n] is None or from_lm[n].abs().sum() == 0 for n in indexer_names)
    from_kl = _grads(model, out.indexer_loss)
    assert all(from_kl[n] is not None and from_kl[n].abs().sum() > 0 for n in indexer_names)
    others = [n for n in from_kl if n not in indexer_names]
    assert all(from_kl[n] is None or from_kl[n].abs().sum() == 0 for n in others)
    assert torch.allclose(out.loss, out.lm_loss + model.config.indexer_loss_weight * out.indexer_loss)


def test_no_indexer_loss_at_inference_or_with_zero_weight():
    ids = ids_of(20)
    assert make()(ids, labels=ids).indexer_loss is None
    assert make(indexer_loss_weight=0.0).train()(ids, labels=ids).indexer_loss is None


def test_dense_warmup_under_trainer_halves_kl_and_raises_recall(tmp_path):
    import datasets
    from transformers import Trainer, TrainingArguments

    # initializer_range 0.2 gives peaked (non-uniform) main attention, i.e. something to distil
    model = make(dsa_mode="dense_warmup", index_topk=8, initializer_range=0.2)
    ids = ids_of(48, batch=8, seed=3)
    with torch.no_grad():
        before = model.train()(ids, labels=ids)
    assert freeze_all_but_indexers(model) > 0
    ds = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", max_steps=30,
                             per_device_train_batch_size=8, learning_rate=2e-2, save_strategy="no",
                             logging_steps=10, dataloader_num_workers=0, disable_tqdm=True, seed=0)
    Trainer(model=model, args=args, train_dataset=ds).train()
    with torch.no_grad():
        after = model.train()(ids, labels=ids)
    print("KL", before.indexer_loss.item(), "->", after.indexer_loss.item(),
          "recall", before.indexer_recall.item(), "->", after.indexer_recall.item())
    assert after.indexer_loss < 0.5 * before.indexer_loss
    assert after.indexer_recall > before.indexer_recall + 0.05
    torch.testing.assert_close(after.lm_loss, before.lm_loss)  # everything but the indexers stayed frozen


def test_freeze_all_but_indexers():
    model = make()
    n = freeze_all_but_indexers(model)
    assert n == sum(p.numel() for name, p in model.named_parameters() if ".indexer." in name)
    assert not model.lm_head.weight.requires_grad


def test_visible_keys_pads_static_cache_slots():
    pad = torch.tensor([[False, True, True]])
    valid = visible_keys(torch.tensor([[2, 3]]), 5, pad)
    assert valid.tolist() == [[[False, True, False, False, False], [False, True, True, False, False]]]
