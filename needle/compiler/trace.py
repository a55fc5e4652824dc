"""Trace a recurrent cell's `forward` once into a step graph (graph.py) and a prelude.

The cell runs once, eagerly, on a small batch whose size appears in no parameter's shape, with its
tensors swapped for fresh leaves so that every value computed from them is recorded. The recorded autograd
graph is then read back, node by node:
  - values computed from the parameters alone (a bias reshaped, a weight split into blocks) form the
    prelude: the same ops replayed on the cell's tensors at every call, so they differentiate as usual;
  - values computed from the input or the state are rows of the step graph; a product of the input with a
    parameter matrix is hoisted out of the time loop (`xw`), any other product with a matrix stays a
    per-step GEMM (`mm`).
An op that cannot run in a compiled step, a tensor made inside `forward` or a read of a tensor's values
raises `Unsupported`, naming what was found.
"""
import math
from dataclasses import dataclass

import numpy as np

from .. import autograd, ops
from ..autograd import Tensor, TensorTuple
from .graph import Builder, Ref, StepGraph

__all__ = ["Unsupported", "Trace", "trace_cell", "cell_tensors", "cell_signature"]


class Unsupported(Exception):
    """The cell does something a compiled step cannot: `what` names it."""

    def __init__(self, what):
        super().__init__(what)
        self.what = what


@dataclass
class Trace:
    """A traced cell: the step graph, how to get the kernel's matrices and vectors from the cell's tensors
    (`prelude`: ops replayed on `paths`), and the sizes it was traced with."""
    graph: StepGraph
    paths: list          # where each captured tensor lives in the cell (attribute paths)
    prelude: list        # (op, input slots): slot i < len(paths) is captured tensor i, then each step's result
    matrices: list       # slot of each matrix M_k
    vectors: list        # slot of each vector P_k (flattened at call time)
    in_features: int
    hidden_size: int
    num_states: int


def _is_module(value):
    """A sub-module (duck-typed, as a cell's own modules may be any Module-like object)."""
    return hasattr(value, "parameters") and hasattr(value, "__dict__") and hasattr(value, "training")


def cell_tensors(module, path=()):
    """(path, Tensor) for every Tensor the cell holds, in its attributes, lists, tuples, dicts and
    sub-modules; a path is a tuple of attribute names, list indices and dict keys."""
    found, seen = [], set()

    def walk(value, path):
        if isinstance(value, Tensor):
            if id(value) not in seen:
                seen.add(id(value))
                found.append((path, value))
        elif isinstance(value, dict):
            for key, item in value.items():
                walk(item, path + (key,))
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                walk(item, path + (i,))
        elif _is_module(value):
            for key, item in vars(value).items():
                walk(item, path + (key,))

    for key, item in vars(module).items():
        walk(item, path + (key,))
    return found


def cell_signature(cell):
    """What a trace of `cell` depends on, as a flat tuple to compare between calls: the identity, shape and
    dtype of every Tensor cell_tensors finds (in its order) and the cell's own plain attributes (bool, int,
    float, str, None), which the forward may branch on. Equal signatures: the earlier trace still holds."""
    out = []

    def walk(value):
        if isinstance(value, Tensor):
            out.append((id(value), value.shape, value.dtype))
        elif isinstance(value, dict):
            for key, item in value.items():
                out.append(key)
                walk(item)
        elif isinstance(value, (list, tuple)):
            out.append(len(value))
            for item in value:
                walk(item)
        elif _is_module(value):
            out.append(value.training)
            walk(vars(value))

    for key, value in vars(cell).items():
        if value is None or isinstance(value, (bool, int, float, str)):
            out.append((key, value))
        else:
            out.append(key)
            walk(value)
    return tuple(out)


def _get(root, path):
    for key in path:
        root = getattr(root, key) if isinstance(key, str) and not isinstance(root, dict) else root[key]
    return root


def _set(root, path, value):
    """Set the item at `path`, rebuilding tuples on the way."""
    *head, last = path
    parent = _get(root, head)
    if isinstance(parent, tuple):
        items = list(parent)
        items[last] = value
        _set(root, head, tuple(items))
    elif isinstance(parent, (list, dict)):
        parent[last] = value
    else:
        setattr(parent, last, value)


