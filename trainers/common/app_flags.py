"""The flags both trainer binaries share: workdir, distribution and mesh.

Defined here once, so that `python -m trainers.lm` and `python -m
trainers.nmt` take the same `--distribution`, `--mesh`, `--batch_axis`,
`--expert_axis` and `--local_devices`.
"""

from absl import flags

WORKDIR = flags.DEFINE_string(
    "workdir", None, "Vocabulary, checkpoints, TensorBoard summaries and the "
    "export go here; a run resumes from the checkpoints it finds.")
DISTRIBUTION = flags.DEFINE_enum(
    "distribution", "none", ("none", "mirrored", "dtensor"),
    "none: one device; mirrored: tf.distribute.MirroredStrategy over the "
    "local devices; dtensor: a DTensor mesh (--mesh).")
MESH = flags.DEFINE_string(
    "mesh", "", "DTensor mesh for --distribution=dtensor, axis:size pairs, "
    "e.g. batch:2,expert:4 (or expert:8: one axis for both).")
BATCH_AXIS = flags.DEFINE_string("batch_axis", "batch",
                                 "The mesh axis the batch is split over.")
EXPERT_AXIS = flags.DEFINE_string("expert_axis", "expert",
                                  "The mesh axis the experts are split over.")
LOCAL_DEVICES = flags.DEFINE_integer(
    "local_devices", 0, "Split the CPU into this many logical devices "
    "(for mirrored or dtensor without GPUs); 0 leaves it whole.")
EXPORT_DIR = flags.DEFINE_string(
    "export_dir", "", "Where --mode=export (and train) write the SavedModel "
    "(default: WORKDIR/export).")

flags.mark_flags_as_required(["workdir"])


def distribution():
    """The flags' `Distribution`, the logical CPUs configured first.

    Call before anything initialises TensorFlow's devices.
    """
    from tf_moe import sharding
    if LOCAL_DEVICES.value:
        sharding.configure_logical_cpus(LOCAL_DEVICES.value)
    from trainers.common.distribution import Distribution
    return Distribution(DISTRIBUTION.value, MESH.value, BATCH_AXIS.value,
                        EXPERT_AXIS.value)


def export_dir():
    import os
    return EXPORT_DIR.value or os.path.join(WORKDIR.value, "export")
