"""TensorFlow's CPU allocator: a pool in every configuration.

A training step allocates and frees tensors of hundreds of MB (buffers of
routed rows, the experts' stacked weight gradients). With TensorFlow's
oneDNN kernels on, CPU tensors come from oneDNN's allocator, which pools
large blocks. With them off (`TF_ENABLE_ONEDNN_OPTS=0`, or a platform whose
build has them off), TensorFlow's default allocator calls malloc per
tensor, and glibc maps every block over 32 MB afresh: the page faults of a
fresh 128 MB tensor cost several times the copy that fills it. The layer
benchmark's step at E=256 (oneDNN off, AMD EPYC) took 2.51 s that way
against 1.88 s from a pool (README, "Allocator").

TensorFlow has its own pool (`TF_CPU_ALLOCATOR_USE_BFC=1`), which replaces
oneDNN's where both would apply. So importing tf_moe turns it on where
oneDNN's kernels are off, unless the variable is set already (set it to 0
to keep malloc). TensorFlow reads it when it makes its CPU allocator, at
the first tensor: it takes effect when tf_moe is imported before any
tensor is made, even after `import tensorflow`.

DTensor on CPU devices cannot run on that pool: it gives a zero-byte
tensor a null buffer, and DTensor's eager ops refuse one ("TF_TensorData
returned nullptr") wherever an input or output is empty, even the empty
shape of `tf.zeros([])`. So splitting the CPU into devices for a mesh
(`tf_moe.sharding.configure_logical_cpus`) hands the allocator back to
malloc, unless the user chose, and a CPU mesh made on the pool all the
same (one unsplit device, or a user's pool) gets a warning that says so
(`warn_if_pooled_for_dtensor`), rather than the bare error of a later op.
"""

import os
import warnings

POOL_VARIABLE = "TF_CPU_ALLOCATOR_USE_BFC"

# Set beside POOL_VARIABLE where this module chose the pool, so that it
# (and a child process, which inherits both) can tell its choice from a
# user's.
CHOSEN_VARIABLE = "TF_MOE_CHOSE_CPU_POOL"


def _onednn_enabled():
    """Whether TensorFlow runs its oneDNN kernels (and their allocator)."""
    try:
        from tensorflow.python.util import _pywrap_util_port
        return bool(_pywrap_util_port.IsMklEnabled())
    except (ImportError, AttributeError):  # Private API: judge by the flag.
        return os.environ.get("TF_ENABLE_ONEDNN_OPTS", "").lower() not in (
            "0", "false")


def use_pooled_cpu_allocator():
    """Asks TensorFlow for its pooled CPU allocator where oneDNN's is not in
    use and the user has not chosen (the module docstring).

    Returns:
        The value of `TF_CPU_ALLOCATOR_USE_BFC` after the call, or None.
    """
    if POOL_VARIABLE not in os.environ and not _onednn_enabled():
        os.environ[POOL_VARIABLE] = "1"
        os.environ[CHOSEN_VARIABLE] = "1"
    return os.environ.get(POOL_VARIABLE)


def use_malloc_for_dtensor():
    """Takes back `use_pooled_cpu_allocator`'s choice (not a user's) for a
    process that runs DTensor on CPU devices (the module docstring). Call
    it before TensorFlow makes its first tensor.

    Returns:
        The value of `TF_CPU_ALLOCATOR_USE_BFC` after the call, or None.
    """
    if os.environ.pop(CHOSEN_VARIABLE, None):
        os.environ.pop(POOL_VARIABLE, None)
    return os.environ.get(POOL_VARIABLE)


def warn_if_pooled_for_dtensor():
    """Warns that DTensor's eager ops on CPU devices will fail on empty
    tensors where TensorFlow's CPU pool is asked for (the module
    docstring). `tf_moe.sharding.make_mesh` calls it for CPU meshes; the
    warning points at make_mesh's caller."""
    if os.environ.get(POOL_VARIABLE) != "1":
        return
    cause = ("importing tf_moe set it, since oneDNN's kernels are off"
             if os.environ.get(CHOSEN_VARIABLE) else "it was set")
    warnings.warn(
        f"{POOL_VARIABLE}=1 ({cause}): TensorFlow's pooled CPU allocator "
        "gives empty tensors a null buffer, and DTensor's eager ops on a "
        "CPU mesh fail on them with 'TF_TensorData returned nullptr'. Set "
        f"{POOL_VARIABLE}=0 before TensorFlow makes its first tensor, or "
        "split the CPU with tf_moe.sharding.configure_logical_cpus (which "
        "takes back tf_moe's own choice).", RuntimeWarning, stacklevel=3)


def cpu_allocator_pooled():
    """Whether TensorFlow's CPU allocator pools its blocks (it keeps
    statistics: oneDNN's or TensorFlow's pool; plain malloc keeps none).

    Makes TensorFlow's CPU allocator and runtime if they are not made yet,
    so call it after configuring devices (`tf_moe.sharding`).
    """
    import tensorflow as tf
    try:
        tf.config.experimental.get_memory_info("CPU:0")
    except ValueError:
        return False
    return True
