"""TensorFlow's CPU allocator pools in every oneDNN configuration once
tf_moe is imported, except for DTensor on logical CPUs (`tf_moe.allocator`),
each case in a fresh process."""

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


# DTensor's eager ops on empty tensors (the empty shape of a scalar
# `tf.zeros([])`, a `[0]` result) fail on TensorFlow's pool.
_MESH_PROBE = """
import json, os
import tensorflow as tf
from tensorflow.experimental import dtensor
import tf_moe
from tf_moe import sharding
sharding.configure_logical_cpus(2)
mesh = dtensor.create_mesh([("batch", 2)], devices=["CPU:0", "CPU:1"])
with dtensor.default_mesh(mesh):
    shapes = [tf.zeros([]).shape.as_list(), tf.zeros([0, 3]).shape.as_list()]
print(json.dumps({
    "variable": os.environ.get(tf_moe.allocator.POOL_VARIABLE),
    "pooled": tf_moe.allocator.cpu_allocator_pooled(),
    "shapes": shapes}))
"""


def _probe(script=_PROBE, **environment):
    env = {k: v for k, v in os.environ.items()
           if k not in ("TF_ENABLE_ONEDNN_OPTS", allocator.POOL_VARIABLE,
                        allocator.CHOSEN_VARIABLE)}
    env.update(environment, TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run([sys.executable, "-c", script], env=env,
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


@pytest.mark.parametrize("onednn", ["0", "1"])
def test_a_cpu_mesh_runs_dtensor_on_malloc(onednn):
    probe = _probe(_MESH_PROBE, TF_ENABLE_ONEDNN_OPTS=onednn)
    assert probe["variable"] is None
    assert probe["shapes"] == [[], [0, 3]]
    if onednn == "0":
        assert not probe["pooled"]


def test_a_users_pool_is_kept_on_a_cpu_mesh():
    script = _PROBE.replace(
        "import tf_moe\n",
        "import tf_moe\ntf_moe.sharding.configure_logical_cpus(2)\n")
    probe = _probe(script, TF_ENABLE_ONEDNN_OPTS="0",
                   **{allocator.POOL_VARIABLE: "1"})
    assert probe == {"variable": "1", "onednn": False, "pooled": True}


# A CPU mesh made on TensorFlow's pool: one unsplit device (no
# `configure_logical_cpus`), or split with the user's own pool.
_MAKE_MESH_PROBE = """
import json, warnings
import tensorflow as tf
from tensorflow.experimental import dtensor
import tf_moe
from tf_moe import sharding
if {devices} > 1:
    sharding.configure_logical_cpus({devices})
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    mesh = sharding.make_mesh("batch:{devices}")
try:
    with dtensor.default_mesh(mesh):
        tf.zeros([]).numpy()
    failed = False
except tf.errors.InternalError:
    failed = True
print(json.dumps({{
    "warnings": [str(w.message) for w in caught
                 if issubclass(w.category, RuntimeWarning)],
    "empty_tensor_failed": failed}}))
"""


@pytest.mark.parametrize("devices,pool,warned", [
    (1, None, True),   # tf_moe's pool, the CPU not split.
    (1, "0", False),   # The user's malloc.
    (2, None, False),  # Split: tf_moe's pool taken back.
    (2, "1", True),    # Split, the user's own pool kept.
])
def test_make_mesh_warns_where_dtensor_would_fail(devices, pool, warned):
    environment = {} if pool is None else {allocator.POOL_VARIABLE: pool}
    probe = _probe(_MAKE_MESH_PROBE.format(devices=devices),
                   TF_ENABLE_ONEDNN_OPTS="0", **environment)
    # The warning is given exactly where the op it warns of fails.
    assert probe["empty_tensor_failed"] == warned
    assert len(probe["warnings"]) == int(warned)
    if warned:
        message = probe["warnings"][0]
        assert allocator.POOL_VARIABLE in message
        assert ("importing tf_moe" in message) == (pool is None)
