"""How a layer of experts holds each `[E, ...]` weight: one variable, or E.

"stacked" (the default): one `[E, ...]` variable. The padded layout's
batched products read it as it is, and a mesh splits it over its expert
axis. The packed layout (one MatMul pair per expert) runs on its E slices,
and the gradient of that slicing stacks the E per-expert gradients back
into one `[E, ...]` tensor: a copy of the weight every step.

"per_expert": E variables of `[...]`, as a per-expert dispatcher holds
them. The packed layout runs on them directly and their gradients stay
apart; the padded layout stacks them in its forward pass instead (the same
copy, moved). On one device, wherever the packed layout is the faster one,
this storage removes that copy: at E=256, d=512, h=1,024, 128 rows per
expert, it was 16% of the experts' step alone on a 2-core CPU
(`bench/bench_matmul.py`); in the whole layer's step, where the copy
overlaps with other work, 1-10%, with 24% less peak memory
(`bench/bench_layer.py --expert_storages=stacked,per_expert`; README "The
floor: the experts alone"). Without that copy the packed layout stays a
candidate above `tf_moe.kernels.PER_EXPERT_MAX_EXPERTS` experts
(`tf_moe.kernels.packed_applies`), where stacked weights run padded: at
E=1,024 the layer's step was 11-20% faster than stacked.
"""

import numpy as np
import tensorflow as tf
from tensorflow.python.trackable import autotrackable

STORAGES = ("stacked", "per_expert")


def check_storage(storage, argument="expert_storage"):
    """Raises unless `storage` is one of STORAGES (`argument` names it in
    the error)."""
    if storage not in STORAGES:
        raise ValueError(f"`{argument}` must be one of {STORAGES}, got "
                         f"{storage!r}.")


class PerExpertWeight(autotrackable.AutoTrackable):
    """An `[E, ...]` weight held as E variables of `[...]`, one per expert.

    It reads like the stacked variable it stands for (`value`, `numpy()`,
    `tf.convert_to_tensor`, `shape`, `dtype`) and assigns from a stacked
    value (`assign`), so that code written for one `[E, ...]` variable
    (upcycling, keras-hub conversion, references in tests) runs on it
    unchanged. `experts` are the variables, tracked for checkpoints and
    SavedModels; a Keras layer also lists them in its `weights`.

    Args:
        variables: E variables of the same shape and dtype.
    """

    def __init__(self, variables):
        variables = list(variables)
        if not variables:
            raise ValueError("`variables` must hold at least one variable.")
        self.experts = variables

    @property
    def shape(self):
        return tf.TensorShape([len(self.experts)]).concatenate(
            self.experts[0].shape)

    @property
    def dtype(self):
        return self.experts[0].dtype

    @property
    def value(self):
        """The stacked `[E, ...]` tensor (the compute dtype inside a
        layer's autocast scope, as a Keras variable reads)."""
        return tf.stack([tf.convert_to_tensor(v) for v in self.experts])

    def numpy(self):
        return np.stack([np.asarray(v) for v in self.experts])

    def __getitem__(self, index):
        return self.value[index]

    def __array__(self, dtype=None, copy=None):
        array = self.numpy()
        return array if dtype is None else array.astype(dtype)

    def assign(self, value):
        """Assigns an `[E, ...]` value, slice e to expert e's variable."""
        value = tf.convert_to_tensor(value, self.dtype)
        if not value.shape.is_compatible_with(self.shape):
            raise ValueError(f"The value assigned must have shape "
                             f"{tuple(self.shape)}, got "
                             f"{tuple(value.shape)}.")
        for variable, part in zip(self.experts, tf.unstack(value)):
            variable.assign(part)


def _to_tensor(weight, dtype=None, name=None, as_ref=False):
    del name, as_ref
    value = weight.value
    return value if dtype is None else tf.cast(value, dtype)


tf.register_tensor_conversion_function(PerExpertWeight, _to_tensor)


def per_expert_slices(weight):
    """`[E, ...]` weight -> E tensors of `[...]`: its variables' values in
    "per_expert" storage (gradients apart), else slices of the stacked
    variable (whose gradient stacks them back)."""
    if isinstance(weight, PerExpertWeight):
        return [tf.convert_to_tensor(v) for v in weight.experts]
    return tf.unstack(tf.convert_to_tensor(weight))
