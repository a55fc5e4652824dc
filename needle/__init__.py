"""needle: a readable deep-learning framework on numpy, centred on recurrent sequence models."""
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
