"""The gates' noise draw: TensorFlow's normal op against tf_moe.noise.

    python bench/bench_noise.py [--sizes=16777216,33554432] [--output=...]

Times one draw of N(0, 1) samples (summed, so that nothing is pruned),
alternately with each method, and prints the median seconds of each and
their ratio. 33,554,432 is the secondary gates' draw of a hierarchical
layer of 256x256 experts at 65,536 tokens (k_primary=2), 16,777,216 its
primary gate's.
"""

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from tf_moe import noise  # noqa: E402

import workers  # noqa: E402

_HERE = os.path.dirname(os.path.abspath(__file__))


def _draws(size):
    """`{method: compiled draw}` of `size` samples each."""
    seed = keras.random.SeedGenerator(0)
    return {
        "tensorflow (StatelessRandomNormalV2)": tf.function(
            lambda: tf.reduce_sum(keras.random.normal([size], seed=seed))),
        "tf_moe.noise (Box-Muller)": tf.function(
            lambda: tf.reduce_sum(noise.standard_normal([size], tf.float32,
                                                        seed))),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="16777216,33554432")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--output", default=os.path.join(
        _HERE, "results", "noise.json"))
    args = parser.parse_args()

    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        draws = _draws(size)
        for draw in draws.values():
            draw().numpy()  # trace and warm up
        medians, seconds = workers.time_in_rounds(
            {name: (lambda draw=draw: draw().numpy())
             for name, draw in draws.items()}, args.rounds)
        tensorflow_name, tf_moe_name = draws
        row = {"samples": size, "seconds": medians, "seconds_all": seconds}
        row["ratio"] = row["seconds"][tf_moe_name] / row["seconds"][
            tensorflow_name]
        rows.append(row)

    names = list(rows[0]["seconds"])
    print("| samples | " + " (s) | ".join(names) + " (s) | ratio |")
    print("|---" * (len(names) + 2) + "|")
    for row in rows:
        cells = " | ".join(f"{row['seconds'][n]:.3f}" for n in names)
        print(f"| {row['samples']:,} | {cells} | {row['ratio']:.2f} |")
    workers.write_results(args.output, args, rows=rows)


if __name__ == "__main__":
    main()
