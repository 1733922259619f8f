"""Parameter, Module and Sequential: the containers every layer is built from.

The design follows ``torch.nn.Module`` so that a model written here lines up with its PyTorch twin
name for name, with one deliberate difference: there is no autograd. Every module writes its own
``backward(grad_output) -> grad_input``, which

* uses what its last ``forward`` cached (so call ``forward`` first, once per ``backward``),
* *adds* the gradients of its parameters into ``Parameter.grad`` (as autograd accumulates), and
* returns the gradient of the loss with respect to the module's input.

The input gradient follows torch's rule that a model's input is data, which requires no gradient:
``Sequential.backward(grad_output)`` returns None and skips the work of its first layer's input
gradient (for a first convolution, most of its backward); ask for it with
``backward(grad_output, input_grad=True)``. A single layer's ``backward`` returns it by default;
a layer whose ``backward`` takes the keyword ``input_grad`` (Conv2d, Linear) skips it when False.

A Sequential also runs a few exact rewrites by itself, so the plain training loop is the fast
one: a ReLU directly followed by a MaxPool2d runs after the pool (4x fewer elements for 2x2
windows, the same values and gradients), and a large batch under ``no_grad()`` runs through the
leading layers whose bits do not depend on the batch size (``Module.splits_exactly``: the
convolutions and pools, and in eval mode BatchNorm2d and Dropout too) in pieces of
``INFERENCE_PIECE`` samples, whose activations stay in cache; the rest on the whole batch. Under
``no_grad()`` a Conv2d also runs with the tiling MaxPool2d and ReLU after it as one step, the same
values in one pass; with gradients, so does a first Conv2d followed by a tiling MaxPool2d, whose
pool then runs over contiguous blocks both ways (nn/fused.py).

Activations are logically NCHW like PyTorch's. A layer may return an array whose *memory* is
channels-last (a transposed view, like ``torch.channels_last``), because that is the faster layout
for im2col convolution; shapes and values are exactly PyTorch's either way, so never assume an
output is C-contiguous.
"""

from __future__ import annotations

import functools
import inspect
import math
import operator
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, ClassVar, NamedTuple, ParamSpec, TypeVar

import numpy as np

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

# Samples per piece of a large batch under no_grad (see Sequential.forward): simple-cnn inferred
# 10,000 images in 0.29 s in pieces of 64 against 0.33 s in pieces of 128, whose activations
# (~6 MB at 64) no longer fit in cache between layers.
INFERENCE_PIECE = 64

P = ParamSpec("P")
R = TypeVar("R")

_grad_enabled = True


class no_grad:  # torch's name; like torch's, a class
    """Like ``torch.no_grad``: inside it, layers keep no cache for ``backward``.

    Inference then needs less memory and time; calling ``backward`` afterwards is an error.
    Use it as ``with no_grad():``, or as a decorator, ``@no_grad()`` or ``@no_grad``.
    """

    def __new__(cls, function: Callable[P, R] | None = None) -> Any:
        if function is None:
            return super().__new__(cls)
        return cls()(function)  # ``@no_grad`` without parentheses

    def __enter__(self) -> None:
        self.previous = _grad_enabled
        _set_grad_mode(False)

    def __exit__(self, *exc_info: object) -> None:
        _set_grad_mode(self.previous)

    def __call__(self, function: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(function)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            with no_grad():
                return function(*args, **kwargs)

        return wrapper


def _set_grad_mode(mode: bool) -> None:
    global _grad_enabled
    _grad_enabled = mode


class set_grad_enabled:  # torch's name; like torch's, a class
    """Like ``torch.set_grad_enabled(mode)``: layers keep their caches for ``backward`` if
    ``mode`` is True, not if False. A plain call sets the mode for good; as a context manager
    (or a decorator), the previous mode returns on exit.

    A class rather than a generator context manager because, as in torch, the mode must change
    at the call itself: a generator would only run on ``__enter__``, so a plain call did nothing.
    """

    def __init__(self, mode: bool) -> None:
        self.previous = _grad_enabled
        self.mode = bool(mode)
        _set_grad_mode(self.mode)

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc_info: object) -> None:
        _set_grad_mode(self.previous)

    def __call__(self, function: Callable[P, R]) -> Callable[P, R]:
        # As a decorator, the mode belongs to each call of ``function``, not to decoration time
        # (which set it in __init__): put it back, as torch does.
        _set_grad_mode(self.previous)
        mode = self.mode

        @functools.wraps(function)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            with set_grad_enabled(mode):
                return function(*args, **kwargs)

        return wrapper


def is_grad_enabled() -> bool:
    """Whether layers currently cache what ``backward`` needs (False inside ``no_grad()``)."""
    return _grad_enabled


def _is_torch_object(value: Any, type_name: str) -> bool:
    # Recognised by type, so that the engine never imports torch.
    kind = type(value)
    return kind.__name__ == type_name and kind.__module__.split(".")[0] == "torch"


def as_float_dtype(dtype: Any) -> np.dtype:
    """Validate a floating dtype argument (``None`` means the float32 default). A torch dtype is
    taken by its name (``torch.float64`` -> float64)."""
    if _is_torch_object(dtype, "dtype"):
        dtype = str(dtype).removeprefix("torch.")
    try:
        resolved = np.dtype(np.float32 if dtype is None else dtype)
    except TypeError:
        raise ValueError(f"dtype must be float32 or float64, got {dtype!r}") from None
    if resolved not in FLOAT_DTYPES:
        # Quoted like the branch above: with ml_dtypes installed (onnx brings it) NumPy knows
        # 'bfloat16', without it np.dtype refuses the name; the message is the same either way.
        raise ValueError(f"dtype must be float32 or float64, got '{resolved}'")
    return resolved


