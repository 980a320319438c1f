import pytest
import torch

# Test models are tiny: one thread avoids OpenMP start-up and spin costs that dominate tiny ops
# (and make the suite crawl on a busy 2-core machine). Benchmarks keep torch's default.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