class _swapped:
    """Temporarily replace the cell's tensors with fresh leaves, record the graph, forbid reading values."""

    def __init__(self, cell, found):
        self.cell, self.found = cell, found
        self.proxies = [Tensor.make_const(t.realize_cached_data(), requires_grad=True) for _, t in found]

    def __enter__(self):
        for (path, _), proxy in zip(self.found, self.proxies):
            _set(self.cell, path, proxy)
        self._grad, autograd._GRAD_ENABLED = autograd._GRAD_ENABLED, True
        self._numpy = Tensor.numpy
        Tensor.numpy = _no_reading
        return self.proxies

    def __exit__(self, *exc):
        Tensor.numpy = self._numpy
        autograd._GRAD_ENABLED = self._grad
        for path, tensor in reversed(self.found):
            _set(self.cell, path, tensor)
        return False


def _no_reading(self):
    raise Unsupported("reading values")


def _trace_batch(in_features, hidden_size, found):
    """A batch size that no feature or parameter dimension has, so the batch axis is never ambiguous."""
    dims = {in_features, hidden_size} | {d for _, t in found for d in t.shape}
    return next(b for b in range(2, 10 ** 6) if b not in dims)


def trace_cell(cell, in_features):
    """Trace `cell` (with `hidden_size` and `num_states`) for inputs of `in_features` features."""
    hidden, n_states = cell.hidden_size, getattr(cell, "num_states", 1)
    found = cell_tensors(cell)
    batch = _trace_batch(in_features, hidden, found)
    rng = np.random.default_rng(0)
    dtype = found[0][1].dtype if found else "float32"
    device = found[0][1].device if found else None

    def leaf(*shape):
        return Tensor(rng.uniform(0.1, 0.9, shape), device=device, dtype=dtype, requires_grad=True)

    X = leaf(batch, in_features)
    states = [leaf(batch, hidden) for _ in range(n_states)]
    with np.errstate(all="ignore"), _swapped(cell, found) as proxies:
        out = cell(X, states[0] if n_states == 1 else tuple(states))
    outs = [out] if n_states == 1 else list(out) if isinstance(out, (tuple, list, TensorTuple)) else [out]
    if len(outs) != n_states or not all(isinstance(o, Tensor) and o.shape == (batch, hidden) for o in outs):
        raise Unsupported(f"a cell whose forward returns {n_states} state(s) of shape (bs, {hidden})")
    reader = _Reader(batch, X, states, proxies)
    for value in autograd._topo_order(outs, every_input=True):   # every input, not only gradient-needing
        reader.visit(value)
    outputs = []
    for o in outs:
        ref, fshape = reader.row(o)
        outputs.append(reader.b.plain(ref, hidden))
    graph = StepGraph(reader.b.nodes, [("state", k, r) for k, r in enumerate(outputs)])
    return Trace(graph, [p for p, _ in found], reader.prelude, reader.matrices, reader.vectors,
                 in_features, hidden, n_states)


_UNARY = {"Negate": "neg", "Exp": "exp", "Log": "log", "Tanh": "tanh", "Sigmoid": "sigmoid", "ReLU": "relu"}
_SCALAR = {"AddScalar": "adds", "MulScalar": "muls", "DivScalar": "divs", "PowerScalar": "pows"}
_BINARY = {"EWiseAdd": "add", "EWiseMul": "mul", "EWiseDiv": "div"}


def _size(shape):
    return math.prod(shape)


def _broadcast_map(shape, out):
    """(div, mod) reading a value of feature shape `shape` as feature shape `out` (numpy broadcasting)."""
    shape = (1,) * (len(out) - len(shape)) + tuple(shape)
    if len(shape) > len(out):
        raise Unsupported(f"broadcasting {shape} to {out}")
    if shape == out:
        return 1, 0
    if all(d == 1 for d in shape):
        return 1, 1
    for k in range(1, len(out)):
        if shape[:k] == out[:k] and all(d == 1 for d in shape[k:]):
            return _size(out[k:]), 0
        if all(d == 1 for d in shape[:k]) and shape[k:] == out[k:]:
            return 1, _size(out[k:])
    raise Unsupported(f"broadcasting features {shape} to {out}")


