"""The noisy gate's own work, on TensorFlow's kernels and XLA-compiled.

    python bench/bench_gate.py [--shapes=8192x1024x4,65536x256x2] \
        [--output=bench/results/gate.json]

Times the forward and gradient of `NoisyTopKGate.decide` (the noise scale,
the noisy logits, the top k+1, the gates' softmax, the load estimate
`Phi` and its written-out gradient; not the gate's matmul) on logits of
`rows x 2E` with its noise given, alternately in rounds, three ways:

- "tensorflow": as the layer runs it.
- "xla elementwise": the steps before and after the top-k compiled with
  XLA (`jit_compile`), the top-k on TensorFlow's kernel.
- "xla all": everything in one XLA-compiled function, the top-k too.

Shapes are `rows x E x k`: 8192x1024x4 is the flat layer's gate at the
layer benchmark's E=1,024; 65536x256x2 the primary gate of a hierarchical
layer of 256x256 experts at 65,536 tokens (its secondary gates see twice
the rows). Prints the median seconds of each way and checks that all
three route alike and agree on the loss and its gradient.
"""

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

from tf_moe import balance  # noqa: E402
from tf_moe.gating import top_k_with_gather_gradient  # noqa: E402
from tf_moe.top_k_gating import NoisyTopKGate  # noqa: E402

import workers  # noqa: E402

_HERE = os.path.dirname(os.path.abspath(__file__))


def _ways(gate, row_valid):
    """`{way: decide(logits, noise) -> (gate_weights, probability,
    expert_ids)}`."""
    k = gate.k

    def tensorflow(logits, noise):
        routing = gate.decide(logits, row_valid, training=True, noise=noise)
        return (routing.gate_weights, routing.selection_probability,
                routing.expert_ids)

    @tf.function(jit_compile=True)
    def before_top_k(logits, noise):
        clean, noise_logits = tf.split(logits, 2, axis=-1)
        stddev = tf.nn.softplus(noise_logits) + gate.noise_epsilon
        return clean, clean + noise * stddev, stddev

    @tf.function(jit_compile=True)
    def after_top_k(clean, noisy, stddev, top_values):
        return (tf.nn.softmax(top_values[:, :k], axis=-1),
                balance.selection_probability(clean, noisy, stddev,
                                              top_values, k))

    def xla_elementwise(logits, noise):
        clean, noisy, stddev = before_top_k(logits, noise)
        top_values, top_ids = top_k_with_gather_gradient(noisy, k + 1)
        gate_weights, probability = after_top_k(clean, noisy, stddev,
                                                top_values)
        return gate_weights, probability, top_ids[:, :k]

    return {"tensorflow": tensorflow, "xla elementwise": xla_elementwise,
            "xla all": tf.function(tensorflow, jit_compile=True)}


def _steps(rows, num_experts, k):
    """`{way: step}`, each `() -> (loss, d loss / d logits, expert_ids)`."""
    gate = NoisyTopKGate(num_experts, k)
    generator = tf.random.Generator.from_seed(0)
    logits = generator.normal([rows, 2 * num_experts]) * 0.1
    noise = generator.normal([rows, num_experts])
    gate_upstream = generator.normal([rows, k])
    load_upstream = generator.normal([rows, num_experts])
    row_valid = tf.ones([rows], tf.bool)

    def step_of(decide):
        @tf.function
        def step():
            with tf.GradientTape() as tape:
                tape.watch(logits)
                gate_weights, probability, expert_ids = decide(logits, noise)
                loss = (tf.reduce_sum(gate_weights * gate_upstream)
                        + tf.reduce_sum(probability * load_upstream))
            return loss, tape.gradient(loss, logits), expert_ids
        return step

    return {way: step_of(decide)
            for way, decide in _ways(gate, row_valid).items()}


def _check_agree(results):
    (_, (loss, gradient, ids)), *others = results.items()
    for way, (other_loss, other_gradient, other_ids) in others:
        if not bool(tf.reduce_all(ids == other_ids)):
            raise RuntimeError(f"{way} routes differently")
        gradient_error = float(tf.reduce_max(tf.abs(gradient
                                                    - other_gradient)))
        if (abs(float(loss - other_loss)) > 1e-3 * max(1.0, abs(float(loss)))
                or gradient_error > 1e-3):
            raise RuntimeError(f"{way} disagrees: loss {float(other_loss)} "
                               f"against {float(loss)}, gradient error "
                               f"{gradient_error}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="8192x1024x4,65536x256x2",
                        help="rows x experts x k, comma-separated.")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--output", default=os.path.join(
        _HERE, "results", "gate.json"))
    args = parser.parse_args()

    rows = []
    for shape in args.shapes.split(","):
        num_rows, num_experts, k = (int(n) for n in shape.split("x"))
        steps = _steps(num_rows, num_experts, k)
        # Trace, compile and warm up; the ways must agree.
        _check_agree({way: step() for way, step in steps.items()})
        medians, seconds = workers.time_in_rounds(
            {way: (lambda step=step: step()[0].numpy())
             for way, step in steps.items()}, args.rounds)
        rows.append({"rows": num_rows, "experts": num_experts, "k": k,
                     "seconds": medians, "seconds_all": seconds})

    ways = list(rows[0]["seconds"])
    print("| rows | experts | k | " + " (s) | ".join(ways) + " (s) |")
    print("|---" * (len(ways) + 3) + "|")
    for row in rows:
        cells = " | ".join(f"{row['seconds'][w]:.4f}" for w in ways)
        print(f"| {row['rows']:,} | {row['experts']:,} | {row['k']} "
              f"| {cells} |")
    workers.write_results(args.output, args, rows=rows)


if __name__ == "__main__":
    main()
