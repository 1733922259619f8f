"""What the MPI tests run in each rank (``mpiexec -n N python ddp_worker.py MODE OUT ...``), and,
imported by the tests, the one-process reference of the same training.

Modes: ``train OUT MODELS`` (each model trained with DistributedDataParallel, its weights saved per
rank), ``syncbn OUT`` (one SyncBatchNorm forward and backward on this rank's part), ``raise`` and
``kill`` (rank 1 fails while rank 0 waits; the job must end), ``collectives`` (every ReduceOp, and
a broadcast), ``barrier`` (the CPU time a rank spends waiting for a busy rank 0). The last argument
of every command is a marker the tests look for with pgrep.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np

from scratchcnn import distributed as dist
from scratchcnn import nn
from scratchcnn.data import BatchSampler, split_batch
from scratchcnn.models import build_model
from scratchcnn.optim import Adam

# 55 samples in batches of 16: 16, 16, 16, 7, split 6/5/5 and 3/2/2 on three ranks (uneven).
SAMPLES, BATCH, EPOCHS = 55, 16, 2


def training_data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    return rng.standard_normal((SAMPLES, 1, 28, 28)), rng.integers(0, 10, SAMPLES)


def train(model_name: str, distributed: bool) -> dict[str, np.ndarray]:
    """The weights after EPOCHS epochs of Adam in float64, Dropout off; with ``distributed``
    each rank trains on its part of every batch through DistributedDataParallel (and
    SyncBatchNorm), else one process on the whole batches."""
    model = build_model(model_name, dtype=np.float64, rng=0)
    for layer in model.modules():
        if isinstance(layer, nn.Dropout):
            layer.p = 0.0
    rank, world = 0, 1
    if distributed:
        rank, world = dist.get_rank(), dist.get_world_size()
        model = nn.parallel.DistributedDataParallel(
            nn.SyncBatchNorm.convert_sync_batchnorm(model))
    images, labels = training_data()
    loss_fn = nn.CrossEntropyLoss()
    optimizer = Adam(model.parameters(), lr=1e-3)
    sampler = BatchSampler(SAMPLES, BATCH, shuffle=True, seed=0)
    for epoch in range(EPOCHS):
        for batch in sampler.epoch(epoch):
            local = split_batch(batch, rank, world)
            optimizer.zero_grad()
            loss = loss_fn(model(images[local]), labels[local])
            model.backward(loss_fn.backward())
            optimizer.step()
    del loss
    bare = model.module if distributed else model
    return dict(bare.state_dict())


def syncbn_data() -> dict[str, np.ndarray]:
    """A batch of 13 (split 7/6 on two ranks), a grad_output, the layer's weight and bias."""
    rng = np.random.default_rng(2)
    return {"x": rng.standard_normal((13, 4, 5, 5)) * 3 + 1,
            "grad": rng.standard_normal((13, 4, 5, 5)),
            "weight": rng.standard_normal(4), "bias": rng.standard_normal(4)}


def syncbn_step(layer: nn.BatchNorm2d, x: np.ndarray, grad: np.ndarray) -> dict[str, np.ndarray]:
    data = syncbn_data()
    layer.weight.data[...] = data["weight"]
    layer.bias.data[...] = data["bias"]
    out = layer(x)
    grad_input = layer.backward(grad)
    return {"out": out, "grad_input": grad_input, "weight_grad": layer.weight.grad,
            "bias_grad": layer.bias.grad, "running_mean": layer.running_mean,
            "running_var": layer.running_var}


def main() -> None:
    mode = sys.argv[1]
    dist.init_process_group(backend="mpi")
    rank, world = dist.get_rank(), dist.get_world_size()
    if mode == "train":
        out = Path(sys.argv[2])
        for model_name in sys.argv[3].split(","):
            state = train(model_name, distributed=True)
            np.savez(out / f"{model_name}-rank{rank}.npz", **state)
    elif mode == "syncbn":
        data = syncbn_data()
        local = split_batch(np.arange(13), rank, world)
        layer = nn.SyncBatchNorm(4, dtype=np.float64)
        result = syncbn_step(layer, data["x"][local], data["grad"][local])
        np.savez(Path(sys.argv[2]) / f"syncbn-rank{rank}.npz", **result)
    elif mode == "collectives":
        # Rank r holds [r + 1, 10 - r]: every op's result, and rank 1's array broadcast.
        results = {}
        for op in dist.ReduceOp:
            for async_op in (False, True):
                array = np.array([rank + 1.0, 10.0 - rank])
                work = dist.all_reduce(array, op=op, async_op=async_op)
                if work is not None:
                    work.wait()
                results[f"{op.name}{'-async' * async_op}"] = array.tolist()
        array = np.full(3, float(rank))
        dist.broadcast(array, src=1)
        results["broadcast"] = array.tolist()
        print(f"rank {rank}", json.dumps(results), flush=True)
    elif mode == "barrier":
        # Rank 0 is busy for 2 s; the others report the CPU time their wait cost.
        if rank == 0:
            time.sleep(2.0)
        start = (time.perf_counter(), time.process_time())
        dist.barrier()
        print(f"rank {rank} waited {time.perf_counter() - start[0]:.2f} s using "
              f"{time.process_time() - start[1]:.3f} s of CPU", flush=True)
    elif mode in ("raise", "kill"):
        if rank == 1:
            time.sleep(0.5)  # rank 0 is waiting by then
            if mode == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise ValueError("rank 1 fails on purpose")
        if mode == "raise":
            dist.barrier()  # a polite wait
        else:
            dist.all_reduce(np.zeros(3))  # a busy one
        time.sleep(60)  # never reached in a working job: the test would time out
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
