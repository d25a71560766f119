"""Why the experts run as they do: each product's kernels on this CPU.

    python bench/bench_matmul.py [--experts=256] [--rows=128]
    python bench/bench_matmul.py --experts=16 --rows=2048 \
        --output=bench/results/matmul_16.json

Times, for E experts of `[C, d] x [d, h]` (one shard, float32):
- one `MatMul` of all E*C rows against one weight: the speed the hardware
  gives these FLOPs;
- each of the three products (forward `x @ W`, weight gradient `x^T @ dy`,
  input gradient `dy @ W^T`) with every candidate of
  `tf_moe.kernels.CANDIDATES` that applies: what the layer chooses among;
- the same products as `tf.einsum` (what several shards, a mesh, run);
- the overflow experts' weight gradient (`tf_moe/matmul.py`, E/2 experts)
  added into the main one in place (`InplaceAdd`, what tf_moe runs) and by
  `tensor_scatter_nd_add` (which copies all of `[E, d, h]` first);
- up to `PER_EXPERT_MAX_EXPERTS`, the packed layout's whole expert FFN
  (forward and the gradients of its input and every weight, one MatMul pair
  per expert) with the weights held as tf_moe holds them, `[E, d, h]` read
  whole and unstacked, whose gradient stacks the E per-expert gradients
  into one tensor (a copy of every weight's size), and as a per-expert
  dispatcher holds them, E variables of `[d, h]` each, whose gradients
  stay apart.

Each figure is the median of 5 calls after a warm-up, of a function that
returns the product's sum (no copy of the result). Prints a markdown table
and writes JSON (bench/results/matmul.json by default).
"""

import argparse
import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import workers  # noqa: E402
from tf_moe import kernels  # noqa: E402

_HERE = os.path.dirname(os.path.abspath(__file__))

EINSUMS = {"forward": "eca,eab->ecb", "weight_gradient": "eca,ecb->eab",
           "input_gradient": "ecb,eab->eca"}


def _median_seconds(fn, *args, calls=5):
    fn(*args).numpy()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn(*args).numpy()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _summed(product):
    return tf.function(lambda *args: tf.reduce_sum(product(*args)))


def product_timings(experts, rows, model_dim, hidden_size):
    """`{row name: seconds}`, in the table's order."""
    rng = np.random.default_rng(0)

    def normal(*shape):
        return tf.constant(rng.standard_normal(shape, np.float32))

    x = normal(1, experts, rows, model_dim)
    w = normal(experts, model_dim, hidden_size)
    dy = normal(1, experts, rows, hidden_size)
    operands = {"forward": (x, w), "weight_gradient": (x, dy),
                "input_gradient": (dy, w)}
    seconds = {"one MatMul of all rows": _median_seconds(
        _summed(tf.matmul), tf.reshape(x, [-1, model_dim]), w[0])}
    for product, candidates in kernels.CANDIDATES.items():
        left, right = operands[product]
        for name, candidate in candidates.items():
            if name == "per_expert" and \
                    experts > kernels.PER_EXPERT_MAX_EXPERTS:
                continue
            seconds[f"{product}, {name}"] = _median_seconds(
                _summed(candidate), left, right)
        einsum = EINSUMS[product]
        seconds[f"{product}, einsum"] = _median_seconds(
            _summed(lambda a, b, e=einsum: tf.einsum(e, a, b)),
            tf.squeeze(left, 0), right if right.shape.rank == 3
            else tf.squeeze(right, 0))
    # Both adds start from a fresh tensor (`m * 1.0`), as the main group's
    # weight gradient is in the layer; that pass is in both figures.
    overflow = tf.range(0, experts, 2)
    main = normal(experts, model_dim, hidden_size)
    update = normal(len(overflow), model_dim, hidden_size)
    seconds["overflow weight gradient, InplaceAdd"] = _median_seconds(
        _summed(lambda m, v: tf.raw_ops.InplaceAdd(x=m * 1.0, i=overflow,
                                                   v=v)), main, update)
    seconds["overflow weight gradient, tensor_scatter_nd_add"] = \
        _median_seconds(_summed(lambda m, v: tf.tensor_scatter_nd_add(
            m * 1.0, overflow[:, None], v)), main, update)
    if experts <= kernels.PER_EXPERT_MAX_EXPERTS:
        seconds.update(packed_ffn_timings(experts, rows, model_dim,
                                          hidden_size))
    return seconds


