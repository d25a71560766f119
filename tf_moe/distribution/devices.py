"""Devices and hosts: logical CPU devices and DTensor's multi-client setup."""

import tensorflow as tf
from tensorflow.experimental import dtensor

from tf_moe import allocator


def configure_logical_cpus(count):
    """Splits the host CPU into `count` logical devices (before TF runs),
    for DTensor meshes: TensorFlow's CPU allocator is left to malloc, which
    DTensor's eager ops need (`tf_moe.allocator`)."""
    allocator.use_malloc_for_dtensor()
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
