"""needle: a readable deep-learning framework on numpy, centred on recurrent sequence models."""
import os

# After a GEMM, OpenBLAS's worker threads spin for 2^28 cycles (about 0.1 s) before they sleep: meanwhile
# they hold every other core, so numpy passes that needle splits over threads (parallel_numpy.py) gain
# nothing, and anything else in the process (torch's thread pool, in the benchmarks) runs slower. 2^18
# cycles keep them spinning through a recurrent loop and let them sleep right after. OpenBLAS reads this
# once, when numpy loads: it applies where needle is imported before numpy, and a value the user set wins.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "18")


def _keep_freed_memory():
    """glibc returns a freed block of more than 128 KiB to the kernel at once, so every step's fresh
    (700, 10,000) logits, softmax and gradient arrays are faulted in again page by page: 4-7 ms of kernel
    time in a 100 ms language-model step. Keep blocks of up to 32 MiB on the heap and freed memory in the
    process (as PyTorch's advice to preload jemalloc does). glibc only; NEEDLE_MALLOC_TUNING=0, or the
    user's own MALLOC_*_ / GLIBC_TUNABLES settings, leave malloc as it is."""
    if os.environ.get("NEEDLE_MALLOC_TUNING", "1") == "0" or "GLIBC_TUNABLES" in os.environ or any(
            name.startswith("MALLOC_") for name in os.environ):
        return
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 * 2 ** 20)   # M_MMAP_THRESHOLD: glibc's largest
        libc.mallopt(-1, 2 ** 30)        # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


_keep_freed_memory()

from . import backend_ndarray, autograd, ops, init, nn, optim, data, testing
from .anomaly import detect_anomaly, is_anomaly_enabled
from .autograd import Tensor, TensorOp, TensorTuple, TensorTupleOp, is_grad_enabled, no_grad
from .backend_ndarray import all_devices, cpu, cpu_numpy, cuda, default_device
from .ops import (add, add_scalar, broadcast_to, dilate, divide, divide_scalar, exp, flip, log, logsoftmax,
                  logsumexp, make_tuple, matmul, mul_scalar, multiply, negate, power, power_scalar, relu, reshape,
                  sigmoid, split, stack, summation, tanh, transpose, tuple_get_item, undilate)

__version__ = "0.1.0"

__all__ = [
    "backend_ndarray", "autograd", "ops", "init", "nn", "optim", "data", "testing",
    "Tensor", "TensorOp", "TensorTuple", "TensorTupleOp", "is_grad_enabled", "no_grad", "detect_anomaly",
    "is_anomaly_enabled",
    "all_devices", "cpu", "cpu_numpy", "cuda", "default_device",
    "add", "add_scalar", "broadcast_to", "dilate", "divide", "divide_scalar", "exp", "flip", "log", "logsoftmax",
    "logsumexp", "make_tuple", "matmul", "mul_scalar", "multiply", "negate", "power", "power_scalar", "relu",
    "reshape", "sigmoid", "split", "stack", "summation", "tanh", "transpose", "tuple_get_item", "undilate",
]
