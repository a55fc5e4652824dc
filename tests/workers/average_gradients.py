"""Average hand-made gradients with DistributedOptimizer and check them against MPI's own sum, on every rank.

Usage: mpiexec -n K python average_gradients.py   (exits non-zero on a mismatch)
Parameters: an embedding-like table whose rows in use are few (some shared between ranks; rank 1 uses none),
one whose rows in use are many (reduced dense), a tiny one (bucketed) and a big one (reduced in place).
"""
import numpy as np
from mpi4py import MPI

import needle as ndl
from needle import distributed

rank, size = distributed.init()
comm = MPI.COMM_WORLD
shapes = [(400, 8), (400, 8), (3, 5), (600, 600)]
params = [ndl.nn.Parameter(ndl.init.zeros(*s)) for s in shapes]
opt = distributed.DistributedOptimizer(ndl.optim.SGD(params, lr=1.0))
rng = np.random.default_rng(rank)
grads = [rng.standard_normal(s).astype(np.float32) for s in shapes]
sparse = np.zeros(shapes[0], np.float32)
if rank != 1:
    rows = np.r_[0:5, rng.choice(np.arange(5, 400), 20, replace=False)]   # rows 0-4 on every such rank
    sparse[rows] = grads[0][rows]
grads[0] = sparse
for p, g in zip(params, grads):
    p.grad = ndl.Tensor(g)
expected = []
for g in grads:
    total = g.astype(np.float64)
    comm.Allreduce(MPI.IN_PLACE, total)
    expected.append(total / size)
opt.step()
assert opt.sparse_reductions == 1, opt.sparse_reductions
for p, e in zip(params, expected):
    np.testing.assert_allclose(-p.numpy(), e, rtol=1e-6, atol=1e-6)
print(f"rank {rank} of {size}: ok")
