"""NDArray: an n-d array as shape, strides and an offset over a flat buffer owned by a device backend.

Views (reshape of a compact array, permute, broadcast_to, slicing, flip, as_strided) share the buffer;
`compact()` copies only when the layout is not already row-major and dense. Arithmetic hands strided
views of the operands to the backend's array module (numpy on cpu), so no operand is copied first.
"""
import functools
import math
import numbers
import operator

import numpy as np

from . import backend_numpy
from .float_errors import quiet

__all__ = ["BackendDevice", "NDArray", "array", "empty", "full", "cpu", "cpu_numpy", "cuda",
           "default_device", "all_devices"]

_DTYPES = {"float32": np.float32, "float64": np.float64}
_DTYPE_NAMES = {np.dtype(t): name for name, t in _DTYPES.items()}  # numpy's dtype.name is slow


def _dtype_name(dtype):
    """'float32' or 'float64' from a string, numpy dtype or None (float32)."""
    if dtype is None:
        return "float32"
    name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name not in _DTYPES:
        raise ValueError(f"needle: dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    return name


class BackendDevice:
    """A device: a name and the backend module that computes on it (None where it cannot run)."""

    def __init__(self, name, mod, reason=None):
        self.name = name
        self.mod = mod
        self.reason = reason
        # looked up once here, not on every op: the array module and the optional parallel kernels
        self.xp = getattr(mod, "xp", None)
        self._ewise = getattr(mod, "ewise", None)
        self._unary = getattr(mod, "unary", None)
        self._reduce = getattr(mod, "reduce", None)
        # elementwise results smaller than this never reach the parallel entry points (a size test inline)
        self.parallel_from = getattr(mod, "PARALLEL_FROM", 0)

    def __eq__(self, other):
        return isinstance(other, BackendDevice) and self.name == other.name

    def __hash__(self):
        return hash(self.name)

    def __repr__(self):
        return self.name + "()"

    def enabled(self):
        return self.mod is not None and self.mod.enabled()

    def check_enabled(self):
        if not self.enabled():
            raise ValueError(f"device {self!r} is not available on this machine: {self.reason}")

    def kernel(self, name):
        """An optional fused entry point of the backend, or None."""
        return getattr(self.mod, name, None)

    def randn(self, *shape, dtype="float32"):
        return NDArray(np.asarray(np.random.randn(*shape)), device=self, dtype=dtype)

    def rand(self, *shape, dtype="float32"):
        return NDArray(np.asarray(np.random.rand(*shape)), device=self, dtype=dtype)

    def one_hot(self, n, i, dtype="float32"):
        idx = np.asarray(i, dtype=np.int64)
        return NDArray(np.eye(n)[idx], device=self, dtype=dtype)

    def empty(self, shape, dtype="float32"):
        return NDArray.make(_as_shape(shape), device=self, dtype=dtype)

    def full(self, shape, fill_value, dtype="float32"):
        out = self.empty(shape, dtype)
        out.fill(fill_value)
        return out


def cpu():
    """The default device: numpy on the host."""
    return _CPU


def cpu_numpy():
    """The numpy host device under the course's name (a device of its own, same backend as cpu())."""
    return _CPU_NUMPY


def cuda():
    """The GPU device; `cuda().enabled()` is False where CuPy or a GPU is missing (nothing raises here)."""
    global _CUDA
    if _CUDA is None:
        try:
            from . import backend_cupy
            _CUDA = BackendDevice("cuda", backend_cupy)
        except Exception as err:  # no CuPy, no driver, no GPU: the device exists but is disabled
            _CUDA = BackendDevice("cuda", None, reason=f"{type(err).__name__}: {err}")
    return _CUDA


def default_device():
    return _CPU


def all_devices():
    return [cpu(), cpu_numpy(), cuda()]


_CPU = BackendDevice("cpu", backend_numpy)
_CPU_NUMPY = BackendDevice("cpu_numpy", backend_numpy)
_CUDA = None


def _check_device(device):
    if device is None:
        return default_device()
    if not isinstance(device, BackendDevice):
        raise TypeError(f"needle: device must be a needle device such as ndl.cpu(), got {device!r}")
    device.check_enabled()
    return device


def _as_shape(shape):
    if type(shape) is tuple:  # the common case: a tuple of ints, returned as it is
        for d in shape:
            if type(d) is not int:
                break
        else:
            return shape
    if isinstance(shape, numbers.Integral):
        shape = (shape,)
    try:
        return tuple(map(operator.index, shape))
    except TypeError:
        raise TypeError(f"needle: a shape must be a tuple of ints, got {shape!r}") from None


@functools.lru_cache(maxsize=1024)  # a few shapes recur on every op
def _compact_strides(shape):
    strides, stride = [], 1
    for dim in reversed(shape):
        strides.append(stride)
        stride *= dim
    return tuple(reversed(strides))


def _numeric_numpy(data, who):
    """data as a numpy array, or a TypeError naming `who` if it is not numeric."""
    try:
        arr = np.asarray(data)
    except (ValueError, TypeError):
        raise TypeError(f"{who}: data must be numeric, got {type(data).__name__}") from None
    if arr.dtype.kind not in "biuf":
        raise TypeError(f"{who}: data must be numeric (bool, int or float), got {type(data).__name__} "
                        f"of dtype {arr.dtype}: {data!r:.80}")
    return arr


class NDArray:
    """A float n-d array: `shape`, `strides` (in elements) and `offset` over a device's flat buffer."""

    __slots__ = ("shape", "_strides", "_offset", "device", "_handle", "_view")
    __array_ufunc__ = None  # `np.float64(2) - a` defers to our reflected operators instead of iterating `a`

    def __init__(self, other, device=None, dtype=None):
        """A copy of `other` (an NDArray, a numpy array, a list or a scalar) on `device`."""
        if isinstance(other, NDArray):
            device = other.device if device is None else device
            dtype = other.dtype if dtype is None else dtype
            other = other.numpy()
        device = _check_device(device)
        arr = _numeric_numpy(other, "array")
        target = _DTYPES[_dtype_name(dtype)]
        if arr.dtype != target:
            with quiet():  # 1e300 becomes inf in float32 silently, as in PyTorch
                arr = arr.astype(target)
        self._init(arr.shape, _compact_strides(arr.shape), 0, device, device.mod.from_numpy(arr))

    def _init(self, shape, strides, offset, device, handle, view=None):
        self.shape = tuple(shape)
        self._strides = tuple(strides)
        self._offset = offset
        self.device = device
        self._handle = handle
        self._view = view

    @staticmethod
    def make(shape, strides=None, device=None, handle=None, offset=0, dtype="float32"):
        """An NDArray over `handle` (a new buffer when None) without copying."""
        array = NDArray.__new__(NDArray)
        device = default_device() if device is None else device
        shape = tuple(shape)
        if handle is None:
            handle = device.mod.empty(math.prod(shape), _DTYPES[_dtype_name(dtype)])
        array._init(shape, _compact_strides(shape) if strides is None else strides, offset, device, handle)
        return array

    def _part(self, view, shape, strides, offset):
        """An NDArray over this array's buffer with the given layout, whose backend view `view` the caller
        made (slicing self.x is cheaper than making the view from the layout later)."""
        out = _new_array(NDArray)
        out._init(shape, strides, offset, self.device, self._buffer(), view)
        return out

    @staticmethod
    def from_xp(arr, device):
        """Wrap a backend array (numpy on cpu) as an NDArray, sharing memory when it is C-contiguous."""
        return _wrap(arr, device)

    # ---- properties
    @property
    def strides(self):
        if self._strides is None:
            self._strides = _compact_strides(self.shape)
        return self._strides

    @property
    def offset(self):
        return self._offset

    def _buffer(self):
        """The flat buffer this array is a view of (for an array made by from_xp, made here on first use: a
        flat view of its C-contiguous data)."""
        if self._handle is None:
            self._handle = self._view.reshape(-1)
        return self._handle

    @property
    def dtype(self):
        dtype = (self._handle if self._view is None else self._view).dtype
        return _DTYPE_NAMES.get(dtype) or dtype.name

    @property
    def ndim(self):
        return len(self.shape)

    @property
    def size(self):
        return math.prod(self.shape)

    @property
    def x(self):
        """The backend's strided view of this array (a numpy array on cpu); shares memory."""
        if self._view is None:
            self._view = self.device.mod.view(self._handle, self.shape, self._strides, self._offset)
        return self._view

    def __repr__(self):
        return f"NDArray({self.numpy()!r}, device={self.device!r})"

    def __str__(self):
        return str(self.numpy())

    def __len__(self):
        if not self.shape:
            raise TypeError("len() of a 0-d NDArray")
        return self.shape[0]

    def numpy(self):
        """A numpy copy."""
        return self.device.mod.to_numpy(self.x)

    def to(self, device):
        device = _check_device(device)
        return self if device == self.device else NDArray(self.numpy(), device=device, dtype=self.dtype)

    def astype(self, dtype):
        dtype = _dtype_name(dtype)
        return self if dtype == self.dtype else NDArray.from_xp(self.x.astype(_DTYPES[dtype]), self.device)

    def fill(self, value):
        """Set every element to `value`, in place."""
        self.x[...] = value

    # ---- layout
    def is_compact(self):
        if self._handle is None:  # made by from_xp: a whole C-contiguous buffer
            return True
        return self.strides == _compact_strides(self.shape) and self._handle.size == math.prod(self.shape)

    def compact(self):
        """This array if it is compact, else a compact copy."""
        return self if self.is_compact() else NDArray.from_xp(self.device.xp.ascontiguousarray(self.x), self.device)

    def as_strided(self, shape, strides):
        shape, strides = _as_shape(shape), _as_shape(strides)
        if len(shape) != len(strides):
            raise ValueError(f"as_strided: shape {shape} and strides {strides} differ in length")
        return NDArray.make(shape, strides, self.device, self._buffer(), self._offset)

    @property
    def flat(self):
        return self.reshape((self.size,))

    def reshape(self, new_shape):
        """A view with `new_shape` (one entry may be -1); only for compact arrays."""
        new_shape = _resolve_shape("reshape", self.shape, new_shape)
        if self._handle is None:  # made by from_xp, C-contiguous: the backend's reshape is a view of it
            return _wrap(self._view.reshape(new_shape), self.device)
        if not self.is_compact():
            raise ValueError(f"reshape: NDArray of shape {self.shape} with strides {self.strides} is not "
                             "compact; call compact() first")
        out = NDArray.make(new_shape, device=self.device, handle=self._buffer(), offset=self._offset)
        if self._view is not None:  # the backend's own view of the same memory, cheaper than making one later
            out._view = self._view.reshape(new_shape)
        return out

    def permute(self, new_axes):
        new_axes = tuple(new_axes)
        if sorted(new_axes) != list(range(self.ndim)):
            raise ValueError(f"permute: axes {new_axes} are not a permutation of {tuple(range(self.ndim))}")
        out = self.as_strided(tuple(self.shape[a] for a in new_axes), tuple(self.strides[a] for a in new_axes))
        if self._view is not None:
            out._view = self._view.transpose(new_axes)
        return out

    def broadcast_to(self, new_shape):
        new_shape = _as_shape(new_shape)
        check_broadcast_to("broadcast_to", self.shape, new_shape)
        lead = len(new_shape) - self.ndim
        strides = [0] * lead + [0 if old == 1 and new != 1 else st
                                for old, new, st in zip(self.shape, new_shape[lead:], self.strides)]
        return self.as_strided(new_shape, strides)

    def flip(self, axes):
        """A view reversed along `axes` (negative strides)."""
        axes = _norm_axes("flip", axes, self.shape)
        strides, offset = list(self.strides), self._offset
        for a in axes:
            offset += (self.shape[a] - 1) * strides[a] if self.shape[a] else 0
            strides[a] = -strides[a]
        return NDArray.make(self.shape, tuple(strides), self.device, self._buffer(), offset)

    def pad(self, axes):
        """Zero padding: `axes` gives (lo, hi) per axis."""
        axes = tuple(tuple(p) for p in axes)
        if len(axes) != self.ndim or any(len(p) != 2 or min(p) < 0 for p in axes):
            raise ValueError(f"pad: expected {self.ndim} pairs of non-negative (lo, hi), got {axes}")
        out = NDArray.make(tuple(d + lo + hi for d, (lo, hi) in zip(self.shape, axes)), device=self.device,
                           dtype=self.dtype)
        out.fill(0.0)
        out[tuple(slice(lo, lo + d) for d, (lo, _) in zip(self.shape, axes))] = self
        return out

    # ---- indexing: one int or slice per axis, result keeps ndim
    def _process_slice(self, sl, dim):
        start, stop, step = sl.indices(dim)
        if step <= 0:
            raise ValueError(f"NDArray indexing: steps must be positive, got {sl.step}")
        if stop <= start:  # empty: start at 0, as start == dim could put the offset past the buffer's end
            return slice(0, 0, step)
        return slice(start, stop, step)

    def __getitem__(self, idxs):
        if not isinstance(idxs, tuple):
            idxs = (idxs,)
        if len(idxs) > self.ndim:
            raise ValueError(f"NDArray indexing: {len(idxs)} indices for shape {self.shape}")
        idxs = idxs + (slice(None),) * (self.ndim - len(idxs))
        shape, strides, offset = [], [], self._offset
        for axis, (idx, dim, stride) in enumerate(zip(idxs, self.shape, self.strides)):
            if isinstance(idx, slice):
                sl = self._process_slice(idx, dim)
            else:
                i = operator.index(idx)
                if not -dim <= i < dim:
                    raise IndexError(f"NDArray indexing: index {i} out of range for axis {axis} of size {dim}")
                sl = slice(i % dim, i % dim + 1, 1)
            offset += sl.start * stride
            shape.append(len(range(sl.start, sl.stop, sl.step)))
            strides.append(stride * sl.step)
        return NDArray.make(tuple(shape), tuple(strides), self.device, self._buffer(), offset)

    def __setitem__(self, idxs, other):
        view = self[idxs]
        view.x[...] = other.x if isinstance(other, NDArray) else other

    # ---- arithmetic: broadcasting as numpy does
    def _ewise(self, other, ufunc, reflected=False):
        # the hot path of every elementwise op: slots read directly, the backend's parallel split only for
        # results that may be big enough: an operand that big, or two that broadcast against each other into
        # as many elements at most as size(a) * size(b)
        a = self._view
        if a is None:
            a = self.x
        if isinstance(other, NDArray):
            b = other._view
            if b is None:
                b = other.x
        elif isinstance(other, np.generic):  # a numpy scalar (np.float64) would promote float32 results
            b = other.item()
        else:
            b = other
        device = self.device
        if device._ewise is not None:
            n, m, big = a.size, getattr(b, "size", 1), device.parallel_from
            if n >= big or m >= big or (n * m >= big and a.shape != b.shape):
                return _wrap(device._ewise(ufunc, b, a) if reflected else device._ewise(ufunc, a, b), device)
        return _wrap(ufunc(b, a) if reflected else ufunc(a, b), device)

    def _add_in_place(self, other):
        """self += other (an NDArray of self's shape), for the backward walk's running sums (not public: an
        NDArray is otherwise never written by arithmetic)."""
        out = self.x
        self.device.xp.add(out, other.x, out=out)

    def _unary(self, ufunc):
        a = self._view
        if a is None:
            a = self.x
        device = self.device
        if device._unary is not None and a.size >= device.parallel_from:
            return _wrap(device._unary(ufunc, a), device)
        return _wrap(ufunc(a), device)

    def __add__(self, other):
        return self._ewise(other, self.device.xp.add)

    __radd__ = __add__

    def __sub__(self, other):
        return self._ewise(other, self.device.xp.subtract)

    def __rsub__(self, other):
        return self._ewise(other, self.device.xp.subtract, reflected=True)

    def __mul__(self, other):
        return self._ewise(other, self.device.xp.multiply)

    __rmul__ = __mul__

    def __truediv__(self, other):
        return self._ewise(other, self.device.xp.true_divide)

    def __rtruediv__(self, other):
        return self._ewise(other, self.device.xp.true_divide, reflected=True)

    def __neg__(self):
        return self._unary(self.device.xp.negative)

    def __pow__(self, other):
        return self._ewise(other, self.device.xp.power)

    def maximum(self, other):
        return self._ewise(other, self.device.xp.maximum)

    def _compare(self, other, fn):
        return self._ewise(other, lambda a, b: fn(a, b).astype(a.dtype))

    def __eq__(self, other):
        return self._compare(other, operator.eq)

    def __ne__(self, other):
        return self._compare(other, operator.ne)

    def __lt__(self, other):
        return self._compare(other, operator.lt)

    def __le__(self, other):
        return self._compare(other, operator.le)

    def __gt__(self, other):
        return self._compare(other, operator.gt)

    def __ge__(self, other):
        return self._compare(other, operator.ge)

    __hash__ = None

    def log(self):
        return self._unary(self.device.xp.log)

    def exp(self):
        return self._unary(self.device.xp.exp)

    def tanh(self):
        return self._unary(self.device.xp.tanh)

    def sigmoid(self):
        # 0.5 * tanh(0.5 x) + 0.5: stable for any x, and tanh is cheaper than exp plus a reciprocal
        out = self.device.xp.tanh(self.x * 0.5)
        out *= 0.5
        out += 0.5
        return NDArray.from_xp(out, self.device)

    def __matmul__(self, other):
        return NDArray.from_xp(self.device.xp.matmul(self.x, other.x), self.device)

    # ---- reductions
    def _reduce(self, kind, axis, keepdims):
        a, device = self.x, self.device
        if device._reduce is not None and a.size >= device.parallel_from:
            out = device._reduce(a, kind, axis, keepdims)
        else:
            out = getattr(a, kind)(axis=axis, keepdims=keepdims)
        return _wrap(out, device)  # a reduction to a scalar is a numpy scalar: _wrap makes it a 0-d array

    def sum(self, axis=None, keepdims=False):
        return self._reduce("sum", axis, keepdims)

    def max(self, axis=None, keepdims=False):
        return self._reduce("max", axis, keepdims)


_new_array = object.__new__


def _wrap(arr, device):
    """NDArray.from_xp: a backend array as an NDArray (a C-contiguous copy where it is not C-contiguous).
    Only the slots every op reads are filled here; strides and the flat buffer are made on first use."""
    xp = device.xp
    if type(arr) is not xp.ndarray:  # ufuncs on 0-d arrays return scalars, which setitem could not write
        arr = xp.asarray(arr)
    if not arr.flags.c_contiguous:
        arr = xp.ascontiguousarray(arr)
    out = _new_array(NDArray)
    out.shape = arr.shape
    out.device = device
    out._view = arr
    out._offset = 0
    out._strides = out._handle = None
    return out


def _resolve_shape(who, old_shape, new_shape):
    """new_shape with a single -1 resolved; ValueError naming `who` if the sizes differ."""
    new_shape = _as_shape(new_shape)
    size = math.prod(old_shape)
    if math.prod(new_shape) == size and min(new_shape, default=0) >= 0:  # the common case: nothing to resolve
        return new_shape
    if new_shape.count(-1) > 1 or any(d < -1 for d in new_shape):
        raise ValueError(f"{who}: invalid target shape {new_shape}")
    if -1 in new_shape:
        known = math.prod(d for d in new_shape if d != -1)
        if known == 0 or size % known:
            raise ValueError(f"{who}: cannot reshape {tuple(old_shape)} (size {size}) to {new_shape}")
        new_shape = tuple(size // known if d == -1 else d for d in new_shape)
    if math.prod(new_shape) != size:
        raise ValueError(f"{who}: cannot reshape {tuple(old_shape)} (size {size}) to {new_shape} "
                         f"(size {math.prod(new_shape)})")
    return new_shape


def check_broadcast_to(who, shape, new_shape):
    """ValueError naming `who` unless `shape` broadcasts to `new_shape` by numpy's rules."""
    ok = len(new_shape) >= len(shape) and all(
        old == new or old == 1 for old, new in zip(reversed(shape), reversed(new_shape)))
    if not ok:
        raise ValueError(f"{who}: cannot broadcast shape {tuple(shape)} to {tuple(new_shape)}")


def _norm_axes(who, axes, shape):
    """axes (an int, a sequence or None = all) of an array of `shape` as a tuple of non-negative ints;
    ValueError if one is out of range."""
    ndim = len(shape)
    if axes is None:
        return tuple(range(ndim))
    if type(axes) is int or isinstance(axes, numbers.Integral):  # the cheap test first
        axes = (axes,)
    out = []
    for a in axes:
        a = operator.index(a)
        if not -ndim <= a < ndim:
            raise ValueError(f"{who}: axis {a} is out of range for shape {tuple(shape)} "
                             f"(expected {-ndim} <= axis < {ndim})")
        out.append(a % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"{who}: repeated axis in {tuple(axes)}")
    return tuple(out)


def array(a, dtype="float32", device=None):
    """A new NDArray holding a copy of `a`."""
    return NDArray(a, device=device, dtype=dtype)


def empty(shape, dtype="float32", device=None):
    return _check_device(device).empty(shape, dtype)


def full(shape, fill_value, dtype="float32", device=None):
    return _check_device(device).full(shape, fill_value, dtype)
