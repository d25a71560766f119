"""The noisy top-k gate's per-entry math in training, fused by XLA.

In training every entry of a noisy gate (`[rows, E]`) runs a softplus, a
noise product, the comparison with its row's threshold, a normal CDF and,
backward, the gradient of each: some twenty passes over `[rows, E]` as
separate TensorFlow ops. A hierarchical layer of 65,536 experts has 768
entries a token, and there these passes are the largest part of a step.
Here they run as three XLA-compiled functions, each one loop over the
entries (`before_top_k`, `after_top_k`, `gradient`), around TensorFlow's
top-k, with the gradient written out. The values are those of
`NoisyTopKGate`'s plain ops (`tf_moe.top_k_gating`), which a layer runs
where XLA may not (a DTensor mesh of several devices) or was not timed
faster (`tf_moe.kernels.choose_gate`).

The compiled functions specialise to the number of rows, so a gate fuses
only rows whose number is static (the tokens of a batch of fixed shape, a
hierarchical layer's group rows under a fixed capacity). Rows whose number
changes with every batch (a dropless hierarchical layer's group rows) run
the plain ops: padding them to a few sizes and cutting the results back
costs more copies of `[rows, E]` than the fusion saves (measured at 2^17
rows of 256 experts, forward and backward).
"""

import math

import tensorflow as tf

from tf_moe import scoped_gradient

_INVERSE_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _compiled(function):
    # Traced per shape (k and E are read from them), as XLA compiles.
    return tf.function(function, jit_compile=True)


def _noise_scale(noise_logits, noise_epsilon):
    return tf.nn.softplus(noise_logits) + noise_epsilon


def _margin(logits, noisy_logits, thresholds, noise_epsilon):
    """`((clean - threshold) / stddev, stddev, is_in_top_k)`, the threshold
    the (k+1)-th largest noisy logit for an entry in the top k, else the
    k-th (`balance.selection_probability`)."""
    clean_logits, noise_logits = tf.split(logits, 2, axis=-1)
    stddev = _noise_scale(noise_logits, noise_epsilon)
    is_in_top_k = noisy_logits > thresholds[:, 1:]
    threshold = tf.where(is_in_top_k, thresholds[:, 1:], thresholds[:, :1])
    return (clean_logits - threshold) / stddev, stddev, is_in_top_k


@_compiled
def _before_top_k(logits, noise, noise_epsilon):
    """`[R, 2E], [R, E] -> [R, E]`: `clean + noise * stddev`."""
    clean_logits, noise_logits = tf.split(logits, 2, axis=-1)
    return clean_logits + noise * _noise_scale(noise_logits, noise_epsilon)


@_compiled
def _after_top_k(logits, noisy_logits, thresholds, row_weights,
                 noise_epsilon):
    """`[R, E]`: P(x, i) of the smooth load estimate, times the row's
    weight."""
    margin, _, _ = _margin(logits, noisy_logits, thresholds, noise_epsilon)
    return 0.5 * tf.math.erfc(-margin / math.sqrt(2.0)) * row_weights


@_compiled
def _gradient(logits, noise, noisy_logits, thresholds, row_weights, top_ids,
              d_top_values, d_probability, noise_epsilon):
    """`[R, 2E]`: the gradient of the logits from those of the top values
    (`[R, k+1]`) and of P (`[R, E]`)."""
    margin, stddev, is_in_top_k = _margin(logits, noisy_logits, thresholds,
                                          noise_epsilon)
    k = top_ids.shape[-1] - 1
    # dP/dclean = phi(margin) / stddev = -dP/dthreshold, dP/dstddev =
    # -phi(margin) * margin / stddev.
    d_clean = (d_probability * row_weights * _INVERSE_SQRT_2PI
               * tf.exp(-0.5 * tf.square(margin)) / stddev)
    d_threshold_if_in = -tf.reduce_sum(
        tf.where(is_in_top_k, d_clean, tf.zeros_like(d_clean)), axis=-1)
    d_threshold_if_out = -tf.reduce_sum(d_clean, axis=-1) - d_threshold_if_in
    # The thresholds are the k-th and (k+1)-th top values.
    d_top_values += tf.pad(
        tf.stack([d_threshold_if_out, d_threshold_if_in], axis=-1),
        [[0, 0], [k - 1, 0]])
    # The top values are the noisy logits at top_ids; XLA sums the one-hot
    # product without making it.
    num_experts = noisy_logits.shape[-1]
    d_noisy = tf.reduce_sum(
        tf.one_hot(top_ids, num_experts, dtype=d_top_values.dtype)
        * d_top_values[..., None], axis=1)
    d_stddev = d_noisy * noise - d_clean * margin
    _, noise_logits = tf.split(logits, 2, axis=-1)
    return tf.concat([d_clean + d_noisy,
                      d_stddev * tf.sigmoid(noise_logits)], axis=-1)


def noisy_top_k(logits, noise, row_weights, k, noise_epsilon):
    """The noisy gate's top k+1 and smooth load estimate, in training.

    Args:
        logits: `[R, 2E]` float32, the clean logits then the noise logits.
        noise: `[R, E]` standard normal noise.
        row_weights: `[R, 1]`, 1 for the rows to route, 0 for the others.
        k: experts per row, `k < E`.
        noise_epsilon: added to the noise scale.

    Returns:
        `(top_values, top_ids, probability)`: the k+1 largest noisy logits
        `[R, k+1]` (descending) and their experts, and `[R, E]` P(x, i)
        times the row weight; differentiable in `logits`.
    """
    num_experts = logits.shape[-1] // 2
    if not 0 < k < num_experts:
        raise ValueError(f"`k` must be in [1, {num_experts}), got {k!r}.")
    if logits.shape[0] is None:
        raise ValueError("`logits` must have a static number of rows (XLA "
                         f"compiles per shape), got shape {logits.shape}.")
    return _route(logits, noise, row_weights, k, noise_epsilon)


def _route(logits, noise, row_weights, k, noise_epsilon):
    epsilon = tf.constant(noise_epsilon, logits.dtype)
    top_ids = None

    @scoped_gradient.custom_gradient
    def route(logits):
        nonlocal top_ids
        noisy_logits = _before_top_k(logits, noise, epsilon)
        top_values, top_ids = tf.math.top_k(noisy_logits, k + 1)
        thresholds = top_values[:, k - 1:k + 1]
        probability = _after_top_k(logits, noisy_logits, thresholds,
                                   row_weights, epsilon)

        def gradient(d_top_values, d_probability):
            if d_top_values is None:
                d_top_values = tf.zeros_like(top_values)
            if d_probability is None:
                d_probability = tf.zeros_like(probability)
            return _gradient(logits, noise, noisy_logits, thresholds,
                             row_weights, top_ids, d_top_values,
                             d_probability, epsilon)

        return (top_values, probability), gradient

    top_values, probability = route(logits)
    return top_values, top_ids, probability
