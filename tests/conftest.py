import pytest
import torch

# Test models are tiny: one thread avoids OpenMP start-up and spin costs that dominate tiny ops
# (and make the suite crawl on a busy 2-core machine). Benchmarks keep torch's default.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture
def port_topk_with_our_tie_rule(monkeypatch):
    """The port's indexer calls `Tensor.topk`, whose choice among equal scores depends on memory layout;
    ReLU scores tie exactly (all heads zero) often. For parity the port gets our rule: ties -> later position."""
    from seekv4.modeling.indexer import deterministic_topk

    original = torch.Tensor.topk

    def topk(self, k, dim=-1, largest=True, sorted=True):
        if not self.is_floating_point() or dim not in (-1, self.dim() - 1) or not largest:
            return original(self, k, dim=dim, largest=largest, sorted=sorted)
        idx = deterministic_topk(self, k)
        return torch.return_types.topk((self.gather(-1, idx), idx))

    monkeypatch.setattr(torch.Tensor, "topk", topk)


def _assert_same_greedy(model, a: torch.Tensor, b: torch.Tensor, tie: float = 1e-4):
    """Two greedy generations agree, or first part where the model's own top-2 logits are within `tie` (a near-tie
    that an ISA or memory-layout change may flip): token equality is only promised where the argmax margin is safe."""
    assert a.shape == b.shape
    differ = (a != b).any(0).nonzero()
    if not len(differ):
        return
    j = int(differ[0])
    with torch.no_grad():
        top = model(a[:, :j], use_cache=False).logits[:, -1].float().topk(2, dim=-1).values
    rows = (a[:, j] != b[:, j]).nonzero().flatten()
    margins = (top[rows, 0] - top[rows, 1]).tolist()
    assert max(margins) < tie, f"greedy outputs first differ at position {j} with top-2 margins {margins}"


@pytest.fixture
def assert_same_greedy():
    return _assert_same_greedy
