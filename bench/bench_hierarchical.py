"""Hierarchical benchmark: HierarchicalMoE as experts grow to 65,536.

    python bench/bench_hierarchical.py [--sizes=8x8,32x32,128x128,256x256]

Times one forward+backward step (input and weight gradients, balancing
losses included; no optimizer update) of `tf_moe.HierarchicalMoE` with
k_primary = k_secondary = 2 at each size (groups x experts per group), of
the flat `tf_moe.MoE` with k = 4 over as many experts, and of the dense FFN
with the same active FLOPs per token (hidden width 4 * hidden_size), all at
the same expert size and tokens, in one run. Every configuration runs in
its own process (`bench_layer.py`'s worker), so its peak resident memory is
its own. The flat layer is skipped where its `[tokens, experts]` gate
tensors alone would not fit here. Prints a markdown table and writes JSON
(bench/results/hierarchical.json). Asserts nothing about time.

The table's "weight traffic" column is a floor on each step from its
parameters alone: every step reads the expert weights twice (forward and
input gradient), writes their gradient and reads it back (the benchmark
sums every gradient), 16 bytes per float32 parameter, at the memory
bandwidth this machine shows in the same run (`_stream_bandwidth`).
"""

import argparse
import json
import os
import time

import bench_layer

_HERE = os.path.dirname(os.path.abspath(__file__))


def _parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="8x8,32x32,128x128,256x256",
                        help="Comma-separated groups x experts per group.")
    parser.add_argument("--tokens", type=int, default=65536)
    parser.add_argument("--model_dim", type=int, default=32)
    parser.add_argument("--hidden_size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5,
                        help="Timed steps per configuration (median taken).")
    parser.add_argument("--warmup", type=int, default=2)
    bench_layer.add_optimizer_flag(parser)
    parser.add_argument(
        "--flat_gate_limit_gb", type=float, default=1.0,
        help="Skip the flat MoE where one [tokens, experts] float32 tensor "
             "exceeds this (its gate keeps several alive at once).")
    parser.add_argument(
        "--stream_gigabytes", type=float, default=1.0,
        help="Size of the tensor the memory bandwidth is measured on.")
    parser.add_argument("--malloc", default="tcmalloc",
                        choices=["tcmalloc", "system"],
                        help="See bench_layer.py --help.")
    parser.add_argument(
        "--output",
        default=os.path.join(_HERE, "results", "hierarchical.json"))
    args = parser.parse_args(argv)
    args.k = 4  # k_primary * k_secondary, and the flat layer's k
    return args


_BYTES_PER_PARAMETER_STEP = 4 * 4  # Read twice, gradient written and read.


def _stream_bandwidth(gigabytes=1.0, repeats=5):
    """Bytes per second of `y = 2 x` over a `gigabytes` float32 tensor on
    TensorFlow's CPU kernels (every core), median of `repeats` after one
    warm-up: one read and one write per element."""
    import numpy as np
    import tensorflow as tf

    x = tf.ones([int(gigabytes * 2**30) // 4])
    double = tf.function(lambda x: tf.reduce_sum(x * 2.0))
    double(x).numpy()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        double(x).numpy()
        times.append(time.perf_counter() - start)
    # The sum reads the product once more: three passes over the tensor.
    return 3 * int(gigabytes * 2**30) / float(np.median(times))


def main(argv=None):
    args = _parse_args(argv)
    sizes = [tuple(int(n) for n in size.split("x"))
             for size in args.sizes.split(",")]
    print(f"tokens={args.tokens} d={args.model_dim} "
          f"hidden_size={args.hidden_size} k=2x2 (flat k=4, dense FFN "
          f"hidden={args.k * args.hidden_size}); malloc={args.malloc}; "
          f"median of {args.steps} steps after {args.warmup} warm-up",
          flush=True)
    dense = bench_layer._measure(args, "dense")
    print(f"dense: {dense['step_seconds']:.3f} s/step", flush=True)
    rows = []
    for groups, per_group in sizes:
        experts = groups * per_group
        row = bench_layer._measure(args, f"hierarchical:{groups}x{per_group}")
        row["size"] = f"{groups}x{per_group}"
        print(f"{row['size']}: {row['step_seconds']:.3f} s/step, "
              f"{row['peak_rss_mb']:,.0f} MB", flush=True)
        gate_gb = args.tokens * experts * 4 / 2**30
        if gate_gb <= args.flat_gate_limit_gb:
            flat = bench_layer._measure(args, f"moe:{experts}")
            row["flat"] = flat
            print(f"flat E={experts}: {flat['step_seconds']:.3f} s/step",
                  flush=True)
        else:
            row["flat_skipped_gate_gb"] = gate_gb
        rows.append(row)

    bandwidth = _stream_bandwidth(args.stream_gigabytes)
    print(f"memory bandwidth (y = 2x, then its sum): "
          f"{bandwidth / 1e9:.1f} GB/s", flush=True)
    smallest = rows[0]["step_seconds"]
    print()
    print("| experts | groups x experts | hierarchical step (s) "
          "| / smallest | / dense | flat MoE step (s) | parameters "
          "| peak RSS (MB) | flat peak RSS (MB) | max/mean load "
          "| rows/routed | weight traffic (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        row["ratio_to_smallest"] = row["step_seconds"] / smallest
        row["ratio_to_dense"] = row["step_seconds"] / dense["step_seconds"]
        row["weight_traffic_seconds"] = (
            row["parameters"] * _BYTES_PER_PARAMETER_STEP / bandwidth)
        if "flat" in row:
            flat_step = f"{row['flat']['step_seconds']:.3f}"
            flat_rss = f"{row['flat']['peak_rss_mb']:,.0f}"
        else:
            flat_step = (f"skipped ([T, E] = "
                         f"{row['flat_skipped_gate_gb']:.0f} GB)")
            flat_rss = "-"
        print(f"| {row['num_experts']:,} | {row['size']} | "
              f"{row['step_seconds']:.3f} | {row['ratio_to_smallest']:.2f} | "
              f"{row['ratio_to_dense']:.2f} | {flat_step} | "
              f"{row['parameters']:,} | {row['peak_rss_mb']:,.0f} | "
              f"{flat_rss} | {row['max_over_mean_load']:.2f} | "
              f"{row['rows_over_routed']:.2f} | "
              f"{row['weight_traffic_seconds']:.3f} |")
    print(f"| dense FFN ({args.k * args.hidden_size}) | - | "
          f"{dense['step_seconds']:.3f} | - | 1.00 | - | "
          f"{dense['parameters']:,} | {dense['peak_rss_mb']:,.0f} | - | - "
          f"| - | - |")

    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
        json.dump({"config": vars(args), "dense": dense,
                   "stream_bandwidth_bytes_per_second": bandwidth,
                   "hierarchical": rows}, f, indent=2)
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
