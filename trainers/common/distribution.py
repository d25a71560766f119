"""One training step under the trainers' three distributions.

    none      one device
    mirrored  tf.distribute.MirroredStrategy over the local devices (GPUs,
              else the logical CPUs): the global batch is split into equal
              row blocks, one per replica; gradients are summed.
    dtensor   a DTensor mesh (`--mesh=batch:2,expert:4`): expert weights
              sharded over the expert axis, the batch over the batch axis
              (tf_moe.sharding); LSTMs run with tf_moe.recurrent. A mesh
              program needs static shapes, so every sequence axis of a
              batch is padded (with padding tokens) to a power of two, and
              a step is compiled once per batch shape (a handful, as the
              batches are bucketed by powers of two).

Every distribution computes the same objective on the same global batch:
`sum(nll) / tokens(global batch) + balancing losses`, so a run gives the
same numbers under each, up to float rounding (and, in training, the
random draws of dropout and gate noise, which follow the batch split).
"""

import contextlib

import numpy as np
import tensorflow as tf

from tf_moe import sharding
from tf_moe.distribution.trainer import compile_without_autograph

KINDS = ("none", "mirrored", "dtensor")


def pad_rows(batch, multiple):
    """Pads every `[batch, ...]` array of a dict with zero rows to a multiple
    of `multiple` (zero rows are padding: they carry no tokens)."""
    rows = next(iter(batch.values())).shape[0]
    extra = -rows % multiple
    if not extra:
        return batch
    return {key: np.concatenate(
        [value, np.zeros((extra,) + value.shape[1:], value.dtype)])
        for key, value in batch.items()}


def pad_time(batch, minimum=8):
    """Pads every `[batch, time]` array of a dict with zero columns (padding)
    to one length: the next power of two (at least `minimum`) of the
    longest."""
    lengths = [value.shape[1] for value in batch.values() if value.ndim == 2]
    if not lengths:
        return batch
    length = max(minimum, 1 << (max(lengths) - 1).bit_length())
    return {key: np.pad(value, [(0, 0), (0, length - value.shape[1])])
            if value.ndim == 2 else value
            for key, value in batch.items()}


def relaxed(function):
    """`function(batch, *rest)` compiled once for every batch shape: the
    signature, taken from the first batch, leaves every dimension open
    (bucketed batches vary in both)."""
    compiled = {}

    def call(batch, *rest):
        if "function" not in compiled:
            spec = {key: tf.TensorSpec([None] * np.ndim(value),
                                       tf.as_dtype(np.asarray(value).dtype))
                    for key, value in batch.items()}
            rest_spec = [tf.TensorSpec.from_tensor(tf.convert_to_tensor(r))
                         for r in rest]
            compiled["function"] = compile_without_autograph(
                function, input_signature=[spec] + rest_spec)
        return compiled["function"](batch, *rest)
    return call


