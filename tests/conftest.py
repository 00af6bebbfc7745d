"""Shared test helpers. PyTorch (the parity reference) is imported lazily, only by tests that need it."""

import json
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


def max_abs(a, b, what: str = "") -> float:
    """Max-abs difference. With ``JAXDIFF_PARITY_LOG`` set, also appends (test, what, error, ref scale) to that
    JSON-lines file; ``python -m tests.parity_report`` builds the README's parity table from it."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    err = float(np.max(np.abs(a - b)))
    log = os.environ.get("JAXDIFF_PARITY_LOG")
    if log:
        test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
        with open(log, "a") as f:
            f.write(json.dumps({"test": test, "what": what, "max_abs": err, "ref_std": float(b.std()),
                                "shape": list(b.shape)}) + "\n")
    return err


@pytest.fixture(autouse=True)
def no_persistent_compilation_cache():
    """Fail any test that leaves JAX's persistent compilation cache on (a CLI run without ``--no-compile-cache``).
    The cache is process-global: left on, every later test writes its programs to ``~/.cache/jaxdiff``, and a
    write there once crashed the whole suite (segfault inside ``compilation_cache.put_executable_and_time``)."""
    yield
    import jax
    from jax._src import compilation_cache

    if jax.config.jax_compilation_cache_dir is not None:
        jax.config.update("jax_compilation_cache_dir", None)
        compilation_cache.reset_cache()
        pytest.fail("the test turned on the persistent compilation cache; run CLIs with --no-compile-cache")


@pytest.fixture(autouse=True, scope="module")
def release_compiled_programs():
    """Drop JAX's compiled programs after each test module. One pytest process compiles hundreds of programs;
    kept alive, their code mappings and buffers accumulate (4+ GiB RSS late in the suite), and twice a late
    compilation crashed the process (segfault inside XLA's compile / cache write, never alone)."""
    yield
    import jax
    jax.clear_caches()


@pytest.fixture
def rng():
    return np.random.default_rng(0)
