"""Elementwise, linear-algebra and shape operations: compute (NDArrays) directly above gradient (Tensors).

Gradients hold no graph (backward runs under no_grad), so the gradients here compute on arrays, not
recorded ops, and wrap the result once as a constant Tensor. The elementwise and matrix gradients work on
the backend's arrays (`.x`: numpy's on cpu, CuPy's on cuda) and wrap only their result: a product of three
factors is then three numpy calls and one wrapper, not three NDArrays (the wrapper and the NDArray's dispatch
cost as much as the numpy call itself on small tensors). Backward reuses what forward produced
(`node.cached_data`). A binary op
whose gradient costs work per input (multiply, divide, matmul) returns None for an input that needs no
gradient (a batch of data, a constant), which the backward walk skips.
"""
import numbers
import operator

from ..autograd import Tensor, TensorOp, TensorTuple, TensorTupleOp, _constant
from ..backend_ndarray.ndarray import NDArray, _norm_axes, _resolve_shape, _wrap, check_broadcast_to

__all__ = [
    "EWiseAdd", "AddScalar", "EWiseMul", "MulScalar", "EWiseDiv", "DivScalar", "EWisePow", "PowerScalar",
    "Negate", "Log", "Exp", "ReLU", "Tanh", "Sigmoid", "MatMul", "Affine", "Summation", "BroadcastTo",
    "Reshape", "Transpose", "Stack", "Split", "Flip", "Dilate", "UnDilate", "MakeTensorTuple", "TupleGetItem",
    "add", "add_scalar", "multiply", "mul_scalar", "divide", "divide_scalar", "power", "power_scalar",
    "negate", "log", "exp", "relu", "tanh", "sigmoid", "matmul", "affine", "summation", "broadcast_to",
    "reshape", "transpose", "stack", "split", "flip", "dilate", "undilate", "make_tuple", "tuple_get_item",
]


def _summed_to(grad, shape):
    """An NDArray gradient of a broadcast operand, summed back to the operand's shape (an NDArray)."""
    if grad.shape == shape:
        return grad
    lead = len(grad.shape) - len(shape)
    axes = tuple(range(lead)) + tuple(lead + i for i, d in enumerate(shape) if d == 1 and grad.shape[lead + i] != 1)
    return grad.sum(axis=axes).compact().reshape(shape)


def _grad(data, shape=None):
    """An op's gradient computed on NDArrays, summed to `shape` when given, as a constant Tensor."""
    return _constant(data if shape is None else _summed_to(data, shape))


def _grad_x(x, like, shape=None):
    """_grad of a backend array `x` computed from the NDArray `like` (on like's device)."""
    return _grad(_wrap(x, like.device), shape)


def _sum_to_shape(grad, shape):
    """A broadcast operand's gradient Tensor summed back to the operand's shape."""
    return grad if grad.cached_data.shape == shape else _grad(grad.cached_data, shape)


def _check_tensor(name, value):
    if not isinstance(value, Tensor):
        raise TypeError(f"{name}: expected a needle Tensor, got {type(value).__name__}") from None


def _check_binary(name, a, b):
    """TypeError unless both are Tensors; ValueError unless their shapes broadcast as in numpy. The binary
    ops call it only once their op has failed (numpy and make_from_op refuse what it refuses), so the check
    costs nothing on the way that works and the error still names the op and both shapes."""
    if not (isinstance(a, Tensor) and isinstance(b, Tensor)):
        _check_tensor(name, a)
        _check_tensor(name, b)
    shape_a, shape_b = a.shape, b.shape
    if shape_a == shape_b:  # the common case: nothing to broadcast
        return
    for x, y in zip(reversed(shape_a), reversed(shape_b)):
        if x != y and x != 1 and y != 1:
            raise ValueError(f"{name}: shapes {a.shape} and {b.shape} cannot broadcast") from None


