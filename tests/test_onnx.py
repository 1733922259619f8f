"""ONNX export and import (``scratchcnn.formats.onnx``, ``export-onnx``, ``import-onnx``):
ONNX Runtime gives every architecture's logits as the NumPy model does, float64 graphs run in
ONNX's reference evaluator, a model survives NumPy -> ONNX -> NumPy bit for bit, the PyTorch
twin's own ONNX export imports to a model with the twin's outputs, and every kind of bad file is
one line, exit status 2 and no output file."""

from __future__ import annotations

import io
import re
import sys
import warnings

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from scratchcnn import nn  # noqa: E402
from scratchcnn.cli import main  # noqa: E402
from scratchcnn.formats.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from scratchcnn.formats.onnx import from_onnx, to_onnx  # noqa: E402
from scratchcnn.models import MODEL_NAMES, build_model  # noqa: E402
from test_cli_convert import run_error  # noqa: E402

MEAN, STD = 0.13, 0.31
TINY = ["--dataset", "mnist-sample", "--limit-test", "20"]


@pytest.fixture(scope="module")
def ort():
    return pytest.importorskip("onnxruntime")


def trained_like(name: str, dtype: str = "float32", seed: int = 0) -> nn.Sequential:
    """Architecture ``name`` in eval mode, with BatchNorm's affine parameters, running statistics
    and step counters moved away from their initial values (ones, zeros, 0) so that a mix-up of
    any two of them shows."""
    rng = np.random.default_rng(seed)
    model = build_model(name, dtype=dtype, rng=rng)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            size = module.num_features
            module.weight.data[...] = rng.uniform(0.5, 1.5, size)
            module.bias.data[...] = rng.normal(0, 0.2, size)
            module.running_mean[...] = rng.normal(0, 0.3, size)
            module.running_var[...] = rng.uniform(0.5, 2.0, size)
            module.num_batches_tracked[...] = rng.integers(1, 1000)
    return model.eval()


def numpy_logits(model: nn.Module, x: np.ndarray) -> np.ndarray:
    with nn.no_grad():
        return np.asarray(model(x))


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def images(batch: int, dtype: str = "float32", seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 1, 28, 28)).astype(dtype)


def assert_same_state(actual: dict, expected: dict) -> None:
    assert list(actual) == list(expected)
    for key, value in expected.items():
        assert actual[key].dtype == value.dtype, key
        assert actual[key].shape == value.shape, key
        assert np.array_equal(actual[key], value), key


# -- export: ONNX Runtime against the NumPy model ----------------------------------------------


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_onnxruntime_gives_the_numpy_models_logits(name, ort):
    model = trained_like(name)
    proto = to_onnx(model, mean=MEAN, std=STD)
    onnx.checker.check_model(proto, full_check=True)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    # bn-cnn is ~8x simple-cnn's work per image: a smaller large batch keeps the test quick.
    for batch in (1, 7, 40 if name == "bn-cnn" else 257):
        x = images(batch, seed=batch)
        (logits,) = session.run(None, {"input": x})
        assert relative_error(logits, numpy_logits(model, x)) < 1e-5, batch


def test_the_graph_has_a_dynamic_batch_and_the_normalisation_as_metadata():
    proto = to_onnx(trained_like("simple-cnn"), mean=MEAN, std=STD,
                    metadata={"dataset": "mnist"})
    (image_input,), (output,) = proto.graph.input, proto.graph.output
    dims = image_input.type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [1, 28, 28]
    assert output.type.tensor_type.shape.dim[0].dim_param == "batch"
    assert output.type.tensor_type.shape.dim[1].dim_value == 10
    props = {prop.key: prop.value for prop in proto.metadata_props}
    assert float(props["mean"]) == MEAN and float(props["std"]) == STD
    assert props["dataset"] == "mnist"
    # The graph does not normalise (the logits test above feeds it the NumPy model's inputs).
    assert [node.op_type for node in proto.graph.node] == [
        "Conv", "Relu", "MaxPool", "Conv", "Relu", "MaxPool", "Flatten", "Gemm", "Relu", "Gemm"]
    gemm = proto.graph.node[-1]
    assert helper.get_attribute_value(gemm.attribute[0]) == 1 and gemm.attribute[0].name == "transB"


