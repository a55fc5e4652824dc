"""Optimisers. Updates work on the parameters' arrays directly, so they never grow the autograd graph, and
under float_errors.quiet(), so a NaN or infinite gradient reaches the weights without numpy's warnings."""
import math

from .autograd import Tensor
from .backend_ndarray import NDArray
from .backend_ndarray.float_errors import quiet

__all__ = ["Optimizer", "SGD", "Adam"]


class Optimizer:
    def __init__(self, params):
        self.params = list(params)
        for p in self.params:
            if not isinstance(p, Tensor):
                raise TypeError(f"{type(self).__name__}: params must be needle Tensors, got {type(p).__name__}")

    def step(self):
        raise NotImplementedError()

    def reset_grad(self):
        for p in self.params:
            p.grad = None

    zero_grad = reset_grad

    @quiet()
    def clip_grad_norm(self, max_norm=0.25):
        """Rescale all gradients together so that their global L2 norm is at most max_norm; returns the
        norm before clipping."""
        grads = [p.grad.realize_cached_data() for p in self.params if p.grad is not None]
        # vdot is one BLAS pass per gradient, no temporaries; float64 only if float32 squares overflow
        total = math.sqrt(sum(float(g.device.xp.vdot(g.x, g.x)) for g in grads))
        if not math.isfinite(total):
            total = math.sqrt(sum(float((g.x.astype("float64") ** 2).sum()) for g in grads))
        if total > max_norm:
            scale = max_norm / (total + 1e-6)
            for p in self.params:
                if p.grad is not None:
                    p.grad = Tensor.make_const(p.grad.realize_cached_data() * scale)
        return total

    def state_dict(self):
        """The optimiser's state as a dict of numpy arrays and numbers (for checkpoints)."""
        return {}

    def load_state_dict(self, state):
        pass


def _add_scaled(w, g, alpha):
    """w + alpha * g as a new array, with one temporary less than the expression; big arrays row block by
    row block on the backend's threads (parallel_numpy.py)."""
    a, b, xp = g.x, w.x, w.device.xp
    alpha = float(alpha)  # a numpy float64 alpha would promote float32 to float64
    parallel = w.device.kernel("for_rows")
    if parallel is None or a.ndim == 0:
        out = a * alpha
        out += b
        return NDArray.from_xp(out, w.device)
    out = xp.empty(a.shape, a.dtype)

    def rows(sl):
        o = out[sl]
        xp.multiply(a[sl], alpha, out=o)
        o += b[sl]

    parallel(rows, a.shape[0], a.size)
    return NDArray.from_xp(out, w.device)


def _grad_with_decay(p, weight_decay):
    grad = p.grad.realize_cached_data()
    return grad + p.realize_cached_data() * weight_decay if weight_decay else grad


class SGD(Optimizer):
    """g = grad + weight_decay * w; u = momentum * u + (1 - momentum) * g; w -= lr * u."""

    def __init__(self, params, lr=0.01, momentum=0.0, weight_decay=0.0):
        super().__init__(params)
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.u = {}

    @quiet()
    def step(self):
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            g = _grad_with_decay(p, self.weight_decay)
            if self.momentum:
                u = self.u.get(i)
                g = g * (1 - self.momentum) if u is None else u * self.momentum + g * (1 - self.momentum)
                self.u[i] = g
            p.cached_data = _add_scaled(p.realize_cached_data(), g, -self.lr)

    def state_dict(self):
        return {f"u.{i}": u.numpy() for i, u in self.u.items()}

    def load_state_dict(self, state):
        self.u = {i: _like(self.params[i], state[f"u.{i}"]) for i in range(len(self.params)) if f"u.{i}" in state}


class Adam(Optimizer):
    """Adam with bias correction; weight decay is added to the gradient."""

    def __init__(self, params, lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0):
        super().__init__(params)
        self.lr, self.beta1, self.beta2, self.eps, self.weight_decay = lr, beta1, beta2, eps, weight_decay
        self.t = {}  # steps per parameter: one without a gradient does not count (PyTorch's state["step"])
        self.m, self.v = {}, {}

    @quiet()
    def step(self):
        b1, b2 = self.beta1, self.beta2
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            t = self.t[i] = self.t.get(i, 0) + 1
            g = _grad_with_decay(p, self.weight_decay)
            m = g * (1 - b1) if i not in self.m else self.m[i] * b1 + g * (1 - b1)
            v = g * g * (1 - b2) if i not in self.v else self.v[i] * b2 + g * g * (1 - b2)
            self.m[i], self.v[i] = m, v
            m_hat = m / (1 - b1 ** t)
            v_hat = v / (1 - b2 ** t)
            p.cached_data = p.realize_cached_data() - m_hat / (v_hat ** 0.5 + self.eps) * self.lr

    def state_dict(self):
        state = {f"t.{i}": t for i, t in self.t.items()}
        state.update({f"m.{i}": m.numpy() for i, m in self.m.items()})
        state.update({f"v.{i}": v.numpy() for i, v in self.v.items()})
        return state

    def load_state_dict(self, state):
        n = len(self.params)
        self.t = {i: int(state[f"t.{i}"]) for i in range(n) if f"t.{i}" in state}
        self.m = {i: _like(self.params[i], state[f"m.{i}"]) for i in range(n) if f"m.{i}" in state}
        self.v = {i: _like(self.params[i], state[f"v.{i}"]) for i in range(n) if f"v.{i}" in state}


def _like(param, array):
    return NDArray(array, device=param.device, dtype=param.dtype)
