"""The package's default random generator, so that ``scratchcnn.manual_seed(0)`` makes a run
repeatable the way ``torch.manual_seed(0)`` does. Every layer and data utility that draws random
numbers also takes an explicit ``rng: numpy.random.Generator`` that overrides this default."""

from __future__ import annotations

import numpy as np

_default_rng = np.random.default_rng(0)


def manual_seed(seed: int) -> np.random.Generator:
    """Reseed the default generator and return it."""
    global _default_rng
    _default_rng = np.random.default_rng(seed)
    return _default_rng


def default_rng() -> np.random.Generator:
    """The generator used when a caller passes no ``rng``."""
    return _default_rng


def resolve_rng(rng: np.random.Generator | None) -> np.random.Generator:
    """``rng`` itself, or the default generator when it is None."""
    return _default_rng if rng is None else rng