class _Reader:
    """Reads the recorded graph into the step graph (rows) and the prelude (parameter values)."""

    def __init__(self, batch, X, states, proxies):
        self.batch, self.b = batch, Builder()
        self.values = {}        # id(tensor) -> ("row", ref, fshape) | ("slot", i) | ("tuple", [values])
        self.prelude, self.matrices, self.vectors = [], [], []
        self.n_slots = len(proxies)
        self.values[id(X)] = ("row", self.b.add("x", width=X.shape[1]), X.shape[1:])
        for k, s in enumerate(states):
            self.values[id(s)] = ("row", self.b.add("state", attr=(k,), width=s.shape[1]), s.shape[1:])
        for i, p in enumerate(proxies):
            self.values[id(p)] = ("slot", i)
        self.shapes = {i: p.shape for i, p in enumerate(proxies)}
        self._vector_of, self._matrix_of = {}, {}
        self.reshape_of = {}

    def row(self, tensor):
        kind, *rest = self.values[id(tensor)]
        if kind != "row":
            raise Unsupported("a state that does not depend on the input or the state")
        return rest

    def visit(self, t):
        if id(t) in self.values:
            return
        if t.op is None:
            raise Unsupported("a tensor made inside forward (not a parameter of the cell: e.g. dropout or init)")
        ins = [self.values[id(v)] for v in t.inputs]
        if all(v[0] == "slot" for v in ins) and not self._batch_broadcast(t):
            if type(t.op).__name__ == "Reshape":   # a vector's kernel value is flat: read the one before
                self.reshape_of[self.n_slots] = ins[0][1]
            self.prelude.append((t.op, [v[1] for v in ins]))
            self.values[id(t)] = ("slot", self.n_slots)
            self.shapes[self.n_slots] = t.shape if isinstance(t, Tensor) else None
            self.n_slots += 1
            return
        self.values[id(t)] = self._row_op(t, ins)

    def _batch_broadcast(self, t):
        return type(t.op).__name__ == "BroadcastTo" and len(t.shape) >= 1 and t.shape[0] == self.batch

    def _vector(self, slot, out_fshape):
        """A parameter value as an operand of a row op with features `out_fshape`."""
        shape = self.shapes[slot]
        full = (1,) * (1 + len(out_fshape) - len(shape)) + tuple(shape)
        if len(full) != 1 + len(out_fshape) or full[0] != 1:
            raise Unsupported(f"a parameter of shape {shape} broadcast over the batch and {out_fshape}")
        base = slot
        while base in self.reshape_of:
            base = self.reshape_of[base]
        if base not in self._vector_of:
            self._vector_of[base] = len(self.vectors)
            self.vectors.append(base)
        node = self.b.add("param", attr=(self._vector_of[base],), width=_size(shape))
        div, mod = _broadcast_map(full[1:], tuple(out_fshape))
        return Ref(node.node, div, mod)

    def _operand(self, value, out_fshape):
        if value[0] == "slot":
            return self._vector(value[1], out_fshape)
        _, ref, fshape = value
        div, mod = _broadcast_map(tuple(fshape), tuple(out_fshape))
        return ref if (div, mod) == (1, 0) else self.b.view(ref, _size(fshape), div, mod)

    def _matrix(self, slot):
        shape = self.shapes[slot]
        if shape is None or len(shape) != 2:
            raise Unsupported(f"matmul with a parameter of shape {shape} (a 2-D matrix is needed)")
        if slot not in self._matrix_of:
            self._matrix_of[slot] = len(self.matrices)
            self.matrices.append(slot)
        return self._matrix_of[slot]

    def _product(self, left, slot):
        """left (a row value) @ parameter matrix `slot`."""
        if left[0] != "row":
            raise Unsupported("matmul of a parameter with a value computed from the input or state")
        _, ref, fshape = left
        k = self._matrix(slot)
        width = self.shapes[slot][1]
        if len(fshape) != 1 or fshape[0] != self.shapes[slot][0]:
            raise Unsupported(f"matmul of features {fshape} with a matrix {self.shapes[slot]}")
        if self.b.nodes[ref.node].op == "x" and ref == Ref(ref.node):
            return self.b.add("xw", attr=(k,), width=width), (width,)
        if ref.off or not ref.plain or self.b.width(ref) != fshape[0]:
            ref = self.b.add("unary", (ref,), ("copy", 0.0), fshape[0])
        return self.b.add("mm", (ref,), (k,), width), (width,)

    def _row_op(self, t, ins):
        name = type(t.op).__name__
        op, b = t.op, self.b
        if isinstance(t, Tensor):
            if len(t.shape) == 0 or t.shape[0] != self.batch:
                raise Unsupported(f"{op._name()} producing shape {t.shape} (the batch axis must stay first)")
            fshape = t.shape[1:]
            width = _size(fshape)
        if name in _UNARY or name in _SCALAR:
            fn = _UNARY.get(name) or _SCALAR[name]
            const = float(getattr(op, "scalar", 0.0))
            return "row", b.add("unary", (self._operand(ins[0], fshape),), (fn, const), width), fshape
        if name in _BINARY:
            args = [self._operand(v, fshape) for v in ins]
            a, c = args
            if name == "EWiseAdd" and b.nodes[c.node].op == "unary" and b.nodes[c.node].attr[0] == "neg" \
                    and c.plain and c.off == 0:
                return "row", b.add("binary", (a, b.nodes[c.node].args[0]), ("sub",), width), fshape
            return "row", b.add("binary", tuple(args), (_BINARY[name],), width), fshape
        if name == "MatMul":
            if ins[1][0] != "slot":
                raise Unsupported("matmul of two values computed from the input or state")
            ref, fs = self._product(ins[0], ins[1][1])
            return "row", ref, fs
        if name == "Affine":
            product, fs = self._product(ins[0], ins[1][1]) if ins[1][0] == "slot" else (None, None)
            if product is None or ins[2][0] != "slot":
                raise Unsupported("affine with weights computed from the input or state")
            bias = self._vector(ins[2][1], fs)
            return "row", b.add("binary", (product, bias), ("add",), width), fs
        if name == "Reshape":
            _, ref, _ = ins[0]
            return "row", ref, fshape
        if name == "BroadcastTo":
            return "row", self._operand(ins[0], fshape), fshape
        if name == "Summation":
            return self._summation(op, ins[0])
        if name == "Split":
            return self._split(op, ins[0])
        if name == "Stack":
            return self._stack(op, ins, fshape)
        if name == "TupleGetItem":
            return ins[0][1][op.index]
        if name == "MakeTensorTuple":
            return "tuple", ins
        raise Unsupported(op._name())

    def _summation(self, op, value):
        _, ref, fshape = value
        axes = sorted(a - 1 for a in op.axes)
        if not axes:
            return value
        if axes[0] < 0:
            raise Unsupported("summation over the batch axis")
        n, width = len(fshape), _size(fshape)
        ref = self.b.plain(ref, width)
        if axes == list(range(axes[0], n)):
            k = axes[0]
            kept = fshape[:k]
            return "row", self.b.add("reduce", (ref,), ("trail", _size(fshape[k:])), _size(kept)), kept
        if axes == list(range(0, len(axes))):
            k = len(axes)
            kept = fshape[k:]
            return "row", self.b.add("reduce", (ref,), ("lead", _size(fshape[:k])), _size(kept)), kept
        raise Unsupported(f"summation over feature axes {tuple(a + 1 for a in axes)} of shape {fshape}")

    def _split(self, op, value):
        if value[0] != "row":
            raise Unsupported("split of a parameter inside a step")
        _, ref, fshape = value
        axis = op.axis - 1
        if axis < 0:
            raise Unsupported("split along the batch axis")
        if _size(fshape[:axis]) != 1:
            raise Unsupported(f"split along axis {op.axis} of shape {fshape} (only leading feature axes)")
        block = _size(fshape[axis + 1:])
        kept = fshape[:axis] + fshape[axis + 1:]
        ref = self.b.plain(ref, _size(fshape))
        return "tuple", [("row", ref.shifted(i * block), kept) for i in range(fshape[axis])]

    def _stack(self, op, ins, fshape):
        axis = op.axis - 1
        if axis < 0:
            raise Unsupported("stack along the batch axis")
        if _size(fshape[:axis]) != 1:
            raise Unsupported(f"stack along axis {op.axis} into shape {fshape} (only leading feature axes)")
        parts, widths = [], []
        for v in ins:
            if v[0] != "row":
                raise Unsupported("stack of a parameter with values computed from the input or state")
            parts.append(self.b.plain(v[1], _size(v[2])))
            widths.append(_size(v[2]))
        return "row", self.b.add("concat", tuple(parts), tuple(widths), _size(fshape)), fshape
