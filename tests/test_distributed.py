"""Data parallelism over MPI: K processes give the weights of one process with the same global batch."""
import os
import shutil
import subprocess
import sys
import sysconfig

import numpy as np
import pytest

WORKERS = os.path.join(os.path.dirname(__file__), "workers")


def mpiexec():
    """mpiexec from the `mpi` extra (the mpich wheel installs it beside python), else from PATH."""
    candidate = os.path.join(sysconfig.get_path("scripts"), "mpiexec")
    path = candidate if os.path.exists(candidate) else shutil.which("mpiexec")
    assert path, "mpiexec not found: install the test command's `mpi` extra (pip install -e '.[test,mpi]')"
    return path


def run(command, timeout=300):
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout}\n{result.stderr}"
    return result


def test_one_process_needs_no_mpi():
    code = ("import sys, needle, needle.distributed as d; assert d.init() == (0, 1) and d.is_main(); "
            "assert 'mpi4py' not in sys.modules, 'mpi4py was imported'")
    run([sys.executable, "-c", code])


def test_two_processes_equal_one(tmp_path):
    script = os.path.join(WORKERS, "data_parallel_lm.py")
    run([sys.executable, script, str(tmp_path / "one.npz")])
    run([mpiexec(), "-n", "2", sys.executable, script, str(tmp_path / "two.npz")])
    one, two = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
    assert int(one["world_size"]) == 1 and int(two["world_size"]) == 2
    names = [n for n in one.files if n != "world_size"]
    assert len(names) > 5
    for name in names:
        np.testing.assert_allclose(two[name], one[name], rtol=1e-4, atol=1e-5, err_msg=name)
