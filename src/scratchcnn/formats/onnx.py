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

import copy
import json
import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

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
    shapes = _output_shapes(layers, shape, dtype)

    nodes: list[Any] = []
    initializers: list[Any] = []

    def constant(name: str, value: np.ndarray) -> str:
        initializers.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    current = INPUT_NAME
    for (name, layer), in_shape in zip(layers, [(1, *shape), *shapes], strict=False):
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
        else:  # _leaf_layers let only the layers above through
            raise AssertionError(type(layer).__name__)
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


_EXPORTED = (nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.Flatten, nn.Linear,
             nn.Dropout)


def _leaf_layers(module: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Module]]:
    """``(state_dict prefix, layer)`` of every layer in order, nested Sequentials opened."""
    if not isinstance(module, nn.Sequential):
        raise ValueError(f"to_onnx: expected a Sequential model, got {type(module).__name__}")
    for name, child in module._modules.items():
        path = f"{prefix}{name}"
        if isinstance(child, nn.Sequential):
            yield from _leaf_layers(child, f"{path}.")
        elif isinstance(child, _EXPORTED):
            yield path, child
        else:
            raise ValueError(f"to_onnx: layer {path!r} ({type(child).__name__}) has no ONNX "
                             f"export; supported: {', '.join(t.__name__ for t in _EXPORTED)}")


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


def _output_shapes(layers: list[tuple[str, nn.Module]], shape: tuple[int, int, int],
                   dtype: np.dtype) -> list[tuple[int, ...]]:
    """Each layer's output shape for one sample of ``shape``, found by running a copy of the
    layers in eval mode (their own checks then say what does not fit): the model itself keeps
    its mode, its statistics and the caches a pending ``backward`` needs."""
    probe = nn.Sequential(*copy.deepcopy([layer for _, layer in layers])).eval()
    shapes = []
    x = np.zeros((1, *shape), dtype=dtype)
    try:
        with nn.no_grad():
            for layer in probe:
                x = layer(x)
                shapes.append(x.shape)
    except ValueError as error:
        raise ValueError(f"to_onnx: the model does not run on inputs of shape (N, "
                         f"{', '.join(map(str, shape))}): {error}; pass input_shape=(C, H, W)") \
            from None
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



# -- import ---------------------------------------------------------------------------------------

SUPPORTED_OPS = ("Conv", "BatchNormalization", "Relu", "MaxPool", "AveragePool", "Flatten",
                 "Reshape", "Gemm", "Dropout", "Identity", "Constant")


class OnnxImport(NamedTuple):
    """What ``from_onnx`` read: the name of the architecture in ``scratchcnn.models``, a
    state_dict with that architecture's keys and shapes, and metadata: ``dtype``, ``opset`` and
    ``producer`` always; ``mean``, ``std``, ``dataset`` and ``classes`` when the file has them."""

    architecture: str
    state_dict: dict[str, np.ndarray]
    metadata: dict[str, Any]

    def build_model(self) -> nn.Sequential:
        """The NumPy model holding these weights, in eval mode."""
        from scratchcnn.models import build_model

        model = build_model(self.architecture, dtype=self.metadata["dtype"],
                            rng=np.random.default_rng(0))
        model.load_state_dict(self.state_dict)
        return model.eval()


class _Layer(NamedTuple):
    """A graph node read as a scratchcnn layer: ``signature`` must equal the architecture's
    layer's (see ``_signature``); ``params`` are its arrays by state_dict suffix."""

    signature: tuple[Any, ...]
    params: dict[str, np.ndarray]
    node: str


