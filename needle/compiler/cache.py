"""Generated kernel source on disk, imported as a module, so Numba's own cache (`cache=True`) applies.

Numba cannot cache a function made with `exec` (it has no file to key on), so each rendered source is
written once to `<cache>/kernels/k_<hash>.py` and imported from there; Numba keeps the compiled machine
code beside it in `__pycache__`, and a new process that renders the same source loads it instead of
compiling. The hash covers the source and the Numba and needle versions. A reader can open the file.
"""
import hashlib
import importlib.util
import os
import sys
import tempfile

__all__ = ["cache_dir", "load_source"]

_MODULES = {}


def cache_dir():
    """NEEDLE_CACHE_DIR, else the user's cache directory (XDG_CACHE_HOME, ~/Library/Caches, LOCALAPPDATA)."""
    root = os.environ.get("NEEDLE_CACHE_DIR")
    if root:
        return root
    if sys.platform == "darwin":
        base = os.path.expanduser("~/Library/Caches")
    elif os.name == "nt":
        base = os.environ.get("LOCALAPPDATA") or os.path.expanduser("~/AppData/Local")
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(base, "needle")


def _writable_kernel_dir():
    for root in (cache_dir(), os.path.join(tempfile.gettempdir(), f"needle-{os.getuid() if hasattr(os, 'getuid') else 0}")):
        path = os.path.join(root, "kernels")
        try:
            os.makedirs(path, exist_ok=True)
            if os.access(path, os.W_OK):
                return path
        except OSError:
            continue
    raise OSError("needle.compiler: no writable cache directory (set NEEDLE_CACHE_DIR)")


def load_source(source):
    """The module of `source`, written to the cache directory on first use (atomically) and imported."""
    import numba

    from .. import __version__
    key = hashlib.sha256(f"{numba.__version__}\n{__version__}\n{source}".encode()).hexdigest()[:24]
    if key in _MODULES:
        return _MODULES[key]
    directory = _writable_kernel_dir()
    path = os.path.join(directory, f"k_{key}.py")
    if not os.path.exists(path):
        fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(source)
        os.replace(tmp, path)   # an interrupted write never leaves a partial kernel file
    name = f"needle_kernel_{key}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    module.path = path
    _MODULES[key] = module
    return module