def packed_ffn_steps(experts, rows, model_dim, hidden_size):
    """`({row name: step}, x)`: the packed experts' FFN step, forward and
    the sum of every gradient (of `x` and each weight), with the weights
    stacked and separate (the module docstring), the same values in both."""
    rng = np.random.default_rng(0)

    def variable(*shape):
        return tf.Variable(rng.standard_normal(shape, np.float32) * 0.02)

    stacked = [variable(experts, model_dim, hidden_size),
               variable(experts, hidden_size),
               variable(experts, hidden_size, model_dim),
               variable(experts, model_dim)]
    separate = [[tf.Variable(w[e]) for e in range(experts)]
                for w in stacked]
    x = tf.constant(rng.standard_normal((experts * rows, model_dim),
                                        np.float32))

    def ffn_step(read_weights, variables):
        @tf.function
        def step(x):
            with tf.GradientTape() as tape:
                tape.watch(x)
                outputs = []
                for part, w_in, b_in, w_out, b_out in zip(
                        tf.split(x, experts), *read_weights()):
                    hidden = tf.nn.relu(tf.matmul(part, w_in) + b_in)
                    outputs.append(tf.matmul(hidden, w_out) + b_out)
                loss = tf.reduce_sum(tf.concat(outputs, 0))
            return tf.add_n([tf.reduce_sum(g) for g in tape.gradient(
                loss, [x] + variables)])
        return step

    steps = {
        "packed FFN step, weights [E, d, h] (gradients stacked)": ffn_step(
            lambda: [tf.unstack(tf.convert_to_tensor(w)) for w in stacked],
            stacked),
        "packed FFN step, E weights of [d, h] (gradients apart)": ffn_step(
            lambda: [[tf.convert_to_tensor(w) for w in ws]
                     for ws in separate],
            [w for ws in separate for w in ws]),
    }
    return steps, x


def packed_ffn_timings(experts, rows, model_dim, hidden_size):
    """`{row name: seconds}` of `packed_ffn_steps`, alternately in 5
    rounds after a warm-up, the median of each."""
    steps, x = packed_ffn_steps(experts, rows, model_dim, hidden_size)
    calls = {name: lambda step=step: step(x).numpy()
             for name, step in steps.items()}
    for call in calls.values():
        call()
    medians, _ = workers.time_in_rounds(calls, rounds=5)
    return {name: float(value) for name, value in medians.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--model_dim", type=int, default=512)
    parser.add_argument("--hidden_size", type=int, default=1024)
    parser.add_argument("--output",
                        default=os.path.join(_HERE, "results", "matmul.json"))
    args = parser.parse_args()
    seconds = product_timings(args.experts, args.rows, args.model_dim,
                              args.hidden_size)
    base = seconds["one MatMul of all rows"]
    e, c, d, h = args.experts, args.rows, args.model_dim, args.hidden_size
    onednn = os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default")
    print(f"E={e} experts x [{c}, {d}] x [{d}, {h}], "
          f"TF_ENABLE_ONEDNN_OPTS={onednn}\n")
    print("| product, kernel | seconds | / one MatMul |")
    print("|---|---|---|")
    for name, value in seconds.items():
        print(f"| {name} | {value:.3f} | {value / base:.2f} |")
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
        json.dump({"config": vars(args), "onednn": onednn,
                   "seconds": seconds}, f, indent=2)
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
