"""The fused CPU indexer kernel (modeling/indexer_topk.c) against the eager float32 selection.

With q, k and w on a coarse dyadic grid every bf16 rounding and float32 sum is exact, so both paths compute
identical scores and must pick identical sets, ties (common on such a grid) included. On random inputs the
kernel's bf16 products may reorder near-equal scores; there the picks must still mostly agree.
"""
import logging
import os
import platform
import shlex
import subprocess
from types import SimpleNamespace

import pytest
import torch

from seekv4 import SeekV4Config, SeekV4ForCausalLM
from seekv4.modeling import indexer_kernel
from seekv4.modeling.indexer import LightningIndexer, index_scores, resolve_implementation, select_topk
from seekv4.modeling.indexer_kernel import IndexerKernelError, fused_topk

PATHS = [True, False] if indexer_kernel.uses_amx() else [False]  # tile unit and portable loop


def grid(*shape, scale=4, generator=None):
    return torch.randint(-3, 4, shape, generator=generator).float() / scale


def eager_indexer(h, d, k):
    cfg = SimpleNamespace(index_n_heads=h, index_head_dim=d, index_rope_head_dim=2, index_topk=k, hidden_size=8,
                          indexer_implementation="eager")
    return LightningIndexer(cfg, 8)


def as_sets(idx):
    return idx.sort(-1).values


@pytest.mark.parametrize("amx", PATHS)
@pytest.mark.parametrize("h,d,length,k", [(2, 64, 300, 16), (4, 16, 257, 8), (3, 40, 100, 5), (64, 128, 70, 20),
                                          (1, 8, 33, 40)])
def test_picks_equal_eager_on_exact_grid(amx, h, d, length, k):
    g = torch.Generator().manual_seed(h * 1000 + d)
    q, w, keys = (grid(2, length, h, d, generator=g), grid(2, length, h, scale=2, generator=g),
                  grid(2, length, d, generator=g))
    limit = torch.arange(1, length + 1)[None]  # causal: query t sees keys s <= t
    ref = eager_indexer(h, d, k).select(q, w, keys, limit, None)
    got = fused_topk(q, w, keys, limit, None, min(k, length), amx=amx)
    assert got.shape == ref.shape
    assert torch.equal(as_sets(got), as_sets(ref))
    # best first; equal scores -> later position first (the eager tie rule)
    scores = index_scores(q, w, keys)
    picked = scores.gather(-1, got.clamp(min=0)).masked_fill(got < 0, float("-inf"))
    assert (picked[..., :-1] >= picked[..., 1:]).all()
    tie = picked[..., :-1] == picked[..., 1:]
    assert (got[..., :-1][tie & (got[..., 1:] >= 0)] > got[..., 1:][tie & (got[..., 1:] >= 0)]).all()


@pytest.mark.parametrize("amx", PATHS)
def test_all_zero_rows_take_the_latest_keys(amx):
    """Negative head weights with positive dot products: every score is 0, the k latest visible keys win."""
    q, keys = torch.ones(1, 50, 2, 16), torch.ones(1, 50, 16)
    w = -torch.ones(1, 50, 2)
    got = fused_topk(q, w, keys, torch.arange(1, 51)[None], None, 4, amx=amx)
    expect = torch.stack([torch.tensor([t - j if t - j >= 0 else -1 for j in range(4)]) for t in range(50)])
    assert torch.equal(got[0], expect)


@pytest.mark.parametrize("amx", PATHS)
def test_padding_and_decode_positions_match_eager(amx):
    """Queries at arbitrary cache positions (decode / chunked prefill) and padded keys (left-padded batches)."""
    g = torch.Generator().manual_seed(3)
    b, length, t, h, d, k = 2, 7, 90, 2, 32, 12
    q, w, keys = (grid(b, length, h, d, generator=g), grid(b, length, h, scale=2, generator=g),
                  grid(b, t, d, generator=g))
    pos = torch.tensor([[10, 11, 40, 41, 80, 88, 89]])
    pad = torch.ones(b, t, dtype=torch.bool)
    pad[1, :37] = False
    pad[0, 50:53] = False
    ref = eager_indexer(h, d, k).select(q, w, keys, pos + 1, pad)
    got = fused_topk(q, w, keys, pos + 1, pad, k, amx=amx)
    assert torch.equal(as_sets(got), as_sets(ref))
    assert (got[1, 0] == -1).all()  # query at 10 sees only padding


