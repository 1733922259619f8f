"""Weight initialisers with the names, arguments and distributions of ``torch.nn.init``.

Each fills an array (or a Parameter's ``.data``) in place and returns it. Random draws come from
``rng`` when given (a Generator, or an int seed for a new one), else from the package's default
generator (``scratchcnn.manual_seed``).

PyTorch's default for Conv2d and Linear is ``kaiming_uniform_(w, a=sqrt(5))``, which works out to
U(-1/sqrt(fan_in), 1/sqrt(fan_in)); their biases use the same bound.
"""

from __future__ import annotations

import math

import numpy as np

from scratchcnn.nn.module import Parameter
from scratchcnn.random import resolve_rng

ArrayLike = np.ndarray | Parameter


def _array(tensor: ArrayLike) -> np.ndarray:
    return tensor.data if isinstance(tensor, Parameter) else tensor


def calculate_gain(nonlinearity: str, param: float | None = None) -> float:
    """The gain that keeps activations' variance stable through ``nonlinearity``."""
    linear = ("linear", "conv1d", "conv2d", "conv3d", "sigmoid")
    if nonlinearity in linear:
        return 1.0
    if nonlinearity == "tanh":
        return 5.0 / 3
    if nonlinearity == "relu":
        return math.sqrt(2.0)
    if nonlinearity == "leaky_relu":
        slope = 0.01 if param is None else float(param)
        return math.sqrt(2.0 / (1 + slope**2))
    if nonlinearity == "selu":
        return 3.0 / 4
    raise ValueError(f"unsupported nonlinearity {nonlinearity!r}")


def calculate_fan_in_and_fan_out(shape: tuple[int, ...]) -> tuple[int, int]:
    """fan_in = shape[1] * receptive field, fan_out = shape[0] * receptive field (as PyTorch)."""
    if len(shape) < 2:
        raise ValueError(f"fan in and fan out need at least 2 dimensions, got shape {shape}")
    receptive_field = math.prod(shape[2:])
    return shape[1] * receptive_field, shape[0] * receptive_field


def _fan(shape: tuple[int, ...], mode: str) -> int:
    if mode not in ("fan_in", "fan_out"):
        raise ValueError(f"mode must be 'fan_in' or 'fan_out', got {mode!r}")
    fan_in, fan_out = calculate_fan_in_and_fan_out(shape)
    return fan_in if mode == "fan_in" else fan_out


def uniform_(tensor: ArrayLike, a: float = 0.0, b: float = 1.0,
             rng: np.random.Generator | int | None = None) -> ArrayLike:
    array = _array(tensor)
    array[...] = resolve_rng(rng).uniform(a, b, size=array.shape)
    return tensor


def normal_(tensor: ArrayLike, mean: float = 0.0, std: float = 1.0,
            rng: np.random.Generator | int | None = None) -> ArrayLike:
    array = _array(tensor)
    array[...] = resolve_rng(rng).normal(mean, std, size=array.shape)
    return tensor


def constant_(tensor: ArrayLike, val: float) -> ArrayLike:
    _array(tensor).fill(val)
    return tensor


def zeros_(tensor: ArrayLike) -> ArrayLike:
    return constant_(tensor, 0.0)


def ones_(tensor: ArrayLike) -> ArrayLike:
    return constant_(tensor, 1.0)


def xavier_uniform_(tensor: ArrayLike, gain: float = 1.0,
                    rng: np.random.Generator | int | None = None) -> ArrayLike:
    """U(-b, b) with b = gain * sqrt(6 / (fan_in + fan_out)) (Glorot & Bengio, 2010)."""
    fan_in, fan_out = calculate_fan_in_and_fan_out(_array(tensor).shape)
    bound = gain * math.sqrt(6.0 / (fan_in + fan_out))
    return uniform_(tensor, -bound, bound, rng)


def xavier_normal_(tensor: ArrayLike, gain: float = 1.0,
                   rng: np.random.Generator | int | None = None) -> ArrayLike:
    """N(0, std^2) with std = gain * sqrt(2 / (fan_in + fan_out))."""
    fan_in, fan_out = calculate_fan_in_and_fan_out(_array(tensor).shape)
    return normal_(tensor, 0.0, gain * math.sqrt(2.0 / (fan_in + fan_out)), rng)


def kaiming_uniform_(tensor: ArrayLike, a: float = 0.0, mode: str = "fan_in",
                     nonlinearity: str = "leaky_relu",
                     rng: np.random.Generator | int | None = None) -> ArrayLike:
    """U(-b, b) with b = gain * sqrt(3 / fan) (He et al., 2015); a zero-element array is left
    as it is, as in PyTorch (its fan may be 0, e.g. ``Linear(0, 3)``'s weight)."""
    if _array(tensor).size == 0:
        return tensor
    fan = _fan(_array(tensor).shape, mode)
    bound = calculate_gain(nonlinearity, a) * math.sqrt(3.0 / fan)
    return uniform_(tensor, -bound, bound, rng)


def kaiming_normal_(tensor: ArrayLike, a: float = 0.0, mode: str = "fan_in",
                    nonlinearity: str = "leaky_relu",
                    rng: np.random.Generator | int | None = None) -> ArrayLike:
    """N(0, std^2) with std = gain / sqrt(fan); a zero-element array is left as it is."""
    if _array(tensor).size == 0:
        return tensor
    fan = _fan(_array(tensor).shape, mode)
    return normal_(tensor, 0.0, calculate_gain(nonlinearity, a) / math.sqrt(fan), rng)


def default_layer_init_(weight: Parameter, bias: Parameter | None,
                        rng: np.random.Generator | int | None = None) -> None:
    """PyTorch's ``reset_parameters`` for Conv2d and Linear: weight by kaiming_uniform_ with
    a=sqrt(5), bias from U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    rng = resolve_rng(rng)
    kaiming_uniform_(weight, a=math.sqrt(5), rng=rng)
    if bias is not None:
        fan_in, _ = calculate_fan_in_and_fan_out(weight.shape)
        bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
        uniform_(bias, -bound, bound, rng)
