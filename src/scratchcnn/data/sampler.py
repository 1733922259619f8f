"""Each MPI rank's share of the data: ``DistributedSampler`` (torch's, per epoch) and
``split_batch`` (per batch, so that N ranks together see one process's batches)."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sized

import numpy as np


def split_batch(batch_indices: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """Rank ``rank``'s part of one global batch: ``np.array_split(batch_indices,
    world_size)[rank]``, consecutive pieces whose sizes differ by at most one, the larger first
    (a batch of 64 on 3 ranks: 22, 21, 21). Concatenated in rank order they are the batch, so N
    ranks stepping through ``BatchSampler.epoch(e)`` together train on exactly one process's
    batches (``DistributedDataParallel`` weighs the unequal parts so the gradient is too)."""
    if isinstance(world_size, bool) or not isinstance(world_size, (int, np.integer)) or (
            world_size < 1):
        raise ValueError(f"split_batch: world_size must be a positive int, got {world_size!r}")
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not (
            0 <= rank < world_size):
        raise ValueError(f"split_batch: rank must be in [0, {world_size - 1}], got {rank!r}")
    batch_indices = np.asarray(batch_indices)
    size, extra = divmod(len(batch_indices), int(world_size))
    start = rank * size + min(rank, extra)
    return batch_indices[start:start + size + (rank < extra)]


class DistributedSampler:
    """The indices of one rank's share of a dataset for one epoch, with the semantics of
    ``torch.utils.data.DistributedSampler``:

    * the epoch's order is ``range(n)``, or with ``shuffle`` a permutation drawn from
      ``np.random.default_rng([seed, epoch])`` (``BatchSampler``'s; torch draws its own with
      ``torch.randperm``, so shuffled orders differ from torch's, unshuffled ones are equal);
    * it is padded with its own first indices up to a multiple of ``num_replicas`` (so every
      rank gets as many), or with ``drop_last`` cut down to one;
    * rank r takes every ``num_replicas``-th index starting at r: ``order[r::num_replicas]``.

    ``dataset`` is anything with a length, or the number of samples itself.
    Call ``set_epoch(e)`` before each epoch, or every epoch repeats epoch 0's order.
    ``num_replicas`` and ``rank`` default to the process group's (``init_process_group``).
    """

    def __init__(self, dataset: int | Sized, num_replicas: int | None = None,
                 rank: int | None = None, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False) -> None:
        if isinstance(dataset, (int, np.integer)):
            self.dataset_size = int(dataset)
        else:
            self.dataset_size = len(dataset)
        if self.dataset_size < 0:
            raise ValueError(f"DistributedSampler: the dataset size must be >= 0, got "
                             f"{self.dataset_size}")
        if num_replicas is None or rank is None:
            from scratchcnn import distributed as dist

            if not dist.is_initialized():
                raise RuntimeError("DistributedSampler: give num_replicas and rank, or call "
                                   "scratchcnn.distributed.init_process_group() first")
            num_replicas = dist.get_world_size() if num_replicas is None else num_replicas
            rank = dist.get_rank() if rank is None else rank
        if num_replicas < 1:
            raise ValueError(f"DistributedSampler: num_replicas must be >= 1, got "
                             f"{num_replicas}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"Invalid rank {rank}, rank should be in the interval "
                             f"[0, {num_replicas - 1}]")
        self.num_replicas, self.rank = int(num_replicas), int(rank)
        self.shuffle, self.seed, self.drop_last = bool(shuffle), int(seed), bool(drop_last)
        self.epoch = 0
        if self.drop_last and self.dataset_size % self.num_replicas:
            # Drop the tail, so that every rank gets the same count without padding.
            self.num_samples = math.ceil((self.dataset_size - self.num_replicas)
                                         / self.num_replicas)
        else:
            self.num_samples = math.ceil(self.dataset_size / self.num_replicas)
        self.total_size = self.num_samples * self.num_replicas

    def set_epoch(self, epoch: int) -> None:
        """Use epoch ``epoch``'s order (the same on every rank: they must all call it)."""
        self.epoch = int(epoch)

    def order(self) -> np.ndarray:
        """The whole epoch's indices before they are dealt out (int64, ``total_size``)."""
        if self.shuffle:
            indices = np.random.default_rng([self.seed, self.epoch]).permutation(
                self.dataset_size).astype(np.int64, copy=False)
        else:
            indices = np.arange(self.dataset_size, dtype=np.int64)
        if self.total_size <= len(indices):
            return indices[:self.total_size]
        # Pad with the order's own beginning, repeated if it is shorter than the padding.
        repeats = math.ceil(self.total_size / max(len(indices), 1))
        return np.tile(indices, repeats)[:self.total_size]

    def indices(self) -> np.ndarray:
        """This rank's indices for the current epoch (int64, ``num_samples`` of them)."""
        return self.order()[self.rank:self.total_size:self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices().tolist())

    def __len__(self) -> int:
        return self.num_samples

    def __repr__(self) -> str:
        return (f"DistributedSampler(num_samples={self.dataset_size}, num_replicas="
                f"{self.num_replicas}, rank={self.rank}, shuffle={self.shuffle}, "
                f"seed={self.seed}, drop_last={self.drop_last})")