def test_v4_selection_matches_eager_on_exact_grid():
    g = torch.Generator().manual_seed(5)
    q, w, keys = grid(2, 40, 4, 16, generator=g), grid(2, 40, 4, scale=2, generator=g), grid(2, 12, 16, generator=g)
    limit = (torch.arange(40)[None].expand(2, 40) + 1) // 4  # CSA: entries i < (t + 1) // 4 are complete
    ref = select_topk(q, w, keys, limit, 6, "eager")
    got = select_topk(q, w, keys, limit, 6, "fused")
    assert torch.equal(as_sets(got), as_sets(ref))


def test_random_inputs_mostly_agree_and_threads_do_not_change_the_result():
    g = torch.Generator().manual_seed(0)
    q, w, keys = (torch.randn(1, 600, 2, 64, generator=g), torch.randn(1, 600, 2, generator=g),
                  torch.randn(1, 600, 64, generator=g))
    limit = torch.arange(1, 601)[None]
    ref = eager_indexer(2, 64, 16).select(q, w, keys, limit, None)
    old = torch.get_num_threads()
    try:
        got = {}
        for threads in (1, 2):  # 2: key packing and query ranges split over a thread pool
            torch.set_num_threads(threads)
            got[threads] = fused_topk(q, w, keys, limit, None, 16)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(got[1], got[2])
    kept = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(ref[0], got[2][0])) / ref[0].numel()
    assert kept > 0.98, kept


