"""Meshes and layouts: where a model's tokens and experts live on a DTensor
mesh, and the scope that makes variables DTensor variables.

Keras 3's own `keras.distribution` is a stub on the TensorFlow backend, so
variables are made through TensorFlow's variable-creator hook, the
mechanism `tf.distribute` strategies use.
"""

import contextlib
import threading

import keras
import numpy as np
import tensorflow as tf
from tensorflow.experimental import dtensor

from tf_moe import allocator

UNSHARDED = dtensor.UNSHARDED

# The default capacity factor of layers that are dropless off the mesh: the
# mesh needs static buffer shapes. Tokens past it are counted in the
# layer's dropped_fraction metric.
DEFAULT_MESH_CAPACITY_FACTOR = 2.0

_state = threading.local()


def parse_mesh_shape(spec):
    """`"batch:2,expert:4"` (or a dict) -> `[("batch", 2), ("expert", 4)]`."""
    if isinstance(spec, dict):
        items = list(spec.items())
    else:
        items = []
        for part in str(spec).split(","):
            name, sep, size = part.strip().partition(":")
            if not sep or not name or not size.strip().isdigit():
                raise ValueError(
                    f"`mesh` must look like 'batch:2,expert:4' (axis:size "
                    f"pairs), got {spec!r}.")
            items.append((name, int(size)))
    for name, size in items:
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"mesh axis {name!r} must have a size >= 1, got "
                             f"{size!r}.")
    if len({name for name, _ in items}) != len(items):
        raise ValueError(f"mesh axis names must be distinct, got {spec!r}.")
    return items


def make_mesh(spec, device_type="CPU", devices=None):
    """A mesh over this job's devices (all clients' in multi-client mode).

    Args:
        spec: axis sizes, `"batch:2,expert:4"` or `{"batch": 2, ...}`; their
            product must be the number of devices.
        device_type: "CPU", "GPU" or "TPU".
        devices: optional local device names (e.g. `["CPU:0", "CPU:1"]`) for
            a mesh over some of this process's devices; all of the job's
            devices by default.

    Warns (`tf_moe.allocator.warn_if_pooled_for_dtensor`) where a CPU
    mesh runs on TensorFlow's pooled CPU allocator, which DTensor's eager
    ops cannot use for empty tensors.
    """
    dims = parse_mesh_shape(spec)
    size = int(np.prod([s for _, s in dims]))
    available = (len(devices) if devices is not None
                 else dtensor.num_global_devices(device_type))
    if size != available:
        raise ValueError(
            f"mesh {spec!r} has {size} devices but "
            + (f"{available} were given" if devices is not None else
               f"this job has {available} {device_type} devices (configure "
               "logical devices or launch more clients)") + ".")
    on_cpu = (any("CPU" in str(name).upper() for name in devices)
              if devices is not None else device_type.upper() == "CPU")
    if on_cpu:
        allocator.warn_if_pooled_for_dtensor()
    if devices is not None:
        return dtensor.create_mesh(dims, devices=list(devices))
    if dtensor.num_clients() > 1:
        return dtensor.create_distributed_mesh(dims, device_type=device_type)
    return dtensor.create_mesh(dims, device_type=device_type)


