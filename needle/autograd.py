"""Reverse-mode automatic differentiation: Tensor, TensorTuple, Op and an iterative backward pass.

Values are computed eagerly when an op is applied. A result records its op and inputs only when
gradients are enabled and some input requires a gradient, so evaluation under `no_grad()` builds no
graph. Backward walks the graph in reverse topological order found with an explicit stack (graphs
hundreds of thousands of nodes deep work) and runs under `no_grad()`, so gradients hold no graph.
"""
import functools

import numpy as np

from . import anomaly as _anomaly
from . import backend_ndarray as nd
from .backend_ndarray.float_errors import QUIET as _FP_QUIET
from .backend_ndarray.float_errors import STATE as _FP_STATE
from .backend_ndarray.float_errors import quiet as _quiet_fp
from .backend_ndarray.ndarray import NDArray, _dtype_name, _numeric_numpy

__all__ = ["Value", "Tensor", "TensorTuple", "Op", "TensorOp", "TensorTupleOp", "no_grad",
           "is_grad_enabled", "compute_gradient_of_variables"]

_GRAD_ENABLED = True


def is_grad_enabled():
    return _GRAD_ENABLED


class no_grad:
    """Context manager and decorator under which ops record no graph.

    `with ndl.no_grad(): ...`, `@ndl.no_grad()` and `@ndl.no_grad` all work.
    """

    def __new__(cls, func=None):
        if func is None:
            return super().__new__(cls)

        @functools.wraps(func)
        def wrapper(*args, **kwargs):
            with no_grad():
                return func(*args, **kwargs)
        return wrapper

    def __call__(self, func):
        return no_grad(func)

    def __enter__(self):
        global _GRAD_ENABLED
        self._previous, _GRAD_ENABLED = _GRAD_ENABLED, False
        return self

    def __exit__(self, *exc):
        global _GRAD_ENABLED
        _GRAD_ENABLED = self._previous
        return False


class Op:
    """An operation: `compute` maps NDArrays to an NDArray, `gradient` maps the output's gradient to the
    inputs' gradients (Tensors, one per input, None where an input gets none)."""

    name = None  # the public function name, used in error messages

    def __call__(self, *args):
        raise NotImplementedError()

    def compute(self, *args):
        raise NotImplementedError()

    def gradient(self, out_grad, node):
        raise NotImplementedError()

    def gradient_as_tuple(self, out_grad, node):
        grads = self.gradient(out_grad, node)
        return tuple(grads) if isinstance(grads, (tuple, list)) else (grads,)

    def _name(self):
        return self.name or type(self).__name__


class TensorOp(Op):
    """An op whose output is one Tensor."""

    def __call__(self, *args):
        return _make_from_op(Tensor, self, args)  # Tensor.make_from_op without binding a classmethod per call


class TensorTupleOp(Op):
    """An op whose output is a TensorTuple."""

    def __call__(self, *args):
        return _make_from_op(TensorTuple, self, args)


class Value:
    """A node of the graph: the op that made it, its inputs and its computed data."""

    # the four fields every node has live in slots (set by _init or make_from_op); others (a Tensor's grad,
    # detect_anomaly's call sites, attributes a user adds) go to the instance dictionary
    __slots__ = ("op", "inputs", "cached_data", "requires_grad", "__dict__", "__weakref__")

    def realize_cached_data(self):
        return self.cached_data

    def is_leaf(self):
        return self.op is None

    def _init(self, op, inputs, cached_data, requires_grad):
        self.op = op
        self.inputs = inputs
        self.cached_data = cached_data
        self.requires_grad = requires_grad

    @classmethod
    def make_from_op(cls, op, inputs):
        return _make_from_op(cls, op, inputs)

    @classmethod
    def make_const(cls, data, requires_grad=False):
        return _constant(data, requires_grad, cls)


