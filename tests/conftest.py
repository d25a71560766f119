"""Shared test setup: quiet TensorFlow, TensorFlow's kernels for the
experts, 8 logical CPU devices for the mesh tests, deterministic seeds per
test."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
# TensorFlow's kernels for the experts' products: "auto" would time every
# new shape of every test, and XLA compile each. tests/test_kernels.py
# covers the other modes and the choice.
os.environ.setdefault("TF_MOE_EXPERT_KERNELS", "tensorflow")

from tf_moe import sharding  # noqa: E402

# Before TensorFlow initialises its devices: meshes of up to 8 devices.
sharding.configure_logical_cpus(8)

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_and_clear():
    keras.utils.set_random_seed(1234)
    yield
    keras.config.set_dtype_policy("float32")


@pytest.fixture
def kernel_mode():
    """Sets `tf_moe.kernels`' mode for one test: `kernel_mode(mode)`. The
    suite's mode and the choices made are restored after it."""
    from tf_moe import kernels
    suite_mode = kernels.get_mode()
    kernels.clear_measurements()
    yield kernels.set_mode
    kernels.set_mode(suite_mode)
    kernels.clear_measurements()


@pytest.fixture
def no_kernel_timing(monkeypatch):
    """Fails the test if `tf_moe.kernels` times anything."""
    from tf_moe import kernels

    def fail(*args):
        raise AssertionError("a choice was timed")
    monkeypatch.setattr(kernels, "_time", fail)  # Faked by some tests.
    monkeypatch.setattr(kernels, "_time_calls", fail)


@pytest.fixture
def rng():
    return np.random.default_rng(0)
