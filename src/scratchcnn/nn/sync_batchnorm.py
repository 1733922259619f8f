"""Batch normalisation whose statistics are the whole global batch's, over every MPI rank, as
``torch.nn.SyncBatchNorm``."""

from __future__ import annotations

import numpy as np

from scratchcnn import distributed as dist
from scratchcnn.nn.batchnorm import BatchNorm2d
from scratchcnn.nn.module import Module


class SyncBatchNorm(BatchNorm2d):
    """``BatchNorm2d`` over the union of every rank's part of the batch.

    Shapes: input (n_r, C, H, W) on rank r, output the same; parameters and buffers as
    ``BatchNorm2d``. With N = sum_r n_r samples over R ranks and M = N * H * W:

        mu = (1/M) sum_r sum_{i in r} x_i,    var = (1/M) sum_r sum_{i in r} (x_i - mu)^2

    and in backward the per-channel sums sum(dy) and sum(dy * x_hat) run over all M values too,
    so each rank's input gradient is exactly the slice of the one-process gradient for its
    samples. What is synchronised: those sums, through ``_sum_over_batch`` (an all-reduce SUM of
    a few C-vectors: three per training step, the count M riding with the first). The running
    statistics are then the same on every rank. The parameter gradients stay each rank's own
    (``DistributedDataParallel`` reduces them with the rest).

    As in torch, only training synchronises: in eval mode (or outside a process group, or with
    one rank) it is exactly ``BatchNorm2d``, so one rank may evaluate alone.
    """

    def forward(self, x: np.ndarray) -> np.ndarray:
        # Decided once per forward, so that its backward meets the other ranks the same way.
        self._synchronised = (self.training and dist.is_initialized()
                              and dist.get_world_size() > 1)
        return super().forward(x)

    def _sum_over_batch(self, partial_sums: np.ndarray) -> np.ndarray:
        """Every rank's ``partial_sums`` added up (a new array; the argument is left alone)."""
        if not getattr(self, "_synchronised", False):
            return partial_sums
        total = np.array(partial_sums, order="C", copy=True)
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total

    @classmethod
    def convert_sync_batchnorm(cls, module: Module, process_group: None = None) -> Module:
        """``module`` with every ``BatchNorm2d`` in it replaced by a ``SyncBatchNorm`` holding
        the same parameters (the same ``Parameter`` objects), buffers (the same arrays),
        settings and training flag; if ``module`` is itself one, the replacement is returned.
        Other modules are changed in place and returned."""
        if process_group is not None:
            raise ValueError("convert_sync_batchnorm: only the default group exists here; "
                             "leave process_group out")
        if isinstance(module, BatchNorm2d) and not isinstance(module, SyncBatchNorm):
            return cls._from_batchnorm(module)
        for name, child in list(module.named_children()):
            converted = cls.convert_sync_batchnorm(child)
            if converted is not child:
                setattr(module, name, converted)
        return module

    @classmethod
    def _from_batchnorm(cls, layer: BatchNorm2d) -> SyncBatchNorm:
        reference = layer.weight.data if layer.weight is not None else layer.running_mean
        dtype = None if reference is None else reference.dtype  # None: nothing to hold
        sync = cls(layer.num_features, eps=layer.eps, momentum=layer.momentum,
                   affine=layer.affine, track_running_stats=layer.track_running_stats,
                   bias=layer.bias is not None, dtype=dtype)
        for name in layer._parameters:
            setattr(sync, name, layer._parameters[name])
        for name, buffer in layer._buffers.items():
            sync.register_buffer(name, buffer)
        sync.train(layer.training)
        if "needs_input_grad" in vars(layer):
            sync.needs_input_grad = layer.needs_input_grad
        return sync
