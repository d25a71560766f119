"""A learning rate of their own for the routed experts' weights.

An expert's weights get gradient only from the rows routed to it, about
k / E of a batch's tokens, so the more experts, the noisier each expert's
gradient. Adam normalises every weight's step to about the learning rate
whatever the gradient's size, so an expert with 20 rows a step moves as far
as the router or an LSTM that saw 2,000. The square-root rule for Adam
(Malladi et al., "On the SDEs and Scaling Rules for Adaptive Gradient
Algorithms", NeurIPS 2022: the rate scales with the square root of the
batch) suggests stepping an expert at sqrt(k / E) of the dense weights'
rate: `expert_learning_rate_scale="square_root"`.

Expert-parallel libraries keep the experts' weights in an optimizer group
of their own for the same kind of reason (DeepSpeed's
`split_params_into_different_moe_groups_for_optimizer`); here one Adam
scales the step of the weights `expert_weight_scales` names, so its slots,
checkpoints and gradient clipping stay those of one optimizer.
"""

import math

import keras

from tf_moe.arguments import check_positive_int
from tf_moe.mixture import moe_layers

SCALE_RULES = ("square_root",)


def _is_positive_number(value):
    return (not isinstance(value, bool) and isinstance(value, (int, float))
            and math.isfinite(value) and value > 0)


def check_expert_learning_rate_scale(scale):
    """Raises unless `scale` is a finite number > 0 or one of SCALE_RULES."""
    if scale in SCALE_RULES:
        return
    if not _is_positive_number(scale):
        raise ValueError("`expert_learning_rate_scale` must be a finite "
                         f"number > 0 or one of {SCALE_RULES}, got "
                         f"{scale!r}.")


def routed_expert_weights(*models):
    """The trainable weights of every MoE layer's routed experts.

    Args:
        *models: Keras models or layers; the tf_moe layers inside them (at
            any depth) are searched.

    Returns:
        A list of variables: each `MoE` or `HierarchicalMoE` layer's
        `experts` weights (`kernel_in`, `kernel_out` and the biases). Shared
        experts, which every token goes through, are left out: their
        gradient is the whole batch's, like a dense layer's.
    """
    return [weight for layer in moe_layers(*models)
            for weight in layer.experts.trainable_weights]


def square_root_scale(num_selected, num_experts):
    """sqrt(k / E): an expert sees k / E of the tokens on average, and the
    square-root rule scales Adam's rate with the square root of the batch.
    """
    check_positive_int("num_selected", num_selected)
    check_positive_int("num_experts", num_experts)
    if num_selected > num_experts:
        raise ValueError(f"`num_selected` ({num_selected}) must be at most "
                         f"`num_experts` ({num_experts}).")
    return math.sqrt(num_selected / num_experts)


def expert_weight_scales(expert_learning_rate_scale, *models):
    """`[(weight, factor)]` for `ExpertAdam`: each routed expert weight of
    the models' MoE layers with the multiplier of its rate.

    Args:
        expert_learning_rate_scale: a number > 0, the same factor for every
            layer, or "square_root": sqrt(experts_per_token / num_experts)
            of each layer (k / E; a hierarchical layer's k1 k2 / (G E')).
        *models: Keras models or layers.
    """
    check_expert_learning_rate_scale(expert_learning_rate_scale)
    scales = []
    for layer in moe_layers(*models):
        factor = (square_root_scale(layer.experts_per_token,
                                    layer.num_experts)
                  if expert_learning_rate_scale == "square_root"
                  else float(expert_learning_rate_scale))
        scales.extend((weight, factor)
                      for weight in layer.experts.trainable_weights)
    return scales


@keras.saving.register_keras_serializable(package="tf_moe")
class ExpertAdam(keras.optimizers.Adam):
    """Adam with a multiplier of the rate for some weights.

    Every weight follows Adam at the schedule's rate, except those in
    `weight_scales`, whose rate is multiplied by their factor. The moments,
    global-norm clipping and checkpoints are those of
    `keras.optimizers.Adam`; the factors are saved in the optimizer's
    config by weight path, so a compiled model saved to a `.keras` file
    trains on with them.

    Args:
        learning_rate: as for Adam (a float or a schedule).
        weight_scales: `[(weight, factor)]`, each weight a variable or its
            `path` (matched when the optimizer is built), each factor
            finite and > 0; usually `expert_weight_scales(scale, model)`.
            Empty: plain Adam.
        **kwargs: Adam's other arguments.
    """

    def __init__(self, learning_rate=0.001, weight_scales=(), **kwargs):
        super().__init__(learning_rate=learning_rate, **kwargs)
        self._path_scales = {}  # {weight path: factor}, for the config.
        self._scales = {}  # {variable key: factor}, what update_step reads.
        for weight, factor in weight_scales:
            path = weight if isinstance(weight, str) else weight.path
            if not _is_positive_number(factor):
                raise ValueError(f"`weight_scales`: the factor of {path} must "
                                 f"be a finite number > 0, got {factor!r}.")
            self._path_scales[path] = float(factor)
            if not isinstance(weight, str):
                self._scales[self._var_key(weight)] = float(factor)

    def build(self, variables):
        super().build(variables)
        paths = {variable.path: variable for variable in variables}
        unknown = sorted(set(self._path_scales) - set(paths))
        if unknown:
            raise ValueError("`weight_scales` names weights that are not "
                             f"among the optimizer's variables: {unknown}.")
        for path, factor in self._path_scales.items():
            self._scales[self._var_key(paths[path])] = factor

    def learning_rate_scale(self, variable):
        """The multiplier of `variable`'s rate (1.0 unless scaled)."""
        return self._scales.get(self._var_key(variable), 1.0)

    def update_step(self, gradient, variable, learning_rate):
        scale = self._scales.get(self._var_key(variable))
        if scale is not None:
            learning_rate = learning_rate * scale
        super().update_step(gradient, variable, learning_rate)

    def get_config(self):
        config = super().get_config()
        config["weight_scales"] = sorted(self._path_scales.items())
        return config