# torch's device types: a string naming one is a device for Module.to, not a dtype.
_DEVICE_TYPES = frozenset({
    "cpu", "cuda", "mps", "xpu", "xla", "meta", "hip", "ipu", "hpu", "mtia", "maia", "lazy",
    "vulkan", "mkldnn", "opengl", "opencl", "ideep", "ve", "fpga", "privateuseone",
})


def _device_type(value: Any) -> str | None:
    """``value``'s device type when it names a device ('cpu', 'cuda:0', a torch.device)."""
    if _is_torch_object(value, "device"):
        value = str(value)
    if isinstance(value, str):
        kind = value.partition(":")[0]
        if kind in _DEVICE_TYPES:
            return kind
    return None


def check_size(value: Any, name: str, owner: str, minimum: int = 1) -> int:
    """``value`` as an int, or a ValueError naming ``owner`` unless it is an int (not a bool,
    not a float, not a string: they used to be truncated or parsed silently) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        kind = {0: "a non-negative int", 1: "a positive int"}.get(minimum, f"an int >= {minimum}")
        raise ValueError(f"{owner}: {name} must be {kind}, got {value!r}")
    return int(value)


class Parameter:
    """A trainable array: ``.data`` is its value, ``.grad`` the accumulated gradient or None.

    ``grad_buffer`` (optional, not a torch attribute): an array of the parameter's shape and dtype
    that a first gradient is copied into instead of a new array, so it lands where its reader
    expects it (``flatten_parameters``'s flat gradient vector, a worker process's shared memory)
    and the step saves a copy. ``.grad`` is then that array each step, as with PyTorch DDP's
    ``gradient_as_bucket_view``: copy a ``.grad`` you want to keep past the next backward."""

    __slots__ = ("data", "grad", "grad_buffer")

    def __init__(self, data: np.ndarray) -> None:
        # Not np.ascontiguousarray: it turns a 0-d array into shape (1,).
        data = np.asarray(data, order="C")
        if data.dtype not in FLOAT_DTYPES:
            raise TypeError(f"Parameter data must be float32 or float64, got {data.dtype}")
        self.data: np.ndarray = data
        self.grad: np.ndarray | None = None
        self.grad_buffer: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return self.data.shape

    @property
    def dtype(self) -> np.dtype:
        return self.data.dtype

    @property
    def size(self) -> int:
        return self.data.size

    def accumulate_grad(self, grad: np.ndarray) -> None:
        """Add ``grad`` into ``.grad`` (autograd semantics); the array is copied, never aliased:
        the first one into ``grad_buffer`` when that is set and matches, else into a new array."""
        if grad.shape != self.data.shape or grad.dtype != self.data.dtype:
            # A mismatch here is a bug in a layer's backward, not a user error.
            raise RuntimeError(
                f"gradient of shape {grad.shape} and dtype {grad.dtype} does not match parameter "
                f"of shape {self.data.shape} and dtype {self.data.dtype}"
            )
        if self.grad is None:
            buffer = self.grad_buffer
            if buffer is not None and buffer.shape == grad.shape and buffer.dtype == grad.dtype:
                np.copyto(buffer, grad)
                self.grad = buffer
            else:
                self.grad = np.array(grad, copy=True, order="C")
        else:
            self.grad += grad

    def accumulate_grad_product(self, a: np.ndarray, b: np.ndarray) -> None:
        """``accumulate_grad(a @ b)``, with the first gradient's product written straight into
        ``grad_buffer``: no temporary to allocate, fault in and copy (scratch-notebook-cnn's
        64x6272 weight gradient: ~0.3 -> 0.19 ms). The same bits: the same BLAS call."""
        buffer = self.grad_buffer
        if (self.grad is None and buffer is not None
                and buffer.shape == (a.shape[0], b.shape[-1]) == self.data.shape
                and a.dtype == b.dtype == buffer.dtype):
            self.grad = np.matmul(a, b, out=buffer)
        else:
            self.accumulate_grad(a @ b)

    def __repr__(self) -> str:
        return f"Parameter(shape={self.data.shape}, dtype={self.data.dtype})"


def flatten_parameters(params: Iterable[Parameter]) -> np.ndarray:
    """Lay the parameters end to end in one new contiguous vector and return it.

    Each ``param.data`` is rebound to a view of the vector (values unchanged), so an optimizer can
    update all of them with a few whole-vector operations instead of one call per parameter (see
    ``scratchcnn.optim.optimizer``). Arrays taken from ``.data`` before the call no longer alias
    the parameters: call it right after building a model, before creating its optimizer. The
    training harness does this; nothing else in the library rebinds ``.data``.

    The gradients get a second such vector: each ``param.grad_buffer`` is its view, so backward
    writes the gradients where the optimizer reads them as one vector, with no gathering copy.
    """
    unique: dict[int, Parameter] = {}
    for param in params:
        unique.setdefault(id(param), param)
    ordered = list(unique.values())
    if not ordered:
        raise ValueError("flatten_parameters: no parameters given")
    dtypes = {param.dtype for param in ordered}
    if len(dtypes) != 1:
        raise ValueError(
            f"flatten_parameters: parameters must share one dtype, got {sorted(map(str, dtypes))}"
        )
    dtype = dtypes.pop()
    total = sum(param.size for param in ordered)
    vector, grad_vector = np.empty(total, dtype), np.empty(total, dtype)
    np.concatenate([param.data.ravel() for param in ordered], out=vector)
    shapes = [param.shape for param in ordered]
    for param, data, grad in zip(ordered, vector_views(vector, shapes),
                                 vector_views(grad_vector, shapes), strict=True):
        param.data, param.grad_buffer = data, grad
    return vector


def vector_views(vector: np.ndarray, shapes: Sequence[tuple[int, ...]]) -> list[np.ndarray]:
    """Consecutive pieces of the 1-d ``vector``, one per shape, as views of those shapes: how a
    vector laid out by ``flatten_parameters`` is cut back into per-parameter arrays."""
    ends = np.cumsum([0, *(math.prod(shape) for shape in shapes)]).tolist()
    return [vector[start:stop].reshape(shape)
            for shape, start, stop in zip(shapes, ends[:-1], ends[1:], strict=True)]


def _state_array(raw: Any, where: str) -> np.ndarray:
    """``raw`` as a numeric array, or a ValueError starting with ``where``: np.asarray would make
    None or a string a 0-d object or text array (then reported as "has shape ()"), and a ragged
    list raises NumPy's own inhomogeneous-shape error."""
    try:
        value = np.asarray(raw)
    except (ValueError, TypeError) as error:
        raise ValueError(f"{where} is a {type(raw).__name__} that is not an array of numbers "
                         f"({error})") from None
    if value.dtype.kind not in "biufc":  # complex: reported by the dtype check
        raise ValueError(f"{where} must be an array of numbers, got a {type(raw).__name__} "
                         f"(dtype {value.dtype})")
    return value


