"""notebooks/cnn_from_scratch.ipynb: it runs top to bottom (in small mode, on a temporary copy)
and shows what it claims; the stored copy holds a full run's outputs at a reasonable size."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "cnn_from_scratch.ipynb"
MAX_STORED_BYTES = 1_500_000


def _texts(cell: dict) -> str:
    """Everything a code cell printed or displayed as text (streams, Markdown, plain text)."""
    parts = []
    for output in cell.get("outputs", []):
        if output["output_type"] == "stream":
            parts.append("".join(output["text"]))
        for kind in ("text/markdown", "text/plain"):
            value = output.get("data", {}).get(kind)
            if value is not None:
                parts.append("".join(value))
    return "\n".join(parts)


def _count_images(cells: list[dict]) -> int:
    return sum("image/png" in output.get("data", {})
               for cell in cells for output in cell.get("outputs", []))


def _check_outputs(cells: list[dict]) -> str:
    """Assert the outputs every run must have; returns all their text."""
    code = [cell for cell in cells if cell["cell_type"] == "code"]
    errors = [output for cell in code for output in cell.get("outputs", [])
              if output["output_type"] == "error"]
    assert not errors, f"cells raised: {[e['ename'] + ': ' + e['evalue'] for e in errors]}"
    counts = [cell.get("execution_count") for cell in code]
    assert counts == list(range(1, len(code) + 1)), f"not run top to bottom once: {counts}"
    text = "\n".join(_texts(cell) for cell in code)
    assert "loops and vectorised layers agree" in text
    assert "gradient check of MaxPool2d " in text
    for line in text.splitlines():
        if line.startswith("gradient check of NeverBackwardMaxPool2d"):
            assert "FAILS" in line, line
        if line.startswith("gradient check of MaxPool2d "):
            assert "passes" in line, line
    assert "NumPy test accuracy" in text and "PyTorch test accuracy" in text
    assert "first convolution's filters changed during training: False" in text
    # Sample digits, loss curves, confusion matrix, filters, feature maps.
    assert _count_images(cells) >= 5
    return text


def test_stored_notebook_holds_a_full_run() -> None:
    assert NOTEBOOK.stat().st_size < MAX_STORED_BYTES
    notebook = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    text = _check_outputs(notebook["cells"])
    assert "FULL run" in text and "SMALL run" not in text
    assert "FALLING BACK" not in text, "the stored outputs should come from full MNIST"


@pytest.mark.slow
def test_notebook_runs_in_small_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    pytest.importorskip("matplotlib")
    pytest.importorskip("torch")
    copy = tmp_path / NOTEBOOK.name
    shutil.copyfile(NOTEBOOK, copy)
    # The kernel inherits this environment: small mode, and no dataset download attempted.
    monkeypatch.setenv("SCRATCHCNN_NOTEBOOK_SMALL", "1")
    # Left unset, the kernel draws figures inline (as PNG outputs); "Agg" would draw none.
    monkeypatch.delenv("MPLBACKEND", raising=False)
    notebook = nbformat.read(copy, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    client = nbclient.NotebookClient(notebook, timeout=300, startup_timeout=120,
                                     kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    nbformat.write(notebook, copy)
    text = _check_outputs(json.loads(copy.read_text(encoding="utf-8"))["cells"])
    assert "SMALL run" in text
