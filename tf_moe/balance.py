"""The paper's balancing losses (section 4): importance, smooth load, CV^2.

All functions work in float32 (or the dtype of their inputs) and never
allocate anything larger than the gate logits `[tokens, experts]`.
"""

import math

import tensorflow as tf

from tf_moe import scoped_gradient

# Keeps CV^2 finite (0) when every entry is zero: an empty or fully masked
# batch has zero importance and zero load, and must give a zero loss.
_CV_EPSILON = 1e-10


def cv_squared(values):
    """Squared coefficient of variation, `var(values) / mean(values)^2`.

    Uses the population variance, as the paper authors' implementation.

    Args:
        values: `[n]` float tensor (per-expert importance or load).

    Returns:
        Scalar. 0 for a single entry and for an all-zero vector.
    """
    values = tf.convert_to_tensor(values)
    mean = tf.reduce_mean(values)
    variance = tf.reduce_mean(tf.square(values - mean))
    return variance / (tf.square(mean) + _CV_EPSILON)


def importance(expert_ids, gate_weights, num_experts):
    """`Importance(X)_i = sum_x G(x)_i`, from the sparse gate output.

    Args:
        expert_ids: `[tokens, k]` int expert index of each kept gate.
        gate_weights: `[tokens, k]` gate value of each; zero for masked tokens.
        num_experts: E.

    Returns:
        `[E]` importance, differentiable with respect to `gate_weights`.
    """
    return tf.math.unsorted_segment_sum(
        tf.reshape(gate_weights, [-1]),
        tf.reshape(expert_ids, [-1]),
        num_experts,
    )


def normal_cdf(x):
    """Phi, the standard normal CDF (erfc form: accurate in the lower tail)."""
    return 0.5 * tf.math.erfc(-x / math.sqrt(2.0))


def selection_probability(clean_logits, noisy_logits, noise_stddev,
                          top_values, k):
    """The paper's `P(x, i)`, for every token and expert.

    `P(x, i) = Phi((clean_i - kth_excluding(H, k, i)) / noise_stddev_i)`: the
    probability that expert i stays in the top k of H when only its own noise
    is drawn again. `kth_excluding(H, k, i)` is the (k+1)-th largest of H for
    an expert currently in the top k, and the k-th largest for one that is not.

    Args:
        clean_logits: `[tokens, E]` x . W_g.
        noisy_logits: `[tokens, E]` H(x) (equal to clean_logits without noise).
        noise_stddev: `[tokens, E]` positive noise scale.
        top_values: `[tokens, >= k+1]` the largest values of H, descending.
        k: experts per token.

    Returns:
        `[tokens, E]`, differentiable with respect to every input.
    """
    num_experts = clean_logits.shape[-1]
    if k >= num_experts:
        # Every expert is always chosen: P(x, i) = 1.
        return tf.ones_like(clean_logits)
    # A comparison: no gradient flows through which threshold applies.
    is_in_top_k = noisy_logits > top_values[:, k:k + 1]
    return _probability_above_threshold(
        clean_logits, noise_stddev, top_values[:, k - 1:k + 1], is_in_top_k)


_INVERSE_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


@scoped_gradient.custom_gradient
def _probability_above_threshold(clean_logits, noise_stddev, thresholds,
                                 is_in_top_k):
    """`Phi((clean - threshold) / noise_stddev)`, threshold the row's
    (k+1)-th largest value for an expert in the top k, else its k-th.

    Its gradient is written out: autodiff through the select, the
    broadcast thresholds, the division and erfc makes twice as many
    `[tokens, E]` passes (zeros, selects, broadcast sums), and at 65,536
    experts (appendix B's secondary gates, 512 entries a token) this
    function is one of the costliest of the step.

    Args:
        clean_logits, noise_stddev: `[tokens, E]`.
        thresholds: `[tokens, 2]`, the k-th and (k+1)-th largest noisy
            logits.
        is_in_top_k: `[tokens, E]` bool.
    """
    threshold = tf.where(is_in_top_k, thresholds[:, 1:], thresholds[:, :1])
    margin = (clean_logits - threshold) / noise_stddev
    probability = normal_cdf(margin)

    def gradient(upstream):
        # dP/dclean = phi(margin) / stddev = -dP/dthreshold, and
        # dP/dstddev = -phi(margin) * margin / stddev.
        d_clean = (upstream * _INVERSE_SQRT_2PI
                   * tf.exp(-0.5 * tf.square(margin)) / noise_stddev)
        d_threshold_if_in = -tf.reduce_sum(
            tf.where(is_in_top_k, d_clean, tf.zeros_like(d_clean)), axis=-1)
        d_threshold_if_out = (-tf.reduce_sum(d_clean, axis=-1)
                              - d_threshold_if_in)
        d_thresholds = tf.stack([d_threshold_if_out, d_threshold_if_in],
                                axis=-1)
        return d_clean, -d_clean * margin, d_thresholds, None

    return probability, gradient