class MeshPlacement:
    """Where an MoE model's tokens and experts live on a mesh.

    Args:
        mesh: a `dtensor.Mesh`.
        batch_axis: mesh axis the batch is split over.
        expert_axis: mesh axis the experts are split over; may equal
            `batch_axis` (every device a data-parallel shard holding
            E/devices experts).
        capacity_factor: capacity of layers built dropless (off the mesh the
            layer has no fixed capacity; on it buffers have static shapes):
            each batch shard gives each expert at most
            `ceil(capacity_factor * k * shard tokens / E)` rows.
    """

    def __init__(self, mesh, batch_axis="batch", expert_axis="expert",
                 capacity_factor=DEFAULT_MESH_CAPACITY_FACTOR):
        for arg, axis in (("batch_axis", batch_axis),
                          ("expert_axis", expert_axis)):
            if axis not in mesh.dim_names:
                raise ValueError(
                    f"`{arg}` {axis!r} is not an axis of the mesh; its axes "
                    f"are {list(mesh.dim_names)}.")
        if not capacity_factor > 0:
            raise ValueError(
                f"`capacity_factor` must be > 0, got {capacity_factor!r}.")
        self.mesh = mesh
        self.batch_axis = batch_axis
        self.expert_axis = expert_axis
        self.capacity_factor = float(capacity_factor)

    @property
    def num_batch_shards(self):
        return self.mesh.dim_size(self.batch_axis)

    @property
    def num_expert_shards(self):
        return self.mesh.dim_size(self.expert_axis)

    # Layouts ---------------------------------------------------------------

    def replicated(self, rank):
        return dtensor.Layout.replicated(self.mesh, rank)

    def batch_sharded(self, rank):
        """Dimension 0 split over the batch axis."""
        return dtensor.Layout.batch_sharded(self.mesh, self.batch_axis, rank)

    def expert_sharded(self, rank, dim=0):
        """Dimension `dim` split over the expert axis."""
        specs = [UNSHARDED] * rank
        specs[dim] = self.expert_axis
        return dtensor.Layout(specs, self.mesh)

    def buffer_layout(self):
        """`[shards, E, C, d]` buffers at the experts: E over the expert
        axis, and the token shards still over the batch axis where it is
        another axis (on a one-axis mesh the relayout to this is the
        all-to-all)."""
        shards = (UNSHARDED if self.batch_axis == self.expert_axis
                  else self.batch_axis)
        return dtensor.Layout([shards, self.expert_axis, UNSHARDED, UNSHARDED],
                              self.mesh)

    # Checks ----------------------------------------------------------------

    def check_num_experts(self, num_experts, layer_name):
        if num_experts % self.num_expert_shards:
            raise ValueError(
                f"{layer_name}: num_experts={num_experts} is not divisible by "
                f"the size {self.num_expert_shards} of mesh axis "
                f"{self.expert_axis!r}; each device must hold E/"
                f"{self.num_expert_shards} whole experts.")

    def check_batch(self, num_tokens, what="batch"):
        if num_tokens % self.num_batch_shards:
            raise ValueError(
                f"the {what} of {num_tokens} is not divisible by the size "
                f"{self.num_batch_shards} of mesh axis {self.batch_axis!r}.")

    # Values ----------------------------------------------------------------

    def shard_batch(self, value):
        """A global batch (array) -> a DTensor split over the batch axis.

        Every client passes the same global batch and keeps its devices'
        slices, so the same input code serves one or many hosts.
        """
        value = np.asarray(value)
        if value.ndim == 0:
            raise ValueError("a batch must have a batch dimension.")
        self.check_batch(value.shape[0])
        layout = self.batch_sharded(value.ndim)
        shards = np.split(value, self.num_batch_shards, axis=0)
        # Device i of this client holds the shard of its batch-axis index.
        components = []
        axis = self.mesh.dim_names.index(self.batch_axis)
        for device_index in self.mesh.local_device_ids():
            coords = self.mesh.coords(device_index)
            components.append(tf.constant(shards[int(coords[axis])]))
        return dtensor.pack(components, layout)

    def to_mesh(self, value, layout=None):
        """A local value (tensor, array) -> a DTensor with `layout`
        (replicated by default)."""
        value = tf.convert_to_tensor(value)
        tensor = dtensor.copy_to_mesh(value, self.replicated(value.shape.rank))
        return tensor if layout is None else dtensor.relayout(tensor, layout)

    # Variable creation -----------------------------------------------------

    @contextlib.contextmanager
    def scope(self):
        """Variables created inside are DTensor variables on this mesh, and
        MoE layers built inside route on it."""
        previous = getattr(_state, "placement", None)
        _state.placement = self
        try:
            with tf.variable_creator_scope(self._create_variable), \
                    dtensor.default_mesh(self.mesh):
                yield self
        finally:
            _state.placement = previous

    def _create_variable(self, next_creator, **kwargs):
        del next_creator  # DVariables replace the default variables.
        initial_value = kwargs["initial_value"]
        if callable(initial_value):
            # On the host: some initializers (e.g. the LSTM's orthogonal
            # one) use ops DTensor cannot run on regular tensors.
            with tf.device("/device:CPU:0"):
                initial_value = initial_value()
        dtype = kwargs.get("dtype")
        value = initial_value
        if not dtensor.is_dtensor(value):
            value = self.to_mesh(tf.convert_to_tensor(value, dtype=dtype))
        hint = getattr(_state, "layout_hint", None)
        layout = None if hint is None else hint(self, value.shape.rank)
        if layout is not None:
            value = dtensor.relayout(value, layout)
        return dtensor.DVariable(
            value, trainable=kwargs.get("trainable", True),
            name=kwargs.get("name"), dtype=dtype)


def current_placement():
    """The `MeshPlacement` whose scope is active, or None."""
    return getattr(_state, "placement", None)


@contextlib.contextmanager
def _layout_hint(rule):
    """Variables created inside (under a placement scope) take the layout
    `rule(placement, rank)` (None: replicated)."""
    previous = getattr(_state, "layout_hint", None)
    _state.layout_hint = rule
    try:
        yield
    finally:
        _state.layout_hint = previous


def expert_sharded_variables():
    """Variables created inside have dimension 0 (experts) split over the
    expert axis when a placement scope is active; a no-op otherwise."""
    return _layout_hint(lambda placement, rank: placement.expert_sharded(rank))


def layout_like(variable):
    """Variables created inside take `variable`'s layout (its shape)."""
    value = (variable.value if isinstance(variable, keras.Variable)
             else variable)
    layout = (dtensor.fetch_layout(value)
              if isinstance(value, dtensor.DVariable) else None)
    return _layout_hint(lambda placement, rank: layout)
