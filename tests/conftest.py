"""Shared test helpers. PyTorch (the parity reference) is imported lazily, only by tests that need it."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np
import pytest


def torch_state_dict(module) -> dict:
    """A torch module's state dict as numpy arrays (what weights_convert consumes)."""
    return {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}


def nchw_to_nhwc(x):
    return np.transpose(np.asarray(x), (0, 2, 3, 1))


def nhwc_to_nchw(x):
    return np.transpose(np.asarray(x), (0, 3, 1, 2))


def max_abs(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a - b)))


@pytest.fixture
def rng():
    return np.random.default_rng(0)