def smooth_load(clean_logits, noisy_logits, noise_stddev, top_values, k,
                token_weights=None):
    """The paper's smooth load estimator, `Load(X)_i = sum_x P(x, i)`.

    Args: as `selection_probability`, and
        token_weights: optional `[tokens]` 1 for real tokens, 0 for masked ones.

    Returns:
        `[E]` load, differentiable with respect to every input.
    """
    probabilities = selection_probability(clean_logits, noisy_logits,
                                          noise_stddev, top_values, k)
    if token_weights is not None:
        probabilities *= tf.cast(token_weights, probabilities.dtype)[:, None]
    return tf.reduce_sum(probabilities, axis=0)


def balancing_loss(importance_values, load_values, importance_weight,
                   load_weight):
    """`w_importance * CV(importance)^2 + w_load * CV(load)^2`.

    Args:
        importance_values: `[E]`.
        load_values: `[E]`, or None when there is no load estimate (gating
            without noise): then only the importance term applies.
        importance_weight, load_weight: non-negative floats.

    Returns:
        `(importance_loss, load_loss)`, two scalars (load_loss 0 without load).
    """
    importance_loss = importance_weight * cv_squared(importance_values)
    if load_values is None:
        load_loss = tf.zeros_like(importance_loss)
    else:
        load_loss = load_weight * cv_squared(load_values)
    return importance_loss, load_loss


def routing_statistics(importance_values, expert_counts, num_dropped,
                       num_routed):
    """The routing metrics of a batch (the paper's Table 6 measures).

    Args:
        importance_values: `[E]` Importance.
        expert_counts: `[E]` float, tokens each expert received (Load).
        num_dropped, num_routed: float scalars, routed assignments past a
            capacity and all routed assignments.

    Returns:
        A dict of scalars: `importance_cv`, `load_cv`, `load_max_over_mean`
        and `dropped_fraction`.
    """
    return {
        "importance_cv": tf.sqrt(
            cv_squared(tf.cast(importance_values, tf.float32))),
        "load_cv": tf.sqrt(cv_squared(expert_counts)),
        "load_max_over_mean": tf.math.divide_no_nan(
            tf.reduce_max(expert_counts), tf.reduce_mean(expert_counts)),
        "dropped_fraction": tf.math.divide_no_nan(num_dropped, num_routed),
    }


def switch_loss(statistics):
    """Switch Transformer's balancing term, unweighted (Fedus et al. 2021).

    `E * sum_i f_i * P_i` per group of rows, f_i the fraction of the
    group's routed assignments that went to expert i and P_i the mean
    router probability of expert i over its valid rows; the mean over the
    groups that had rows. 1 when routing is uniform; only P carries a
    gradient.

    Args:
        statistics: a `RouterStatistics` with `probability_sum`.

    Returns:
        Scalar; 0 for an empty or fully masked batch.
    """
    assignments = statistics.assignments
    num_experts = assignments.shape[-1]
    fraction = tf.math.divide_no_nan(
        assignments, tf.reduce_sum(assignments, axis=-1, keepdims=True))
    mean_probability = tf.math.divide_no_nan(
        statistics.probability_sum, statistics.rows[:, None])
    per_group = num_experts * tf.reduce_sum(fraction * mean_probability,
                                            axis=-1)
    has_rows = tf.cast(statistics.rows > 0, per_group.dtype)
    return tf.math.divide_no_nan(tf.reduce_sum(per_group * has_rows),
                                 tf.reduce_sum(has_rows))


def router_z_loss(statistics):
    """ST-MoE's router z-loss, unweighted (Zoph et al. 2022): the mean over
    valid rows of `logsumexp(router logits)^2`.

    Args:
        statistics: a `RouterStatistics` with `z_sum`.

    Returns:
        Scalar; 0 for an empty or fully masked batch.
    """
    return tf.math.divide_no_nan(tf.reduce_sum(statistics.z_sum),
                                 tf.reduce_sum(statistics.rows))