def from_onnx(source: Any, *, dtype: Any = None) -> OnnxImport:
    """Read an ONNX model (a path, or an ``onnx.ModelProto``) that is one chain of the operators
    ``to_onnx`` writes, plus what ``torch.onnx.export`` may add (Identity, Constant, inference
    Dropout, a Reshape that flattens), and whose layers are those of a scratchcnn architecture.

    ``dtype`` (float32 or float64) converts the weights; by default they keep the graph's dtype.
    Every problem is a ValueError of one line that names the file and, where one is at fault,
    the node.
    """
    from scratchcnn.models import MODEL_NAMES, build_model
    from scratchcnn.nn.module import as_float_dtype

    model, where = _load(source)
    graph = model.graph
    constants, folded = _constants(graph, where)
    image_input = _image_input(graph, constants, where)
    wanted = as_float_dtype(dtype) if dtype is not None else _graph_dtype(image_input, where)
    layers = _relu_first(_read_chain(graph, constants, folded, image_input.name, where),
                         lambda layer: layer.signature[0])
    signatures = [layer.signature for layer in layers]

    candidates = {}
    for name in MODEL_NAMES:
        reference = build_model(name, dtype=wanted, rng=np.random.default_rng(0))
        keyed = _relu_first([(key, module) for key, module in _leaf_layers(reference, "")
                             if not isinstance(module, nn.Dropout)],
                            lambda item: _signature(item[1])[0])
        candidates[name] = [_signature(module) for _, module in keyed]
        if candidates[name] != signatures:
            continue
        state = _state_dict(reference, keyed, layers, _step_counters(model, where), wanted,
                            convert=dtype is not None, where=where)
        _check_input_size(reference, image_input, name, where)
        metadata = _metadata(model, where)
        metadata.update(dtype=str(wanted), opset=_opset(model),
                        producer=f"{model.producer_name} {model.producer_version}".strip())
        return OnnxImport(name, state, metadata)
    raise ValueError(_no_architecture(where, signatures, candidates))


def _load(source: Any) -> tuple[Any, str]:
    """The parsed and checked ModelProto, and how messages name it."""
    onnx = require_onnx()
    if isinstance(source, onnx.ModelProto):
        model, where = source, "the ONNX model"
    else:
        path = Path(source)
        where = str(path)
        try:
            data = path.read_bytes()
        except OSError as error:
            reason = (error.strerror or str(error)).lower()
            raise ValueError(f"{path}: cannot read the ONNX file ({reason})") from None
        if not data:
            raise ValueError(f"{path}: the file is empty (an interrupted copy?), not an ONNX model")
        try:
            # Parses protobuf only: no code runs, and no external data file is opened.
            model = onnx.load_model_from_string(data)
        except Exception:  # protobuf's DecodeError, or whatever a malformed message raises
            raise ValueError(f"{path}: not an ONNX model: it does not parse as one (truncated, "
                             "or another kind of file)") from None
    if not model.HasField("graph") or not model.graph.node:
        raise ValueError(f"{where}: not an ONNX model, or an empty one: it holds no graph nodes")
    _refuse_external_data(model.graph, where)
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else "invalid"
        raise ValueError(f"{where}: not a valid ONNX model ({first_line})") from None
    return model, where


def _refuse_external_data(graph: Any, where: str) -> None:
    """Weights in files beside the model are never read: their paths come from the file."""
    from onnx import AttributeProto, TensorProto

    if graph.sparse_initializer:
        raise ValueError(f"{where}: the graph has sparse initializers, which scratchcnn does not "
                         "import; store the weights as dense initializers")
    tensors = list(graph.initializer)
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == AttributeProto.TENSOR:
                tensors.append(attribute.t)
            elif attribute.type == AttributeProto.TENSORS:
                tensors.extend(attribute.tensors)
    for tensor in tensors:
        if tensor.data_location == TensorProto.EXTERNAL or tensor.external_data:
            raise ValueError(
                f"{where}: tensor {tensor.name!r} is stored in an external data file, which "
                "scratchcnn never reads; save the model as one file with onnx.save_model(model, "
                "path, save_as_external_data=False)")


def _constants(graph: Any, where: str) -> tuple[dict[str, np.ndarray], set[int]]:
    """The graph's constant values by name (initializers, Constant nodes, Identity of either),
    and the indices of the nodes that only make constants."""
    from onnx import helper

    constants = {tensor.name: _array(tensor, where) for tensor in graph.initializer}
    folded = set()
    for index, node in enumerate(graph.node):  # the checker made sure they are in order
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            attribute = node.attribute[0]
            value = helper.get_attribute_value(attribute)
            if attribute.name == "value":
                value = _array(value, where)
            elif attribute.name.startswith(("value_float", "value_int")):
                value = np.asarray(value, np.float32 if "float" in attribute.name else np.int64)
            else:
                raise ValueError(f"{where}: node {_label(node)} makes a {attribute.name} "
                                 "constant, which scratchcnn does not import")
            constants[node.output[0]] = value
        elif node.op_type == "Identity" and node.input[0] in constants:
            constants[node.output[0]] = constants[node.input[0]]
        else:
            continue
        folded.add(index)
    return constants, folded


