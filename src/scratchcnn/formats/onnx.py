"""ONNX export and import of scratchcnn models, with the ``onnx`` package's graph API (no torch).

``to_onnx(model)`` writes a ``Sequential`` as one chain of ONNX nodes in its declared layer
order (the mathematical model: ``Sequential`` may run a ReLU after the MaxPool that follows it,
an exact rewrite that gives the same values):

    Conv2d -> Conv, BatchNorm2d -> BatchNormalization (eval: running statistics), ReLU -> Relu,
    MaxPool2d -> MaxPool, AvgPool2d -> AveragePool, Flatten -> Flatten, Linear -> Gemm
    (y = x W^T + b, transB=1), Dropout -> nothing

Dropout is left out rather than written as an inference-mode ``Dropout`` node: in eval mode it is
the identity, ``torch.onnx.export`` leaves it out too, and so both exporters give the importer
the same graph. The batch dimension is dynamic (input ``['batch', C, H, W]``), the weights keep
the model's dtype (float32 or float64), and the initializers are named by the state_dict keys.

Normalisation is not part of the graph: like the NumPy model, it takes images already normalised
as ``(pixel / 255 - mean) / std``. The checkpoint's ``mean`` and ``std`` travel as metadata
(``metadata_props``), with the architecture, dataset, classes and BatchNorm step counters.

``from_onnx(path_or_model)`` reads such a graph back, or one that ``torch.onnx.export`` made of
the PyTorch twin, and returns the architecture's name, a state_dict and the metadata. A
checkpoint records its model by name, so only a graph whose layers and shapes are those of an
architecture in ``scratchcnn.models`` can be imported; anything else (another operator, a branch,
a computed weight, an attribute the layers cannot express, external data) is refused in one line.
Reading parses protobuf only: it never runs code from the file.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from scratchcnn import nn

ONNX_INSTALL = "pip install 'scratchcnn[onnx]'"
DEFAULT_OPSET = 17
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
BATCH_DIM = "batch"
# The image size of every dataset scratchcnn knows; the input's height and width by default.
DEFAULT_IMAGE_SIZE = (28, 28)
# metadata_props keys (values are strings; classes and step counters as JSON).
MEAN_KEY, STD_KEY = "mean", "std"
ARCHITECTURE_KEY, DATASET_KEY, CLASSES_KEY = "architecture", "dataset", "classes"
STEP_COUNTERS_KEY = "num_batches_tracked"


def require_onnx() -> Any:
    """The ``onnx`` module, or an ImportError that says how to install it."""
    try:
        import onnx
    except ImportError:
        raise ImportError(f"the onnx package is not installed; install it with {ONNX_INSTALL}") \
            from None
    return onnx


# -- export ---------------------------------------------------------------------------------------


def to_onnx(
    model: nn.Module,
    *,
    mean: float | None = None,
    std: float | None = None,
    input_shape: tuple[int, int, int] | None = None,
    opset: int = DEFAULT_OPSET,
    metadata: Mapping[str, str] | None = None,
) -> Any:
    """``model`` (a ``Sequential`` of the layers above) as an ``onnx.ModelProto``, checked with
    ``onnx.checker``.

    ``input_shape`` is one sample's (C, H, W); default: the first layer's channels and 28x28.
    ``mean`` and ``std`` (the normalisation the inputs must already have) and ``metadata`` go into
    ``metadata_props``; the graph itself does not normalise. The model is exported in eval mode
    (BatchNorm's running statistics, no Dropout) whatever its mode, which is left unchanged.
    """
    onnx = require_onnx()
    from onnx import TensorProto, helper, numpy_helper

    layers = list(_leaf_layers(model, ""))
    if not layers:
        raise ValueError("to_onnx: the model has no layers")
    dtype = _model_dtype(model)
    elem_type = TensorProto.FLOAT if dtype == np.float32 else TensorProto.DOUBLE
    shape = _input_shape(layers, input_shape)
    shapes = _output_shapes(model, layers, shape, dtype)

    nodes: list[Any] = []
    initializers: list[Any] = []

    def constant(name: str, value: np.ndarray) -> str:
        initializers.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    current = INPUT_NAME
    for (name, layer), in_shape in zip(layers, [(1, *shape), *shapes], strict=False):
        kind = type(layer).__name__
        output = f"{name}.output"
        if isinstance(layer, nn.Dropout):
            continue  # the identity in eval mode (see the module docstring)
        if isinstance(layer, nn.Conv2d):
            top, bottom, left, right = layer._pad  # the resolved padding, "same" included
            inputs = [current, constant(f"{name}.weight", layer.weight.data)]
            if layer.bias is not None:
                inputs.append(constant(f"{name}.bias", layer.bias.data))
            node = helper.make_node(
                "Conv", inputs, [output], name=name, kernel_shape=list(layer.kernel_size),
                strides=list(layer.stride), pads=[top, left, bottom, right],
                dilations=list(layer.dilation), group=1)
        elif isinstance(layer, nn.BatchNorm2d):
            if layer.running_mean is None or layer.running_var is None:
                raise ValueError(f"to_onnx: layer {name!r} (BatchNorm2d) tracks no running "
                                 "statistics, so it normalises each batch by itself, which an "
                                 "inference graph cannot express")
            features = layer.num_features
            scale = layer.weight.data if layer.weight is not None else np.ones(features)
            shift = layer.bias.data if layer.bias is not None else np.zeros(features)
            inputs = [current, constant(f"{name}.weight", scale),
                      constant(f"{name}.bias", shift),
                      constant(f"{name}.running_mean", layer.running_mean),
                      constant(f"{name}.running_var", layer.running_var)]
            node = helper.make_node("BatchNormalization", inputs, [output], name=name,
                                    epsilon=layer.eps)
        elif isinstance(layer, nn.ReLU):
            node = helper.make_node("Relu", [current], [output], name=name)
        elif isinstance(layer, (nn.MaxPool2d, nn.AvgPool2d)):
            node = _pool_node(helper, name, layer, current, output)
        elif isinstance(layer, nn.Flatten):
            rank = len(in_shape)
            start = layer.start_dim % rank
            if start != 1 or layer.end_dim % rank != rank - 1:
                raise ValueError(f"to_onnx: layer {name!r} is Flatten(start_dim="
                                 f"{layer.start_dim}, end_dim={layer.end_dim}); only "
                                 "Flatten(start_dim=1, end_dim=-1) is exported")
            node = helper.make_node("Flatten", [current], [output], name=name, axis=1)
        elif isinstance(layer, nn.Linear):
            if len(in_shape) != 2:
                raise ValueError(f"to_onnx: layer {name!r} (Linear) gets a rank-{len(in_shape)} "
                                 "input; only a Linear on (N, features) is exported (as Gemm): "
                                 "put a Flatten before it")
            inputs = [current, constant(f"{name}.weight", layer.weight.data)]
            if layer.bias is not None:
                inputs.append(constant(f"{name}.bias", layer.bias.data))
            node = helper.make_node("Gemm", inputs, [output], name=name, transB=1)
        else:
            raise ValueError(f"to_onnx: layer {name!r} ({kind}) has no ONNX export; supported: "
                             "Conv2d, BatchNorm2d, ReLU, MaxPool2d, AvgPool2d, Flatten, Linear, "
                             "Dropout")
        nodes.append(node)
        current = output
    if not nodes:  # only Dropout layers: the graph still needs a node from input to output
        nodes.append(helper.make_node("Identity", [current], [OUTPUT_NAME], name="identity"))
    else:
        nodes[-1].output[0] = OUTPUT_NAME

    graph = helper.make_graph(
        nodes, "scratchcnn",
        [helper.make_tensor_value_info(INPUT_NAME, elem_type, [BATCH_DIM, *shape])],
        [helper.make_tensor_value_info(OUTPUT_NAME, elem_type, [BATCH_DIM, *shapes[-1][1:]])],
        initializers,
        doc_string="Inputs are normalised images, (pixel / 255 - mean) / std with the mean and "
        "std of metadata_props; the graph does not normalise them.",
    )
    proto = helper.make_model_gen_version(
        graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="scratchcnn",
        producer_version=_version())
    props = dict(metadata or {})
    props.update(_normalisation_props(mean, std))
    counters = {key: int(value) for key, value in model.state_dict().items()
                if key.endswith(".num_batches_tracked")}
    if counters:
        props[STEP_COUNTERS_KEY] = json.dumps(counters)
    helper.set_model_props(proto, {str(key): str(value) for key, value in props.items()})
    onnx.checker.check_model(proto)
    return proto


def _leaf_layers(module: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Module]]:
    """``(state_dict prefix, layer)`` of every layer in order, nested Sequentials opened."""
    if not isinstance(module, nn.Sequential):
        raise ValueError(f"to_onnx: expected a Sequential model, got {type(module).__name__}")
    for name, child in module._modules.items():
        path = f"{prefix}{name}"
        if isinstance(child, nn.Sequential):
            yield from _leaf_layers(child, f"{path}.")
        else:
            yield path, child


def _model_dtype(model: nn.Module) -> np.dtype:
    dtypes = {value.dtype for value in model.state_dict().values() if value.dtype.kind == "f"}
    if len(dtypes) > 1:
        raise ValueError(f"to_onnx: the model mixes dtypes {sorted(map(str, dtypes))}; convert "
                         "it to one with model.float() or model.double()")
    return dtypes.pop() if dtypes else np.dtype(np.float32)


def _input_shape(layers: list[tuple[str, nn.Module]],
                 given: tuple[int, int, int] | None) -> tuple[int, int, int]:
    if given is not None:
        if len(given) != 3 or not all(isinstance(size, int) and size > 0 for size in given):
            raise ValueError(f"to_onnx: input_shape must be one sample's (C, H, W) as three "
                             f"positive ints, got {given!r}")
        return tuple(given)  # type: ignore[return-value]
    first = next(layer for _, layer in layers)
    channels = getattr(first, "in_channels", getattr(first, "num_features", None))
    if channels is None:
        raise ValueError(f"to_onnx: the first layer ({type(first).__name__}) does not say how "
                         "many channels the input has; pass input_shape=(C, H, W)")
    return (channels, *DEFAULT_IMAGE_SIZE)


def _output_shapes(model: nn.Module, layers: list[tuple[str, nn.Module]],
                   shape: tuple[int, int, int], dtype: np.dtype) -> list[tuple[int, ...]]:
    """Each layer's output shape for one sample of ``shape``, by running it in eval mode (the
    layers' own checks then say what does not fit); the modules' modes are put back after."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    shapes = []
    try:
        x = np.zeros((1, *shape), dtype=dtype)
        with nn.no_grad():
            for _, layer in layers:
                x = layer(x)
                shapes.append(x.shape)
    except ValueError as error:
        raise ValueError(f"to_onnx: the model does not run on inputs of shape (N, "
                         f"{', '.join(map(str, shape))}): {error}; pass input_shape=(C, H, W)") \
            from None
    finally:
        for module, training in modes:
            object.__setattr__(module, "training", training)
    return shapes


def _pool_node(helper: Any, name: str, layer: nn.Module, current: str, output: str) -> Any:
    (ph, pw), dilation = layer._padding, layer._dilation
    common = dict(kernel_shape=list(layer._kernel), strides=list(layer._stride),
                  pads=[ph, pw, ph, pw], ceil_mode=int(layer.ceil_mode))
    if isinstance(layer, nn.MaxPool2d):
        return helper.make_node("MaxPool", [current], [output], name=name,
                                dilations=list(dilation), **common)
    if layer.divisor_override is not None:
        raise ValueError(f"to_onnx: layer {name!r} is AvgPool2d with divisor_override, which "
                         "ONNX's AveragePool cannot express")
    return helper.make_node("AveragePool", [current], [output], name=name,
                            count_include_pad=int(layer.count_include_pad), **common)


def _normalisation_props(mean: float | None, std: float | None) -> dict[str, str]:
    props = {}
    for key, value in ((MEAN_KEY, mean), (STD_KEY, std)):
        if value is None:
            continue
        if not math.isfinite(value) or (key == STD_KEY and value <= 0):
            raise ValueError(f"to_onnx: {key} must be a finite number (std positive), "
                             f"got {value}")
        props[key] = repr(float(value))
    return props


def _version() -> str:
    from scratchcnn import __version__

    return __version__