def _make_from_op(cls, op, inputs):
    """Value.make_from_op: `op` computed on the Values `inputs`, as a new node of class `cls` that records op
    and inputs when gradients are enabled and some input requires one.

    This is the per-op path of every op in needle: each check is one cheap test whose failure (rare) takes
    the slow branch that names the mistake; one, two and three inputs (most ops) go without a loop."""
    n = len(inputs)
    try:
        if n == 2:
            arrays = (inputs[0].cached_data, inputs[1].cached_data)
        elif n == 1:
            arrays = (inputs[0].cached_data,)
        elif n == 3:  # affine
            arrays = (inputs[0].cached_data, inputs[1].cached_data, inputs[2].cached_data)
        else:
            arrays = [value.cached_data for value in inputs]
    except AttributeError:
        bad = next(v for v in inputs if not isinstance(v, Value))
        raise TypeError(f"{op._name()}: inputs must be needle Tensors, got {type(bad).__name__}") from None
    if n == 2:
        a, b = arrays
        if type(a) is not NDArray or type(b) is not NDArray or a.device is not b.device:
            _check_same_device(op, inputs)  # raises unless the devices are equal after all
    elif n > 2:
        device = _device_of(arrays[0])
        for data in arrays:
            if (data.device if type(data) is NDArray else _device_of(data)) is not device:
                _check_same_device(op, inputs)
                break
    token = _FP_STATE.set(_FP_QUIET)  # NaN and inf propagate silently, without numpy's warnings
    try:  # a call with the arguments spelled out is faster than op.compute(*arrays)
        data = op.compute(arrays[0], arrays[1]) if n == 2 else op.compute(arrays[0]) if n == 1 else \
            op.compute(arrays[0], arrays[1], arrays[2]) if n == 3 else op.compute(*arrays)
    finally:
        _FP_STATE.reset(token)
    value = _new_value(cls)
    value.cached_data = data
    for v in inputs if _GRAD_ENABLED else ():
        if v.requires_grad:
            value.op, value.inputs, value.requires_grad = op, list(inputs), True
            break
    else:  # under no_grad, or no input requires a gradient: a constant
        value.op, value.inputs, value.requires_grad = None, [], False
    if _anomaly.enabled:
        _anomaly.check_forward(op, inputs, value)
    return value


_new_value = object.__new__


def _constant(data, requires_grad=False, cls=None):
    """A leaf of class `cls` (default Tensor) holding `data` (Value.make_const without the classmethod: every
    gradient the ops compute is one)."""
    value = _new_value(Tensor if cls is None else cls)
    value.op, value.inputs, value.cached_data, value.requires_grad = None, [], data, requires_grad
    return value


def _device_of(data):
    """The device of an NDArray or of a tuple's first NDArray; None for an empty tuple."""
    if type(data) is tuple:
        return data[0].device if data else None
    return data.device


def _check_same_device(op, inputs):
    devices = [d for d in (_device_of(v.cached_data) for v in inputs) if d is not None]
    if any(d != devices[0] for d in devices[1:]):  # a plain scan: this runs for every op
        names = ", ".join(sorted({repr(d) for d in devices}))
        raise ValueError(f"{op._name()}: all inputs must be on one device, got tensors on {names}")


class TensorTuple(Value):
    """A tuple of tensors, the output of a tuple op; `t[i]` records the indexing in the graph."""

    def __len__(self):
        return len(self.cached_data)

    def __getitem__(self, index):
        return ops.tuple_get_item(self, index)

    def tuple(self):
        return tuple(self[i] for i in range(len(self)))

    def __iter__(self):
        return iter(self.tuple())

    def __repr__(self):
        return "needle.TensorTuple" + str(self.tuple())

    def __add__(self, other):
        from .ops import make_tuple
        return make_tuple(*[a + b for a, b in zip(self, other)])

    def detach(self):
        return TensorTuple.make_const(self.realize_cached_data())

    @property
    def device(self):
        return _device_of(self.cached_data)


