"""Shared test setup: a fixed seed for numpy's global RNG, float tolerances and the devices to run on."""

import numpy as np
import pytest

import needle as ndl

# float32 against torch (or numpy) on O(1) values; rtol covers the larger ones
RTOL, ATOL = 1e-5, 1e-5
# float64 gradcheck: central differences with eps=1e-6 are good to ~1e-9 on smooth functions
GRADCHECK = dict(eps=1e-6, atol=1e-6, rtol=1e-6)

DEVICES = [
    ndl.cpu(),
    pytest.param(ndl.cuda(), marks=pytest.mark.skipif(not ndl.cuda().enabled(),
                                                      reason="no CUDA device (CuPy and a GPU are needed)")),
]


@pytest.fixture(autouse=True)
def _seed_numpy():
    """Every test draws the same numbers from numpy's global RNG, whatever ran before it."""
    np.random.seed(0)


@pytest.fixture(params=DEVICES, ids=repr)
def device(request):
    return request.param
