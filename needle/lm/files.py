"""Atomic file writes: a temporary file in the target's directory, flushed and fsynced, then renamed over it.

A crash leaves either the old file or the new one, never a torn one.
"""
import json
import os
import tempfile

__all__ = ["atomic_write", "write_json"]


def atomic_write(path, write):
    """Call `write(f)` on a binary temporary file beside `path`, then move it to `path`."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a plain open() would honour the umask
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_directory(directory)


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_directory(directory):
    """Make the rename itself durable (POSIX only; Windows cannot open a directory)."""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path, obj):
    data = (json.dumps(obj, indent=2) + "\n").encode("utf-8")
    atomic_write(path, lambda f: f.write(data))