def _check_scalar(name, scalar):
    if type(scalar) is float or type(scalar) is int:  # the common case in two cheap tests
        return
    if not isinstance(scalar, numbers.Real) or isinstance(scalar, bool):
        raise TypeError(f"{name}: expected a real number, got {type(scalar).__name__} {scalar!r:.40}")


# ---- elementwise ---------------------------------------------------------------------------------------

class EWiseAdd(TensorOp):
    name = "add"

    def compute(self, a, b):
        return a + b

    def gradient(self, out_grad, node):
        a, b = node.inputs
        return _sum_to_shape(out_grad, a.shape), _sum_to_shape(out_grad, b.shape)


_ADD = EWiseAdd()  # one instance serves every call: the op holds no state


def add(a, b):
    try:
        return _ADD(a, b)
    except (TypeError, ValueError):
        _check_binary("add", a, b)
        raise


class AddScalar(TensorOp):
    name = "add_scalar"

    def __init__(self, scalar):
        self.scalar = scalar

    def compute(self, a):
        return a + self.scalar

    def gradient(self, out_grad, node):
        return out_grad


def add_scalar(a, scalar):
    _check_scalar("add_scalar", scalar)
    return AddScalar(scalar)(a)


class EWiseMul(TensorOp):
    name = "multiply"

    def compute(self, a, b):
        return a * b

    def gradient(self, out_grad, node):
        a, b = node.inputs
        g = out_grad.cached_data
        return (_grad_x(g.x * b.cached_data.x, g, a.shape) if a.requires_grad else None,
                _grad_x(g.x * a.cached_data.x, g, b.shape) if b.requires_grad else None)


_MULTIPLY = EWiseMul()  # one instance serves every call: the op holds no state


def multiply(a, b):
    try:
        return _MULTIPLY(a, b)
    except (TypeError, ValueError):
        _check_binary("multiply", a, b)
        raise


class MulScalar(TensorOp):
    name = "mul_scalar"

    def __init__(self, scalar):
        self.scalar = scalar

    def compute(self, a):
        return a * self.scalar

    def gradient(self, out_grad, node):
        return _grad(out_grad.cached_data * self.scalar)  # NDArray's *: a numpy scalar keeps float32


def mul_scalar(a, scalar):
    _check_scalar("mul_scalar", scalar)
    return MulScalar(scalar)(a)


class EWiseDiv(TensorOp):
    name = "divide"

    def compute(self, a, b):
        return a / b

    def gradient(self, out_grad, node):
        a, b = node.inputs
        g = out_grad.cached_data
        grad_a = g.x / b.cached_data.x
        return (_grad_x(grad_a, g, a.shape) if a.requires_grad else None,
                _grad_x(-grad_a * node.cached_data.x, g, b.shape) if b.requires_grad else None)


_DIVIDE = EWiseDiv()  # one instance serves every call: the op holds no state


def divide(a, b):
    try:
        return _DIVIDE(a, b)
    except (TypeError, ValueError):
        _check_binary("divide", a, b)
        raise


class DivScalar(TensorOp):
    name = "divide_scalar"

    def __init__(self, scalar):
        self.scalar = scalar

    def compute(self, a):
        return a / self.scalar

    def gradient(self, out_grad, node):
        return _grad(out_grad.cached_data / self.scalar)


def divide_scalar(a, scalar):
    _check_scalar("divide_scalar", scalar)
    return DivScalar(scalar)(a)


class EWisePow(TensorOp):
    """a ** b elementwise; the gradient of b uses log(a), so it needs a > 0 where it matters."""
    name = "power"

    def compute(self, a, b):
        return a ** b

    def gradient(self, out_grad, node):
        a, b = node.inputs
        a_data, b_data = a.cached_data, b.cached_data
        g = out_grad.cached_data
        return (_grad(g * (b_data * a_data ** (b_data - 1.0)), a.shape),
                _grad(g * (node.cached_data * a_data.log()), b.shape))


_POWER = EWisePow()  # one instance serves every call: the op holds no state


def power(a, b):
    try:
        return _POWER(a, b)
    except (TypeError, ValueError):
        _check_binary("power", a, b)
        raise