class StateDictError(ValueError, RuntimeError):
    """A state_dict that does not fit the module: torch raises RuntimeError for these, and
    scratchcnn's one-line error handling catches ValueError, so this is both."""


class LoadResult(NamedTuple):
    """What ``load_state_dict(..., strict=False)`` left out, as in PyTorch."""

    missing_keys: list[str]
    unexpected_keys: list[str]


class Module:
    """Base class of every layer and model. Subclasses set parameters, buffers and submodules as
    attributes in ``__init__`` (after ``super().__init__()``) and implement ``forward`` and
    ``backward``."""

    training: bool
    # False: ``backward`` never computes dL/d(input) (Conv2d and Linear return None), whatever
    # the caller asks. Rarely needed: a Sequential already skips its first layer's by default.
    needs_input_grad: bool = True
    # Whether ``forward`` gives the same values for a batch split into pieces as for the whole,
    # so that a Sequential may run it in pieces under no_grad: True in either mode, False never,
    # None in eval mode only (where torch.nn-style layers compute each sample on its own).
    splits_exactly: ClassVar[bool | None] = None
    # Names of buffers that load_state_dict may find missing without calling it a mismatch.
    optional_state: ClassVar[tuple[str, ...]] = ()
    # Names of this module's buffers registered with persistent=False: not in state_dict, not
    # expected by load_state_dict (torch's attribute of the same name). Replaced, never mutated,
    # so this class-level default is shared safely.
    _non_persistent_buffers_set: frozenset[str] | set[str] = frozenset()

    def __init__(self) -> None:
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_buffers", OrderedDict())
        object.__setattr__(self, "_modules", OrderedDict())
        object.__setattr__(self, "training", True)

    # -- registration -----------------------------------------------------------------------

    def __setattr__(self, name: str, value: Any) -> None:
        if "_parameters" not in self.__dict__:
            raise AttributeError(
                f"cannot assign {name!r} before Module.__init__() is called; "
                f"call super().__init__() first in {type(self).__name__}.__init__"
            )
        if isinstance(value, Parameter):
            self._forget_buffer(name)
            self._modules.pop(name, None)
            self._parameters[name] = value
        elif isinstance(value, Module):
            self._parameters.pop(name, None)
            self._forget_buffer(name)
            self._modules[name] = value
        elif name in self._parameters:
            if value is not None:
                raise TypeError(f"cannot assign {type(value).__name__} as parameter {name!r} "
                                "(a Parameter or None expected)")
            del self._parameters[name]
        elif name in self._modules:
            # As in torch, None removes the child (a dropped head or layer); anything else would
            # hide a child that still trains and is saved.
            if value is not None:
                raise TypeError(f"cannot assign {type(value).__name__} as child module {name!r} "
                                "(a Module or None expected)")
            del self._modules[name]
        elif name in self._buffers:
            if value is not None and not isinstance(value, np.ndarray):
                raise TypeError(f"cannot assign {type(value).__name__} as buffer {name!r} "
                                "(a NumPy array or None expected)")
            self._buffers[name] = value
        object.__setattr__(self, name, value)

    def __delattr__(self, name: str) -> None:
        self._parameters.pop(name, None)
        self._forget_buffer(name)
        self._modules.pop(name, None)
        object.__delattr__(self, name)

    def _forget_buffer(self, name: str) -> None:
        self._buffers.pop(name, None)
        self._set_persistent(name, True)

    def _set_persistent(self, name: str, persistent: bool) -> None:
        if (name not in self._non_persistent_buffers_set) == persistent:
            return
        names = set(self._non_persistent_buffers_set)
        if persistent:
            names.discard(name)
        else:
            names.add(name)
        object.__setattr__(self, "_non_persistent_buffers_set", names)

    def register_buffer(self, name: str, tensor: np.ndarray | None,
                        persistent: bool = True) -> None:
        """A non-trainable array (e.g. BatchNorm's running statistics), saved in ``state_dict``
        unless ``persistent`` is False; as torch's, with torch's checks of the name. ``None``
        registers the name with no array (nothing saved, nothing cast)."""
        if "_buffers" not in self.__dict__:
            raise AttributeError("cannot assign buffer before Module.__init__() call")
        if not isinstance(name, str):
            raise TypeError(f"buffer name should be a string. Got {type(name).__name__}")
        if "." in name:
            raise KeyError('buffer name can\'t contain "."')
        if name == "":
            raise KeyError('buffer name can\'t be empty string ""')
        if hasattr(self, name) and name not in self._buffers:
            raise KeyError(f"attribute '{name}' already exists")
        if tensor is not None and not isinstance(tensor, np.ndarray):
            raise TypeError(f"cannot assign '{type(tensor).__name__}' object to buffer '{name}' "
                            "(a NumPy array or None required)")
        self._buffers[name] = tensor
        self._set_persistent(name, bool(persistent))
        object.__setattr__(self, name, tensor)

    def add_module(self, name: str, module: Module | None) -> None:
        """Register ``module`` as the child ``name`` (``None`` removes the child of that name),
        with torch's checks: ``name`` a string without ".", not empty, and not already an
        attribute other than a child."""
        if not isinstance(module, Module) and module is not None:
            raise TypeError(f"{type(module).__name__} is not a Module subclass")
        if not isinstance(name, str):
            raise TypeError(f"module name should be a string. Got {type(name).__name__}")
        if hasattr(self, name) and name not in self._modules:
            raise KeyError(f"attribute '{name}' already exists")
        if "." in name:
            raise KeyError(f'module name can\'t contain ".", got: {name}')
        if name == "":
            raise KeyError('module name can\'t be empty string ""')
        setattr(self, name, module)  # a subclass's own rules (Sequential's) apply as well

    def register_module(self, name: str, module: Module | None) -> None:
        """Alias for ``add_module``."""
        self.add_module(name, module)

    def get_submodule(self, target: str) -> Module:
        """The submodule at the dotted path ``target`` ("" is this module), or an
        AttributeError naming the first part that is missing or not a module, as torch's."""
        if target == "":
            return self
        module: Module = self
        for item in target.split("."):
            if not hasattr(module, item):
                raise AttributeError(f"{type(module).__name__} has no attribute `{item}`")
            module = getattr(module, item)
            if not isinstance(module, Module):
                raise AttributeError(f"`{item}` is not an nn.Module")
        return module

    def apply(self, fn: Callable[[Module], Any]) -> Module:
        """Call ``fn`` on every child (recursively, each child's children first), then on this
        module; returns self, as torch's (e.g. ``model.apply(init_weights)``)."""
        seen: set[int] = set()
        for module in self.children():
            if id(module) not in seen:  # torch's children() lists a child held twice once
                seen.add(id(module))
                module.apply(fn)
        fn(self)
        return self

    # -- computation ------------------------------------------------------------------------

    def forward(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError(f"{type(self).__name__} does not implement forward")

    def backward(self, grad_output: np.ndarray) -> np.ndarray:
        raise NotImplementedError(f"{type(self).__name__} does not implement backward")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)

    # -- traversal --------------------------------------------------------------------------

    def named_children(self) -> Iterator[tuple[str, Module]]:
        yield from self._modules.items()

    def children(self) -> Iterator[Module]:
        for _, module in self.named_children():
            yield module

    def named_modules(self, prefix: str = "", remove_duplicate: bool = True,
                      ) -> Iterator[tuple[str, Module]]:
        """This module and every submodule, depth first, in registration order; a module held
        twice comes once (under its first name) unless ``remove_duplicate`` is False."""
        seen: set[int] = set()

        def visit(module: Module, name: str) -> Iterator[tuple[str, Module]]:
            if remove_duplicate:
                if id(module) in seen:
                    return
                seen.add(id(module))
            yield name, module
            for child_name, child in module._modules.items():
                yield from visit(child, f"{name}.{child_name}" if name else child_name)

        yield from visit(self, prefix)

    def modules(self) -> Iterator[Module]:
        for _, module in self.named_modules():
            yield module

    def _named_members(self, registry: str, prefix: str, recurse: bool,
                       remove_duplicate: bool) -> Iterator[tuple[str, Any]]:
        """Torch's ``_named_members``: the entries of each module's ``registry`` (its own only
        unless ``recurse``), each object once unless ``remove_duplicate`` is False."""
        seen: set[int] = set()
        modules = (self.named_modules(prefix, remove_duplicate=remove_duplicate) if recurse
                   else iter([(prefix, self)]))
        for module_name, module in modules:
            for name, value in getattr(module, registry).items():
                if value is None or id(value) in seen:
                    continue
                if remove_duplicate:
                    seen.add(id(value))
                yield (f"{module_name}.{name}" if module_name else name), value

    def named_parameters(self, prefix: str = "", recurse: bool = True,
                         remove_duplicate: bool = True) -> Iterator[tuple[str, Parameter]]:
        """Every parameter with its name, in ``state_dict`` order; a parameter held twice (tied
        weights) comes once unless ``remove_duplicate`` is False; only this module's own
        unless ``recurse``."""
        yield from self._named_members("_parameters", prefix, recurse, remove_duplicate)

    def parameters(self, recurse: bool = True) -> Iterator[Parameter]:
        for _, param in self.named_parameters(recurse=recurse):
            yield param

    def named_buffers(self, prefix: str = "", recurse: bool = True,
                      remove_duplicate: bool = True) -> Iterator[tuple[str, np.ndarray]]:
        """Every buffer (persistent or not) with its name, as ``named_parameters``."""
        yield from self._named_members("_buffers", prefix, recurse, remove_duplicate)

    def buffers(self, recurse: bool = True) -> Iterator[np.ndarray]:
        for _, buffer in self.named_buffers(recurse=recurse):
            yield buffer

    # -- modes and dtype ----------------------------------------------------------------------

    def train(self, mode: bool = True) -> Module:
        # bool(mode) would read train("False") as training: refuse non-booleans, as torch does.
        if not isinstance(mode, (bool, np.bool_)):
            raise ValueError(f"training mode is expected to be boolean, got {mode!r}")
        for module in self.modules():
            object.__setattr__(module, "training", bool(mode))
        return self

    def eval(self) -> Module:
        return self.train(False)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for param in self.parameters():
            if set_to_none:
                param.grad = None
            elif param.grad is not None:
                param.grad.fill(0)

    def to(self, *args: Any, device: Any = None, dtype: Any = None,
           non_blocking: bool = False) -> Module:
        """Cast parameters, gradients and floating buffers to ``dtype`` in place; returns self.

        Called as torch's: ``to(dtype)``, ``to(device)``, ``to(device, dtype)`` or with keywords.
        The only device is the CPU, so ``'cpu'`` (or ``torch.device('cpu')``) changes nothing and
        any other device is a ValueError; ``to()`` and ``to(None)`` change nothing either.
        ``non_blocking`` is accepted for torch's signature and has no effect."""
        if len(args) > 2:
            raise TypeError(f"to() takes at most 2 positional arguments, got {len(args)}")
        for arg in args:
            if arg is None:
                continue
            if _device_type(arg) is not None:
                if device is not None:
                    raise TypeError("to() got the device twice")
                device = arg
            elif dtype is not None:
                raise TypeError("to() got the dtype twice")
            else:
                dtype = arg
        if device is not None and _device_type(device) != "cpu":
            raise ValueError(f"to(): device {str(device)!r} is not available; scratchcnn runs "
                             "on the CPU only ('cpu')")
        if dtype is None:
            return self
        dtype = as_float_dtype(dtype)
        for param in self.parameters():
            if param.data.dtype != dtype:
                param.grad_buffer = None  # laid out for the old dtype
            param.data = param.data.astype(dtype, copy=False)
            if param.grad is not None:
                param.grad = param.grad.astype(dtype, copy=False)
        for module in self.modules():
            for name, buffer in list(module._buffers.items()):
                if buffer is not None and buffer.dtype in FLOAT_DTYPES:
                    # Not register_buffer, which would make a non-persistent buffer persistent.
                    cast = buffer.astype(dtype, copy=False)
                    module._buffers[name] = cast
                    object.__setattr__(module, name, cast)
        return self

    def float(self) -> Module:
        return self.to(np.float32)

    def double(self) -> Module:
        return self.to(np.float64)

    # -- state ------------------------------------------------------------------------------

    def _state_entries(self) -> Iterator[tuple[str, Module, str, Parameter | np.ndarray]]:
        """(key, module, name, parameter or buffer) for every entry of ``state_dict``, in
        torch's order: each module's parameters, then its persistent buffers, then its
        children's (a child held twice under both names)."""
        for module_name, module in self.named_modules(remove_duplicate=False):
            dot = f"{module_name}." if module_name else ""
            for name, param in module._parameters.items():
                yield dot + name, module, name, param
            for name, buffer in module._buffers.items():
                if buffer is not None and name not in module._non_persistent_buffers_set:
                    yield dot + name, module, name, buffer

    def state_dict(self, *, destination: Any = None, prefix: str = "",
                   keep_vars: bool = False) -> Any:
        """Copies of every parameter and persistent buffer, keyed and ordered exactly as
        PyTorch's (torch's are references; copies here, so a state_dict is a snapshot). Each key
        starts with ``prefix``; the entries go into ``destination`` (returned) when given, else
        into a new OrderedDict. ``keep_vars=True`` gives the objects themselves, as torch does:
        the ``Parameter`` objects and the buffer arrays, no copies (``load_state_dict`` takes
        them)."""
        state = OrderedDict() if destination is None else destination
        for key, _, _, value in self._state_entries():
            if not keep_vars:
                value = (value.data if isinstance(value, Parameter) else value).copy()
            state[prefix + key] = value
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True) -> LoadResult:
        """Copy arrays (NumPy arrays, or anything ``np.asarray`` accepts, such as CPU tensors)
        into this module's parameters and buffers, keeping their dtypes."""
        if not isinstance(state_dict, Mapping):
            # Otherwise a list's items were reported as "unexpected keys".
            raise TypeError(f"Expected state_dict to be dict-like, got "
                            f"{type(state_dict).__name__}")
        targets: dict[str, tuple[Module, str, np.ndarray]] = {
            key: (module, name, value.data if isinstance(value, Parameter) else value)
            for key, module, name, value in self._state_entries()}
        missing = [key for key, (module, name, _) in targets.items()
                   if key not in state_dict and name not in module.optional_state]
        unexpected = [key for key in state_dict if key not in targets]
        where = f"loading state_dict into {type(self).__name__}"
        if strict and (missing or unexpected):
            raise StateDictError(
                f"{where}: missing keys {missing}, unexpected keys {unexpected}; "
                "the state_dict must come from the same architecture"
            )
        values = {}
        for key, (_, _, current) in targets.items():
            if key not in state_dict:
                continue
            raw = state_dict[key]
            if isinstance(raw, Parameter):  # from state_dict(keep_vars=True)
                raw = raw.data
            value = _state_array(raw, f"{where}: {key!r}")
            if value.shape != current.shape:
                raise StateDictError(
                    f"{where}: {key!r} has shape {value.shape} but the model expects "
                    f"{current.shape}; the state_dict must come from the same architecture"
                )
            if not np.can_cast(value.dtype, current.dtype, casting="same_kind"):
                raise ValueError(
                    f"{where}: {key!r} has dtype {value.dtype}, expected {current.dtype}"
                )
            values[key] = value
        # Validate everything before copying anything, so a bad state_dict changes nothing.
        for key, value in values.items():
            _, _, current = targets[key]
            current[...] = value
        return LoadResult(missing, unexpected)

    # -- display ----------------------------------------------------------------------------

    def extra_repr(self) -> str:
        return ""

    def describe(self) -> str:
        """One-line description used in error messages, e.g. ``Linear(in_features=3, ...)``."""
        return f"{type(self).__name__}({self.extra_repr()})"

    def __repr__(self) -> str:
        if not self._modules:
            return self.describe()
        lines = [f"{type(self).__name__}("]
        for name, module in self._modules.items():
            child = repr(module).replace("\n", "\n  ")
            lines.append(f"  ({name}): {child}")
        lines.append(")")
        return "\n".join(lines)


