"""Values and models off the mesh: full values, weight assignment, and a
single-device copy of a mesh model for export and serving."""

import keras
import tensorflow as tf
from tensorflow.experimental import dtensor

from tf_moe.distribution import mesh as mesh_lib


def to_numpy(value):
    """The full value of a tensor, variable or (possibly sharded) DTensor."""
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
        assign(variable, value)


def assign(variable, value):
    """Assigns a full value to a variable, on a mesh in its own layout."""
    value = tf.convert_to_tensor(value, variable.dtype)
    if not dtensor.is_dtensor(tf.convert_to_tensor(variable.value)):
        variable.assign(value)
        return
    layout = dtensor.fetch_layout(variable.value)
    tensor = dtensor.copy_to_mesh(
        value, dtensor.Layout.replicated(layout.mesh, layout.rank))
    variable.assign(dtensor.relayout(tensor, layout))


def to_single_device(model):
    """A plain (unsharded) copy of a mesh model, for export and serving.

    The copy is rebuilt from the model's config (Sequential and functional
    models, and subclassed ones with `get_config`/`from_config`) outside
    any placement, then given the mesh model's values.
    """
    if mesh_lib.current_placement() is not None:
        raise RuntimeError("to_single_device must run outside "
                           "`placement.scope()`.")
    copy = model.__class__.from_config(model.get_config())
    if not copy.built:
        copy.build(model.inputs[0].shape if model.inputs else None)
    copy.set_weights([to_numpy(v) for v in model.weights])
    return copy