class PowerScalar(TensorOp):
    name = "power_scalar"

    def __init__(self, scalar):
        self.scalar = scalar

    def compute(self, a):
        return a ** self.scalar

    def gradient(self, out_grad, node):
        a = node.inputs[0].cached_data
        return _grad(out_grad.cached_data * (a ** (self.scalar - 1) * self.scalar))


def power_scalar(a, scalar):
    _check_scalar("power_scalar", scalar)
    return PowerScalar(scalar)(a)


class Negate(TensorOp):
    name = "negate"

    def compute(self, a):
        return -a

    def gradient(self, out_grad, node):
        g = out_grad.cached_data
        return _grad_x(-g.x, g)


_NEGATE = Negate()


def negate(a):
    return _NEGATE(a)


class Log(TensorOp):
    name = "log"

    def compute(self, a):
        return a.log()

    def gradient(self, out_grad, node):
        g = out_grad.cached_data
        return _grad_x(g.x / node.inputs[0].cached_data.x, g)


_LOG = Log()


def log(a):
    return _LOG(a)


class Exp(TensorOp):
    name = "exp"

    def compute(self, a):
        return a.exp()

    def gradient(self, out_grad, node):
        g = out_grad.cached_data
        return _grad_x(g.x * node.cached_data.x, g)


_EXP = Exp()


def exp(a):
    return _EXP(a)


class ReLU(TensorOp):
    name = "relu"

    def compute(self, a):
        return a.maximum(0.0)

    def gradient(self, out_grad, node):
        g = out_grad.cached_data
        return _grad_x(g.x * (node.cached_data.x > 0.0), g)


_RELU = ReLU()


def relu(a):
    return _RELU(a)


class Tanh(TensorOp):
    """A primitive rather than built from sigmoid: one pass, and backward reuses the output."""
    name = "tanh"

    def compute(self, a):
        return a.tanh()

    def gradient(self, out_grad, node):
        out, g = node.cached_data.x, out_grad.cached_data
        return _grad_x(g.x * (1.0 - out * out), g)


_TANH = Tanh()


def tanh(a):
    return _TANH(a)


class Sigmoid(TensorOp):
    """A primitive for stability: 1 / (1 + exp(-x)) built from ops overflows for large negative x."""
    name = "sigmoid"

    def compute(self, a):
        return a.sigmoid()

    def gradient(self, out_grad, node):
        out, g = node.cached_data.x, out_grad.cached_data
        return _grad_x(g.x * (out * (1.0 - out)), g)


_SIGMOID = Sigmoid()


def sigmoid(a):
    return _SIGMOID(a)


# ---- linear algebra --------------------------------------------------------------------------------------

class MatMul(TensorOp):
    """a @ b for 2-D operands, batched over leading axes that broadcast."""
    name = "matmul"

    def compute(self, a, b):
        return a @ b

    def gradient(self, out_grad, node):
        a, b = node.inputs
        g = out_grad.cached_data
        return (_grad_x(_times_swapped(g, b.cached_data), g, a.shape) if a.requires_grad else None,
                _grad_x(_swapped_times(a.cached_data, g), g, b.shape) if b.requires_grad else None)


def _times_swapped(a, b):
    """a @ b with b's last two axes swapped (a backend array), for the gradients of matmul and affine: the
    backend's own transposed view (numpy's, CuPy's) goes straight into its matmul, no NDArray view made."""
    return a.device.xp.matmul(a.x, b.x.swapaxes(-1, -2))


def _swapped_times(a, b):
    """a @ b with a's last two axes swapped (as _times_swapped)."""
    return a.device.xp.matmul(a.x.swapaxes(-1, -2), b.x)


