"""Gradient checking: compare an op's backward with central finite differences."""
import numpy as np

from .autograd import Tensor, no_grad
from .backend_ndarray import NDArray

__all__ = ["gradcheck", "GradcheckError"]


class GradcheckError(AssertionError):
    """backward and finite differences disagree; the message names the input, the worst index and both values."""


def gradcheck(f, *inputs, eps=1e-3, atol=1e-2, rtol=1e-2, raise_exception=True):
    """Check the gradients of `f` (Tensors -> one Tensor) at `inputs` against central differences.

    With a random upstream gradient u, the analytic gradient of sum(u * f) from `backward` is compared,
    entry by entry, with (sum(u * f(x + eps)) - sum(u * f(x - eps))) / (2 eps), accumulated in float64.
    Pass float64 tensors for tight tolerances (eps=1e-6, atol=rtol=1e-5); float32 needs the defaults.
    Returns True; on a mismatch raises GradcheckError, or returns False when raise_exception=False.
    """
    checked = [i for i, t in enumerate(inputs) if isinstance(t, Tensor) and t.requires_grad]
    if not checked:
        raise ValueError("gradcheck: no input requires a gradient")
    out = f(*inputs)
    rng = np.random.default_rng(0)
    upstream = rng.standard_normal(out.shape)
    saved_grads = [inputs[i].grad for i in checked]
    for i in checked:
        inputs[i].grad = None
    out.backward(Tensor(upstream, device=out.device, dtype=out.dtype, requires_grad=False))
    analytic = [inputs[i].grad.numpy().astype(np.float64) if inputs[i].grad is not None
                else np.zeros(inputs[i].shape) for i in checked]
    for i, grad in zip(checked, saved_grads):
        inputs[i].grad = grad

    def objective():
        with no_grad():
            return float((f(*inputs).numpy().astype(np.float64) * upstream).sum())

    for k, i in enumerate(checked):
        t = inputs[i]
        original = t.realize_cached_data()
        base = original.numpy()
        numeric = np.zeros(base.shape)
        for index in np.ndindex(base.shape):
            values = []
            for step in (eps, -eps):
                moved = base.copy()
                moved[index] += step
                t.cached_data = NDArray(moved, device=original.device, dtype=original.dtype)
                values.append(objective())
            numeric[index] = (values[0] - values[1]) / (2 * eps)
        t.cached_data = original
        excess = np.abs(analytic[k] - numeric) - (atol + rtol * np.abs(numeric))
        if excess.size and excess.max() > 0:
            worst = np.unravel_index(int(np.argmax(excess)), excess.shape)
            message = (f"gradcheck: input {i} (shape {base.shape}): backward and finite differences differ; "
                       f"worst at index {tuple(int(w) for w in worst)}: backward {analytic[k][worst]:.6g}, "
                       f"numeric {numeric[worst]:.6g} (atol={atol}, rtol={rtol})")
            if raise_exception:
                raise GradcheckError(message)
            return False
    return True
