"""The experts' weights stacked or separate, under each CPU allocator.

    python bench/bench_stacking.py [--experts=64] [--rows=128,512] \
        [--output=bench/results/stacking.json]

The packed layout keeps the experts' weights as one `[E, d, h]` variable
and runs one MatMul per expert on its slice, so its weight gradient is a
Pack of E slice gradients: a fresh `[E, d, h]` tensor every step. The
per-expert dispatcher keeps E separate variables and has no such copy. This
times one forward+backward of the same E expert FFNs (ReLU, `rows` rows
each) both ways, alternately in rounds, once in a process whose TensorFlow
CPU allocator calls malloc per tensor (`TF_CPU_ALLOCATOR_USE_BFC=0`) and
once with TensorFlow's pool (`=1`). With oneDNN's kernels on, both
processes take tensors from oneDNN's pooled allocator instead, so run it
with `TF_ENABLE_ONEDNN_OPTS=0` to see what the pool is for
(`tf_moe/allocator.py`).
"""

import argparse
import json
import math
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import workers  # noqa: E402

_HERE = os.path.dirname(os.path.abspath(__file__))
_ALLOCATORS = {"malloc": "0", "pooled": "1"}
_WORKER_FLAGS = ("experts", "rows", "model_dim", "hidden_size", "rounds")


def _steps(num_experts, rows, model_dim, hidden_size):
    """`{"stacked": step, "separate": step}`: compiled forward+backward
    steps of E ReLU FFNs on `rows` rows each, returning the sum of the
    outputs and of every weight gradient (so that nothing is pruned)."""
    import tensorflow as tf

    init = tf.random.stateless_normal
    stacked_in = tf.Variable(init([num_experts, model_dim, hidden_size],
                                  [0, 1]) * 0.02)
    stacked_out = tf.Variable(init([num_experts, hidden_size, model_dim],
                                   [0, 2]) * 0.02)
    separate_in = [tf.Variable(w) for w in tf.unstack(stacked_in)]
    separate_out = [tf.Variable(w) for w in tf.unstack(stacked_out)]
    inputs = tf.split(init([num_experts * rows, model_dim], [0, 3]),
                      num_experts)

    def ffns(weights_in, weights_out):
        return tf.add_n([
            tf.reduce_sum(tf.matmul(tf.nn.relu(tf.matmul(x, w_in)), w_out))
            for x, w_in, w_out in zip(inputs, weights_in, weights_out)])

    @tf.function
    def stacked():
        with tf.GradientTape() as tape:
            loss = ffns(tf.unstack(stacked_in), tf.unstack(stacked_out))
        grads = tape.gradient(loss, [stacked_in, stacked_out])
        return loss + tf.add_n([tf.reduce_sum(g) for g in grads])

    @tf.function
    def separate():
        weights = separate_in + separate_out
        with tf.GradientTape() as tape:
            loss = ffns(separate_in, separate_out)
        grads = tape.gradient(loss, weights)
        return loss + tf.add_n([tf.reduce_sum(g) for g in grads])

    return {"stacked": stacked, "separate": separate}


def _run_worker(args):
    import tf_moe  # noqa: F401  (its allocator choice; ours is set already)
    from tf_moe import allocator

    rows = []
    for rows_per_expert in (int(r) for r in args.rows.split(",")):
        steps = _steps(args.experts, rows_per_expert, args.model_dim,
                       args.hidden_size)
        # Trace and warm up; the two layouts compute the same sums.
        first = {name: step().numpy() for name, step in steps.items()}
        if not math.isclose(*first.values(), rel_tol=1e-4):
            raise RuntimeError(f"the layouts disagree: {first}")
        medians, seconds = workers.time_in_rounds(
            {name: (lambda step=step: step().numpy())
             for name, step in steps.items()}, args.rounds)
        rows.append({"rows_per_expert": rows_per_expert,
                     "seconds": medians, "seconds_all": seconds})
    print("RESULT " + json.dumps({
        "pooled": allocator.cpu_allocator_pooled(),
        "TF_CPU_ALLOCATOR_USE_BFC": os.environ.get(allocator.POOL_VARIABLE),
        "rows": rows}), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--rows", default="128,512",
                        help="Rows per expert, comma-separated.")
    parser.add_argument("--model_dim", type=int, default=512)
    parser.add_argument("--hidden_size", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--worker", default="",
                        help="Internal: run one allocator's process.")
    parser.add_argument("--output", default=os.path.join(
        _HERE, "results", "stacking.json"))
    args = parser.parse_args()
    if args.worker:
        _run_worker(args)
        return

    results = {}
    for name, value in _ALLOCATORS.items():
        env = dict(os.environ, TF_CPU_ALLOCATOR_USE_BFC=value)
        results[name] = workers.measure(os.path.abspath(__file__), name,
                                        args, _WORKER_FLAGS, env=env)
    print(f"E={args.experts}, d={args.model_dim}, h={args.hidden_size}; "
          f"TF_ENABLE_ONEDNN_OPTS="
          f"{os.environ.get('TF_ENABLE_ONEDNN_OPTS', 'default')}\n")
    print("| allocator | pooled | rows/expert | stacked (s) | separate (s) "
          "| stacked / separate |")
    print("|---|---|---|---|---|---|")
    for name, result in results.items():
        for row in result["rows"]:
            stacked, separate = (row["seconds"][n]
                                 for n in ("stacked", "separate"))
            row["ratio"] = stacked / separate
            print(f"| {name} | {result['pooled']} | {row['rows_per_expert']} "
                  f"| {stacked:.3f} | {separate:.3f} | {row['ratio']:.2f} |")
    workers.write_results(args.output, args, allocators=results)


if __name__ == "__main__":
    sys.exit(main())
