import numpy as np
import pytest


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(12345)


@pytest.fixture(scope="session")
def torch():
    """PyTorch, in float64 and deterministic; tests that need it skip when it is absent."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    return torch
