"""The mesh API under its documented names (README, "Several devices and
hosts"); the code lives in `tf_moe.distribution`."""

from tf_moe.distribution import DEFAULT_MESH_CAPACITY_FACTOR  # noqa: F401
from tf_moe.distribution import MeshPlacement  # noqa: F401
from tf_moe.distribution import MeshStep  # noqa: F401
from tf_moe.distribution import MeshTrainer  # noqa: F401
from tf_moe.distribution import configure_logical_cpus  # noqa: F401
from tf_moe.distribution import current_placement  # noqa: F401
from tf_moe.distribution import initialize_multi_client  # noqa: F401
from tf_moe.distribution import make_mesh  # noqa: F401
from tf_moe.distribution import parse_mesh_shape  # noqa: F401
from tf_moe.distribution import set_weights  # noqa: F401
from tf_moe.distribution import shard_optimizer_slots  # noqa: F401
from tf_moe.distribution import to_numpy  # noqa: F401
from tf_moe.distribution import to_single_device  # noqa: F401
