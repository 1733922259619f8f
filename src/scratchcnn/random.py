"""The package's default random generator, so that ``scratchcnn.manual_seed(0)`` makes a run
repeatable the way ``torch.manual_seed(0)`` does. Every layer and data utility that draws random
numbers also takes an explicit ``rng`` (a ``numpy.random.Generator``, or an int seed for a new
one) that overrides this default."""

from __future__ import annotations

from typing import Any

import numpy as np

_default_rng = np.random.default_rng(0)


def _check_seed(seed: Any, owner: str) -> int:
    # NumPy's own errors ("expected non-negative integer", a SeedSequence TypeError) name
    # neither the call nor what it accepts; bool is an int but surely not a meant seed.
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"{owner}: the seed must be an int, got {type(seed).__name__} {seed!r}")
    if seed < 0:
        raise ValueError(f"{owner}: the seed must be a non-negative int, got {seed}")
    return int(seed)


def manual_seed(seed: int) -> np.random.Generator:
    """Reseed the default generator and return it.

    A new generator object, not the old one reseeded in place: anything holding the previous
    default (an explicit ``rng=scratchcnn.default_rng()``) keeps its stream, as it always has.
    Layers built without an ``rng`` look the default up when they draw, so they follow this."""
    global _default_rng
    _default_rng = np.random.default_rng(_check_seed(seed, "manual_seed"))
    return _default_rng


def default_rng() -> np.random.Generator:
    """The generator used when a caller passes no ``rng``."""
    return _default_rng


def as_generator(rng: Any, owner: str = "rng") -> np.random.Generator | None:
    """Validate an ``rng`` argument: a Generator is returned as is, an int seed as a new
    ``np.random.default_rng(seed)``, None stays None (the default generator, looked up when
    drawing). Anything else is a TypeError naming ``owner``, raised where the argument is
    given rather than at the first draw."""
    if rng is None or isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        return np.random.default_rng(_check_seed(rng, owner))
    raise TypeError(f"{owner}: rng must be a numpy.random.Generator, an int seed or None, "
                    f"got {type(rng).__name__}")


def resolve_rng(rng: np.random.Generator | int | None) -> np.random.Generator:
    """``rng`` itself (an int: a new generator seeded with it), or the default generator when it
    is None."""
    generator = as_generator(rng)
    return _default_rng if generator is None else generator
