"""Where MoE layers run: one device, tf.distribute replicas, a DTensor mesh.

The only code of tf_moe that knows about `dtensor` or `tf.distribute`:

    strategy.py       the execution strategy interface (and OneDevice);
                      `strategy_at_build()` picks a layer's strategy
    replicas.py       tf.distribute replicas: statistics all-reduced
    mesh_strategy.py  a DTensor mesh: token shards, relayouts, static shapes
    mesh.py           meshes, layouts, MeshPlacement and its variable scope
    devices.py        logical CPU devices, multi-client (multi-host) setup
    optimizer.py      optimizer slots in their weights' layouts
    trainer.py        the mesh training step, MeshTrainer
    convert.py        values and models off the mesh
"""

from tf_moe.distribution.convert import assign
from tf_moe.distribution.convert import set_weights
from tf_moe.distribution.convert import to_numpy
from tf_moe.distribution.convert import to_single_device
from tf_moe.distribution.devices import configure_logical_cpus
from tf_moe.distribution.devices import initialize_multi_client
from tf_moe.distribution.mesh import DEFAULT_MESH_CAPACITY_FACTOR
from tf_moe.distribution.mesh import MeshPlacement
from tf_moe.distribution.mesh import current_placement
from tf_moe.distribution.mesh import make_mesh
from tf_moe.distribution.mesh import parse_mesh_shape
from tf_moe.distribution.mesh_strategy import Mesh
from tf_moe.distribution.optimizer import shard_optimizer_slots
from tf_moe.distribution.replicas import PerReplicaLosses
from tf_moe.distribution.replicas import Replicas
from tf_moe.distribution.strategy import OneDevice
from tf_moe.distribution.strategy import strategy_at_build
from tf_moe.distribution.trainer import MeshStep
from tf_moe.distribution.trainer import MeshTrainer
