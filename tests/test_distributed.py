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


@pytest.mark.parametrize("sizes", [(), ("400", "8")], ids=["dense", "sparse-embedding"])
def test_two_processes_equal_one(tmp_path, sizes):
    """The same weights after ten steps; with a 400-word vocabulary (a window touches at most 56 rows) the
    embedding's gradient goes as its rows in use, every step."""
    script = os.path.join(WORKERS, "data_parallel_lm.py")
    run([sys.executable, script, str(tmp_path / "one.npz"), *sizes])
    run([mpiexec(), "-n", "2", sys.executable, script, str(tmp_path / "two.npz"), *sizes])
    one, two = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
    assert int(one["world_size"]) == 1 and int(two["world_size"]) == 2
    assert int(two["sparse_reductions"]) == (10 if sizes else 0)
    names = [n for n in one.files if n not in ("world_size", "sparse_reductions")]
    assert len(names) > 5
    for name in names:
        np.testing.assert_allclose(two[name], one[name], rtol=1e-4, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("processes", [2, 3])
def test_average_of_every_kind_of_gradient(processes):
    """Rows-in-use (one rank with none), dense, bucketed and in-place gradients all average to MPI's own sum."""
    result = run([mpiexec(), "-n", str(processes), sys.executable, os.path.join(WORKERS, "average_gradients.py")])
    assert result.stdout.count(": ok") == processes


def _write_corpus(directory):
    rng = np.random.default_rng(0)
    words = "the cat dog sees likes a ball tree runs".split()
    for name, n in (("train", 200), ("valid", 40), ("test", 40)):
        lines = [" ".join(rng.choice(words, size=rng.integers(3, 8))) for _ in range(n)]
        (directory / f"{name}.txt").write_text("\n".join(lines) + "\n")
    return str(directory)


CLI = [sys.executable, "-m", "needle.lm", "train", "--epochs", "2", "--embedding-size", "12", "--hidden-size", "16",
       "--layers", "2", "--seq-len", "8", "--batch-size", "8", "--optimizer", "sgd", "--lr", "2", "--dropout", "0"]


def test_needle_lm_under_mpirun_equals_one_process(tmp_path):
    data = _write_corpus(tmp_path)
    run(CLI + ["--data", data, "--out", str(tmp_path / "one")])
    result = run([mpiexec(), "-n", "2"] + CLI + ["--data", data, "--out", str(tmp_path / "two")])
    assert result.stdout.count("epoch   2/2") == 1, "only rank 0 prints"
    import json
    from safetensors.numpy import load_file
    one, two = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "two"))
    assert [row["epoch"] for row in one] == [row["epoch"] for row in two] == [1, 2, "test"]
    for a, b in zip(one, two):
        for key in ("train_loss", "valid_loss", "test_loss"):
            if key in a:
                assert abs(a[key] - b[key]) < 1e-5, (key, a[key], b[key])
    w1, w2 = (load_file(str(tmp_path / d / "checkpoint.safetensors")) for d in ("one", "two"))
    weights = [k for k in w1 if k.startswith("weight")]
    assert weights and set(w1) == set(w2)
    for k in weights:
        np.testing.assert_allclose(w2[k], w1[k], rtol=1e-4, atol=1e-5, err_msg=k)
    # --resume under mpirun continues to a third epoch
    run([mpiexec(), "-n", "2"] + CLI[:4] + ["--out", str(tmp_path / "two"), "--epochs", "3", "--resume"])
    assert [row["epoch"] for row in json.loads((tmp_path / "two" / "metrics.json").read_text())] == [1, 2, 3, "test"]


def test_batch_size_not_divisible_is_a_clear_error(tmp_path):
    data = _write_corpus(tmp_path)
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    result = subprocess.run([mpiexec(), "-n", "2"] + CLI + ["--data", data, "--out", str(tmp_path / "x"),
                                                            "--batch-size", "5"],
                            capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode != 0
    assert "--batch-size 5 must be divisible by the 2 processes of mpirun" in result.stderr
    assert "Traceback" not in result.stderr