class Tensor(Value):
    """An n-d float array that records how it was computed.

    Args:
        array: a numpy array, an NDArray, a (nested) list, a number or another Tensor.
        device: a needle device (default: the Tensor's or NDArray's own, else cpu()).
        dtype: "float32" (default) or "float64".
        requires_grad: whether backward computes a gradient for this tensor (default True).
    """

    grad = None

    def __init__(self, array, device=None, dtype=None, requires_grad=True):
        if isinstance(array, Tensor):
            device = array.device if device is None else device
            dtype = array.dtype if dtype is None else _dtype_name(dtype)
            if device == array.device and dtype == array.dtype:
                data = array.realize_cached_data()
            else:
                data = nd.NDArray(array.realize_cached_data(), device=device, dtype=dtype)
        else:
            if isinstance(array, nd.NDArray):
                device = array.device if device is None else device
            else:
                array = _numeric_numpy(array, "Tensor")  # a TypeError names Tensor, not an internal function
            data = nd.NDArray(array, device=device, dtype=_dtype_name(dtype))
        self._init(None, [], data, requires_grad)

    @staticmethod
    def make_const(data, requires_grad=False):
        if isinstance(data, Tensor):
            data = data.realize_cached_data()
        return _constant(data, requires_grad)

    @property
    def data(self):
        return self.detach()

    @data.setter
    def data(self, value):
        if not isinstance(value, Tensor):
            raise TypeError(f"Tensor.data: expected a Tensor, got {type(value).__name__}")
        if value.shape != self.shape or value.dtype != self.dtype:
            raise ValueError(f"Tensor.data: expected shape {self.shape} and dtype {self.dtype}, "
                             f"got {value.shape} and {value.dtype}")
        self.cached_data = value.realize_cached_data()

    def detach(self):
        return Tensor.make_const(self.realize_cached_data())

    @property
    def shape(self):
        return self.cached_data.shape

    @property
    def dtype(self):
        return self.cached_data.dtype

    @property
    def device(self):
        return self.cached_data.device

    @property
    def ndim(self):
        return self.cached_data.ndim

    def numpy(self):
        return self.cached_data.numpy()

    def to(self, device):
        return self if device == self.device else Tensor(self, device=device, requires_grad=self.requires_grad)

    def backward(self, out_grad=None):
        if out_grad is None:
            out_grad = Tensor.make_const(self.device.full(self.shape, 1.0, self.dtype))
        elif not isinstance(out_grad, Tensor):
            out_grad = Tensor(out_grad, device=self.device, dtype=self.dtype, requires_grad=False)
        if out_grad.shape != self.shape:
            raise ValueError(f"backward: out_grad must have the output's shape {self.shape}, got {out_grad.shape}")
        compute_gradient_of_variables(self, out_grad)

    def __repr__(self):
        return "needle.Tensor(" + str(self.realize_cached_data()) + ")"

    def __str__(self):
        return str(self.realize_cached_data())

    def __len__(self):
        return len(self.cached_data)

    # Operators dispatch to needle.ops (imported at the bottom of this module).
    def __add__(self, other):
        return ops.add(self, other) if isinstance(other, Tensor) else ops.add_scalar(self, other)

    __radd__ = __add__

    def __sub__(self, other):
        return ops.add(self, ops.negate(other)) if isinstance(other, Tensor) else ops.add_scalar(self, -other)

    def __rsub__(self, other):
        return ops.add_scalar(ops.negate(self), other)

    def __mul__(self, other):
        return ops.multiply(self, other) if isinstance(other, Tensor) else ops.mul_scalar(self, other)

    __rmul__ = __mul__

    def __truediv__(self, other):
        return ops.divide(self, other) if isinstance(other, Tensor) else ops.divide_scalar(self, other)

    def __rtruediv__(self, other):
        return ops.mul_scalar(ops.power_scalar(self, -1), other)

    def __pow__(self, other):
        return ops.power(self, other) if isinstance(other, Tensor) else ops.power_scalar(self, other)

    def __matmul__(self, other):
        return ops.matmul(self, other)

    def __neg__(self):
        return ops.negate(self)

    def sum(self, axes=None):
        return ops.summation(self, axes)

    def broadcast_to(self, shape):
        return ops.broadcast_to(self, shape)

    def reshape(self, shape):
        return ops.reshape(self, shape)

    def transpose(self, axes=None):
        return ops.transpose(self, axes)

    __hash__ = object.__hash__


