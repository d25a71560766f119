"""Batched products of buffers with per-expert (or per-group) weights.

`[shards, E, C, a] x [E, a, b]` for the main buffer group and `[E2, C2, a] x
[E2, a, b]` (the weights gathered) for the overflow group, with a custom
gradient that adds the overflow part of the weight gradient into the main
part in place. The experts use it for their two layers, and the
hierarchical layer for its group gates.

The main group's products run as XLA-compiled functions where the
strategy allows (one device, tf.distribute replicas, a one-device mesh).
On a CPU with TensorFlow's oneDNN kernels off, XLA was faster at every size
measured on 2 cores (forward + both gradients): E=64, C=530, d=512,
h=1024: 0.99 s against 1.21 s; E=1024, C=40: 1.94 s against 2.67 s;
E=65536, C=7, d=32, h=256: 0.88 s against 1.64 s. On a CPU with oneDNN on,
TensorFlow's own kernels beat XLA by about 30% (`bench/bench_matmul.py`,
README), so which is faster depends on the machine: a choice the speed
work is to make by measurement. XLA compiles once per shape: E is fixed
and the dispatch plan picks C from a few sizes per octave
(`plan.bucket_capacity`), so the compiled kernels are reused. The overflow
group's shapes change with every batch, so it stays on TensorFlow's
kernels.
"""

import tensorflow as tf


def _forward(x, w):
    """`x @ w` per expert: `[S, E, C, a]`, `[E, a, b]` -> `[S, E, C, b]`."""
    return tf.einsum("seca,eab->secb", x, w)


def _weight_gradient(x, dy):
    """`x^T @ dy` per expert, summed over shards: `[S, E, C, a]`,
    `[S, E, C, b]` -> `[E, a, b]`."""
    return tf.einsum("seca,secb->eab", x, dy)


def _input_gradient(dy, w):
    """`dy @ w^T` per expert: `[S, E, C, b]`, `[E, a, b]` -> `[S, E, C, a]`."""
    return tf.einsum("secb,eab->seca", dy, w)


_PLAIN = (_forward, _weight_gradient, _input_gradient)
_XLA = tuple(tf.function(f, jit_compile=True, reduce_retracing=True)
             for f in _PLAIN)

# Below this many rows per expert TensorFlow's CPU batched matmul is slow
# with a transposed right operand: for [E, C, 1024] x [E, 512, 1024]^T,
# 3.1 s at C=32 against 0.78 s for the transposed product W @ dy^T.
SMALL_PRODUCT_ROWS = 256


def _overflow_input_gradient(dy, w):
    """`dy @ w^T` for `dy: [n, C, b]`, `w: [n, a, b]`: `[n, C, a]`."""
    return tf.cond(
        tf.shape(dy)[1] < SMALL_PRODUCT_ROWS,
        lambda: tf.transpose(
            tf.matmul(w, tf.transpose(dy, [0, 2, 1])), [0, 2, 1]),
        lambda: tf.matmul(dy, w, transpose_b=True))


def buffer_matmul(main, overflow, w, overflow_experts, compiled=True):
    """Batched matmuls of the two buffer groups with the expert weights.

    Args:
        main: `[shards, E, C, a]`, rows of every expert.
        overflow: `[E2, C2, a]`, more rows of the experts
            `overflow_experts`, or None.
        w: `[E, a, b]` expert weights.
        overflow_experts: `[E2]` int32 (unused without `overflow`).
        compiled: run the main group's products as XLA-compiled functions.

    Returns:
        `(main @ w, overflow @ w[overflow_experts])`: `[shards, E, C, b]`,
        `[E2, C2, b]` (None without `overflow`).
    """
    forward, weight_gradient, input_gradient = _XLA if compiled else _PLAIN
    if overflow is None:
        @tf.custom_gradient
        def main_matmul(main, w):
            def grad(d_main):
                return (input_gradient(d_main, w),
                        weight_gradient(main, d_main))
            return forward(main, w), grad

        return main_matmul(main, w), None

    @tf.custom_gradient
    def matmul(main, overflow, w):
        w_overflow = tf.gather(w, overflow_experts)

        def grad(d_main, d_overflow):
            dw = tf.tensor_scatter_nd_add(
                weight_gradient(main, d_main), overflow_experts[:, None],
                tf.matmul(overflow, d_overflow, transpose_a=True))
            return (input_gradient(d_main, w),
                    _overflow_input_gradient(d_overflow, w_overflow), dw)

        return (forward(main, w), tf.matmul(overflow, w_overflow)), grad

    return matmul(main, overflow, w)