def _check_matmul(a, b):
    _check_tensor("matmul", a)
    _check_tensor("matmul", b)
    if a.ndim < 2 or b.ndim < 2:
        raise ValueError(f"matmul: operands must be at least 2-D, got {a.shape} @ {b.shape}")
    if a.shape[-1] != b.shape[-2]:
        raise ValueError(f"matmul: inner dimensions differ: {a.shape} @ {b.shape}") from None
    for x, y in zip(reversed(a.shape[:-2]), reversed(b.shape[:-2])):
        if x != y and x != 1 and y != 1:
            raise ValueError(f"matmul: batch dimensions cannot broadcast: {a.shape} @ {b.shape}") from None


_MATMUL = MatMul()


def matmul(a, b):
    # numpy would take 1-D operands, so that test stays on the way that works; numpy refuses the other
    # mistakes itself, and the check that names them runs once it has
    if not isinstance(a, Tensor) or not isinstance(b, Tensor) or len(a.shape) < 2 or len(b.shape) < 2:
        _check_matmul(a, b)
    try:
        return _MATMUL(a, b)
    except ValueError:
        _check_matmul(a, b)
        raise


def _for_rows(device, fn, rows, elements):
    """fn(block) over row blocks, on several threads where the backend offers it (parallel_numpy.py) and the
    work is big enough to split."""
    if elements < device.parallel_from:
        return [fn(slice(0, rows))]
    parallel = device.kernel("for_rows")
    return parallel(fn, rows, elements) if parallel else [fn(slice(0, rows))]


class Affine(TensorOp):
    """x @ w + b for x (n, k), w (k, m) and b (1, m) or (m,), as one op: the bias goes into the fresh product
    in place, row block by row block on the backend's threads. Unlike matmul then add, it makes no second
    (n, m) array: for a language model's (700, 10,000) logits that second array, written page by fresh page,
    cost more than the add itself."""
    name = "affine"

    def compute(self, x, w, b):
        device = x.device
        y, bias, xp = device.xp.matmul(x.x, w.x), b.x, device.xp  # bias (m,) or (1, m): broadcasts over rows

        def rows(sl):
            xp.add(y[sl], bias, out=y[sl])

        _for_rows(device, rows, y.shape[0], y.size)
        return NDArray.from_xp(y, device)

    def gradient(self, out_grad, node):
        x, w, b = node.inputs
        g = out_grad.cached_data
        return (_grad_x(_times_swapped(g, w.cached_data), g) if x.requires_grad else None,
                _grad_x(_swapped_times(x.cached_data, g), g) if w.requires_grad else None,
                _grad_x(g.sum(axis=0).x.reshape(b.shape), g) if b.requires_grad else None)


def _check_affine(x, w, b):
    for t in (x, w, b):
        _check_tensor("affine", t)
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[0]:
        raise ValueError(f"affine: expected x (n, k) and w (k, m), got {x.shape} and {w.shape}")
    if b.shape not in ((1, w.shape[1]), (w.shape[1],)):
        raise ValueError(f"affine: b must be (1, {w.shape[1]}) or ({w.shape[1]},), got {b.shape}")


_AFFINE = Affine()


def affine(x, w, b):
    """x @ w + b (x (n, k), w (k, m), b (1, m) or (m,)), what Linear computes, in one op."""
    if isinstance(x, Tensor) and isinstance(w, Tensor) and isinstance(b, Tensor):
        xs, ws, bs = x.cached_data.shape, w.cached_data.shape, b.cached_data.shape
        if len(xs) == 2 and len(ws) == 2 and xs[1] == ws[0] and bs in ((ws[1],), (1, ws[1])):
            return _AFFINE(x, w, b)
    _check_affine(x, w, b)
    return _AFFINE(x, w, b)


# ---- reductions and shapes ------------------------------------------------------------------------------

class Summation(TensorOp):
    """Sum over `axes` (a tuple of non-negative ints), which are dropped."""
    name = "summation"

    def __init__(self, axes):
        self.axes = axes

    def compute(self, a):
        return a.sum(axis=self.axes)

    def gradient(self, out_grad, node):
        shape = node.inputs[0].shape
        kept = tuple(1 if i in self.axes else d for i, d in enumerate(shape))
        return _grad(out_grad.cached_data.compact().reshape(kept).broadcast_to(shape))


