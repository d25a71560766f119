"""keras-hub's Mixtral backbone against its `tf_moe.keras_hub.sparsify` copy.

    python bench/bench_keras_hub.py [--experts=8,16,64] [--hidden_dim=256]

Times the forward pass and one forward+backward step (gradients of every
weight) of a randomly initialised MixtralBackbone (top-2) and of its sparse
copy, each configuration in its own process (its peak resident memory is
its own), all in one run of this script. Prints a markdown table and writes
JSON (bench/results/keras_hub.json by default). Asserts nothing about time.
"""

import argparse
import json
import os
import resource
import time

import workers

_HERE = os.path.dirname(os.path.abspath(__file__))


def _parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--experts", default="8,16,64")
    parser.add_argument("--hidden_dim", type=int, default=256)
    parser.add_argument("--intermediate_dim", type=int, default=512)
    parser.add_argument("--num_layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--output",
                        default=os.path.join(_HERE, "results", "keras_hub.json"))
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _median_seconds(fn, warmup, steps):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _run_worker(args):
    """Times one configuration ("dense:E" or "sparse:E"); one JSON line."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    import keras_hub
    import numpy as np
    import tensorflow as tf

    from tf_moe import keras_hub as tf_moe_keras_hub

    kind, experts = args.worker.split(":")
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.MixtralBackbone(
        vocabulary_size=1000, num_layers=args.num_layers, num_query_heads=4,
        num_key_value_heads=2, hidden_dim=args.hidden_dim,
        intermediate_dim=args.intermediate_dim, num_experts=int(experts),
        top_k=2, sliding_window=args.length)
    if kind == "sparse":
        backbone = tf_moe_keras_hub.sparsify(backbone)
    rng = np.random.default_rng(0)
    inputs = {
        "token_ids": tf.constant(rng.integers(
            1, 1000, (args.batch, args.length)).astype("int32")),
        "padding_mask": tf.ones((args.batch, args.length), tf.bool)}
    variables = backbone.trainable_variables

    @tf.function
    def forward():
        return tf.reduce_sum(backbone(inputs))

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(backbone(inputs, training=True)))
        # Some weights (the untied output embedding) are not used by the
        # backbone and have no gradient.
        return tf.add_n([tf.reduce_sum(g)
                         for g in tape.gradient(loss, variables)
                         if g is not None])

    result = {
        "kind": kind, "num_experts": int(experts),
        "forward_seconds": _median_seconds(lambda: forward().numpy(),
                                           args.warmup, args.steps),
        "step_seconds": _median_seconds(lambda: step().numpy(), args.warmup,
                                        args.steps),
        "parameters": int(sum(np.prod(v.shape) for v in variables)),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        / 1024,
    }
    print("RESULT " + json.dumps(result))


def _measure(args, worker):
    return workers.measure(
        os.path.abspath(__file__), worker, args,
        ("hidden_dim", "intermediate_dim", "num_layers", "batch", "length",
         "steps", "warmup"))


def main(argv=None):
    args = _parse_args(argv)
    if args.worker:
        _run_worker(args)
        return
    print(f"MixtralBackbone: {args.num_layers} layers, hidden_dim "
          f"{args.hidden_dim}, intermediate_dim {args.intermediate_dim}, "
          f"top-2; batch {args.batch} x {args.length} tokens; median of "
          f"{args.steps} after {args.warmup} warm-up", flush=True)
    rows = []
    for experts in (int(e) for e in args.experts.split(",")):
        pair = {kind: _measure(args, f"{kind}:{experts}")
                for kind in ("dense", "sparse")}
        rows.append(pair)
        print(f"E={experts}: forward {pair['dense']['forward_seconds']:.3f} "
              f"-> {pair['sparse']['forward_seconds']:.3f} s, step "
              f"{pair['dense']['step_seconds']:.3f} -> "
              f"{pair['sparse']['step_seconds']:.3f} s", flush=True)
    print()
    print("| experts | keras-hub forward (s) | sparse forward (s) | "
          "keras-hub step (s) | sparse step (s) | step speed-up | "
          "keras-hub peak RSS (MB) | sparse peak RSS (MB) |")
    print("|---|---|---|---|---|---|---|---|")
    for pair in rows:
        dense, sparse = pair["dense"], pair["sparse"]
        print(f"| {dense['num_experts']} | {dense['forward_seconds']:.3f} | "
              f"{sparse['forward_seconds']:.3f} | "
              f"{dense['step_seconds']:.3f} | {sparse['step_seconds']:.3f} | "
              f"{dense['step_seconds'] / sparse['step_seconds']:.1f}x | "
              f"{dense['peak_rss_mb']:,.0f} | {sparse['peak_rss_mb']:,.0f} |")
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
        json.dump({"config": {k: v for k, v in vars(args).items()
                              if k != "worker"}, "rows": rows}, f, indent=2)
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