def check_input(
    module: Module,
    x: Any,
    ndim: int,
    expected: str,
    *,
    dim: int | None = None,
    size: int | None = None,
) -> np.ndarray:
    """Validate a layer's input and return it as an array.

    Raises a ValueError naming the layer, the shape it expects (``expected``, e.g.
    ``"(N, 3, H, W)"``) and the shape it got, when the rank is not ``ndim`` or when axis ``dim``
    does not have length ``size``; and a TypeError when the dtype is not floating or differs from
    the layer's parameters (silent upcasts are refused, as in PyTorch).
    """
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{module.describe()}: expected a NumPy array, got {type(x).__name__}")
    if x.ndim != ndim or (dim is not None and x.shape[dim] != size):
        raise ValueError(
            f"{module.describe()}: expected input of shape {expected}, got {tuple(x.shape)}"
        )
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{module.describe()}: expected float32 or float64 input, got {x.dtype}; "
            "convert it first, e.g. x.astype(np.float32)"
        )
    for param in module._parameters.values():
        if param.dtype != x.dtype:
            raise TypeError(
                f"{module.describe()}: input is {x.dtype} but the layer's parameters are "
                f"{param.dtype}; cast one to match, e.g. model.to(np.{x.dtype})"
            )
        break
    return x


def check_grad_output(
    module: Module, grad_output: Any, expected_shape: tuple[int, ...] | None, dtype: np.dtype
) -> np.ndarray:
    """Validate the gradient handed to ``module.backward`` and return it as an array of ``dtype``.

    ``expected_shape`` is the shape of the layer's last output, or None when ``forward`` kept no
    cache (never called, or called under ``no_grad()``), which is a RuntimeError.
    """
    if expected_shape is None:
        raise RuntimeError(
            f"{module.describe()}: backward() needs the cache of a forward() pass; call forward "
            "first (outside no_grad())"
        )
    if not isinstance(grad_output, np.ndarray):
        grad_output = np.asarray(grad_output, dtype=dtype)  # a Python scalar, e.g. loss grad 1.0
    if grad_output.shape != tuple(expected_shape):
        raise ValueError(
            f"{module.describe()}: grad_output has shape {tuple(grad_output.shape)} but the last "
            f"forward returned shape {tuple(expected_shape)}; they must match"
        )
    if grad_output.dtype != dtype:
        raise TypeError(
            f"{module.describe()}: grad_output is {grad_output.dtype} but the layer computes in "
            f"{dtype}; cast it to match"
        )
    return grad_output


