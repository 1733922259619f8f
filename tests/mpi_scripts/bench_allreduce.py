"""Does overlapping the gradient all-reduce with backward pay? Not a test: a measurement.

    mpiexec -n 2 --bind-to none python tests/mpi_scripts/bench_allreduce.py 64

Prints (rank 0) the median time of one all-reduce of simple-cnn's 207,018 float32 gradients
(blocking, non-blocking), and of a whole training step at the given global batch: each rank
alone ("local", no communication), through DistributedDataParallel (one blocking all-reduce
after backward), and with per-layer buckets (an Iallreduce started as soon as each layer's
backward has written its gradients, tested between layers, all waited for before the step).
"""

import sys
import time

import numpy as np
from mpi4py import MPI

from scratchcnn import distributed as dist
from scratchcnn import nn
from scratchcnn.data import split_batch
from scratchcnn.models import build_model
from scratchcnn.optim import Adam

dist.init_process_group()
comm = MPI.COMM_WORLD
batch = int(sys.argv[1]) if len(sys.argv) > 1 else 64
rng = np.random.default_rng(0)
part = split_batch(np.arange(batch), comm.rank, comm.size)
x = rng.standard_normal((batch, 1, 28, 28)).astype(np.float32)[part]
y = rng.integers(0, 10, batch)[part]


def median_ms(function, repeats=200, warm_up=30):
    for _ in range(warm_up):
        function()
    comm.Barrier()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def step_function(mode):
    model = build_model("simple-cnn", rng=0)
    loss_fn = nn.CrossEntropyLoss()
    pending = []
    if mode != "local":
        wrapped = nn.parallel.DistributedDataParallel(model)
    if mode == "buckets":
        wrapped._sync = False  # the buckets below reduce the gradients instead

        def start_reducing(layer):
            original = layer.backward

            def backward(grad, **kwargs):
                result = original(grad, **kwargs)
                pending.extend(comm.Iallreduce(MPI.IN_PLACE, p.grad) for p in layer.parameters())
                for request in pending:
                    request.Test()  # progress for the ones started earlier
                return result

            object.__setattr__(layer, "backward", backward)

        for layer in model:
            if next(layer.parameters(), None) is not None:
                start_reducing(layer)
    trained = model if mode == "local" else wrapped
    optimizer = Adam(trained.parameters(), lr=1e-4)

    def step():
        optimizer.zero_grad()
        loss_fn(trained(x), y)
        trained.backward(loss_fn.backward())
        MPI.Request.Waitall(pending)
        pending.clear()
        optimizer.step()

    return step


vector = np.ones(207_018, np.float32)
results = {
    "Allreduce, 207k float32": [median_ms(lambda: comm.Allreduce(MPI.IN_PLACE, vector))],
    "Iallreduce + Wait": [median_ms(lambda: comm.Iallreduce(MPI.IN_PLACE, vector).Wait())],
}
for mode in ("local", "ddp", "buckets") * 2:
    results.setdefault(f"step, {mode}", []).append(median_ms(step_function(mode), 150))
if comm.rank == 0:
    for name, times in results.items():
        print(f"{name:26s}" + "  ".join(f"{t:6.2f} ms" for t in times))
dist.destroy_process_group()
