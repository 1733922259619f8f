"""The README's Python example runs as written and its PyTorch twin agrees with it."""

import re
from pathlib import Path

import numpy as np

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_api_example_runs_and_matches_its_torch_twin(torch):
    text = README.read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "the README lost its API example"
    namespace: dict = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)
    from scratchcnn.nn import no_grad

    images = namespace["images"]
    with no_grad():
        ours = namespace["model"](images)
    with torch.no_grad():
        theirs = namespace["twin"](torch.from_numpy(np.ascontiguousarray(images))).numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)