def _array(tensor: Any, where: str) -> np.ndarray:
    from onnx import numpy_helper

    try:
        return numpy_helper.to_array(tensor)
    except Exception as error:  # a data field that does not fit the dims, an unknown type...
        raise ValueError(f"{where}: tensor {tensor.name!r} is malformed ({type(error).__name__}: "
                         f"{str(error).strip().splitlines()[0] if str(error).strip() else ''})"
                         ) from None


def _image_input(graph: Any, constants: Mapping[str, np.ndarray], where: str) -> Any:
    # Graphs of IR version < 4 list their initializers among the inputs too.
    inputs = [value for value in graph.input if value.name not in constants]
    if len(inputs) != 1:
        names = ", ".join(repr(value.name) for value in inputs) or "none"
        raise ValueError(f"{where}: the graph has {len(inputs)} inputs ({names}); a scratchcnn "
                         "model has one, the images (its weights are constants)")
    if len(graph.output) != 1:
        names = ", ".join(repr(value.name) for value in graph.output)
        raise ValueError(f"{where}: the graph has {len(graph.output)} outputs ({names}); a "
                         "scratchcnn model has one, the logits")
    image_input = inputs[0]
    tensor_type = image_input.type.tensor_type
    if tensor_type.HasField("shape") and len(tensor_type.shape.dim) != 4:
        raise ValueError(f"{where}: the input {image_input.name!r} has rank "
                         f"{len(tensor_type.shape.dim)}; scratchcnn models take (N, C, H, W) "
                         "images")
    return image_input


def _graph_dtype(image_input: Any, where: str) -> np.dtype:
    from onnx import TensorProto, helper

    elem_type = image_input.type.tensor_type.elem_type
    if elem_type == TensorProto.FLOAT:
        return np.dtype(np.float32)
    if elem_type == TensorProto.DOUBLE:
        return np.dtype(np.float64)
    name = helper.tensor_dtype_to_string(elem_type) if elem_type else "an unknown type"
    raise ValueError(f"{where}: the input {image_input.name!r} is {name}, not float32 or "
                     "float64; pass dtype='float32' or 'float64' (import-onnx: --dtype) to "
                     "convert the weights")


def _label(node: Any) -> str:
    return f"{node.name!r} ({node.op_type})" if node.name else \
        f"{node.op_type} (writing {node.output[0]!r})"


def _read_chain(graph: Any, constants: Mapping[str, np.ndarray], folded: set[int],
                input_name: str, where: str) -> list[_Layer]:
    """The layers along the one path of nodes from the image input to the output; a value used
    twice, a node off that path or an unused chain end is refused."""
    chain = [node for index, node in enumerate(graph.node) if index not in folded]
    consumers: dict[str, list[tuple[Any, int]]] = {}
    for node in chain:
        for position, name in enumerate(node.input):
            if name:
                consumers.setdefault(name, []).append((node, position))
    producers = {name: node for node in graph.node for name in node.output if name}
    output_name = graph.output[0].name
    reader = _NodeReader(constants, producers, where)
    layers, visited, current = [], [], input_name
    while True:
        users = consumers.get(current, [])
        if len(users) > 1 or (users and current == output_name):
            names = ", ".join(_label(node) for node, _ in users)
            also = "the graph output and " if current == output_name else ""
            raise ValueError(f"{where}: {current!r} feeds {also}{len(users)} nodes ({names}): "
                             "a branch; only a single chain of layers can be imported")
        if current == output_name:
            break
        if not users:
            raise ValueError(f"{where}: the chain of layers ends at {current!r}, which no node "
                             f"uses, before it reaches the output {output_name!r}; only a single "
                             "chain from input to output can be imported")
        node, position = users[0]
        if position != 0:
            raise ValueError(f"{where}: node {_label(node)} takes the layer input {current!r} "
                             f"as its input {position}, where it expects a constant")
        visited.append(node)
        layer = reader.read(node)
        if layer is not None:
            layers.append(layer)
        for extra in node.output[1:]:
            if extra and (extra in consumers or extra == output_name):
                raise ValueError(f"{where}: node {_label(node)}'s second output {extra!r} is "
                                 "used too: a branch; only a single chain of layers can be "
                                 "imported")
        current = node.output[0]
    stray = [node for node in chain if not any(node is seen for seen in visited)]
    if stray:
        raise ValueError(f"{where}: node {_label(stray[0])} is not on the chain from the input "
                         f"to the output; only a single chain of layers can be imported")
    return layers


