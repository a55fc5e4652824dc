"""needle: a readable deep-learning framework on numpy, centred on recurrent sequence models."""
import os

# After a GEMM, OpenBLAS's worker threads spin for 2^28 cycles (about 0.1 s) before they sleep: meanwhile
# they hold every other core, so numpy passes that needle splits over threads (parallel_numpy.py) gain
# nothing, and anything else in the process (torch's thread pool, in the benchmarks) runs slower. 2^18
# cycles keep them spinning through a recurrent loop and let them sleep right after. OpenBLAS reads this
# once, when numpy loads: it applies where needle is imported before numpy, and a value the user set wins.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "18")

from . import backend_ndarray, autograd, ops, init, nn, optim, data, testing
from .autograd import Tensor, TensorOp, TensorTuple, TensorTupleOp, is_grad_enabled, no_grad
from .backend_ndarray import all_devices, cpu, cpu_numpy, cuda, default_device
from .ops import (add, add_scalar, broadcast_to, dilate, divide, divide_scalar, exp, flip, log, logsoftmax,
                  logsumexp, make_tuple, matmul, mul_scalar, multiply, negate, power, power_scalar, relu, reshape,
                  sigmoid, split, stack, summation, tanh, transpose, tuple_get_item, undilate)

__version__ = "0.1.0"

__all__ = [
    "backend_ndarray", "autograd", "ops", "init", "nn", "optim", "data", "testing",
    "Tensor", "TensorOp", "TensorTuple", "TensorTupleOp", "is_grad_enabled", "no_grad",
    "all_devices", "cpu", "cpu_numpy", "cuda", "default_device",
    "add", "add_scalar", "broadcast_to", "dilate", "divide", "divide_scalar", "exp", "flip", "log", "logsoftmax",
    "logsumexp", "make_tuple", "matmul", "mul_scalar", "multiply", "negate", "power", "power_scalar", "relu",
    "reshape", "sigmoid", "split", "stack", "summation", "tanh", "transpose", "tuple_get_item", "undilate",
]
