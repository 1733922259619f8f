"""The package's layering, read from the source: every ``import`` of a scratchcnn module (lazy
ones inside functions included) goes to the same layer or a lower one, so there are no import
circles between packages; and the engine imports nothing outside NumPy and the standard library."""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "scratchcnn"

# Lowest first. A module may import its own layer and the ones before it, never a later one.
LAYERS = (
    ("__init__", "random", "atomic"),
    ("distributed",),  # mpi4py, imported lazily; nothing of ours
    ("nn",),
    ("optim",),
    ("models",),
    ("data",),
    ("formats",),  # checkpoints, ONNX, safetensors
    ("reference",),  # the PyTorch side
    ("harness",),
    ("serve",),
    ("cli", "__main__"),
)
LAYER_OF = {name: depth for depth, names in enumerate(LAYERS) for name in names}

ENGINE = ("nn", "optim", "models", "random")
# What the engine may import besides itself: NumPy, the standard library, and (nn.parallel,
# nn.sync_batchnorm) scratchcnn.distributed.
ENGINE_ALLOWED = {"numpy", "scratchcnn"}


def unit_of(path: Path) -> str:
    """The top-level package or module of scratchcnn that ``path`` belongs to."""
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def imported_modules(path: Path) -> Iterator[tuple[int, str]]:
    """(line, module) for every absolute import in the file, wherever it sits."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module
            for alias in node.names:  # from scratchcnn import nn
                yield node.lineno, f"{node.module}.{alias.name}"


def scratchcnn_unit(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "scratchcnn" or len(parts) == 1:
        return None
    return parts[1] if parts[1] in LAYER_OF else None  # e.g. scratchcnn.__version__


SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_every_unit_has_a_layer():
    units = {unit_of(path) for path in SOURCES}
    assert units <= set(LAYER_OF), f"add {sorted(units - set(LAYER_OF))} to LAYERS"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_go_down_the_layers(path):
    own = unit_of(path)
    upward = [
        f"line {line}: {module}"
        for line, module in imported_modules(path)
        if (target := scratchcnn_unit(module)) is not None and LAYER_OF[target] > LAYER_OF[own]
    ]
    assert not upward, f"{own} imports a higher layer: {upward}"


@pytest.mark.parametrize(
    "path", [p for p in SOURCES if unit_of(p) in ENGINE], ids=lambda p: str(p.relative_to(PACKAGE)))
def test_the_engine_imports_numpy_and_the_standard_library_only(path):
    foreign = [
        f"line {line}: {module}"
        for line, module in imported_modules(path)
        if (top := module.split(".")[0]) not in ENGINE_ALLOWED
        and top not in sys.stdlib_module_names and top != "__future__"
    ]
    assert not foreign, foreign
    ours = {scratchcnn_unit(module) for _, module in imported_modules(path)} - {None}
    assert ours <= {*ENGINE, "__init__", "distributed"}, ours


def test_the_layer_check_sees_an_upward_import(tmp_path):
    """The check itself: a lazy import of the harness inside an engine function is caught."""
    source = tmp_path / "layer.py"
    source.write_text("def f():\n    from scratchcnn.harness import bench\n", encoding="utf-8")
    found = [module for _, module in imported_modules(source)]
    assert "scratchcnn.harness.bench" in found
    assert LAYER_OF[scratchcnn_unit("scratchcnn.harness.bench")] > LAYER_OF["nn"]