class _NodeReader:
    """Reads one node of the chain as a layer (None for those that compute the identity in
    inference: Identity, Dropout), tracking the rank of the values along the chain."""

    def __init__(self, constants: Mapping[str, np.ndarray], producers: Mapping[str, Any],
                 where: str) -> None:
        self.constants, self.producers, self.where = constants, producers, where
        self.rank = 4

    def read(self, node: Any) -> _Layer | None:
        from onnx import helper

        if node.domain not in ("", "ai.onnx") or node.op_type not in SUPPORTED_OPS:
            op = f"{node.domain}:{node.op_type}" if node.domain else node.op_type
            raise ValueError(f"{self.where}: node {_label(node)} uses operator {op}, which "
                             f"scratchcnn cannot import (supported: {', '.join(SUPPORTED_OPS)})")
        self.node = node
        self.attributes = {attribute.name: helper.get_attribute_value(attribute)
                           for attribute in node.attribute}
        return getattr(self, f"_{node.op_type.lower()}")()

    def refuse(self, problem: str) -> ValueError:
        return ValueError(f"{self.where}: node {_label(self.node)} {problem}")

    def attribute(self, name: str, default: Any) -> Any:
        value = self.attributes.get(name, default)
        return value.decode() if isinstance(value, bytes) else value

    def constant(self, position: int, what: str, required: bool = True) -> np.ndarray | None:
        """The node's input ``position`` (its ``what``), which must be a constant."""
        name = self.node.input[position] if position < len(self.node.input) else ""
        if not name:
            if required:
                raise self.refuse(f"has no {what} input")
            return None
        if name in self.constants:
            return self.constants[name]
        producer = self.producers.get(name)
        source = f"computed by node {_label(producer)}" if producer else "a graph input"
        raise self.refuse(f"has a {what} {name!r} that is {source}, not a constant (an "
                          "initializer or Constant node); only constant weights can be imported")

    def expect(self, name: str, default: Any, allowed: tuple[Any, ...], advice: str) -> None:
        value = self.attribute(name, default)
        if value not in allowed:
            raise self.refuse(f"has {name}={value}; {advice}")

    def _geometry(self, kernel: tuple[int, ...]) -> tuple[tuple[int, int], tuple[int, ...]]:
        """(strides, pads as top, bottom, left, right) of a 2-D Conv or pool."""
        if self.rank != 4 or len(kernel) != 2:
            raise self.refuse(f"is {len(kernel)}-D; only 2-D (N, C, H, W) layers are supported")
        self.expect("auto_pad", "NOTSET", ("NOTSET", "VALID"),
                    "only explicit pads (auto_pad NOTSET) are supported")
        self.expect("dilations", [1, 1], ([1, 1],), "only dilations of 1 are supported")
        strides = tuple(self.attribute("strides", [1, 1]))
        pads = self.attribute("pads", [0, 0, 0, 0])
        if self.attribute("auto_pad", "NOTSET") == "VALID":
            pads = [0, 0, 0, 0]
        if len(strides) != 2 or len(pads) != 4:
            raise self.refuse(f"has strides {list(strides)} and pads {list(pads)}, not 2 and 4 "
                              "numbers for its 2-D kernel")
        top, left, bottom, right = pads
        return strides, (top, bottom, left, right)

    def _conv(self) -> _Layer:
        weight = self.constant(1, "weight")
        bias = self.constant(2, "bias", required=False)
        self.expect("group", 1, (1,), "only group=1 (a plain convolution) is supported")
        kernel = tuple(weight.shape[2:])
        if tuple(self.attribute("kernel_shape", kernel)) != kernel:
            raise self.refuse(f"has kernel_shape {self.attribute('kernel_shape', kernel)} but a "
                              f"weight of shape {weight.shape}")
        strides, pads = self._geometry(kernel)
        params = {"weight": weight} if bias is None else {"weight": weight, "bias": bias}
        signature = ("Conv2d", weight.shape[1], weight.shape[0], kernel, strides, pads, (1, 1),
                     bias is not None)
        return _Layer(signature, params, _label(self.node))

    def _batchnormalization(self) -> _Layer:
        if self.rank != 4:
            raise self.refuse(f"normalises a rank-{self.rank} value; only BatchNorm2d on "
                              "(N, C, H, W) is supported")
        self.expect("training_mode", 0, (0,), "only inference (training_mode=0) is supported")
        self.expect("spatial", 1, (1,), "only spatial=1 (one statistic per channel) is supported")
        names = ("weight", "bias", "running_mean", "running_var")
        params = {name: self.constant(position, name) for position, name in enumerate(names, 1)}
        channels = params["weight"].shape
        if any(value.ndim != 1 or value.shape != channels for value in params.values()):
            raise self.refuse("has scale, bias, mean and variance that are not vectors of one "
                              "length")
        signature = ("BatchNorm2d", channels[0], np.float32(self.attribute("epsilon", 1e-5)))
        return _Layer(signature, params, _label(self.node))

    def _relu(self) -> _Layer:
        return _Layer(("ReLU",), {}, _label(self.node))

    def _pool(self, kind: str) -> _Layer:
        self.expect("ceil_mode", 0, (0,), "only ceil_mode=0 is supported")
        kernel = tuple(self.attribute("kernel_shape", ()))
        strides, (top, bottom, left, right) = self._geometry(kernel)
        if top != bottom or left != right:
            raise self.refuse(f"pads unevenly ({[top, left, bottom, right]}), which "
                              f"{kind} cannot")
        padding = (top, left)
        if kind == "MaxPool2d":
            signature = (kind, kernel, strides, padding, (1, 1), False)
        else:  # without padding, count_include_pad changes nothing
            count_pad = bool(self.attribute("count_include_pad", 0)) or padding == (0, 0)
            signature = (kind, kernel, strides, padding, count_pad, False, None)
        return _Layer(signature, {}, _label(self.node))

    def _maxpool(self) -> _Layer:
        return self._pool("MaxPool2d")

    def _averagepool(self) -> _Layer:
        return self._pool("AvgPool2d")

    def _flatten(self) -> _Layer:
        axis = self.attribute("axis", 1)
        if axis % self.rank != 1:
            raise self.refuse(f"flattens from axis {axis}; only Flatten(axis=1), which keeps the "
                              "batch dimension, is supported")
        self.rank = 2
        return _Layer(("Flatten",), {}, _label(self.node))

    def _reshape(self) -> _Layer:
        shape = self.constant(1, "shape").tolist()
        self.expect("allowzero", 0, (0,), "only allowzero=0 is supported")
        # (N, -1) written as [0, -1] (0 copies N), [0, K] or [-1, K]: what flattening exporters
        # write; the architecture match then checks K against the next Linear.
        flattens = len(shape) == 2 and (shape == [0, -1] or (shape[0] in (0, -1) and shape[1] > 0))
        if self.rank != 4 or not flattens:
            raise self.refuse(f"reshapes to {shape}; only a Reshape that flattens (N, C, H, W) "
                              "images to (N, features) is supported")
        self.rank = 2
        return _Layer(("Flatten",), {}, _label(self.node))

    def _gemm(self) -> _Layer:
        if self.rank != 2:
            raise self.refuse(f"multiplies a rank-{self.rank} value; a Linear layer needs "
                              "(N, features): flatten first")
        for name, default in (("alpha", 1.0), ("beta", 1.0), ("transA", 0)):
            self.expect(name, default, (default,), f"only {name}={default} (a Linear layer) is "
                        "supported")
        matrix = self.constant(1, "weight")
        bias = self.constant(2, "bias", required=False)
        if matrix.ndim != 2:
            raise self.refuse(f"has a weight of shape {matrix.shape}, not a matrix")
        weight = matrix if self.attribute("transB", 0) else np.ascontiguousarray(matrix.T)
        params = {"weight": weight}
        if bias is not None:
            if bias.size != weight.shape[0] or bias.ndim > 2 or (bias.ndim == 2 and
                                                               bias.shape[0] != 1):
                raise self.refuse(f"has a bias of shape {bias.shape}, not ({weight.shape[0]},)")
            params["bias"] = bias.reshape(weight.shape[0])
        signature = ("Linear", weight.shape[1], weight.shape[0], bias is not None)
        return _Layer(signature, params, _label(self.node))

    def _identity(self) -> None:
        return None

    def _dropout(self) -> None:
        training = self.constant(2, "training_mode", required=False)
        if training is not None and bool(np.any(training)):
            raise self.refuse("is in training mode; only inference Dropout (the identity) is "
                              "supported")
        return None

    def _constant(self) -> None:  # a Constant on the chain would replace the images
        raise self.refuse("replaces the layer input with a constant")


