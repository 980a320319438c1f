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
