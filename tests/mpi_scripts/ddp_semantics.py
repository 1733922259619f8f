"""Run as N ranks by tests/test_ddp_semantics.py: DistributedDataParallel against one process on
the whole batch for what a ported torch script does (keyword input, no_sync decided by the
forward, a parameter no rank uses). Every rank prints one JSON line of its findings."""

import json
import sys

import numpy as np

from scratchcnn import distributed as dist
from scratchcnn import nn
from scratchcnn.data import split_batch


class TwoHeads(nn.Module):
    """A model with a head that forward never uses (as a ported model with a spare branch)."""

    def __init__(self, features: int) -> None:
        super().__init__()
        rng = np.random.default_rng(0)
        self.body = nn.Linear(4, 3, dtype=np.float64, rng=rng)
        self.unused = nn.Linear(features, 2, dtype=np.float64, rng=rng)

    def forward(self, x: np.ndarray) -> np.ndarray:
        return self.body(x)

    def backward(self, grad_output: np.ndarray) -> np.ndarray:
        return self.body.backward(grad_output)


def gradients(model: nn.Module) -> dict[str, np.ndarray | None]:
    return {name: None if param.grad is None else param.grad.copy()
            for name, param in model.named_parameters()}


def step(model, loss_fn, x, y, **kwargs):
    loss_fn(model(x=x) if kwargs.get("keyword") else model(x), y)
    model.backward(loss_fn.backward())


def largest_difference(ours, want) -> float:
    return max(float(np.max(np.abs(ours[name] - want[name]))) for name in want
               if want[name] is not None)


def main(mode: str) -> None:
    dist.init_process_group()
    rank, world = dist.get_rank(), dist.get_world_size()
    rng = np.random.default_rng(1)
    batches = [(rng.standard_normal((7, 4)), rng.integers(0, 3, 7)) for _ in range(2)]
    loss_fn = nn.CrossEntropyLoss()
    if mode == "mismatch":
        try:
            nn.parallel.DistributedDataParallel(TwoHeads(features=5 + rank))
        except ValueError as error:
            print(json.dumps({"rank": rank, "error": str(error)}), flush=True)
        dist.destroy_process_group()
        return

    findings = {"rank": rank}
    reference, ddp = TwoHeads(features=5), nn.parallel.DistributedDataParallel(TwoHeads(5))
    # A keyword input: the batch must still be counted.
    x, y = batches[0]
    step(reference, loss_fn, x, y)
    part = split_batch(np.arange(7), rank, world)
    step(ddp, loss_fn, x[part], y[part], keyword=True)
    findings["keyword"] = largest_difference(gradients(ddp.module), gradients(reference))
    findings["unused_grad_is_none"] = ddp.module.unused.weight.grad is None
    # no_sync as torch documents it: the forward inside, the backward just after it.
    reference.zero_grad()
    ddp.zero_grad()
    for x, y in batches:
        step(reference, loss_fn, x, y)
    x, y = batches[0]
    with ddp.no_sync():
        output = ddp(x[part])
    loss_fn(output, y[part])
    ddp.backward(loss_fn.backward())  # outside no_sync, but its forward was inside: no sync
    x, y = batches[1]
    step(ddp, loss_fn, x[part], y[part])  # synchronised: both batches' gradients
    findings["no_sync"] = largest_difference(gradients(ddp.module), gradients(reference))
    print(json.dumps(findings), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
