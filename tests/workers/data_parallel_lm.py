"""Train a small LSTM language model for a few steps, data-parallel over however many ranks this runs on.

Each rank takes its share of the batch columns; the result must not depend on the number of ranks.
Usage: python data_parallel_lm.py OUT.npz [VOCAB EMBEDDING]   (under mpiexec -n K or alone)
With a vocabulary much larger than the tokens of a window (e.g. 400 words, embedding 8) the embedding's
gradient is reduced as its rows in use; OUT.npz records how many reductions went that way.
"""
import sys

import numpy as np

import needle as ndl
from needle import distributed
from needle.data import batchify
from needle.models import LanguageModel
from needle.training import epoch_general_ptb

rank, size = distributed.init()
np.random.seed(0)
vocab, embedding = (int(sys.argv[2]), int(sys.argv[3])) if len(sys.argv) > 3 else (30, 12)
ids = np.random.randint(0, vocab, size=2000)
global_batch = 8
batches = batchify(ids, global_batch)
share = global_batch // size
local = batches[:, rank * share:(rank + 1) * share]

np.random.seed(1)
model = LanguageModel(embedding, vocab, 16, num_layers=2, seq_model="lstm")
distributed.broadcast_parameters(model.parameters())
opt = distributed.DistributedOptimizer(ndl.optim.SGD(model.parameters(), lr=1.0))
# ten windows of 7 steps: the training loop itself, with the wrapped optimiser
epoch_general_ptb(local[:71], model, seq_len=7, opt=opt, clip=0.5)
if distributed.is_main():
    np.savez(sys.argv[1], *[p.numpy() for p in model.parameters()], world_size=size,
             sparse_reductions=opt.sparse_reductions)
