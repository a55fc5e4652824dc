"""Data-parallel training over MPI (mpi4py), in the manner of Horovod: every rank holds the whole model,
computes gradients on its share of the batch, and the ranks average those gradients before each update.

MPI is needed only when the process was started by `mpirun`/`mpiexec` with more than one process;
otherwise this is rank 0 of 1 and nothing is imported. Install the extra with `pip install needle[mpi]`
(mpi4py with the `mpich` wheel, which brings `mpiexec` without root).
"""
import os
import time

import numpy as np

from .autograd import Tensor
from .backend_ndarray import NDArray

__all__ = ["init", "rank", "world_size", "is_main", "broadcast_parameters", "allreduce_sum",
           "DistributedOptimizer"]

_LAUNCHER_SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS")
_BUCKET_BYTES = 32 * 2 ** 20  # gradients are reduced in flat buckets of about this size

_state = {"comm": None, "rank": 0, "size": 1, "initialised": False}


def _launched_size():
    for name in _LAUNCHER_SIZE_VARIABLES:
        value = os.environ.get(name)
        if value and value.isdigit():
            return int(value)
    return 1


def init():
    """(rank, world_size): MPI's COMM_WORLD under mpirun with several processes, else (0, 1) without MPI."""
    if not _state["initialised"]:
        if _launched_size() > 1:
            try:
                from mpi4py import MPI
            except ImportError as err:
                raise RuntimeError("needle.distributed: this process was started by mpirun with "
                                   f"{_launched_size()} processes, which needs mpi4py: pip install "
                                   "'needle[mpi]'") from err
            comm = MPI.COMM_WORLD
            _state.update(comm=comm, rank=comm.Get_rank(), size=comm.Get_size())
        _state["initialised"] = True
    return _state["rank"], _state["size"]


def rank():
    return init()[0]


def world_size():
    return init()[1]


def is_main():
    return rank() == 0


def _buckets(arrays):
    """Consecutive groups of arrays of about _BUCKET_BYTES each."""
    group, size = [], 0
    for array in arrays:
        group.append(array)
        size += array.nbytes
        if size >= _BUCKET_BYTES:
            yield group
            group, size = [], 0
    if group:
        yield group


def broadcast_parameters(params, root=0):
    """Every rank takes root's values of `params` (Tensors), through a few flat buffers."""
    init()
    comm = _state["comm"]
    if comm is None:
        return
    params = list(params)
    index = 0
    for group in _buckets([p.numpy() for p in params]):
        flat = np.concatenate([a.ravel() for a in group]).astype(np.float32, copy=False)
        comm.Bcast(flat, root=root)
        offset = 0
        for array in group:
            p = params[index]
            p.cached_data = NDArray(flat[offset:offset + array.size].reshape(array.shape), device=p.device,
                                    dtype=p.dtype)
            offset += array.size
            index += 1


def allreduce_sum(values):
    """The sum over ranks of a float64 numpy array (or numbers), for metrics such as token counts."""
    init()
    values = np.array(values, dtype=np.float64)
    comm = _state["comm"]
    if comm is not None:
        from mpi4py import MPI
        comm.Allreduce(MPI.IN_PLACE, values, op=MPI.SUM)
    return values


def _host(array):
    """A numpy view of a cpu NDArray (a copy from any other device), for MPI's buffers."""
    return array.x if array.device.xp is np else array.numpy()


def _from_host(chunk, like):
    """chunk (a slice of a fresh reduction buffer) as an NDArray on `like`'s device; shared on cpu."""
    if like.device.xp is np and chunk.dtype == np.dtype(like.dtype):
        return NDArray.from_xp(chunk, like.device)
    return NDArray(chunk, device=like.device, dtype=like.dtype)


class DistributedOptimizer:
    """Wraps an optimiser: `step()` first averages every parameter's gradient over the ranks, in a few
    flat all-reduce calls (buckets of ~32 MiB, not one call per parameter), then steps the wrapped optimiser.

    `clip_grad_norm` clips the averaged gradient (it averages first). A parameter without a gradient on
    some rank counts as a zero gradient there. `allreduce_seconds` adds up the time spent reducing.
    """

    def __init__(self, optimizer):
        self.optimizer = optimizer
        self.params = optimizer.params
        self.allreduce_seconds = 0.0
        self._averaged = False
        init()

    def _average_gradients(self):
        if self._averaged:
            return
        self._averaged = True
        comm, size = _state["comm"], _state["size"]
        if comm is None:
            return
        from mpi4py import MPI
        start = time.perf_counter()
        grads = [_host(p.grad.realize_cached_data()) if p.grad is not None else np.zeros(p.shape, np.float32)
                 for p in self.params]
        index = 0
        for group in _buckets(grads):
            flat = np.concatenate([g.ravel() for g in group]).astype(np.float32, copy=False)
            comm.Allreduce(MPI.IN_PLACE, flat, op=MPI.SUM)
            flat /= size
            offset = 0
            for g in group:
                p = self.params[index]
                p.grad = Tensor.make_const(_from_host(flat[offset:offset + g.size].reshape(g.shape), p))
                offset += g.size
                index += 1
        self.allreduce_seconds += time.perf_counter() - start

    def clip_grad_norm(self, max_norm=0.25):
        self._average_gradients()
        return self.optimizer.clip_grad_norm(max_norm)

    def step(self):
        self._average_gradients()
        self.optimizer.step()
        self._averaged = False

    def reset_grad(self):
        self.optimizer.reset_grad()
        self._averaged = False

    zero_grad = reset_grad

    def state_dict(self):
        return self.optimizer.state_dict()

    def load_state_dict(self, state):
        self.optimizer.load_state_dict(state)
