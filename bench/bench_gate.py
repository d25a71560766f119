"""The noisy gate's per-entry work in training, each way tf_moe can run it.

    python bench/bench_gate.py [--shapes=65536x256,131072x256] [--k=2]

For `rows x E` gate entries, times alternately, in rounds:
- the noise draw: TensorFlow's normal op (`StatelessRandomNormalV2`)
  against `tf_moe.noise` (Box-Muller as whole-tensor ops);
- the gate's math, forward and backward (the top k+1 and the smooth load
  estimate from `[rows, 2E]` logits and the noise): `NoisyTopKGate`'s
  TensorFlow ops against the XLA-fused `tf_moe.fused_gate`.
Each timing is summed to a scalar so that nothing is pruned; the medians
and their ratios are printed and written as JSON. 65,536 x 256 is the
primary gate of a hierarchical layer of 256x256 experts at 65,536 tokens,
131,072 x 256 about its secondary gates (k_primary = 2).
"""

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tf_moe import fused_gate  # noqa: E402
from tf_moe import noise  # noqa: E402
from tf_moe.top_k_gating import NoisyTopKGate  # noqa: E402

import workers  # noqa: E402

_HERE = os.path.dirname(os.path.abspath(__file__))


def _noise_draws(rows, num_experts):
    seed = keras.random.SeedGenerator(0)
    shape = [rows, num_experts]
    return {
        "TensorFlow's normal op": tf.function(
            lambda: tf.reduce_sum(keras.random.normal(shape, seed=seed))),
        "tf_moe.noise (Box-Muller)": tf.function(
            lambda: tf.reduce_sum(noise.standard_normal(shape, tf.float32,
                                                        seed))),
    }


def _gate_math(rows, num_experts, k):
    rng = np.random.default_rng(0)

    def random(*shape):
        return tf.constant(rng.standard_normal(shape), tf.float32)

    logits = random(rows, 2 * num_experts)
    gate_noise = random(rows, num_experts)
    row_weights = tf.ones([rows, 1])

    def forward_and_backward(math):
        @tf.function
        def run():
            with tf.GradientTape() as tape:
                tape.watch(logits)
                top_values, _, probability = math(
                    logits, gate_noise, row_weights, k, 1e-2)
                loss = (tf.reduce_sum(tf.nn.softmax(top_values[:, :k]))
                        + tf.reduce_sum(tf.square(tf.reduce_sum(
                            probability, axis=0))))
            return tf.reduce_sum(tape.gradient(loss, logits))
        return run

    return {"TensorFlow's ops": forward_and_backward(
                NoisyTopKGate._noisy_top_k),
            "fused by XLA": forward_and_backward(fused_gate.noisy_top_k)}


def _time_alternately(functions, rounds):
    for function in functions.values():
        function().numpy()  # trace, compile, warm up
    seconds = {name: [] for name in functions}
    for _ in range(rounds):
        for name, function in functions.items():
            start = time.perf_counter()
            function().numpy()
            seconds[name].append(time.perf_counter() - start)
    return seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="65536x256,131072x256",
                        help="Comma-separated ROWSxEXPERTS.")
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--output", default=os.path.join(
        _HERE, "results", "gate.json"))
    args = parser.parse_args()

    rows = []
    for shape in args.shapes.split(","):
        num_rows, num_experts = (int(n) for n in shape.split("x"))
        for work, functions in (
                ("noise draw", _noise_draws(num_rows, num_experts)),
                ("gate math, forward and backward",
                 _gate_math(num_rows, num_experts, args.k))):
            seconds = _time_alternately(functions, args.rounds)
            baseline, candidate = seconds
            medians = {n: statistics.median(s) for n, s in seconds.items()}
            rows.append({"rows": num_rows, "experts": num_experts,
                         "work": work, "seconds": medians,
                         "seconds_all": seconds,
                         "ratio": medians[candidate] / medians[baseline]})

    print("| rows x experts | work | TensorFlow (s) | tf_moe (s) | ratio |")
    print("|---|---|---|---|---|")
    for row in rows:
        baseline, candidate = row["seconds"].values()
        names = " / ".join(row["seconds"])
        print(f"| {row['rows']:,} x {row['experts']} | {row['work']} "
              f"({names}) | {baseline:.3f} | {candidate:.3f} | "
              f"{row['ratio']:.2f} |")
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
        json.dump({"config": vars(args), "machine": workers.machine(),
                   "rows": rows}, f, indent=2)
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
