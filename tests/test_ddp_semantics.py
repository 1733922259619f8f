"""DistributedDataParallel on 2 ranks against one process on the whole batch, for what a ported
torch DDP script does: a keyword input, no_sync around the forward only, a parameter no rank
uses, and ranks that built different models."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from scratchcnn.distributed import launch

pytest.importorskip("mpi4py")
SCRIPT = Path(__file__).parent / "mpi_scripts" / "ddp_semantics.py"


def run_two_ranks(mode: str) -> list[dict]:
    command, env = launch.mpiexec_command(2, [str(SCRIPT), mode], module=None)
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120,
                            check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    found = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    return sorted(found, key=lambda finding: finding["rank"])


def test_ddp_matches_one_process_for_keyword_input_no_sync_and_unused_parameters():
    for finding in run_two_ranks("train"):
        # A keyword input was counted as no samples: every gradient came out 0.
        assert finding["keyword"] < 1e-12, finding
        # A forward inside no_sync gives a backward that does not reduce (torch decides at the
        # forward); reducing there counted the first batch twice.
        assert finding["no_sync"] < 1e-12, finding
        # No rank used the head: its .grad stays None, as in one process, so no step moves it.
        assert finding["unused_grad_is_none"], finding


def test_ranks_with_different_models_are_refused_on_every_rank():
    errors = [finding["error"] for finding in run_two_ranks("mismatch")]
    assert len(errors) == 2
    assert all("the ranks' models differ" in error for error in errors)


@pytest.fixture
def one_process(monkeypatch):
    """A process group of one, as without mpiexec."""
    from scratchcnn import distributed as dist

    for name in (*launch.MPIEXEC_VARIABLES, launch.LAUNCH_MARKER):
        monkeypatch.delenv(name, raising=False)
    dist.init_process_group()
    yield
    dist.destroy_process_group()


def test_torchs_tuning_options_are_accepted_and_a_gpu_is_refused(one_process):
    from scratchcnn import nn

    model = nn.Sequential(nn.Linear(3, 2))
    nn.parallel.DistributedDataParallel(
        model, None, None, broadcast_buffers=False, bucket_cap_mb=25,
        find_unused_parameters=True, gradient_as_bucket_view=True, static_graph=True)
    with pytest.raises(ValueError, match=r"device_ids=\[0\], but scratchcnn runs on the CPU"):
        nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(3, 2)), device_ids=[0])
