"""Derive a step graph's backward (one step of BPTT) as another step graph, by reverse mode.

Forward nodes are visited last to first; each adds its inputs' gradient contributions by one rule per op,
the same rules as the ops' `gradient` methods. A contribution read through a map is carried back through
it: a block (`off`) lands at its offset of the wider gradient, a broadcast (`div`, `mod`) is summed back.
A forward value a rule needs is read as `fwd` (saved by the forward kernel, or its input, state or hoisted
product). The backward step reads `carry` (dL/d the states it produced, from the step after it) and `dout`
(dL/d its output h), and gives dL/d its input states, dL/d its hoisted products, dL/d x where x is used
directly, and adds into every parameter vector's gradient (`pacc`); a per-step product's output gradient
is kept (`dmm`) for its weight gradient, one GEMM over all steps after the loop.
"""
from .graph import Builder, Ref, StepGraph

__all__ = ["derive", "live_nodes"]


def live_nodes(graph):
    """Indices of the nodes the outputs (and sinks) depend on."""
    live = set()
    stack = [ref.node for *_, ref in graph.outputs if ref is not None]
    stack += [i for i, n in enumerate(graph.nodes) if n.op == "pacc"]
    while stack:
        i = stack.pop()
        if i not in live:
            live.add(i)
            stack.extend(a.node for a in graph.nodes[i].args)
    return live


class _Deriver:
    def __init__(self, forward):
        self.f = forward.nodes
        self.b = Builder()
        self.parts = {}   # forward node -> [(ref, offset, width)] gradient contributions

    def fwd(self, ref):
        """A forward operand's value, read in the backward step through the same map."""
        node = self.b.add("fwd", attr=(ref.node,), width=self.f[ref.node].width)
        return Ref(node.node, ref.div, ref.mod, ref.off)

    def add(self, op, args, attr, width):
        return self.b.add(op, args, attr, width)

    def accumulate(self, ref, grad, width):
        """Carry `grad` (width features, the gradient of the value read as `ref`) back to ref's node."""
        node = self.f[ref.node]
        if node.op == "param":
            self.b.add("pacc", (grad,), (node.attr[0], ref.div, ref.mod, ref.off), width)
            return
        if ref.div > 1:
            width //= ref.div
            grad = self.add("reduce", (self.b.plain(grad, width * ref.div),), ("trail", ref.div), width)
        if ref.mod and width > ref.mod:
            count = width // ref.mod
            width = ref.mod
            grad = self.add("reduce", (self.b.plain(grad, width * count),), ("lead", count), width)
        self.parts.setdefault(ref.node, []).append((grad, ref.off, width))

    def gradient(self, i):
        """The total gradient of forward node i, or None where nothing reached it."""
        parts = self.parts.pop(i, None)
        if not parts:
            return None
        width = self.f[i].width
        full = [g for g, off, w in parts if off == 0 and w == width]
        blocks = sorted(((off, w, g) for g, off, w in parts if not (off == 0 and w == width)),
                        key=lambda p: p[0])
        total = None
        if blocks:
            tiles = [0] + [off + w for off, w, _ in blocks]
            if [off for off, _, _ in blocks] == tiles[:-1] and tiles[-1] == width:
                total = self.add("concat", tuple(self.b.plain(g, w) for _, w, g in blocks),
                                 tuple(w for _, w, _ in blocks), width)
            else:
                total = self.add("assemble", tuple(self.b.plain(g, w) for _, w, g in blocks),
                                 tuple((off, w) for off, w, _ in blocks), width)
        for g in full:
            total = g if total is None else self.add("binary", (total, g), ("add",), width)
        return total

    def rule(self, i, node, g):
        """Contributions of forward node i (output gradient g) to its inputs."""
        op, args, w = node.op, node.args, node.width
        if op == "unary":
            fn, c = node.attr
            (a,) = args
            y = Ref(self.fwd(Ref(i)).node)
            local = {
                "neg": lambda: self.add("unary", (g,), ("neg", 0.0), w),
                "copy": lambda: g, "adds": lambda: g,
                "muls": lambda: self.add("unary", (g,), ("muls", c), w),
                "divs": lambda: self.add("unary", (g,), ("divs", c), w),
                "pows": lambda: self.add("binary", (g, self.fwd(a)), ("dpow", c), w),
                "exp": lambda: self.add("binary", (g, y), ("mul",), w),
                "log": lambda: self.add("binary", (g, self.fwd(a)), ("div",), w),
                "tanh": lambda: self.add("binary", (g, y), ("dtanh",), w),
                "sigmoid": lambda: self.add("binary", (g, y), ("dsigmoid",), w),
                "relu": lambda: self.add("binary", (g, y), ("drelu",), w),
            }[fn]()
            self.accumulate(a, local, w)
        elif op == "binary":
            fn = node.attr[0]
            a, c = args
            if fn == "add":
                self.accumulate(a, g, w)
                self.accumulate(c, g, w)
            elif fn == "sub":
                self.accumulate(a, g, w)
                self.accumulate(c, self.add("unary", (g,), ("neg", 0.0), w), w)
            elif fn == "mul":
                self.accumulate(a, self.add("binary", (g, self.fwd(c)), ("mul",), w), w)
                self.accumulate(c, self.add("binary", (g, self.fwd(a)), ("mul",), w), w)
            elif fn == "div":
                ga = self.add("binary", (g, self.fwd(c)), ("div",), w)
                self.accumulate(a, ga, w)
                y = Ref(self.fwd(Ref(i)).node)
                self.accumulate(c, self.add("unary", (self.add("binary", (ga, y), ("mul",), w),), ("neg", 0.0), w), w)
        elif op == "reduce":
            kind, n = node.attr
            (a,) = args
            if kind == "trail":
                self.accumulate(a, self.b.view(g, w, div=n), w * n)
            else:
                self.accumulate(a, self.b.view(g, w, mod=w), w * n)
        elif op == "concat":
            off = 0
            for a, width in zip(args, node.attr):
                self.accumulate(a, self.b.view(g, w, off=off), width)
                off += width
        elif op == "mm":
            (a,) = args
            k = node.attr[0]
            g = self.b.plain(g, w)
            if g.off:
                g = self.add("unary", (g,), ("copy", 0.0), w)
            self.outputs.append(("dmm", i, g))
            self.accumulate(a, self.add("mmT", (g,), (k,), self.f[a.node].width), self.f[a.node].width)
        elif op == "xw":
            self.outputs.append(("dxw", i, g))
        elif op == "x":
            self.outputs.append(("dx", 0, g))
        elif op == "state":
            self.outputs.append(("carry", node.attr[0], g))


def derive(forward):
    """The backward step graph of `forward` (a StepGraph whose outputs are the new states)."""
    d = _Deriver(forward)
    d.outputs = []
    for kind, k, ref in forward.outputs:
        carry = d.add("carry", (), (k,), d.f[ref.node].width)
        if k == 0:
            carry = d.add("binary", (carry, d.add("dout", (), (), d.f[ref.node].width)), ("add",),
                          d.f[ref.node].width)
        d.accumulate(ref, carry, d.f[ref.node].width)
    live = live_nodes(forward)
    for i in sorted(live, reverse=True):
        g = d.gradient(i)
        if g is not None:
            d.rule(i, forward.nodes[i], g)
    return StepGraph(d.b.nodes, d.outputs)
