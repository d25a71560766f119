"""Models on a DTensor mesh: experts sharded, tokens data-parallel.

The paper's section 3 mixes data and model parallelism: the batch is split
over data-parallel shards, every expert lives on one device, and each shard
sends its tokens to the devices of the experts they chose. Here that is a
`MeshPlacement` over a `tf.experimental.dtensor` mesh with a batch axis and
an expert axis (one axis may serve as both, as in the paper):

- variables created under `placement.scope()` are DTensor variables:
  expert weights sharded over the expert axis (their first dimension),
  everything else replicated;
- a layer built under the scope routes each batch shard's tokens into its
  own `[E, C, d]` buffers (`grouped_dispatch`), and relayouting the buffers
  from batch-sharded to expert-sharded is the all-to-all;
- `MeshTrainer` is the training step (Keras `fit` does not run on DTensor),
  and it gives the optimizer's slots the layout of their weights.

Keras 3's own `keras.distribution` is a stub on the TensorFlow backend, so
the variables are made through TensorFlow's variable-creator hook, the
mechanism `tf.distribute` strategies use.
"""

import contextlib
import threading

import keras
import numpy as np
import tensorflow as tf
from tensorflow.experimental import dtensor

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
    if devices is not None:
        return dtensor.create_mesh(dims, devices=list(devices))
    if dtensor.num_clients() > 1:
        return dtensor.create_distributed_mesh(dims, device_type=device_type)
    return dtensor.create_mesh(dims, device_type=device_type)


def configure_logical_cpus(count):
    """Splits the host CPU into `count` logical devices (before TF runs)."""
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * count)


