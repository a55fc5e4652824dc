"""needle's differentiable operations: a CamelCase op class and a snake_case function for each."""
from .ops_indexing import (Gather, Reorder, ReverseSequences, gather_rows, reorder, reversal_index,
                           reverse_sequences)
from .ops_logarithmic import (LogSoftmax, LogSumExp, SoftmaxCrossEntropy, logsoftmax, logsumexp,
                              softmax_cross_entropy)
from .ops_mathematic import (AddScalar, Affine, BroadcastTo, Dilate, DivScalar, EWiseAdd, EWiseDiv, EWiseMul,
                             EWisePow, Exp, Flip, Log, MakeTensorTuple, MatMul, MulScalar, Negate, PowerScalar,
                             ReLU, Reshape, Sigmoid, Split, Stack, Summation, Tanh, Transpose, TupleGetItem,
                             UnDilate, add, add_scalar, affine, broadcast_to, dilate, divide, divide_scalar, exp,
                             flip, log, make_tuple, matmul, mul_scalar, multiply, negate, power, power_scalar,
                             relu, reshape, sigmoid, split, stack, summation, tanh, transpose, tuple_get_item,
                             undilate)
from .ops_recurrent import BidirectionalLayer, GradProbe, bidirectional_layer

__all__ = [
    "AddScalar", "Affine", "BroadcastTo", "Dilate", "DivScalar", "EWiseAdd", "EWiseDiv", "EWiseMul", "EWisePow", "Exp",
    "Flip", "Log", "LogSoftmax", "LogSumExp", "MakeTensorTuple", "MatMul", "MulScalar", "Negate", "PowerScalar",
    "ReLU", "Reshape", "Sigmoid", "SoftmaxCrossEntropy", "Split", "Stack", "Summation", "Tanh", "Transpose",
    "TupleGetItem", "UnDilate", "Gather", "Reorder", "ReverseSequences", "GradProbe", "BidirectionalLayer",
    "add", "add_scalar", "affine", "broadcast_to", "dilate", "divide", "divide_scalar", "exp", "flip", "log", "logsoftmax",
    "logsumexp", "make_tuple", "matmul", "mul_scalar", "multiply", "negate", "power", "power_scalar", "relu",
    "reshape", "sigmoid", "softmax_cross_entropy", "split", "stack", "summation", "tanh", "transpose",
    "tuple_get_item", "undilate", "gather_rows", "reorder", "reversal_index", "reverse_sequences",
    "bidirectional_layer",
]