class _NotAModule(TypeError, AssertionError):
    """``Sequential.insert`` given something other than a Module: torch raises AssertionError
    there and TypeError everywhere else (``append``), so this is both."""


class Sequential(Module):
    """Modules applied in order; children are named ``"0"``, ``"1"``, ... as in PyTorch (or by
    the keys of one mapping given instead).

    Each module may appear only once in the tree: its ``backward`` uses the cache of its own last
    ``forward``, so a second use would overwrite the first's cache and give wrong gradients
    (PyTorch's autograd records each use; here each use needs its own instance). For the same
    reason one ``forward`` allows one ``backward``.

    The children run in registration order but for one exact swap: a ``ReLU`` directly followed
    by a ``MaxPool2d`` runs after the pool. ReLU is monotone, so max(relu(window)) =
    relu(max(window)); a window whose maximum is <= 0 gives 0 and a zero gradient either way, and
    a positive maximum wins at the same (first) position, ties included, because the ReLU only
    lowers non-maxima to 0. Iteration, indexing, names and ``state_dict`` keep the registration
    order. A forward then runs a Conv2d and the tiling MaxPool2d and ReLU after it as one step
    (nn/fused.py): every such run under ``no_grad()``, the first one with gradients on.

    Edited as torch's (``model[i] = m``, ``del model[i]``, ``insert``, ``extend``, ``pop``,
    ``append``, ``add_module``), each edit checks that no module comes twice and makes the next
    forward run the edited children.
    """

    splits_exactly = True  # a container: _splits_exactly checks every layer inside it

    # None: no forward through this Sequential with gradients on since its last backward ran;
    # "pending": its forward ran and backward has not; "done": backward ran for that forward.
    _backward_state: str | None = None
    # The order the children run in (see the class docstring); None until the next forward
    # computes it, and again whenever a child is set or replaced.
    _execution_order: list[Module] | None = None
    # The steps the last forward with gradients on ran (the first possibly fused), which
    # backward runs in reverse; None after a forward under no_grad.
    _training_steps: list[Module] | None = None

    def __init__(self, *modules: Module | Mapping[str, Module]) -> None:
        super().__init__()
        if len(modules) == 1 and isinstance(modules[0], Mapping):
            items: Iterable[tuple[str, Module]] = modules[0].items()
        else:
            items = ((str(i), m) for i, m in enumerate(modules))
        for name, module in items:
            if not isinstance(module, Module):
                raise TypeError(f"Sequential takes Modules, got {type(module).__name__}")
            self.add_module(name, module)  # torch's checks of the name, as torch's Sequential

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, Module):
            self._check_not_present(name, value)
        if isinstance(value, Module) or name in self._modules:
            object.__setattr__(self, "_execution_order", None)
        super().__setattr__(name, value)

    def __delattr__(self, name: str) -> None:
        if name in self._modules:
            object.__setattr__(self, "_execution_order", None)
        super().__delattr__(name)

    def _check_not_present(self, name: str, value: Module) -> None:
        """Raise a ValueError if ``value`` or any module inside it is already in this tree
        (outside the child ``name`` it replaces, if any), or is this Sequential itself."""
        where: dict[int, str] = {id(self): "the Sequential itself"}

        def visit(module: Module, path: str) -> None:
            if id(module) in where:
                raise ValueError(
                    f"Sequential: {module.describe()} appears twice (as {where[id(module)]!r} "
                    f"and {path!r}); each use needs its own instance, because a module's "
                    "backward uses the cache of its own last forward, which a second use "
                    "overwrites (the gradients would be silently wrong)"
                )
            where[id(module)] = path
            for child_name, child in module._modules.items():
                visit(child, f"{path}.{child_name}")

        for child_name, child in self._modules.items():
            if child_name != name:
                visit(child, child_name)
        visit(value, name)

    def execution_order(self) -> list[Module]:
        """The children in the order ``forward`` runs them: registration order, with each
        ``ReLU`` that is directly followed by a ``MaxPool2d`` moved after it."""
        if self._execution_order is None:
            object.__setattr__(self, "_execution_order", _pool_before_relu(list(self)))
        assert self._execution_order is not None
        return self._execution_order

    def forward(self, x: np.ndarray) -> np.ndarray:
        object.__setattr__(self, "_backward_state", None)
        order = self.execution_order()
        order = _fused(order)
        object.__setattr__(self, "_training_steps", order if is_grad_enabled() else None)
        if not is_grad_enabled() and isinstance(x, np.ndarray) and x.ndim >= 2 \
                and len(x) > INFERENCE_PIECE:
            # The leading layers that split exactly run piece by piece, so each piece's
            # activations stay in cache from one layer to the next; the rest (the classifier's
            # Linear layers, whose bits would change) run on the whole batch.
            split = next((index for index, module in enumerate(order)
                          if not _splits_exactly(module)), len(order))
            if split > 0:
                x = np.concatenate([_run(order[:split], x[start:start + INFERENCE_PIECE])
                                    for start in range(0, len(x), INFERENCE_PIECE)])
                order = order[split:]
        x = _run(order, x)
        # Under no_grad the layers keep no cache: their own backward says so.
        object.__setattr__(self, "_backward_state", "pending" if is_grad_enabled() else None)
        return x

    def backward(self, grad_output: np.ndarray, *,
                 input_grad: bool = False) -> np.ndarray | None:
        """Backward through the children in reverse; returns dL/d(input) if ``input_grad``,
        else None, computing only what the parameters' gradients need: the first layer's input
        gradient is skipped (see the module docstring)."""
        if self._backward_state == "done":
            # A second backward would add every parameter's gradient again (torch refuses it:
            # "Trying to backward through the graph a second time").
            raise RuntimeError(
                "Sequential.backward: backward already ran for the last forward; a second one "
                "would add every gradient again. Call forward again first; to accumulate "
                "gradients over several batches, run forward and backward once per batch "
                "(they add up in .grad until zero_grad())"
            )
        order = self._training_steps or self.execution_order()
        for module in reversed(order[1:]):
            grad_output = _backward(module, grad_output, input_grad=True)
        grad_input: np.ndarray | None = grad_output if input_grad else None
        if order:
            grad_input = _backward(order[0], grad_output, input_grad=input_grad)
        # Only once it succeeded: a grad_output the last layer refused can be corrected and retried.
        if self._backward_state == "pending":
            object.__setattr__(self, "_backward_state", "done")
        return grad_input

    def append(self, module: Module) -> Sequential:
        # setattr would store a non-Module as a plain attribute and ignore it.
        if not isinstance(module, Module):
            raise TypeError(f"{type(module).__name__} is not a Module subclass")
        name = str(len(self._modules))
        if name in self._modules:
            # A slice keeps its names, so len() can name a child it holds; torch would replace
            # that child without a word.
            raise ValueError(f"Sequential.append: the name {name!r} is already taken by "
                             f"{self._modules[name].describe()}; use setattr with a new name")
        setattr(self, name, module)
        return self

    def _key_at(self, index: int) -> str:
        """The name of the child at ``index`` (negative from the end), as torch finds it."""
        size = len(self._modules)
        index = operator.index(index)
        if not -size <= index < size:
            raise IndexError(f"index {index} is out of range")
        return list(self._modules)[index % size]

    def _renumber(self, modules: list[Module]) -> None:
        """Hold ``modules`` as the children "0", "1", ... (torch keeps the names consecutive
        after a deletion or an insert, whatever they were)."""
        for name in self._modules:
            self.__dict__.pop(name, None)
        self._modules.clear()
        for index, module in enumerate(modules):
            self._modules[str(index)] = module
            object.__setattr__(self, str(index), module)
        object.__setattr__(self, "_execution_order", None)

    def __setitem__(self, index: int, module: Module) -> None:
        """Replace the child at ``index`` (keeping its name), as torch's."""
        key = self._key_at(index)
        if module is None:
            # torch would keep a None child that forward then fails to call.
            raise TypeError(f"cannot assign None to Sequential[{index}]; "
                            f"remove the child with del model[{index}]")
        setattr(self, key, module)  # refuses a non-Module, checks the tree, resets the order

    def __delitem__(self, index: int | slice) -> None:
        """Remove the child(ren) at ``index``; as in torch, the children left are then named
        "0", "1", ... (even those of a Sequential built from a mapping)."""
        keys = list(self._modules)[index] if isinstance(index, slice) else [self._key_at(index)]
        for key in keys:
            delattr(self, key)
        self._renumber(list(self._modules.values()))

    def pop(self, key: int | slice) -> Module:
        """Remove and return the child at ``key`` (a slice: a Sequential of those children)."""
        module = self[key]
        del self[key]
        return module

    def insert(self, index: int, module: Module) -> Sequential:
        """Put ``module`` at ``index`` (0 <= index <= len, or negative from the end); the
        children from there on move one place up, as in torch. Needs children named "0", "1",
        ... (torch fails half-way on other names): build a mapping-named model anew instead."""
        if not isinstance(module, Module):
            raise _NotAModule(f"module should be of type: {Module}, got {type(module).__name__}")
        size = len(self._modules)
        index = operator.index(index)
        if not -size <= index <= size:
            raise IndexError(f"Index out of range: {index}")
        if index < 0:
            index += size
        if index == size:
            return self.append(module)
        if list(self._modules) != [str(i) for i in range(size)]:
            raise KeyError(f"Sequential.insert: needs children named '0' to '{size - 1}', got "
                           f"{list(self._modules)}; torch's insert renames by number")
        self._check_not_present(f"new {index}", module)  # a name no child has: replaces none
        children = list(self._modules.values())
        children.insert(index, module)
        self._renumber(children)
        return self

    def extend(self, sequential: Iterable[Module]) -> Sequential:
        """Append each module of ``sequential`` (any iterable of modules), as torch's; if one is
        refused, none is added."""
        modules = list(sequential)
        size = len(self._modules)
        try:
            for module in modules:
                self.append(module)
        except BaseException:
            for name in list(self._modules)[size:]:
                delattr(self, name)
            raise
        return self

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self) -> Iterator[Module]:
        return iter(self._modules.values())

    def __getitem__(self, index: int | slice) -> Module:
        if isinstance(index, slice):
            # Keeps the children's names, as torch does, so a slice's state_dict keys are the
            # whole model's.
            return Sequential(OrderedDict(list(self._modules.items())[index]))
        return list(self._modules.values())[index]