def test_missing_compiler_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(indexer_kernel, "_LIB", None)
    monkeypatch.setenv("SEEKV4_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.raises(IndexerKernelError, match="needs a C compiler.*indexer_implementation='eager'"):
        indexer_kernel.library()


def test_unwritable_kernel_cache_is_a_clear_error(monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setattr(indexer_kernel, "_LIB", None)
    monkeypatch.setenv("SEEKV4_KERNEL_CACHE", str(blocker / "kernels"))  # a folder below a file cannot exist
    with pytest.raises(IndexerKernelError, match="SEEKV4_KERNEL_CACHE"):
        indexer_kernel.library()


def test_non_cpu_tensors_are_refused():
    q = torch.zeros(1, 2, 2, 8, device="meta")
    with pytest.raises(IndexerKernelError, match="CPU kernel.*indexer_implementation='eager'"):
        fused_topk(q, q[..., 0], q[:, :, 0], torch.arange(1, 3)[None], None, 1)


def test_unknown_implementation_is_rejected():
    with pytest.raises(ValueError, match="indexer_implementation"):
        SeekV4Config.from_preset("tiny-deepseek-v3.2", indexer_implementation="triton")


@pytest.mark.parametrize("amx", PATHS)
def test_decode_path_equals_eager(amx):
    """A few queries over a long cache take the decode path (keys packed tile by tile inside the scan)."""
    g = torch.Generator().manual_seed(7)
    t, h, d, k = 9000, 2, 64, 16
    q, w, keys = grid(1, 3, h, d, generator=g), grid(1, 3, h, scale=2, generator=g), grid(1, t, d, generator=g)
    pos = torch.tensor([[40, 5000, t - 1]])
    pad = torch.ones(1, t, dtype=torch.bool)
    pad[0, 8000:8100] = False
    ref = eager_indexer(h, d, k).select(q, w, keys, pos + 1, pad)
    got = fused_topk(q, w, keys, pos + 1, pad, k, amx=amx)
    assert torch.equal(as_sets(got), as_sets(ref))


@pytest.mark.parametrize("preset", ["tiny-deepseek-v3.2", "tiny-deepseek-v4-flash"])
def test_the_fused_kernel_is_the_default_selection_on_cpu(preset, monkeypatch):
    """DSA and CSA models built with the default config select with the kernel; "eager" stays one switch away."""
    calls = []
    fused = indexer_kernel.fused_topk
    monkeypatch.setattr(indexer_kernel, "fused_topk", lambda *a, **kw: calls.append(a[0].shape) or fused(*a, **kw))
    config = SeekV4Config.from_preset(preset)
    assert config.indexer_implementation == "auto"
    model = SeekV4ForCausalLM(config).eval()
    ids = torch.randint(3, 256, (1, 40))
    with torch.no_grad():
        model(ids)
        assert calls
        calls.clear()
        model.config.indexer_implementation = "eager"
        model(ids)
    assert not calls


def test_auto_without_a_kernel_runs_eager_and_logs_it_once(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(indexer_kernel, "_LIB", None)
    monkeypatch.setattr(indexer_kernel, "_LIB_ERROR", None)
    monkeypatch.setenv("SEEKV4_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    g = torch.Generator().manual_seed(9)
    q, w = torch.randn(1, 30, 2, 16, generator=g), torch.randn(1, 30, 2, generator=g)
    keys = torch.randn(1, 30, 16, generator=g)
    limit = torch.arange(1, 31)[None]
    with caplog.at_level(logging.INFO, logger=indexer_kernel.__name__):
        got = [select_topk(q, w, keys, limit, 5, "auto") for _ in range(3)]
    ref = select_topk(q, w, keys, limit, 5, "eager")
    assert all(torch.equal(x, ref) for x in got)
    messages = [r.getMessage() for r in caplog.records if r.name == indexer_kernel.__name__]
    assert len(messages) == 1 and "eager" in messages[0] and "needs a C compiler" in messages[0], messages
    assert caplog.records[0].levelno == logging.WARNING
    with pytest.raises(IndexerKernelError, match="needs a C compiler"):  # an explicit "fused" still refuses
        select_topk(q, w, keys, limit, 5, "fused")


def test_auto_is_eager_off_the_cpu():
    assert resolve_implementation("auto", torch.device("meta")) == "eager"
    assert resolve_implementation("auto", torch.device("cpu")) == ("fused" if indexer_kernel.available() else "eager")
    assert resolve_implementation("eager", torch.device("cpu")) == "eager"


def _haswell_skip_reason() -> str | None:
    """Why the AVX2 (-march=haswell) build cannot be run here, or None."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"the -march=haswell build is x86-64 only (this machine is {platform.machine()})"
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "cannot read /proc/cpuinfo to check that this CPU runs AVX2 + FMA code"
    if not {"avx2", "fma"} <= set(flags):
        return "this CPU lacks AVX2 or FMA, so a -march=haswell build cannot run on it"
    cc = shlex.split(os.environ.get("CC", "cc"))
    try:
        res = subprocess.run(cc + ["-march=haswell", "-x", "c", "-c", "-o", os.devnull, "-"], input="int x;\n",
                             capture_output=True, text=True)
    except OSError as e:
        return f"no C compiler (`{' '.join(cc)}`: {e})"
    if res.returncode:
        return f"`{' '.join(cc)}` does not accept -march=haswell: {res.stderr.strip()[-300:]}"
    return None


@pytest.fixture(scope="session")
def haswell_cache(tmp_path_factory):
    reason = _haswell_skip_reason()
    if reason:
        pytest.skip(reason)
    return tmp_path_factory.mktemp("haswell-kernels")  # built once (keyed by the flags), loaded by each test


@pytest.fixture
def haswell(haswell_cache, monkeypatch):
    """The kernel built for -march=haswell (AVX2 + FMA, no AVX-512 / AMX): the code path of AVX2-only CPUs such as
    AMD EPYC, tested on every x86-64 machine. monkeypatch puts the native library (and FLAGS) back afterwards."""
    monkeypatch.setattr(indexer_kernel, "FLAGS",
                        [("-march=haswell" if f == "-march=native" else f) for f in indexer_kernel.FLAGS])
    monkeypatch.setattr(indexer_kernel, "_LIB", None)
    monkeypatch.setenv("SEEKV4_KERNEL_CACHE", str(haswell_cache))
    lib = indexer_kernel.library()
    assert not lib.amx
    assert list(haswell_cache.glob("indexer_topk_*.so")), "the haswell build must come from its own cache"
    return lib


@pytest.mark.parametrize("h,d,length,k", [(1, 16, 100, 8), (2, 64, 300, 16), (4, 16, 257, 8), (4, 64, 130, 12),
                                          (2, 16, 70, 80), (1, 64, 45, 7)])
def test_haswell_build_picks_equal_eager_on_exact_grid(haswell, h, d, length, k):
    test_picks_equal_eager_on_exact_grid(False, h, d, length, k)


@pytest.mark.parametrize("h,d", [(1, 16), (2, 64), (4, 16), (4, 64)])
def test_haswell_build_padding_and_decode_positions_match_eager(haswell, h, d):
    g = torch.Generator().manual_seed(11 * h + d)
    for b, length, t, pos, k in [(2, 40, 300, None, 10),  # prefill (chunks of queries, packed keys)
                                 (2, 3, 3000, [[40, 1700, 2999]], 16)]:  # decode (tiles packed inside the scan)
        q, w, keys = (grid(b, length, h, d, generator=g), grid(b, length, h, scale=2, generator=g),
                      grid(b, t, d, generator=g))
        pos = torch.arange(t - length, t)[None] if pos is None else torch.tensor(pos)
        pad = torch.ones(b, t, dtype=torch.bool)
        pad[1, : t // 3] = False  # left padding
        pad[0, t // 2: t // 2 + 37] = False  # a hole
        ref = eager_indexer(h, d, k).select(q, w, keys, pos + 1, pad)
        got = fused_topk(q, w, keys, pos + 1, pad, k)
        assert torch.equal(as_sets(got), as_sets(ref)), (b, length, t)