def _topo_order(outputs, every_input=False):
    """Nodes that `outputs` (a value or a list) depend on, inputs before the nodes that use them (iterative
    DFS); only nodes that need a gradient, unless every_input (the cell tracer wants every one)."""
    order, visited = [], set()
    for output in outputs if isinstance(outputs, list) else [outputs]:
        if id(output) in visited:
            continue
        visited.add(id(output))
        stack = [(output, iter(output.inputs))]
        while stack:
            node, children = stack[-1]
            for child in children:
                if id(child) not in visited and (every_input or child.requires_grad):
                    visited.add(id(child))
                    stack.append((child, iter(child.inputs)))
                    break
            else:
                stack.pop()
                order.append(node)
    return order


def compute_gradient_of_variables(output, out_grad):
    """Backpropagate `out_grad` from `output`, accumulating `.grad` on the leaves that require it.

    A value that receives several gradients keeps their running sum as a bare NDArray that this walk made
    and nothing else holds, so the third gradient on is added in place; it becomes a Tensor when the
    value's turn comes. A gradient Tensor itself is never written to: an op may hand one to several inputs.
    """
    # gradients may compute on NDArrays directly, outside any op; under detect_anomaly each step is checked
    with no_grad(), _quiet_fp(), _anomaly.backward_walk() as checking:
        grads = {id(output): out_grad}
        pop, get, tuple_get_item = grads.pop, grads.get, ops.TupleGetItem  # looked up once: the loop is hot
        for node in reversed(_topo_order(output)):
            grad = pop(id(node), None)
            if grad is None:
                continue
            if type(grad) is NDArray:  # a running sum (above)
                grad = _constant(grad)
            op = node.op
            if op is None:
                if node.requires_grad and isinstance(node, Tensor):
                    node.grad = grad.detach() if node.grad is None else _summed(node.grad, grad)
                continue
            if type(grad) is list:  # a TensorTuple's gradient, slots filled by tuple_get_item
                grad = _tuple_grad(node, grad)
            if type(op) is tuple_get_item:  # one slot of its input tuple: no zeros made here
                _add_tuple_slot(grads, node.inputs[0], op.index, grad)
                continue
            input_grads = op.gradient_as_tuple(grad, node)
            if checking:
                _anomaly.check_backward(node, input_grads)
            for value, value_grad in zip(node.inputs, input_grads):
                if value_grad is None or not value.requires_grad:
                    continue
                if isinstance(value, TensorTuple):
                    for i, g in enumerate(value_grad):
                        _add_tuple_slot(grads, value, i, g)
                    continue
                key = id(value)
                previous = get(key)
                if previous is None:
                    grads[key] = value_grad
                elif type(previous) is NDArray:
                    previous._add_in_place(value_grad.cached_data)
                else:
                    grads[key] = previous.cached_data + value_grad.cached_data


def _summed(a, b):
    """Two gradients of one value, summed on their arrays (no op recorded) as a constant Tensor."""
    return _constant(a.cached_data + b.cached_data)


def _add_tuple_slot(grads, tuple_value, index, grad):
    slots = grads.setdefault(id(tuple_value), [None] * len(tuple_value.cached_data))
    slots[index] = grad if slots[index] is None else _summed(slots[index], grad)


def _tuple_grad(node, slots):
    """The gradient of a TensorTuple, with zeros in the slots nothing reached."""
    parts = []
    for data, grad in zip(node.cached_data, slots):
        parts.append(data.device.full(data.shape, 0.0, data.dtype) if grad is None else grad.cached_data)
    return TensorTuple.make_const(tuple(parts))  # what make_tuple computes, without an op's checks


from . import ops  # noqa: E402  (Tensor's operators are ops; imported last to break the import cycle)