class Distribution:
    """Builds variables in its scope and runs compiled steps on global
    batches (dicts of numpy arrays).

    Args:
        kind: one of KINDS.
        mesh: the mesh spec for "dtensor" (e.g. "batch:2,expert:4").
        batch_axis, expert_axis: the mesh axes' names.
        num_devices: use the first this many local devices (GPUs, else
            CPUs); 0 for all of them (all of the job's, multi-client).
    """

    def __init__(self, kind="none", mesh="", batch_axis="batch",
                 expert_axis="expert", num_devices=0):
        if kind not in KINDS:
            raise ValueError(f"--distribution must be one of {KINDS}, got "
                             f"{kind!r}.")
        if kind == "dtensor" and not mesh:
            raise ValueError("--distribution=dtensor needs --mesh (e.g. "
                             "--mesh=batch:2,expert:4).")
        if kind != "dtensor" and mesh:
            raise ValueError(f"--mesh is only used with "
                             f"--distribution=dtensor, not {kind!r}.")
        self.kind = kind
        self.strategy = None
        self.placement = None
        # GPUs, else (logical) CPUs: MirroredStrategy's own default takes
        # one CPU only.
        device_type = "GPU" if tf.config.list_logical_devices("GPU") else "CPU"
        devices = [device.name
                   for device in tf.config.list_logical_devices(device_type)]
        if num_devices:
            if num_devices > len(devices):
                raise ValueError(f"num_devices={num_devices} but there are "
                                 f"{len(devices)} {device_type} devices.")
            devices = devices[:num_devices]
        if kind == "mirrored":
            # Reduction on one device, not collectives: collective group
            # keys clash with a DTensor mesh in the same process.
            self.strategy = tf.distribute.MirroredStrategy(
                devices,
                cross_device_ops=tf.distribute.ReductionToOneDevice())
        elif kind == "dtensor":
            self.placement = sharding.MeshPlacement(
                sharding.make_mesh(mesh, device_type,
                                   devices if num_devices else None),
                batch_axis, expert_axis)

    @property
    def num_replicas(self):
        """The row blocks a global batch is split into."""
        if self.strategy is not None:
            return self.strategy.num_replicas_in_sync
        if self.placement is not None:
            return self.placement.num_batch_shards
        return 1

    def prepare_optimizer(self, optimizer):
        """`optimizer`, made to give each slot its weight's layout on a mesh
        (replicated slots of sharded experts took wrong updates)."""
        if self.placement is not None:
            return sharding.shard_optimizer_slots(optimizer)
        return optimizer

    def scope(self):
        if self.strategy is not None:
            return self.strategy.scope()
        if self.placement is not None:
            return self.placement.scope()
        return contextlib.nullcontext()

    def _per_replica(self, batch):
        """Row block r of every array of `batch` on replica r."""
        replicas = self.num_replicas
        return self.strategy.experimental_distribute_values_from_function(
            lambda context: {
                key: np.array_split(value, replicas)[
                    context.replica_id_in_sync_group]
                for key, value in batch.items()})

    def compile(self, loss_fn, variables, optimizer, models):
        """A step `global batch -> stats` that applies one update.

        Args:
            loss_fn: `batch -> (nll_sum, stats)` on the part of the batch
                this replica holds, in training mode; `stats` a dict of
                scalars summed over the replicas (`nll_sum` is added as
                "nll").
            variables: the variables trained.
            optimizer: a Keras optimizer, built in `scope()`.
            models: the Keras models whose `losses` (balancing terms) join
                the objective.
        """
        # Gradients are summed over MirroredStrategy's replicas; a DTensor
        # program is one global computation.
        replicas = self.strategy.num_replicas_in_sync if self.strategy else 1

        def objective(batch, tokens):
            nll_sum, stats = loss_fn(batch)
            aux = tf.add_n([tf.add_n(m.losses) for m in models if m.losses]
                           or [tf.zeros([])])
            # Gradients are summed over replicas: this sum is the global
            # mean NLL per token plus the (all-reduced) balancing losses.
            loss = nll_sum / tokens + aux / replicas
            return loss, dict(stats, nll=nll_sum, aux=aux / replicas)

        def stats_and_gradients(batch, tokens):
            with tf.GradientTape() as tape:
                loss, stats = objective(batch, tokens)
            return stats, tape.gradient(loss, variables)

        def apply(grads):
            optimizer.apply(grads, variables)

        if self.strategy is not None:
            strategy = self.strategy

            @compile_without_autograph(reduce_retracing=True)
            def replica_step(batch, tokens):
                def step(replica_batch):
                    stats, grads = stats_and_gradients(replica_batch, tokens)
                    apply(grads)
                    return stats
                stats = strategy.run(step, args=(batch,))
                return {key: strategy.reduce("SUM", value, axis=None)
                        for key, value in stats.items()}

            def run(batch):
                batch = pad_rows(batch, self.num_replicas)
                tokens = tf.constant(
                    float(np.count_nonzero(batch["targets"])), tf.float32)
                return replica_step(self._per_replica(batch), tokens)
            return run

        if self.placement is not None:
            placement = self.placement
            step = sharding.MeshStep(placement, stats_and_gradients, apply)

            def run(batch):
                batch = pad_time(pad_rows(batch, self.num_replicas))
                with placement.scope():
                    tokens = placement.to_mesh(tf.constant(
                        float(np.count_nonzero(batch["targets"]))))
                    sharded = {key: placement.shard_batch(value)
                               for key, value in batch.items()}
                stats = step(sharded, tokens)
                return {key: sharding.to_numpy(value)
                        for key, value in stats.items()}
            return run

        @relaxed
        def single_step(batch, tokens):
            stats, grads = stats_and_gradients(batch, tokens)
            apply(grads)
            return stats

        def run(batch):
            tokens = tf.constant(
                float(np.count_nonzero(batch["targets"])), tf.float32)
            return single_step(batch, tokens)
        return run

    def compile_eval(self, stats_fn):
        """`global batch -> stats` in inference mode (summed over replicas)."""
        if self.strategy is not None:
            strategy = self.strategy
            replicas = self.num_replicas

            @compile_without_autograph(reduce_retracing=True)
            def replica_eval(batch):
                stats = strategy.run(stats_fn, args=(batch,))
                return {key: strategy.reduce("SUM", value, axis=None)
                        for key, value in stats.items()}

            def run(batch):
                return replica_eval(
                    self._per_replica(pad_rows(batch, replicas)))
            return run

        if self.placement is not None:
            placement = self.placement
            # Traced per shape, as in training.
            compiled = compile_without_autograph(stats_fn)

            def run(batch):
                batch = pad_time(pad_rows(batch, self.num_replicas))
                with placement.scope():
                    stats = compiled({key: placement.shard_batch(value)
                                      for key, value in batch.items()})
                return {key: sharding.to_numpy(value)
                        for key, value in stats.items()}
            return run

        return relaxed(stats_fn)