def summation(a, axes=None):
    _check_tensor("summation", a)
    return Summation(_norm_axes("summation", axes, a.shape))(a)


class BroadcastTo(TensorOp):
    name = "broadcast_to"

    def __init__(self, shape):
        self.shape = shape

    def compute(self, a):
        return a.broadcast_to(self.shape)

    def gradient(self, out_grad, node):
        return _sum_to_shape(out_grad, node.inputs[0].shape)


def broadcast_to(a, shape):
    _check_tensor("broadcast_to", a)
    shape = tuple(operator.index(d) for d in shape)
    check_broadcast_to("broadcast_to", a.shape, shape)
    return BroadcastTo(shape)(a)


class Reshape(TensorOp):
    name = "reshape"

    def __init__(self, shape):
        self.shape = shape

    def compute(self, a):
        return a.compact().reshape(self.shape)

    def gradient(self, out_grad, node):
        return _grad(out_grad.cached_data.compact().reshape(node.inputs[0].shape))


def reshape(a, shape):
    _check_tensor("reshape", a)
    return Reshape(_resolve_shape("reshape", a.shape, shape))(a)


class Transpose(TensorOp):
    """Swap two axes (the last two by default); a view."""
    name = "transpose"

    def __init__(self, axes):
        self.axes = axes

    def compute(self, a):
        order = list(range(a.ndim))
        i, j = self.axes
        order[i], order[j] = order[j], order[i]
        return a.permute(order)

    def gradient(self, out_grad, node):
        return _grad(self.compute(out_grad.cached_data))



def transpose(a, axes=None):
    _check_tensor("transpose", a)
    if axes is None:
        if a.ndim < 2:
            raise ValueError(f"transpose: input must be at least 2-D to swap its last two axes, got {a.shape}")
        axes = (a.ndim - 2, a.ndim - 1)
    elif len(tuple(axes)) != 2:
        raise ValueError(f"transpose: axes must be a pair (i, j), got {axes!r}")
    i, j = (_norm_axes("transpose", (ax,), a.shape)[0] for ax in axes)
    return Transpose((i, j))(a)


class Stack(TensorOp):
    """Join equal-shaped tensors along a new axis."""
    name = "stack"

    def __init__(self, axis):
        self.axis = axis

    def compute(self, *arrays):
        device = arrays[0].device
        return NDArray.from_xp(device.xp.stack([a.x for a in arrays], axis=self.axis), device)

    def gradient(self, out_grad, node):
        return tuple(_grad(g) for g in Split(self.axis).compute(out_grad.cached_data))


def stack(tensors, axis):
    """Join a sequence of equal-shaped tensors along a new axis `axis`."""
    if isinstance(tensors, TensorTuple):
        tensors = tensors.tuple()
    tensors = list(tensors)
    if not tensors:
        raise ValueError("stack: expected at least one tensor, got none")
    for t in tensors:
        _check_tensor("stack", t)
    shape = tensors[0].shape
    for k, t in enumerate(tensors):
        if t.shape != shape:
            raise ValueError(f"stack: all tensors must have one shape; tensor 0 has {shape}, tensor {k} has {t.shape}")
    axis = operator.index(axis)
    if not -(len(shape) + 1) <= axis <= len(shape):
        raise ValueError(f"stack: axis {axis} is out of range for stacking tensors of shape {shape} "
                         f"(expected {-len(shape) - 1} <= axis <= {len(shape)})")
    return Stack(axis % (len(shape) + 1))(*tensors)


class Split(TensorTupleOp):
    """Stack's inverse: the slices along `axis`, each without that axis (views)."""
    name = "split"

    def __init__(self, axis):
        self.axis = axis

    def compute(self, a):
        shape = a.shape[:self.axis] + a.shape[self.axis + 1:]
        strides = a.strides[:self.axis] + a.strides[self.axis + 1:]
        step, x, lead = a.strides[self.axis], a.x, (slice(None),) * self.axis
        return tuple(a._part(x[lead + (i,)], shape, strides, a.offset + i * step) for i in range(a.shape[self.axis]))

    def gradient(self, out_grad, node):
        return _grad(Stack(self.axis).compute(*out_grad.cached_data))