def test_bn_cnn_exports_without_dropout_and_with_its_batchnorm():
    ops = [node.op_type for node in to_onnx(trained_like("bn-cnn")).graph.node]
    assert "Dropout" not in ops and ops.count("BatchNormalization") == 4
    assert ops.count("Gemm") == 2


def test_export_leaves_a_training_model_as_it_was_and_exports_its_eval_mode(ort):
    model = trained_like("bn-cnn").train()
    logits = model(images(2, seed=5))  # a training step under way: backward still to come
    before = {key: value.copy() for key, value in model.state_dict().items()}
    proto = to_onnx(model)
    assert all(module.training for module in model.modules())
    assert_same_state(model.state_dict(), before)
    model.backward(np.ones_like(logits))  # the layers' caches survived the export
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    x = images(3)
    (logits,) = session.run(None, {"input": x})
    assert relative_error(logits, numpy_logits(model.eval(), x)) < 1e-5


@pytest.mark.parametrize("name", ["simple-cnn", "bn-cnn"])
def test_float64_graphs_give_the_numpy_models_logits(name):
    # ONNX Runtime's CPU provider has no double Conv kernel: ONNX's reference evaluator runs
    # the float64 graph instead.
    from onnx.reference import ReferenceEvaluator

    model = trained_like(name, "float64")
    proto = to_onnx(model)
    assert proto.graph.input[0].type.tensor_type.elem_type == TensorProto.DOUBLE
    assert all(init.data_type == TensorProto.DOUBLE for init in proto.graph.initializer)
    x = images(3, "float64")
    (logits,) = ReferenceEvaluator(proto).run(None, {"input": x})
    assert relative_error(logits, numpy_logits(model, x)) < 1e-12


def test_strides_paddings_and_every_pooling_option_match_onnxruntime(ort):
    rng = np.random.default_rng(3)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, stride=2, padding=1, bias=False, rng=rng), nn.BatchNorm2d(4),
        nn.MaxPool2d(3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(4, 6, (3, 1), padding="same", rng=rng), nn.AvgPool2d(2, ceil_mode=True),
        nn.Conv2d(6, 6, 1, rng=rng), nn.AvgPool2d(3, stride=1, padding=1,
                                                  count_include_pad=False),
        nn.MaxPool2d(2, dilation=2), nn.Flatten(), nn.Dropout(0.5), nn.Linear(6, 5, rng=rng),
    ).eval()
    proto = to_onnx(model, input_shape=(2, 25, 25))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    x = rng.standard_normal((5, 2, 25, 25)).astype(np.float32)
    (logits,) = session.run(None, {"input": x})
    assert relative_error(logits, numpy_logits(model, x)) < 1e-5


@pytest.mark.parametrize("model, message", [
    (nn.Sequential(nn.Conv2d(1, 2, 3), nn.Linear(26, 3)), "only a Linear on (N, features)"),
    (nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(2)), "only Flatten(start_dim=1, end_dim=-1)"),
    (nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2, track_running_stats=False)),
     "tracks no running statistics"),
    (nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(5, 3)), "does not run on inputs"),
    (nn.Sequential(nn.Conv2d(1, 2, 3), nn.AvgPool2d(2, divisor_override=3)), "divisor_override"),
    (nn.Sequential(nn.Conv2d(1, 2, 3), nn.Sequential(nn.CrossEntropyLoss())), "no ONNX export"),
    (nn.Conv2d(1, 2, 3), "expected a Sequential"),
])
def test_export_refuses_what_onnx_cannot_hold_in_one_line(model, message):
    with pytest.raises(ValueError) as error:
        to_onnx(model)
    assert message in str(error.value) and "\n" not in str(error.value)


# -- import: round trips -----------------------------------------------------------------------


@pytest.mark.parametrize("name, dtype", [*((name, "float32") for name in MODEL_NAMES),
                                         ("bn-cnn", "float64")])
def test_numpy_to_onnx_and_back_is_bit_identical(name, dtype):
    model = trained_like(name, dtype)
    imported = from_onnx(to_onnx(model, mean=MEAN, std=STD))
    assert imported.architecture == name
    assert_same_state(imported.state_dict, model.state_dict())
    assert imported.metadata["mean"] == MEAN and imported.metadata["std"] == STD
    assert imported.metadata["dtype"] == dtype


