"""Why the experts run as they do: batched matmul shapes on this CPU.

    python bench/bench_matmul.py [--experts=256] [--rows=128]

Times, for the same FLOPs, the forward product of E experts' `[C, 512] x
[512, 1024]` as one `MatMul` of all rows against one weight (the speed the
hardware gives), as one batched matmul over E with TensorFlow's kernel and
compiled by XLA (what tf_moe/experts.py runs), then the weight gradient
`x^T @ dy` and the input gradient `dy @ W^T` (TensorFlow's kernel in both
orders, and XLA). Prints a markdown table and writes JSON
(bench/results/matmul.json by default).
"""

import argparse
import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

_HERE = os.path.dirname(os.path.abspath(__file__))


def _median_seconds(fn, *args, steps=5):
    fn(*args).numpy()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn(*args).numpy()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _summed(product, jit_compile=False):
    return tf.function(lambda a, b: tf.reduce_sum(product(a, b)),
                       jit_compile=jit_compile)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--model_dim", type=int, default=512)
    parser.add_argument("--hidden_size", type=int, default=1024)
    parser.add_argument("--output",
                        default=os.path.join(_HERE, "results", "matmul.json"))
    args = parser.parse_args()
    e, c, d, h = args.experts, args.rows, args.model_dim, args.hidden_size
    x = tf.random.normal((e, c, d))
    w = tf.random.normal((e, d, h))
    dy = tf.random.normal((e, c, h))

    def forward(a, b):
        return tf.matmul(a, b)

    def weight_gradient(a, g):
        return tf.matmul(a, g, transpose_a=True)

    def input_gradient(g, v):
        return tf.matmul(g, v, transpose_b=True)

    def input_gradient_transposed(g, v):
        return tf.transpose(tf.matmul(v, tf.transpose(g, [0, 2, 1])),
                            [0, 2, 1])

    results = {"one MatMul of all rows": _median_seconds(
        _summed(forward), tf.reshape(x, [e * c, d]), w[0])}
    for name, product, operands in [
            ("forward x @ W", forward, (x, w)),
            ("weight gradient x^T @ dy", weight_gradient, (x, dy)),
            ("input gradient dy @ W^T", input_gradient, (dy, w))]:
        results[name] = _median_seconds(_summed(product), *operands)
        if product is input_gradient:
            results["input gradient (W @ dy^T)^T"] = _median_seconds(
                _summed(input_gradient_transposed), *operands)
        results[name + ", XLA"] = _median_seconds(
            _summed(product, jit_compile=True), *operands)

    base = results["one MatMul of all rows"]
    print(f"E={e} experts x [{c}, {d}] x [{d}, {h}] (forward FLOPs equal)\n")
    print("| product | seconds | / one MatMul |")
    print("|---|---|---|")
    for name, seconds in results.items():
        print(f"| {name} | {seconds:.3f} | {seconds / base:.2f} |")
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
        json.dump({"config": vars(args), "seconds": results}, f, indent=2)
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
