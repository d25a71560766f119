"""`tf.custom_gradient` whose gradient ops are named after the forward's.

TensorFlow builds a custom gradient's ops under the gradient tape's name
scope, so the layer's stage scopes (`route`, `dispatch`, `experts`, ...)
are lost for them, and a profile cannot tell which stage their time
belongs to. Here the gradient is built under `<forward scope>/gradient`.
"""

import tensorflow as tf


def custom_gradient(forward):
    """Like `tf.custom_gradient(forward)`; `forward(*tensors)` returns
    `(outputs, grad_fn)`. The ops `grad_fn` makes are named
    `<the scope forward ran in>/gradient/...`."""
    @tf.custom_gradient
    def wrapped(*tensors):
        scope = tf.get_current_name_scope()
        outputs, grad_fn = forward(*tensors)

        def scoped_grad_fn(*output_gradients):
            # A scope name ending in "/" re-enters that absolute scope.
            with tf.name_scope(f"{scope}/gradient/" if scope
                               else "gradient/"):
                return grad_fn(*output_gradients)

        return outputs, scoped_grad_fn

    return wrapped