def _signature(module: nn.Module) -> tuple[Any, ...]:
    """What a graph node must show to be ``module`` (see ``_NodeReader``)."""
    kind = type(module).__name__
    if isinstance(module, nn.Conv2d):
        return (kind, module.in_channels, module.out_channels, module.kernel_size, module.stride,
                module._pad, module.dilation, module.bias is not None)
    if isinstance(module, nn.BatchNorm2d):
        usual = module.affine and module.bias is not None and module.running_mean is not None
        return (kind, module.num_features, np.float32(module.eps), *(() if usual else ("?",)))
    if isinstance(module, nn.MaxPool2d):
        return (kind, module._kernel, module._stride, module._padding, module._dilation,
                module.ceil_mode)
    if isinstance(module, nn.AvgPool2d):
        count_pad = module.count_include_pad or module._padding == (0, 0)
        return (kind, module._kernel, module._stride, module._padding, count_pad,
                module.ceil_mode, module.divisor_override)
    if isinstance(module, nn.Flatten):
        plain = (module.start_dim, module.end_dim) == (1, -1)
        return (kind,) if plain else (kind, module.start_dim, module.end_dim)
    if isinstance(module, nn.Linear):
        return (kind, module.in_features, module.out_features, module.bias is not None)
    return (kind,)


