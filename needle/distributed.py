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
from .backend_ndarray.float_errors import quiet

__all__ = ["init", "rank", "world_size", "is_main", "broadcast_parameters", "allreduce_sum",
           "DistributedOptimizer"]

_LAUNCHER_SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS")
_BUCKET_BYTES = 32 * 2 ** 20  # gradients are reduced in flat buckets of about this size
_OWN_CALL_BYTES = 2 ** 20     # a gradient this big is reduced in place, in a call of its own (no copy)

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


def _IN_PLACE():
    from mpi4py import MPI

    return MPI.IN_PLACE


def _host(array):
    """A numpy view of a cpu NDArray (a copy from any other device), for MPI's buffers."""
    return array.x if array.device.xp is np else array.numpy()


def _from_host(chunk, like):
    """chunk (a slice of a fresh reduction buffer) as an NDArray on `like`'s device; shared on cpu."""
    if like.device.xp is np and chunk.dtype == np.dtype(like.dtype):
        return NDArray.from_xp(chunk, like.device)
    return NDArray(chunk, device=like.device, dtype=like.dtype)


def _rows_in_use(g):
    """The rows of a tall 2-D gradient (an embedding table's: rows >= 4 x columns) that are not all zero;
    None for any other gradient, which is not worth the scan."""
    if g.ndim != 2 or g.shape[0] < 4 * g.shape[1] or g.dtype != np.float32:
        return None
    if g.flags.c_contiguous:     # any bit set (so -0.0 counts as in use, harmlessly): faster than any()
        return np.flatnonzero(g.view(np.uint32).max(axis=1))
    return np.flatnonzero(g.any(axis=1))


class DistributedOptimizer:
    """Wraps an optimiser: `step()` first averages every parameter's gradient over the ranks, then steps the
    wrapped optimiser. A few MPI calls per step, not one per parameter:
      * an embedding table's gradient (a tall matrix whose rows in use on all ranks together are at most a
        quarter of its rows) travels as its rows in use: row numbers and rows gathered from every rank
        (Allgatherv), added into zeros; a window of a language model touches a few hundred of 10,000 rows;
      * every other gradient of at least _OWN_CALL_BYTES is averaged in its own buffer, in place;
      * the rest are copied (already divided by the number of ranks) into flat buckets of ~32 MiB.
    `clip_grad_norm` clips the averaged gradient (it averages first). A parameter without a gradient on
    some rank counts as a zero gradient there. `allreduce_seconds` adds up the time spent reducing.
    """

    def __init__(self, optimizer):
        self.optimizer = optimizer
        self.params = optimizer.params
        self.allreduce_seconds = 0.0
        self.sparse_reductions = 0      # gradients reduced as their rows in use
        self._averaged = False
        init()

    @quiet()  # a NaN or infinite gradient is averaged without numpy's warnings, as in the optimisers
    def _average_gradients(self):
        if self._averaged:
            return
        self._averaged = True
        comm, size = _state["comm"], _state["size"]
        if comm is None:
            return
        start = time.perf_counter()
        grads = [p.grad.realize_cached_data() if p.grad is not None else None for p in self.params]
        host = [_host(g) if g is not None else np.zeros(p.shape, np.float32) for p, g in zip(self.params, grads)]
        sparse = self._sparse_plan(comm, host)
        scale = np.float32(1.0 / size)
        bucketed, in_place = [], set()
        for i, (p, g, h) in enumerate(zip(self.params, grads, host)):
            if i in sparse:
                p.grad = Tensor.make_const(_from_host(self._gather_rows(comm, h, sparse[i], scale), p))
            elif (g is not None and g.device.xp is np and h.dtype == np.float32 and h.flags.c_contiguous
                  and h.flags.owndata and h.flags.writeable and h.nbytes >= _OWN_CALL_BYTES
                  and id(h) not in in_place):
                in_place.add(id(h))         # a gradient array of this step's own: averaged where it lies
                h *= scale
                comm.Allreduce(_IN_PLACE(), h)
            else:
                bucketed.append(i)
        owners = iter(bucketed)
        for group in _buckets([host[i] for i in bucketed]):
            flat = np.empty(sum(h.size for h in group), np.float32)
            offset = 0
            for h in group:
                np.multiply(h.ravel(), scale, out=flat[offset:offset + h.size], casting="unsafe")
                offset += h.size
            comm.Allreduce(_IN_PLACE(), flat)
            offset = 0
            for h in group:
                i = next(owners)
                self.params[i].grad = Tensor.make_const(_from_host(flat[offset:offset + h.size].reshape(h.shape),
                                                                   self.params[i]))
                offset += h.size
        self.allreduce_seconds += time.perf_counter() - start

    def _sparse_plan(self, comm, host):
        """{parameter index: rows in use on each rank} for the gradients that go as rows (same on every rank)."""
        candidates = [(i, _rows_in_use(h)) for i, h in enumerate(host)]
        candidates = [(i, rows) for i, rows in candidates if rows is not None]
        if not candidates:
            return {}
        counts = np.array([len(rows) for _, rows in candidates], np.int64)
        every = np.empty((comm.Get_size(), len(counts)), np.int64)
        comm.Allgather(counts, every)
        plan = {}
        for j, (i, rows) in enumerate(candidates):
            if 4 * every[:, j].sum() <= host[i].shape[0]:
                plan[i] = (rows, every[:, j])
        return plan

    def _gather_rows(self, comm, h, plan, scale):
        """The average over ranks of gradient h, from every rank's rows in use (plan: own rows, all counts)."""
        rows, counts = plan
        width = h.shape[1]
        all_rows = np.empty(int(counts.sum()), np.int64)
        comm.Allgatherv(rows.astype(np.int64), [all_rows, counts])
        values = np.empty((len(all_rows), width), np.float32)
        comm.Allgatherv(np.ascontiguousarray(h[rows]), [values, counts * width])
        values *= scale
        out = np.zeros(h.shape, np.float32)
        start = 0
        for n in counts:            # rows are unique within a rank, so a fancy-index add is exact
            out[all_rows[start:start + n]] += values[start:start + n]
            start += n
        self.sparse_reductions += 1
        return out

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