def test_a_model_declared_pool_first_is_the_architecture_it_equals():
    # simple-cnn with each MaxPool2d before its ReLU: the same function, the same state_dict keys.
    source = trained_like("simple-cnn")
    swapped = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.MaxPool2d(2), nn.ReLU(),
                            nn.Conv2d(16, 32, 3, padding=1), nn.MaxPool2d(2), nn.ReLU(),
                            nn.Flatten(), nn.Linear(32 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10))
    swapped.load_state_dict(source.state_dict())
    imported = from_onnx(to_onnx(swapped))
    assert imported.architecture == "simple-cnn"
    assert_same_state(imported.state_dict, source.state_dict())


def torch_export(torch, twin, **options) -> bytes:
    """``torch.onnx.export`` of ``twin`` with a dynamic batch, by the TorchScript exporter (the
    dynamo one needs onnxscript)."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(twin, (torch.zeros(2, 1, 28, 28, dtype=next(twin.parameters()).dtype),),
                          buffer, dynamo=False, input_names=["images"], output_names=["logits"],
                          dynamic_axes={"images": {0: "n"}, "logits": {0: "n"}}, **options)
    return buffer.getvalue()


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_pytorch_twins_onnx_export_imports_with_the_twins_outputs(name, torch, tmp_path):
    from scratchcnn.reference.torch_models import torch_twin

    twin = torch_twin(trained_like(name), name).eval()
    # In eval mode the exporter folds BatchNorm into the convolution unless told not to.
    path = tmp_path / "twin.onnx"
    path.write_bytes(torch_export(torch, twin, do_constant_folding=name != "bn-cnn"))
    imported = from_onnx(path)
    assert imported.architecture == name
    x = images(7)
    with torch.no_grad():
        expected = twin(torch.from_numpy(x)).numpy()
    assert relative_error(numpy_logits(imported.build_model(), x), expected) < 1e-5
    # The weights are the twin's, bit for bit (the BatchNorm counters are not in the graph).
    for key, value in twin.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert np.array_equal(imported.state_dict[key], value.numpy()), key


def test_pytorch_float64_export_imports_as_float64(torch):
    from scratchcnn.reference.torch_models import torch_twin

    twin = torch_twin(trained_like("lenet5", "float64"), "lenet5").eval()
    imported = from_onnx(onnx.load_from_string(torch_export(torch, twin)))
    assert imported.metadata["dtype"] == "float64"
    x = images(3, "float64")
    with torch.no_grad():
        expected = twin(torch.from_numpy(x)).numpy()
    assert relative_error(numpy_logits(imported.build_model(), x), expected) < 1e-12


def test_an_old_opset_with_initializers_listed_as_inputs_imports(torch):
    from scratchcnn.reference.torch_models import torch_twin

    twin = torch_twin(trained_like("bn-cnn"), "bn-cnn").eval()
    proto = onnx.load_from_string(torch_export(torch, twin, opset_version=9,
                                               keep_initializers_as_inputs=True,
                                               do_constant_folding=False))
    assert len(proto.graph.input) > 1 and proto.opset_import[0].version == 9
    imported = from_onnx(proto)
    x = images(3)
    with torch.no_grad():
        expected = twin(torch.from_numpy(x)).numpy()
    assert relative_error(numpy_logits(imported.build_model(), x), expected) < 1e-5


@pytest.mark.parametrize("shape, accepted", [
    ([0, -1], True), ([-1, 8 * 14 * 14], True), ([0, 8 * 14 * 14], True), ([0, 8, -1], False),
    ([-1, 2, 8 * 7 * 14], False),
])
def test_a_reshape_that_flattens_stands_for_flatten(shape, accepted):
    model = trained_like("tiny-cnn")
    proto = to_onnx(model)
    flatten = next(node for node in proto.graph.node if node.op_type == "Flatten")
    del flatten.attribute[:]
    flatten.op_type = "Reshape"
    proto.graph.node.insert(0, helper.make_node(
        "Constant", [], ["shape"], value=numpy_helper.from_array(np.array(shape, np.int64))))
    flatten.input.append("shape")
    if accepted:
        assert_same_state(from_onnx(proto).state_dict, model.state_dict())
    else:
        with pytest.raises(ValueError, match=r"reshapes to .* only a Reshape that flattens"):
            from_onnx(proto)


def test_pytorchs_folded_batchnorm_is_refused_naming_the_export_option(torch):
    from scratchcnn.reference.torch_models import torch_twin

    twin = torch_twin(trained_like("bn-cnn"), "bn-cnn").eval()
    with pytest.raises(ValueError, match=r"BatchNorm folded.*do_constant_folding=False"):
        from_onnx(onnx.load_from_string(torch_export(torch, twin)))


def test_dtype_converts_the_weights():
    model = trained_like("tiny-cnn", "float64")
    imported = from_onnx(to_onnx(model), dtype="float32")
    assert imported.metadata["dtype"] == "float32"
    for key, value in model.state_dict().items():
        expected = value.astype(np.float32) if value.dtype.kind == "f" else value
        assert np.array_equal(imported.state_dict[key], expected)
        assert imported.state_dict[key].dtype == expected.dtype


# -- import: graphs that are refused -----------------------------------------------------------


def exported(name: str = "tiny-cnn") -> onnx.ModelProto:
    return to_onnx(trained_like(name))


def replace_op(proto, old: str, new: str):
    next(node for node in proto.graph.node if node.op_type == old).op_type = new
    return proto


def with_branch(proto):
    # A second Relu reading the first Conv's output: a value used twice.
    conv = next(node for node in proto.graph.node if node.op_type == "Conv")
    proto.graph.node.append(helper.make_node("Relu", [conv.output[0]], ["side"], name="side"))
    return proto


def with_computed_weight(proto):
    conv = next(node for node in proto.graph.node if node.op_type == "Conv")
    proto.graph.initializer.append(numpy_helper.from_array(np.float32(2.0), "two"))
    proto.graph.node.insert(0, helper.make_node("Mul", [conv.input[1], "two"], ["doubled"],
                                                name="double"))
    conv.input[1] = "doubled"
    return proto


def with_second_input(proto):
    proto.graph.input.append(helper.make_tensor_value_info("extra", TensorProto.FLOAT, [1]))
    return proto


def with_attribute(op: str, **attributes):
    def edit(proto):
        node = next(node for node in proto.graph.node if node.op_type == op)
        kept = [a for a in node.attribute if a.name not in attributes]
        del node.attribute[:]
        node.attribute.extend([*kept, *(helper.make_attribute(name, value)
                                        for name, value in attributes.items())])
        return proto
    return edit


def with_training_dropout(proto):
    gemm = next(node for node in proto.graph.node if node.op_type == "Gemm")
    proto.graph.initializer.append(numpy_helper.from_array(np.array(True), "train"))
    proto.graph.node.insert(len(proto.graph.node) - 1, helper.make_node(
        "Dropout", [gemm.input[0], "", "train"], ["dropped"], name="drop"))
    gemm.input[0] = "dropped"
    return proto


REFUSED = {
    "unsupported operator": (lambda p: replace_op(p, "Relu", "Sigmoid"),
                             r"node '1' \(Sigmoid\) uses operator Sigmoid"),
    "branch": (with_branch, r"feeds 2 nodes .*a branch"),
    "computed weight": (with_computed_weight,
                        r"weight 'doubled' that is computed by node 'double' \(Mul\), not a "
                        r"constant"),
    "second input": (with_second_input, r"the graph has 2 inputs \('input', 'extra'\)"),
    "group": (with_attribute("Conv", group=2), r"group=2; only group=1"),
    "dilations": (with_attribute("Conv", dilations=[2, 2]), r"dilations=\[2, 2\]"),
    "auto_pad": (with_attribute("Conv", auto_pad="SAME_UPPER"), r"auto_pad=SAME_UPPER"),
    "ceil_mode": (with_attribute("MaxPool", ceil_mode=1), r"ceil_mode=1"),
    "transA": (with_attribute("Gemm", transA=1), r"transA=1"),
    "training dropout": (with_training_dropout, r"'drop' \(Dropout\) is in training mode"),
    "other architecture": (with_attribute("MaxPool", kernel_shape=[4, 4], strides=[4, 4]),
                           r"match no scratchcnn architecture"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_graphs_outside_the_supported_chain_are_refused_in_one_line(case):
    edit, pattern = REFUSED[case]
    with pytest.raises(ValueError) as error:
        from_onnx(edit(exported()))
    message = str(error.value)
    assert re.search(pattern, message), message
    assert "\n" not in message


def test_external_data_is_refused_without_being_read(tmp_path):
    path = tmp_path / "model.onnx"
    onnx.save_model(exported(), path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.bin", size_threshold=0)
    (tmp_path / "weights.bin").unlink()  # were it read, the error would be a missing file
    with pytest.raises(ValueError, match="external data file, which scratchcnn never reads"):
        from_onnx(path)


# -- the command line --------------------------------------------------------------------------


def make_checkpoint(path, name: str = "bn-cnn", dtype: str = "float64"):
    model = trained_like(name, dtype)
    metadata = {"architecture": name, "dataset": "mnist-sample",
                "classes": [str(i) for i in range(10)],
                "normalization": {"mean": MEAN, "std": STD}, "dtype": dtype, "epoch": 3}
    return save_checkpoint(path, model.state_dict(), metadata), model


def test_export_and_import_on_the_command_line_round_trip(tmp_path, capsys, ort):
    source, model = make_checkpoint(tmp_path / "bn.npz", dtype="float32")
    onnx_path, back = tmp_path / "bn.onnx", tmp_path / "back.npz"
    assert main(["export-onnx", str(source), str(onnx_path)]) == 0
    assert main(["import-onnx", str(onnx_path), str(back)]) == 0
    assert "bn-cnn checkpoint" in capsys.readouterr().out
    checkpoint = load_checkpoint(back)
    assert checkpoint.architecture == "bn-cnn" and checkpoint.epoch == 0
    assert (checkpoint.mean, checkpoint.std) == (MEAN, STD)
    assert checkpoint.metadata["dataset"] == "mnist-sample" and checkpoint.dtype == np.float32
    assert "optimizer" not in checkpoint.metadata
    assert_same_state(checkpoint.model_state, model.state_dict())
    # The file ONNX Runtime reads gives the checkpoint's logits.
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    x = images(5)
    (logits,) = session.run(None, {"input": x})
    assert relative_error(logits, numpy_logits(checkpoint.build_model().eval(), x)) < 1e-5
    assert session.get_modelmeta().custom_metadata_map["mean"] == str(MEAN)
    # Options override the file's metadata; an existing output is replaced.
    assert main(["import-onnx", str(onnx_path), str(back), "--dataset", "mnist", "--mean", "0.5",
                 "--std", "0.25", "--dtype", "float64"]) == 0
    checkpoint = load_checkpoint(back)
    assert (checkpoint.mean, checkpoint.std, checkpoint.metadata["dataset"]) == (0.5, 0.25,
                                                                                 "mnist")
    assert checkpoint.dtype == np.float64
    assert sorted(p.name for p in tmp_path.iterdir()) == ["back.npz", "bn.npz", "bn.onnx"]


def test_an_imported_checkpoint_evaluates_as_the_original(tmp_path, capsys):
    source, _ = make_checkpoint(tmp_path / "lenet.npz", "lenet5")
    assert main(["export-onnx", str(source), str(tmp_path / "m.onnx")]) == 0
    assert main(["import-onnx", str(tmp_path / "m.onnx"), str(tmp_path / "back.npz")]) == 0
    reports = []
    for path in (source, tmp_path / "back.npz"):
        capsys.readouterr()
        assert main(["evaluate", str(path), *TINY]) == 0
        reports.append([re.sub(r"\s+time .*", "", line)
                        for line in capsys.readouterr().out.splitlines()[1:]])
    assert reports[0] == reports[1] and reports[0]


def test_a_torch_export_without_metadata_imports_with_mnists_statistics(torch, tmp_path):
    from scratchcnn.data import MNIST_MEAN, MNIST_STD
    from scratchcnn.reference.torch_models import torch_twin

    path = tmp_path / "twin.onnx"
    path.write_bytes(torch_export(torch, torch_twin(trained_like("tiny-cnn"), "tiny-cnn")))
    assert main(["import-onnx", str(path), str(tmp_path / "out.npz")]) == 0
    checkpoint = load_checkpoint(tmp_path / "out.npz")
    assert (checkpoint.mean, checkpoint.std) == (MNIST_MEAN, MNIST_STD)
    assert checkpoint.metadata["dataset"] == "mnist" and checkpoint.architecture == "tiny-cnn"


def bad_files(tmp_path):
    good = exported().SerializeToString()
    yield "text", b"this is not an ONNX model\n", "does not parse"
    yield "empty", b"", "the file is empty"
    yield "truncated", good[: len(good) // 2], "does not parse"
    yield "checkpoint", (tmp_path / "c.npz").read_bytes(), "does not parse"
    yield "unsupported op", replace_op(exported(), "Relu", "Tanh").SerializeToString(), "Tanh"
    yield "branch", with_branch(exported()).SerializeToString(), "a branch"
    yield "computed weight", with_computed_weight(exported()).SerializeToString(), "not a constant"
    yield "invalid", with_attribute("Conv", group="x")(exported()).SerializeToString(), "valid"


def test_bad_onnx_files_are_one_line_exit_2_and_no_output(tmp_path, capsys):
    make_checkpoint(tmp_path / "c.npz", "tiny-cnn")
    external = tmp_path / "external.onnx"
    onnx.save_model(exported(), external, save_as_external_data=True, location="w.bin",
                    size_threshold=0)
    cases = [*bad_files(tmp_path), ("external", None, "external data")]
    for case, data, expected in cases:
        path = external if data is None else tmp_path / f"{case}.onnx"
        if data is not None:
            path.write_bytes(data)
        before = sorted(p.name for p in tmp_path.iterdir())
        err = run_error(capsys, "import-onnx", str(path), str(tmp_path / "out.npz"))
        assert expected in err and str(path) in err, (case, err)
        assert sorted(p.name for p in tmp_path.iterdir()) == before, case


@pytest.mark.parametrize("argv, expected", [
    (["import-onnx", "{onnx}", "{dir}/out.npz", "--mean", "40"], "[0, 1] scale"),
    (["import-onnx", "{onnx}", "{dir}/out.npz", "--std", "0"], "finite positive"),
    (["import-onnx", "{onnx}", "{dir}/out.npz", "--dataset", "cifar"], "unknown dataset"),
    (["import-onnx", "{dir}/missing.onnx", "{dir}/out.npz"], "no such file"),
    (["import-onnx", "{onnx}", "{onnx}"], "is the input ONNX file itself"),
    (["import-onnx", "{onnx}", "{dir}"], "is a directory"),
    (["export-onnx", "{ckpt}", "{ckpt}"], "is the input checkpoint itself"),
    (["export-onnx", "{onnx}", "{dir}/out.onnx"], "not a checkpoint"),
])
def test_bad_arguments_are_one_line_and_write_nothing(argv, expected, tmp_path, capsys):
    ckpt, _ = make_checkpoint(tmp_path / "c.npz", "tiny-cnn")
    onnx_path = tmp_path / "m.onnx"
    onnx_path.write_bytes(exported().SerializeToString())
    before = sorted(p.name for p in tmp_path.iterdir())
    argv = [arg.format(onnx=onnx_path, dir=tmp_path, ckpt=ckpt) for arg in argv]
    err = run_error(capsys, *argv)
    assert expected in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert load_checkpoint(ckpt).architecture == "tiny-cnn"  # the input is intact


@pytest.mark.parametrize("command", ["export-onnx", "import-onnx"])
def test_missing_onnx_is_named_before_any_work(command, tmp_path, capsys, monkeypatch):
    ckpt, _ = make_checkpoint(tmp_path / "c.npz", "tiny-cnn")
    monkeypatch.setitem(sys.modules, "onnx", None)
    err = run_error(capsys, command, str(ckpt), str(tmp_path / "out"))
    assert "pip install 'scratchcnn[onnx]'" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.npz"]
