"""Ops of the recurrent modules besides their layers' own (compiler.fused.CompiledLayer, one op per layer
with the derived BPTT as its gradient).

A bidirectional layer is one op over its two directions' layer ops, so that the backend can run the two
recurrent loops side by side (run_phased), in forward and in backward. GradProbe lets the per-step
reference path observe dL/dh_t for record_grad_flow.
"""
from ..autograd import Tensor, TensorOp, TensorTupleOp
from ..backend_ndarray.ndarray import NDArray
from .ops_indexing import reversed_sequences

__all__ = ["BidirectionalLayer", "bidirectional_layer", "GradProbe"]


class BidirectionalLayer(TensorTupleOp):
    """A bidirectional layer as one op: `forward` (a layer op with forward_arrays and backward_arrays, as
    CompiledLayer has) reads X from first step to last, `reverse` (another) reads it backwards, each sequence
    from its own last step when `lengths` is given.
    compute(X, *forward_inputs, *reverse_inputs) -> (Y, *forward_finals, *reverse_finals), Y (T, B, 2H) =
    [forward's h_t, reverse's h_t] at each t. The two directions are independent, so the backend's
    run_phased runs their recurrent loops side by side, in forward and in backward."""
    name = "bidirectional"

    def __init__(self, forward, reverse, n_forward_inputs, lengths=None):
        self.forward, self.reverse = forward, reverse
        self.split = n_forward_inputs
        self.lengths = lengths      # as the layers' own lengths option

    def _reversed(self, xp, A):
        """A (T, B, ...) with every sequence reversed within its length; the map is its own inverse."""
        return reversed_sequences(xp, A, self.lengths)

    def _step_elements(self, B, H):
        return B * self.forward.gates * H    # a step's gate matrix: how much work each loop step has

    def compute(self, X, *args):
        device, xp = X.device, X.device.xp
        forward, reverse = device.kernel("run_phased")(
            [self.forward.forward_arrays(device, X.x, args[:self.split], phased=True),
             self.reverse.forward_arrays(device, self._reversed(xp, X.x), args[self.split:], phased=True)],
            self._step_elements(X.shape[1], args[0].shape[-1]))
        Y = xp.concatenate([forward[0], self._reversed(xp, reverse[0])], axis=2)
        return tuple(NDArray.from_xp(a, device) for a in (Y, *forward[1:], *reverse[1:]))

    def gradient(self, out_grad, node):
        device, xp = node.inputs[0].device, node.inputs[0].device.xp
        dY, *finals = [g.x for g in out_grad.cached_data]
        H, n = dY.shape[2] // 2, self.forward.n_states
        forward, reverse = device.kernel("run_phased")(
            [self.forward.backward_arrays(device, [dY[:, :, :H], *finals[:n]], phased=True),
             self.reverse.backward_arrays(device, [self._reversed(xp, dY[:, :, H:]), *finals[n:]], phased=True)],
            self._step_elements(dY.shape[1], H))
        dX = forward[0] + self._reversed(xp, reverse[0])
        return tuple(Tensor.make_const(NDArray.from_xp(g, device)) for g in (dX, *forward[1:], *reverse[1:]))


def bidirectional_layer(X, forward, forward_inputs, reverse, reverse_inputs, lengths=None):
    """X (T, B, I) through two fused layer ops, `forward` applied to (X, *forward_inputs) and `reverse` to X
    reversed (within `lengths`) and *reverse_inputs -> TensorTuple (Y (T, B, 2H), *forward_finals,
    *reverse_finals)."""
    return BidirectionalLayer(forward, reverse, len(forward_inputs), lengths)(X, *forward_inputs, *reverse_inputs)


class GradProbe(TensorOp):
    """The identity, whose backward hands `record` the squared norm of each row's gradient (summed over
    the last axis): how the reference path observes dL/dh_t without retaining gradients."""
    name = "grad_probe"

    def __init__(self, record):
        self.record = record

    def compute(self, a):
        return a

    def gradient(self, out_grad, node):
        g = out_grad.realize_cached_data()
        self.record(g.device.mod.to_numpy((g.x * g.x).sum(axis=-1)))
        return out_grad

