"""Debugging numbers: `detect_anomaly()` makes the first NaN or infinity an error that names its op.

Inside it, autograd's `make_from_op` hands every op's forward result to `check_forward`, and the backward
walk hands every step's gradients to `check_backward`; the first NaN or infinity raises `AnomalyError`, a
FloatingPointError naming the op by its public name, its input shapes, forward or backward, and the place in
the user's code (the innermost frame outside the needle package) where the op was called. For a backward
step that place is remembered at forward time, on the node. Outside it, autograd tests one flag per op and
one per backward walk, and nothing else happens.

This module imports nothing from needle, so autograd can import it.
"""
import functools
import os
import sys

__all__ = ["detect_anomaly", "is_anomaly_enabled", "AnomalyError", "check_forward", "check_backward",
           "backward_walk"]

enabled = False  # read by autograd on every op; set only by detect_anomaly and backward_walk

_PACKAGE = os.path.dirname(__file__) + os.sep
_ROOT = os.path.dirname(os.path.dirname(__file__)) + os.sep
# needle's own layers below the modules: an op called from here is reported by where it was called from
_CORE = tuple(_PACKAGE + part for part in ("autograd.py", "anomaly.py", "ops" + os.sep,
                                           "backend_ndarray" + os.sep, "compiler" + os.sep))


def is_anomaly_enabled():
    return enabled


class detect_anomaly:
    """Context manager and decorator: every op checks its forward result, and every backward step the
    gradients it produces, for NaN and infinity; the first found raises AnomalyError (a FloatingPointError).

    `with ndl.detect_anomaly(): ...`, `@ndl.detect_anomaly()` and `@ndl.detect_anomaly` all work.
    """

    def __new__(cls, func=None):
        if func is None:
            return super().__new__(cls)

        @functools.wraps(func)
        def wrapper(*args, **kwargs):
            with detect_anomaly():
                return func(*args, **kwargs)
        return wrapper

    def __call__(self, func):
        return detect_anomaly(func)

    def __enter__(self):
        global enabled
        self._previous, enabled = enabled, True
        return self

    def __exit__(self, *exc):
        global enabled
        enabled = self._previous
        return False


class backward_walk:
    """Around a backward walk: the ops that gradients are made of are not checked one by one (each step's
    gradients are, and name the op whose backward it is). Returns whether checking was on."""

    def __enter__(self):
        global enabled
        self._previous, enabled = enabled, False
        return self._previous

    def __exit__(self, *exc):
        global enabled
        enabled = self._previous
        return False


class AnomalyError(FloatingPointError):
    """A NaN or infinity found under detect_anomaly. Attributes: `op` (the public name), `phase` ("forward"
    or "backward"), `kind` ("NaN", "inf" or "NaN and inf"), `input_shapes`, `site` (the user's
    "file:line in function", or None) and `via` (needle's own module code that called the op, or None)."""

    def __init__(self, message, op, phase, kind, input_shapes, site, via):
        super().__init__(message)
        self.op, self.phase, self.kind = op, phase, kind
        self.input_shapes, self.site, self.via = input_shapes, site, via


def check_forward(op, inputs, value):
    """After an op's forward under detect_anomaly: raise if `value` holds NaN or inf; otherwise remember,
    on a node of the graph, where the op was called (for its backward step)."""
    bad = _nonfinite(_arrays(value.cached_data))
    if bad is None:
        if value.requires_grad:
            value._anomaly_sites = _call_sites()
        return
    _raise(op, "forward", bad, inputs, _call_sites(), "")


def check_backward(node, input_grads):
    """After a backward step under detect_anomaly: raise if a gradient it produced holds NaN or inf."""
    for i, grad in enumerate(input_grads):
        bad = _nonfinite(_arrays(grad))
        if bad is not None:
            sites = getattr(node, "_anomaly_sites", (None, None))
            _raise(node.op, "backward", bad, node.inputs, sites, f" in the gradient of input {i}")


def _arrays(data):
    """The backend arrays in an NDArray, a Tensor, a TensorTuple, or a tuple or list of them (None: none)."""
    if data is None:
        return []
    if hasattr(data, "realize_cached_data"):
        data = data.realize_cached_data()
    if isinstance(data, (tuple, list)):
        return [a for item in data for a in _arrays(item)]
    return [data]


def _nonfinite(arrays):
    """(kind, bad values, all values) of the first array holding NaN or inf, else None."""
    for array in arrays:
        xp, x = array.device.xp, array.x
        if not bool(xp.isfinite(x).all()):
            nan, inf = bool(xp.isnan(x).any()), bool(xp.isinf(x).any())
            kind = "NaN and inf" if nan and inf else "NaN" if nan else "inf"
            return kind, int((~xp.isfinite(x)).sum()), int(x.size)
    return None


def _shape_text(value):
    data = value.cached_data
    if isinstance(data, tuple):
        return "tuple of " + ", ".join(str(a.shape) for a in data)
    return str(data.shape)


def _raise(op, phase, bad, inputs, sites, detail):
    kind, count, size = bad
    name = op._name()
    shapes = [_shape_text(v) for v in inputs]
    site, via = sites
    if site is None and via is None:
        where = "; its forward ran outside detect_anomaly, so where it was called is not known"
    else:
        where = f"; called at {site}" if site else "; called"
        where += f", via {via}" if via else ""
    message = (f"{name}: {phase} produced {kind}{detail} ({count} of {size} values); "
               f"inputs {', '.join(shapes) or 'none'}{where}")
    raise AnomalyError(message, name, phase, kind, shapes, site, via)


def _call_sites():
    """(the innermost frame outside the needle package, the innermost frame of needle's own modules or
    training code on the way there), each as "file:line in function" or None."""
    site = via = None
    frame = sys._getframe(1)
    while frame is not None:
        filename = frame.f_code.co_filename
        if not filename.startswith(_PACKAGE):
            site = _describe(frame, filename)
            break
        if via is None and not filename.startswith(_CORE):
            via = _describe(frame, filename[len(_ROOT):])
        frame = frame.f_back
    return site, via


def _describe(frame, filename):
    code = frame.f_code
    return f"{filename}:{frame.f_lineno} in {getattr(code, 'co_qualname', code.co_name)}"