def _run(modules: list[Module], x: np.ndarray) -> np.ndarray:
    for module in modules:
        x = module(x)
    return x


def _splits_exactly(module: Module) -> bool:
    """Whether ``module`` and every module inside it give the same values for a batch in pieces
    (see ``Module.splits_exactly``)."""
    return all(inner.splits_exactly or (inner.splits_exactly is None and not inner.training)
               for inner in module.modules())


def _pool_before_relu(children: list[Module]) -> list[Module]:
    """``children`` with every ``ReLU`` that is directly followed by a ``MaxPool2d`` swapped
    behind it (exact: see Sequential). Exact types only, and not an in-place ReLU, whose
    clamping of its own input the swap would drop."""
    # Imported here: both layer modules import this one.
    from scratchcnn.nn.activation import ReLU
    from scratchcnn.nn.pooling import MaxPool2d

    order = list(children)
    for index in range(len(order) - 1):
        first, second = order[index], order[index + 1]
        if type(first) is ReLU and not first.inplace and type(second) is MaxPool2d:
            order[index], order[index + 1] = second, first
    return order


def _fused(order: list[Module]) -> list[Module]:
    """``order`` with Conv2d -> tiling MaxPool2d -> ReLU runs as single steps (nn/fused.py):
    every such run under ``no_grad()``, the first one with gradients on."""
    # Imported here: fused.py imports the layers, which import this module.
    from scratchcnn.nn.fused import fuse_first_for_training, fuse_for_inference

    return fuse_first_for_training(order) if is_grad_enabled() else fuse_for_inference(order)


def _backward(module: Module, grad_output: np.ndarray, *,
              input_grad: bool) -> np.ndarray | None:
    """``module.backward(grad_output)`` as a Sequential runs it for a child, with the child's
    input gradient computed only if ``input_grad`` (only a first child's may be skipped): a
    module whose backward takes ``input_grad`` (a Sequential, Conv2d, Linear) is told either way,
    so a nested Sequential inside a model returns its input gradient; a parameterless module,
    which would compute nothing else, does not run backward at all when it is not wanted."""
    backward = module.backward
    if _takes_input_grad(getattr(backward, "__func__", backward)):
        return module.backward(grad_output, input_grad=input_grad)  # type: ignore[call-arg]
    if input_grad:
        return module.backward(grad_output)
    if next(module.parameters(), None) is not None:
        module.backward(grad_output)
    return None


@functools.cache  # keyed by the function itself, so a replaced backward is looked at anew
def _takes_input_grad(backward: Callable[..., Any]) -> bool:
    return "input_grad" in inspect.signature(backward).parameters
