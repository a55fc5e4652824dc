"""The compiler's IR: a recurrent step as a flat list of nodes over (batch, width) row values.

A node's value has one row per sequence of the batch and `width` features (a cell's feature axes are
flattened in row-major order, so `reshape` keeps a value's flat features). An operand is a `Ref`: a node
read through an index map, feature j of the operand being feature ((j // div) % mod) + off of the node
(mod 0: no modulo). The map covers a gate block cut out of a wider value (`off`), a per-row scalar or a
parameter broadcast over features (`mod` 1), a value repeated per block (`div`) or per position (`mod`).

Node ops (`attr` in brackets):
  inputs   x (the step's input), state [k], param [k] (a parameter vector, no batch axis), xw [k] (the
           step's rows of X @ M_k, hoisted out of the loop); backward only: carry [k] (dL/d new state k),
           dout (dL/d output at this step), fwd [node] (a forward node's value at this step)
  compute  unary [fn, c], binary [fn] or [fn, c], reduce ['trail', d] (sums of d consecutive features)
           or ['lead', n] (sum of n consecutive blocks), concat [widths] (operands side by side), assemble [(offset,
           width) each] (operands added into a zero row at their offsets); sinks: pacc [k, div, mod, off]
           (adds its operand into parameter k's gradient), out [kind, k] (stores its operand in an output)
  GEMMs    mm [k] (operand @ M_k), mmT [k] (operand @ M_k^T), one per step each
"""
from dataclasses import dataclass

__all__ = ["Ref", "Node", "StepGraph", "Builder", "INPUT_OPS", "GEMM_OPS"]

INPUT_OPS = frozenset({"x", "state", "param", "xw", "carry", "dout", "fwd"})
GEMM_OPS = frozenset({"mm", "mmT"})


@dataclass(frozen=True)
class Ref:
    node: int
    div: int = 1
    mod: int = 0
    off: int = 0

    @property
    def plain(self):
        """Read feature j as feature j (+ an offset): no broadcast."""
        return self.div == 1 and self.mod == 0

    def shifted(self, off):
        return Ref(self.node, self.div, self.mod, self.off + off)


@dataclass(frozen=True)
class Node:
    op: str
    args: tuple = ()
    attr: tuple = ()
    width: int = 1


@dataclass
class StepGraph:
    """One step of a cell. Forward: `outputs` are the new states. Backward (derive.py): `outputs` holds
    (kind, index, ref) for carry (dL/d previous state), dxw, dx and dmm (the gradient at a per-step GEMM's
    output, kept for the weight gradient after the loop)."""
    nodes: list
    outputs: list

    def text(self):
        """A canonical description (the cache key's source)."""
        lines = [f"{i} {n.op} {n.attr} {n.width} " + " ".join(f"{a.node}/{a.div}/{a.mod}/{a.off}" for a in n.args)
                 for i, n in enumerate(self.nodes)]
        return "\n".join(lines) + "\nout " + repr(self.outputs)


class Builder:
    """Appends nodes, sharing identical ones (common subexpressions)."""

    def __init__(self):
        self.nodes, self._index = [], {}

    def add(self, op, args=(), attr=(), width=1):
        node = Node(op, tuple(args), tuple(attr), width)
        if node.op in ("pacc", "out"):
            self.nodes.append(node)
            return Ref(len(self.nodes) - 1)
        if node not in self._index:
            self._index[node] = len(self.nodes)
            self.nodes.append(node)
        return Ref(self._index[node])

    def width(self, ref):
        return self.nodes[ref.node].width

    def plain(self, ref, width):
        """`ref` as a node read plainly (offset allowed), copying a broadcast read into a node of its own."""
        return ref if ref.plain else self.add("unary", (ref,), ("copy", 0.0), width)

    def view(self, ref, width, div=1, mod=0, off=0):
        """`ref` (a value of `width` features) read through another map: feature j of the result is its
        feature ((j // div) % mod) + off. Two maps compose when the first only shifts."""
        ref = self.plain(ref, width)
        return Ref(ref.node, div, mod, ref.off + off)
