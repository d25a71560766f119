"""TensorFlow's CPU allocator pools in every oneDNN configuration once
tf_moe is imported (`tf_moe.allocator`), each case in a fresh process."""

import json
import os
import subprocess
import sys

import pytest

from tf_moe import allocator

_PROBE = """
import json, os
import tensorflow as tf  # TensorFlow first: the allocator is made later.
import tf_moe
x = tf.ones([4])  # The first tensor makes the CPU allocator.
print(json.dumps({
    "variable": os.environ.get(tf_moe.allocator.POOL_VARIABLE),
    "onednn": tf_moe.allocator._onednn_enabled(),
    "pooled": tf_moe.allocator.cpu_allocator_pooled()}))
"""


def _probe(**environment):
    env = {k: v for k, v in os.environ.items()
           if k not in ("TF_ENABLE_ONEDNN_OPTS", allocator.POOL_VARIABLE)}
    env.update(environment, TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run([sys.executable, "-c", _PROBE], env=env,
                            capture_output=True, text=True, timeout=300,
                            check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_onednn_off_gets_tensorflows_pool():
    probe = _probe(TF_ENABLE_ONEDNN_OPTS="0")
    assert probe == {"variable": "1", "onednn": False, "pooled": True}


def test_a_users_choice_is_kept():
    probe = _probe(TF_ENABLE_ONEDNN_OPTS="0",
                   **{allocator.POOL_VARIABLE: "0"})
    assert probe == {"variable": "0", "onednn": False, "pooled": False}


def test_onednn_on_keeps_onednns_pool():
    probe = _probe(TF_ENABLE_ONEDNN_OPTS="1")
    if not probe["onednn"]:
        pytest.skip("this TensorFlow build has no oneDNN kernels")
    assert probe == {"variable": None, "onednn": True, "pooled": True}