def _relu_first(items: list[Any], kind: Any) -> list[Any]:
    """``items`` with every MaxPool2d directly followed by a ReLU swapped behind it: the two
    orders give equal values (max commutes with the monotone ReLU), so either order matches."""
    items = list(items)
    for index in range(len(items) - 1):
        if kind(items[index]) == "MaxPool2d" and kind(items[index + 1]) == "ReLU":
            items[index], items[index + 1] = items[index + 1], items[index]
    return items


def _state_dict(reference: nn.Module, keyed: list[tuple[str, nn.Module]], layers: list[_Layer],
                counters: Mapping[str, int], dtype: np.dtype, *, convert: bool,
                where: str) -> dict[str, np.ndarray]:
    """The architecture's state_dict filled from the graph's layers, in ``dtype``."""
    found: dict[str, np.ndarray] = {}
    for (key, _), layer in zip(keyed, layers, strict=True):
        for suffix, value in layer.params.items():
            if value.dtype.kind != "f":
                raise ValueError(f"{where}: node {layer.node} has a {suffix} of dtype "
                                 f"{value.dtype}, not floating point")
            if value.dtype != dtype and not convert:
                raise ValueError(f"{where}: node {layer.node} has a {suffix} of dtype "
                                 f"{value.dtype} in a {dtype} graph; pass dtype='float32' or "
                                 "'float64' (import-onnx: --dtype) to convert the weights")
            if not np.all(np.isfinite(value)):
                raise ValueError(f"{where}: node {layer.node} has NaN or infinite values in its "
                                 f"{suffix}")
            found[f"{key}.{suffix}"] = np.array(value, dtype=dtype)  # a copy that owns its memory
    state = {}
    for key, expected in reference.state_dict().items():
        if key.endswith(".num_batches_tracked"):
            state[key] = np.array(counters.get(key, 0), dtype=np.int64)
        else:  # the signatures matched, so every key is there with its shape
            state[key] = found[key]
            assert state[key].shape == expected.shape, key
    return state


def _props(model: Any) -> dict[str, str]:
    return {prop.key: prop.value for prop in model.metadata_props}