def split(a, axis):
    _check_tensor("split", a)
    return Split(_norm_axes("split", axis, a.shape)[0])(a)


class Flip(TensorOp):
    name = "flip"

    def __init__(self, axes):
        self.axes = axes

    def compute(self, a):
        return a.flip(self.axes)

    def gradient(self, out_grad, node):
        return _grad(self.compute(out_grad.cached_data))


def flip(a, axes):
    _check_tensor("flip", a)
    return Flip(_norm_axes("flip", axes, a.shape))(a)


def _dilated_slices(shape, axes, dilation):
    return tuple(slice(None, None, dilation + 1) if i in axes else slice(None) for i in range(len(shape)))


class Dilate(TensorOp):
    """Put `dilation` zeros after every element along each axis in `axes`."""
    name = "dilate"

    def __init__(self, axes, dilation):
        self.axes, self.dilation = axes, dilation

    def compute(self, a):
        shape = tuple(d * (self.dilation + 1) if i in self.axes else d for i, d in enumerate(a.shape))
        out = NDArray.make(shape, device=a.device, dtype=a.dtype)
        out.fill(0.0)
        out[_dilated_slices(shape, self.axes, self.dilation)] = a
        return out

    def gradient(self, out_grad, node):
        return _grad(UnDilate(self.axes, self.dilation).compute(out_grad.cached_data))


class UnDilate(TensorOp):
    """Take out what dilate with the same arguments put in (a strided view)."""
    name = "undilate"

    def __init__(self, axes, dilation):
        self.axes, self.dilation = axes, dilation

    def compute(self, a):
        return a[_dilated_slices(a.shape, self.axes, self.dilation)]

    def gradient(self, out_grad, node):
        return _grad(Dilate(self.axes, self.dilation).compute(out_grad.cached_data))


def _check_dilation(name, a, axes, dilation):
    _check_tensor(name, a)
    if not isinstance(dilation, numbers.Integral) or dilation < 0:
        raise ValueError(f"{name}: dilation must be a non-negative int, got {dilation!r}")
    return _norm_axes(name, axes, a.shape)


def dilate(a, axes, dilation):
    return Dilate(_check_dilation("dilate", a, axes, dilation), dilation)(a)


def undilate(a, axes, dilation):
    axes = _check_dilation("undilate", a, axes, dilation)
    for i in axes:
        if a.shape[i] % (dilation + 1):
            raise ValueError(f"undilate: axis {i} of shape {a.shape} is not a multiple of {dilation + 1}")
    return UnDilate(axes, dilation)(a)


# ---- tuples ------------------------------------------------------------------------------------------------

class MakeTensorTuple(TensorTupleOp):
    name = "make_tuple"

    def compute(self, *args):
        return tuple(args)

    def gradient(self, out_grad, node):
        return tuple(_constant(g) for g in out_grad.cached_data)


_MAKE_TUPLE = MakeTensorTuple()


def make_tuple(*args):
    return _MAKE_TUPLE(*args)


class TupleGetItem(TensorOp):
    """One element of a TensorTuple (backward fills just that slot of the tuple's gradient)."""
    name = "tuple_get_item"

    def __init__(self, index):
        self.index = index

    def compute(self, a):
        return a[self.index]

    def gradient(self, out_grad, node):
        parts = [_constant(d.device.full(d.shape, 0.0, d.dtype)) for d in node.inputs[0].cached_data]
        parts[self.index] = out_grad
        return make_tuple(*parts)


def tuple_get_item(value, index):
    size = len(value.cached_data)
    index = operator.index(index)
    if not -size <= index < size:
        raise IndexError(f"tuple_get_item: index {index} out of range for a tuple of {size}")
    return TupleGetItem(index % size)(value)
