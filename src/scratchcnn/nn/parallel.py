"""Data parallel training over MPI ranks, as ``torch.nn.parallel.DistributedDataParallel``.

Every rank runs the same training loop on its own part of each batch (SPMD); the only
coordination is one all-reduce of the gradients at the end of ``backward``:

    model = DistributedDataParallel(build_model(...))   # rank 0's weights on every rank
    optimizer.zero_grad()
    loss = loss_fn(model(x_local), y_local)              # this rank's part of the batch
    model.backward(loss_fn.backward())                   # gradients of the whole batch's loss
    optimizer.step()                                     # the same step on every rank

The layers never know how many ranks there are. A model with BatchNorm2d also needs
``SyncBatchNorm.convert_sync_batchnorm(model)`` (before wrapping) for its statistics to be the
whole batch's.

No overlap of the all-reduce with backward (torch's buckets): measured on 2 ranks on 2 cores
(``tests/mpi_scripts/bench_allreduce.py``, simple-cnn, float32, batch 64), one Allreduce of the
207,018 gradients takes 0.10 ms (0.45 ms in some runs), Iallreduce + Wait 0.18 ms; a step takes
~6.1 ms with no communication, ~6.9 ms through this class, and ~7.6 ms with one Iallreduce per
layer started as its backward ends: without a progress thread the reductions only advance
inside MPI calls, and ten small non-blocking ones cost more than the one they would hide.
(Later, same script and machine: 5.5 ms alone, 5.9-6.2 through this class, 6.1 with buckets.)
The batch-size all-reduce started in ``forward`` is waited for at the start of ``backward``,
where the other ranks are at most their jitter behind: ``Work.wait`` polls before it sleeps.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import as_strided

from scratchcnn import distributed as dist
from scratchcnn.nn.module import (
    Module,
    Parameter,
    flatten_parameters,
    is_grad_enabled,
    vector_views,
)


def _end_to_end_vector(arrays: list[np.ndarray]) -> np.ndarray | None:
    """The 1-d view that the C-contiguous ``arrays`` form if they follow each other in memory,
    in order, in one allocation (as ``flatten_parameters`` lays them out), else None."""
    first = arrays[0]
    address = first.__array_interface__["data"][0]
    for array in arrays:
        if (not array.flags.c_contiguous or array.dtype != first.dtype
                or _root(array) is not _root(first)
                or array.__array_interface__["data"][0] != address):
            return None
        address += array.nbytes
    total = sum(array.size for array in arrays)
    return as_strided(first, shape=(total,), strides=(first.itemsize,))


def _root(array: np.ndarray) -> np.ndarray:
    while isinstance(array.base, np.ndarray):
        array = array.base
    return array


class DistributedDataParallel(Module):
    """Wrap ``module`` so that ``backward`` leaves on every rank the gradient of the loss over
    the whole global batch (all ranks' parts together), as one process would compute it.

    Shapes: ``forward(x)`` takes this rank's part of the batch, (n_r, ...), and returns
    ``module(x)``; ``backward(grad_output, **kwargs)`` returns ``module.backward(...)``.

    At construction the parameters are laid end to end (``flatten_parameters``, unless they
    already are), their gradients in one vector of P elements that backward writes directly
    (``Parameter.grad_buffer``), and rank 0's parameters and buffers are copied to every rank.

    The gradients: with a mean loss, rank r's loss gradient is (1/n_r) times its samples'
    gradients, while the whole batch's loss weighs every sample by 1/N, N = sum_r n_r. So

        g = (1/N) sum_i grad_i = sum_r (n_r / N) g_r.

    ``forward`` learns N (an all-reduce of one number, done while the module runs), ``backward``
    scales ``grad_output`` by n_r / N before the module's backward, and one all-reduce (SUM) of
    the P-vector gives g on every rank. With equal parts (n_r = N / R on R ranks) this is
    torch's plain average (1/R) sum_r g_r; with unequal ones (the last batch of an epoch,
    22/21/21) it is still exactly the one-process gradient, where a plain average would
    over-weight the smaller parts. Scaling the output gradient rather than the parameter
    gradients matters for ``SyncBatchNorm``: its backward adds every rank's sum(dy) and sum(dy *
    x_hat), which are the whole batch's only if every rank's dy carries the same 1/N. (A loss
    with reduction="sum" needs no scaling: divide its gradient by n_r / N yourself, or use a
    mean.) Under ``no_sync()`` each backward is scaled by its own forward's n_r / N, so the
    gradient accumulated over several batches is the sum of their one-process mean-loss
    gradients. A parameter whose ``.grad`` is None on a rank counts as zeros there; after a
    synchronised backward it has a ``.grad`` if any rank gave it one, and stays None (untouched
    by the optimizer, as in one process) if none did. Whether a backward synchronises is decided
    by its forward, as in torch: a forward inside ``no_sync()`` gives a backward that does not.

    ``.grad`` is a view of the gradient vector (as torch DDP's ``gradient_as_bucket_view``):
    copy it to keep it past the next backward.

    ``broadcast_buffers``: as in torch, every ``forward`` with gradients on (outside
    ``no_sync``) first copies rank 0's buffers (BatchNorm's running statistics) to every rank.

    The state_dict keys carry the prefix ``module.`` as in torch: save
    ``ddp.module.state_dict()`` to load it into the bare model later.
    """

    def __init__(self, module: Module, device_ids: Any = None, output_device: Any = None, *,
                 broadcast_buffers: bool = True, bucket_cap_mb: float | None = None,
                 find_unused_parameters: bool = False, gradient_as_bucket_view: bool = False,
                 static_graph: bool = False) -> None:
        """torch's options that only tune its buckets and graph bookkeeping are accepted and
        change nothing here: the gradients always go in one bucket that ``.grad`` views, and
        unused parameters are always found (they keep ``.grad`` None). ``device_ids`` and
        ``output_device`` may only say the CPU (None, as torch's CPU modules take)."""
        super().__init__()
        if not isinstance(module, Module):
            raise TypeError(f"DistributedDataParallel wraps a Module, got {type(module).__name__}")
        for name, value in (("device_ids", device_ids), ("output_device", output_device)):
            if value not in (None, [], "cpu") and str(value) != "cpu":
                raise ValueError(f"DistributedDataParallel: {name}={value!r}, but scratchcnn "
                                 "runs on the CPU only; leave it None, as for a CPU module in "
                                 "torch")
        if not dist.is_initialized():
            raise RuntimeError("DistributedDataParallel: the default process group has not "
                               "been initialized; call scratchcnn.distributed."
                               "init_process_group() first (in one process it needs no MPI)")
        self.module = module
        self.broadcast_buffers = bool(broadcast_buffers)
        params = list(module.parameters())
        if not params:
            raise ValueError("DistributedDataParallel: the module has no parameters")
        if len({param.dtype for param in params}) != 1:
            raise ValueError("DistributedDataParallel: the parameters must share one dtype")
        _check_same_parameters_on_every_rank(params)
        if _end_to_end_vector([param.data for param in params]) is None:
            flatten_parameters(params)
        self._params: list[Parameter] = params
        size = sum(param.size for param in params)
        # The P gradients, then one count per parameter of the ranks that have its gradient:
        # reduced together, so that a parameter no rank used keeps .grad None.
        self._gradients = np.zeros(size + len(params), params[0].dtype)
        self._grad_views = vector_views(self._gradients[:size],
                                        [param.shape for param in params])
        self._has_grad = self._gradients[size:]
        for param, view in zip(params, self._grad_views, strict=True):
            param.grad_buffer = view
        self._sync = True
        self._forward_sync: bool | None = None  # the last forward's no_sync state, until backward
        # The last forward's sample counts (this rank's, all ranks'), being added up.
        self._counts = np.zeros(2, np.int64)
        self._counts_work: dist.Work | None = None
        dist.broadcast(_end_to_end_vector([param.data for param in params]), src=0)
        self._broadcast_buffers()

    def _broadcast_buffers(self) -> None:
        """Rank 0's buffers on every rank: packed into one vector per dtype, so one broadcast
        (bn-cnn: 12 buffers, 2 broadcasts) instead of one per buffer."""
        if dist.get_world_size() == 1:
            return
        buffers = [buffer for _, buffer in self.module.named_buffers()]
        for dtype in sorted({buffer.dtype for buffer in buffers}, key=str):
            same = [buffer for buffer in buffers if buffer.dtype == dtype]
            packed = np.concatenate([buffer.ravel() for buffer in same])
            dist.broadcast(packed, src=0)
            for buffer, piece in zip(same, vector_views(packed, [b.shape for b in same]),
                                     strict=True):
                buffer[...] = piece

    def extra_repr(self) -> str:
        return f"broadcast_buffers={self.broadcast_buffers}"

    def forward(self, *inputs: Any, **kwargs: Any) -> Any:
        if is_grad_enabled():
            self._forward_sync = self._sync
        if is_grad_enabled() and dist.get_world_size() > 1:
            if self.broadcast_buffers and self._sync:
                self._broadcast_buffers()
            self._take_share()  # a previous forward's count still on its way (no backward)
            # N, added up while the module's forward runs (no extra wait for the other ranks).
            local = _batch_length(inputs, kwargs)
            self._counts = np.array([local, local], dtype=np.int64)  # [n_r, N after the sum]
            self._counts_work = dist.all_reduce(self._counts[1:], op=dist.ReduceOp.SUM,
                                                async_op=True)
        return self.module(*inputs, **kwargs)

    def _take_share(self) -> float | None:
        """n_r / N of the last forward with gradients on (once), or None without one."""
        if self._counts_work is None:
            return None
        self._counts_work.wait()
        self._counts_work = None
        local, total = (int(count) for count in self._counts)
        return local / total if total else 0.0

    def backward(self, grad_output: Any, **kwargs: Any) -> Any:
        share = self._take_share()
        if share is not None:
            grad_output = np.asarray(grad_output)
            grad_output = grad_output * grad_output.dtype.type(share)
        grad_input = self.module.backward(grad_output, **kwargs)
        sync = self._sync if self._forward_sync is None else self._forward_sync
        self._forward_sync = None
        if sync and dist.get_world_size() > 1:
            self._all_reduce_gradients()
        return grad_input

    def _all_reduce_gradients(self) -> None:
        """Replace every rank's gradients by their sum over the ranks, in one all-reduce."""
        params, views = self._params, self._grad_views
        # Normally backward wrote every gradient into its view; anything else (a .grad set by
        # hand, or a layout changed since construction) is copied in, None as zeros.
        if all(param.grad is view for param, view in zip(params, views, strict=True)):
            self._has_grad.fill(1)
        else:
            for index, (param, view) in enumerate(zip(params, views, strict=True)):
                self._has_grad[index] = param.grad is not None
                if param.grad is None:
                    view.fill(0)
                elif param.grad is not view:
                    np.copyto(view, param.grad)
        dist.all_reduce(self._gradients, op=dist.ReduceOp.SUM)
        for param, view, ranks_with_grad in zip(params, views, self._has_grad, strict=True):
            if param.grad is None:
                if ranks_with_grad:
                    param.grad = view
            elif param.grad is not view:
                np.copyto(param.grad, view)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Inside it, ``backward`` skips the gradients' all-reduce (and ``forward`` the buffers'
        broadcast): gradients accumulate locally until the first backward after it, which
        reduces them all (for gradient accumulation over several batches)."""
        previous = self._sync
        self._sync = False
        try:
            yield
        finally:
            self._sync = previous


def _batch_length(inputs: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    """This rank's sample count: the length of the first array among the forward's arguments
    (positional or keyword), as the gradients' weighting needs it."""
    for value in (*inputs, *kwargs.values()):
        if hasattr(value, "__len__") and hasattr(value, "shape"):
            return len(value)
    raise TypeError("DistributedDataParallel.forward: no input array among the arguments; pass "
                    "this rank's part of the batch (an array of shape (n, ...))")


def _check_same_parameters_on_every_rank(params: list[Parameter]) -> None:
    """A ValueError on every rank unless all ranks hold parameters of the same shapes and dtypes
    in the same order: the broadcast and the all-reduces would otherwise mix up their numbers."""
    if dist.get_world_size() == 1:
        return
    layout = repr([(param.shape, param.dtype.str) for param in params]).encode()
    signature = zlib.crc32(layout)
    extremes = np.array([signature, -signature], dtype=np.int64)
    dist.all_reduce(extremes, op=dist.ReduceOp.MAX)  # the largest and the smallest
    if extremes[0] != -extremes[1]:
        raise ValueError(
            f"DistributedDataParallel: the ranks' models differ (rank {dist.get_rank()}: "
            f"{len(params)} parameters, shapes {[param.shape for param in params]}); every rank "
            "must build the same model")
