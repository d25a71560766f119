"""What the trainers' serving modules (tf.Module, saved as SavedModels)
share."""


def layer_variables(*layers):
    """Every variable of Keras `layers`, their metrics' too, as TF variables.

    A serving function reads them all, the MoE layers' routing metrics too,
    but Keras 3 does not expose them to tf.Module tracking: a module keeps
    this list as an attribute so that `tf.saved_model.save` finds them.
    """
    return [v.value for layer in layers
            for v in layer.variables + [metric_variable
                                        for metric in layer.metrics
                                        for metric_variable in metric.variables]]