def initialize_multi_client(local_cpus):
    """Starts this process as one DTensor client of a multi-host job.

    Reads DTENSOR_CLIENT_ID, DTENSOR_NUM_CLIENTS, DTENSOR_JOB_NAME and
    DTENSOR_JOBS (each client's host:port) from the environment; every
    client must call it with the same `local_cpus` before building a mesh.
    """
    configure_logical_cpus(local_cpus)
    dtensor.initialize_accelerator_system("CPU")


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
        """`[G, E, C, d]` buffers at the experts: E over the expert axis,
        and the groups still over the batch axis where it is another axis
        (on a one-axis mesh the relayout to this is the all-to-all)."""
        group = (UNSHARDED if self.batch_axis == self.expert_axis
                 else self.batch_axis)
        return dtensor.Layout([group, self.expert_axis, UNSHARDED, UNSHARDED],
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
        for device_index in self.mesh.local_device_ids():
            coords = self.mesh.coords(device_index)
            axis = self.mesh.dim_names.index(self.batch_axis)
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
        layout = _layout_hint(self, value.shape.rank)
        if layout is not None:
            value = dtensor.relayout(value, layout)
        return dtensor.DVariable(
            value, trainable=kwargs.get("trainable", True),
            name=kwargs.get("name"), dtype=dtype)


def current_placement():
    """The `MeshPlacement` whose scope is active, or None."""
    return getattr(_state, "placement", None)


def _layout_hint(placement, rank):
    hint = getattr(_state, "layout_hint", None)
    if hint is None:
        return None
    return hint(placement, rank)


@contextlib.contextmanager
def _hint(rule):
    previous = getattr(_state, "layout_hint", None)
    _state.layout_hint = rule
    try:
        yield
    finally:
        _state.layout_hint = previous


def expert_sharded_variables():
    """Variables created inside have dimension 0 (experts) split over the
    expert axis when a placement scope is active; a no-op otherwise."""
    return _hint(lambda placement, rank: placement.expert_sharded(rank))


def layout_like(variable):
    """Variables created inside take `variable`'s layout (its shape)."""
    value = (variable.value if isinstance(variable, keras.Variable)
             else variable)
    layout = (dtensor.fetch_layout(value)
              if isinstance(value, dtensor.DVariable) else None)
    return _hint(lambda placement, rank: layout)


# Training --------------------------------------------------------------------


def shard_optimizer_slots(optimizer):
    """Makes the optimizer give each slot variable its weight's layout.

    Keras optimizers create their slots (Adam's moments, ...) with
    `add_variable_from_reference`; under a placement scope those would be
    replicated, holding E experts' state on every device.
    """
    create_slot = optimizer.add_variable_from_reference

    def add_variable_from_reference(reference_variable, *args, **kwargs):
        with layout_like(reference_variable):
            return create_slot(reference_variable, *args, **kwargs)

    optimizer.add_variable_from_reference = add_variable_from_reference
    return optimizer


class MeshTrainer:
    """A compiled training step for a model built under a placement scope.

    Args:
        model: a Keras model whose variables were created under
            `placement.scope()`.
        optimizer: a Keras optimizer (its slots get their weights' layouts).
        loss: a Keras loss (name or object), applied as `loss(y, model(x))`;
            the model's `add_loss` terms (the balancing losses) are added.
        placement: the `MeshPlacement`.
    """

    def __init__(self, model, optimizer, loss, placement):
        self.model = model
        self.optimizer = shard_optimizer_slots(optimizer)
        self.loss = keras.losses.get(loss)
        self.placement = placement
        with placement.scope():
            self.optimizer.build(model.trainable_variables)
        # Gradients and the update run as two compiled functions. Fused in
        # one, DTensor (TF 2.21) lost the optimizer's first update and then
        # applied stale Adam moments whenever an MoE layer was in the model
        # (measured against the single-device step); split, they match it.
        self._gradients = tf.function(self._loss_and_gradients)
        self._apply = tf.function(self._apply_gradients)
        self._predict = tf.function(
            lambda x: self.model(x, training=False))

    def _loss_and_gradients(self, x, y):
        with tf.GradientTape() as tape:
            predictions = self.model(x, training=True)
            # Loss functions give per-example values, Loss objects a mean.
            loss = tf.reduce_mean(self.loss(y, predictions))
            if self.model.losses:
                loss += tf.add_n(self.model.losses)
        return loss, tape.gradient(loss, self.model.trainable_variables)

    def _apply_gradients(self, gradients):
        self.optimizer.apply(gradients, self.model.trainable_variables)

    def _step(self, x, y):
        loss, gradients = self._gradients(x, y)
        self._apply(gradients)
        return loss

    def train_step(self, x, y):
        """One step on a global batch (arrays); returns the loss (float)."""
        with self.placement.scope():
            loss = self._step(self.placement.shard_batch(x),
                              self.placement.shard_batch(y))
        return float(to_numpy(loss))

    def predict(self, x):
        """The model's inference output on a global batch, as numpy."""
        with self.placement.scope():
            return to_numpy(self._predict(self.placement.shard_batch(x)))


# Values off the mesh ---------------------------------------------------------


def to_numpy(value):
    """The full value of a (possibly sharded) DTensor or variable."""
    if isinstance(value, keras.Variable):
        value = value.value
    value = tf.convert_to_tensor(value)
    if not dtensor.is_dtensor(value):
        return value.numpy()
    layout = dtensor.fetch_layout(value)
    replicated = dtensor.relayout(
        value, dtensor.Layout.replicated(layout.mesh, layout.rank))
    return dtensor.unpack(replicated)[0].numpy()


def set_weights(model, weights):
    """Assigns arrays (e.g. a single-device model's `get_weights()`) to a
    mesh model's variables, each in its own layout."""
    variables = model.weights
    if len(variables) != len(weights):
        raise ValueError(f"`weights` has {len(weights)} arrays but the model "
                         f"has {len(variables)} variables.")
    for variable, value in zip(variables, weights):
        layout = dtensor.fetch_layout(variable.value)
        value = tf.convert_to_tensor(value, variable.dtype)
        tensor = dtensor.copy_to_mesh(
            value, dtensor.Layout.replicated(layout.mesh, layout.rank))
        variable.assign(dtensor.relayout(tensor, layout))


def to_single_device(model):
    """A plain (unsharded) copy of a mesh model, for export and serving.

    The copy is rebuilt from the model's config (Sequential and functional
    models, and subclassed ones with `get_config`/`from_config`) outside
    any placement, then given the mesh model's values.
    """
    if current_placement() is not None:
        raise RuntimeError("to_single_device must run outside "
                           "`placement.scope()`.")
    copy = model.__class__.from_config(model.get_config())
    if not copy.built:
        copy.build(model.inputs[0].shape if model.inputs else None)
    copy.set_weights([to_numpy(v) for v in model.weights])
    return copy
