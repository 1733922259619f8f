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


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """``tmp_path``, holding every place a dataset is looked for (env/, cache/, system/), with
    downloads refused at once (a closed port on 127.0.0.1, no retry wait)."""
    from scratchcnn.data import sources

    monkeypatch.setenv("SCRATCHCNN_DATA", str(tmp_path / "env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(sources, "SYSTEM_DATA_DIR", tmp_path / "system")
    monkeypatch.setenv("SCRATCHCNN_MIRRORS", "http://127.0.0.1:9/")
    monkeypatch.setattr(sources, "RETRY_BACKOFF", 0.0)
    return tmp_path
