"""Batched products of buffers with per-expert (or per-group) weights.

`[shards, E, C, a] x [E, a, b]` for the main buffer group and `[E2, C2, a] x
[E2, a, b]` (the weights gathered) for the overflow group, with a custom
gradient that adds the overflow part of the weight gradient into the main
part in place. The experts use it for their two layers, and the
hierarchical layer for its group gates.

The main group's three products (forward, weight and input gradients) run
on the kernels `tf_moe.kernels` chooses for their shape: by measurement,
among TensorFlow's batched kernel, XLA's and one MatMul per expert, since
which is faster differs between machines. XLA compiles once per shape: E
is fixed and the dispatch plan picks C from a few sizes per octave
(`plan.bucket_capacity`), so the compiled kernels are reused. The overflow group's shapes change with every
batch, so it stays on TensorFlow's kernels.
"""

import tensorflow as tf

from tf_moe import kernels
from tf_moe import scoped_gradient

def _overflow_input_gradient(orientation):
    """`dy @ w^T` for `dy: [n, C, b]`, `w: [n, a, b]`: `[n, C, a]`, in the
    orientation chosen for the main group, on TensorFlow's batched kernel:
    n and C change with every batch (XLA would compile each, and one op per
    expert needs a static n)."""
    if orientation not in ("tensorflow", "tensorflow_transposed"):
        orientation = "tensorflow"
    product = kernels.CANDIDATES["input_gradient"][orientation]
    return lambda dy, w: tf.squeeze(product(tf.expand_dims(dy, 0), w), 0)


def buffer_matmul(main, overflow, w, overflow_experts, allow_xla=True,
                  rows_hint=None):
    """Batched matmuls of the two buffer groups with the expert weights.

    Args:
        main: `[shards, E, C, a]`, rows of every expert.
        overflow: `[E2, C2, a]`, more rows of the experts
            `overflow_experts`, or None.
        w: `[E, a, b]` expert weights.
        overflow_experts: `[E2]` int32 (unused without `overflow`).
        allow_xla: whether the main group's products may run XLA-compiled
            (not on a mesh of several devices).
        rows_hint: the rows per expert C to choose the kernels for when
            `main`'s C is not static (a dropless plan's), or None.

    Returns:
        `(main @ w, overflow @ w[overflow_experts])`: `[shards, E, C, b]`,
        `[E2, C2, b]` (None without `overflow`).
    """
    shards, experts, rows, in_width = main.shape
    choice = kernels.choose(shards, experts, rows or rows_hint, in_width,
                            w.shape[-1], main.dtype, allow_xla=allow_xla)
    forward, weight_gradient, input_gradient = choice.functions()
    if overflow is None:
        @scoped_gradient.custom_gradient
        def main_matmul(main, w):
            def grad(d_main):
                return (input_gradient(d_main, w),
                        weight_gradient(main, d_main))
            return forward(main, w), grad

        return main_matmul(main, w), None

    @scoped_gradient.custom_gradient
    def matmul(main, overflow, w):
        w_overflow = tf.gather(w, overflow_experts)

        overflow_input_gradient = _overflow_input_gradient(
            choice.input_gradient)

        def grad(d_main, d_overflow):
            # Added into the main group's fresh weight gradient in place
            # (the overflow experts are distinct, and nothing else reads
            # that tensor), so that no copy of [E, a, b] is made. Alone,
            # tensor_scatter_nd_add on a fresh tensor takes as long
            # (`bench/bench_matmul.py`: 0.146 s against 0.156 s at E=256),
            # since TensorFlow can forward the fresh buffer to it.
            dw = tf.raw_ops.InplaceAdd(
                x=weight_gradient(main, d_main), i=overflow_experts,
                v=tf.matmul(overflow, d_overflow, transpose_a=True))
            return (input_gradient(d_main, w),
                    overflow_input_gradient(d_overflow, w_overflow), dw)

        return (forward(main, w), tf.matmul(overflow, w_overflow)), grad

    return matmul(main, overflow, w)