def _step_counters(model: Any, where: str) -> dict[str, int]:
    """BatchNorm's step counters, which to_onnx keeps in metadata (0 when absent, as PyTorch
    does for state_dicts older than the counter)."""
    raw = _props(model).get(STEP_COUNTERS_KEY)
    if raw is None:
        return {}
    try:
        counters = json.loads(raw)
    except ValueError:
        counters = None
    if not isinstance(counters, dict) or not all(
            isinstance(value, int) and not isinstance(value, bool) and value >= 0
            for value in counters.values()):
        raise ValueError(f"{where}: metadata {STEP_COUNTERS_KEY!r} is not a JSON object of "
                         "non-negative step counts")
    return counters


def _metadata(model: Any, where: str) -> dict[str, Any]:
    """The normalisation, dataset and classes recorded in metadata_props, checked."""
    props = _props(model)
    metadata: dict[str, Any] = {}
    for key in (MEAN_KEY, STD_KEY):
        if key in props:
            try:
                value = float(props[key])
            except ValueError:
                value = math.nan
            if not math.isfinite(value) or (key == STD_KEY and value <= 0):
                raise ValueError(f"{where}: metadata {key!r} is {props[key]!r}, not a finite "
                                 f"number{' above 0' if key == STD_KEY else ''}")
            metadata[key] = value
    if DATASET_KEY in props:
        metadata[DATASET_KEY] = props[DATASET_KEY]
    if CLASSES_KEY in props:
        try:
            classes = json.loads(props[CLASSES_KEY])
        except ValueError:
            classes = None
        if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
            raise ValueError(f"{where}: metadata {CLASSES_KEY!r} is not a JSON list of names")
        metadata[CLASSES_KEY] = classes
    return metadata


def _opset(model: Any) -> int:
    return next((entry.version for entry in model.opset_import
                 if entry.domain in ("", "ai.onnx")), 0)


def _check_input_size(reference: nn.Module, image_input: Any, name: str, where: str) -> None:
    """The input's fixed channels, height and width (if the graph gives them) must suit the
    architecture: a model of 28x28 images flattens to its Linear layer's size only at 28x28."""
    dims = image_input.type.tensor_type.shape.dim
    sizes = [dim.dim_value if dim.HasField("dim_value") else None for dim in dims][1:]
    if len(sizes) != 3 or None in sizes:
        return
    try:
        with nn.no_grad():
            reference.eval()(np.zeros((1, *sizes), dtype=next(reference.parameters()).dtype))
    except ValueError:
        raise ValueError(f"{where}: the input {image_input.name!r} has shape (N, "
                         f"{', '.join(map(str, sizes))}), which architecture {name!r} cannot "
                         "take") from None


def _describe(signature: tuple[Any, ...]) -> str:
    kind = signature[0]
    if kind in ("Conv2d", "Linear"):
        size = f", {signature[3][0]}x{signature[3][1]}" if kind == "Conv2d" else ""
        return f"{kind}({signature[1]}->{signature[2]}{size})"
    if kind == "BatchNorm2d":
        return f"{kind}({signature[1]})"
    if kind in ("MaxPool2d", "AvgPool2d"):
        return f"{kind}({signature[1][0]}x{signature[1][1]})"
    return kind


def _folded_batchnorm(signatures: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """``signatures`` as they look once each BatchNorm is folded into the Conv before it."""
    return [(*sig[:-1], True) if sig[0] == "Conv2d" else sig
            for sig in signatures if sig[0] != "BatchNorm2d"]


def _no_architecture(where: str, signatures: list[tuple[Any, ...]],
                     candidates: Mapping[str, list[tuple[Any, ...]]]) -> str:
    layers = ", ".join(map(_describe, signatures)) or "no layers"
    message = (f"{where}: its layers ({layers}) match no scratchcnn architecture; a checkpoint "
               f"records its model by name, so only {', '.join(candidates)} can be imported")
    folded = [name for name, sigs in candidates.items()
              if sigs != _folded_batchnorm(sigs) and _folded_batchnorm(sigs) == signatures]
    if folded:
        message += (f" (these are {folded[0]}'s with BatchNorm folded into the convolutions, "
                    "which torch.onnx.export does in eval mode: export with "
                    "do_constant_folding=False)")
    return message
