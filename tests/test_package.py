"""The package itself: what it exports, and its backend check."""

import os
import subprocess
import sys

import tf_moe


def test_public_api():
    for name in ("MoE", "HierarchicalMoE", "NoisyTopKGate", "BatchwiseGate",
                 "Experts", "GateOutput",
                 "cv_squared", "importance", "smooth_load", "balancing_loss",
                 "make_dispatch_plan", "DispatchPlan"):
        assert hasattr(tf_moe, name), name


def test_import_under_another_keras_backend_says_why_it_fails():
    # No other backend's framework is installed here (Keras's numpy backend
    # needs jax), so Keras is made to report another backend instead.
    script = ("import keras; keras.backend.backend = lambda: 'jax'; "
              "import tf_moe")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run([sys.executable, "-c", script], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "ImportError: tf_moe needs the TensorFlow backend" in result.stderr
    assert "'jax'" in result.stderr
