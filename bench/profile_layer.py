"""Where one training step of a layer spends its time, by stage and op.

    python bench/profile_layer.py [--worker=moe:64] [--tokens=8192] ...

Builds the step bench/bench_layer.py times (same flags, same worker names:
`dense`, `moe:E[:gating[:kernels]]`, `partition:E`), runs it under
TensorFlow's profiler and sums the op time per stage of the layer (the name
scopes of `tf_moe.mixture`: route, plan, dispatch, experts, combine,
losses, each with its gradient) and per op type. A third table names the
costliest single ops (`--top_ops`). Op times are summed over
the threads that ran them, so with 2 cores they add up to about twice the
step; small ops that wait for a core while a large matmul holds both are
overstated. Prints two tables and writes JSON
(bench/results/profile.json by default).
"""

import argparse
import collections
import glob
import json
import os
import tempfile
import time

import bench_layer

_HERE = os.path.dirname(os.path.abspath(__file__))
STAGES = ("route", "plan", "dispatch", "experts", "combine", "losses")


def _stage(op_name):
    """The stage of an op named `scope/.../name`, by its innermost stage
    scope; "outside the layer" for the step's own ops."""
    parts = op_name.split("/")
    for part in reversed(parts):
        base = part.rsplit("_", 1)[0] if part[-1:].isdigit() else part
        if base in STAGES:
            return part if part in STAGES else base
    return "outside the layer"


def _op_events(logdir):
    """`(op name, op type, seconds)` of every TensorFlow op the profile
    holds (the host's executor threads)."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2
    path, = glob.glob(os.path.join(logdir, "**", "*.xplane.pb"),
                      recursive=True)
    space = xplane_pb2.XSpace()
    with open(path, "rb") as f:
        space.ParseFromString(f.read())
    for plane in space.planes:
        if plane.name != "/host:CPU":
            continue
        for line in plane.lines:
            for event in line.events:
                name = plane.event_metadata[event.metadata_id].name
                # Op events are "scope/name:Type"; the executor's own
                # events ("ExecutorState::Process") and the call of the
                # whole step (which holds the others) are not ops.
                if ":" not in name or "::" in name:
                    continue
                op_name, op_type = name.rsplit(":", 1)
                op_type = op_type.strip()
                if op_type.startswith("__inference"):
                    continue
                yield op_name, op_type, event.duration_ps / 1e12


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", default="moe:64")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--model_dim", type=int, default=512)
    parser.add_argument("--hidden_size", type=int, default=1024)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    bench_layer.add_optimizer_flag(parser)
    parser.add_argument("--top_ops", type=int, default=15,
                        help="Rows of the per-type and per-op tables.")
    parser.add_argument("--output", default=os.path.join(
        _HERE, "results", "profile.json"))
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf

    layer, step, inputs = bench_layer.make_step(args, args.worker)
    for _ in range(3):
        step(inputs)[1].numpy()
    start = time.perf_counter()
    for _ in range(args.steps):
        step(inputs)[1].numpy()
    step_seconds = (time.perf_counter() - start) / args.steps
    logdir = tempfile.mkdtemp(prefix="tf_moe_profile_")
    tf.profiler.experimental.start(logdir)
    for _ in range(args.steps):
        step(inputs)[1].numpy()
    tf.profiler.experimental.stop()

    by_stage = collections.Counter()
    by_type = collections.Counter()
    by_op = collections.Counter()
    for op_name, op_type, seconds in _op_events(logdir):
        by_op[f"{op_name} ({op_type})"] += seconds / args.steps
        stage = _stage(op_name)
        # TensorFlow's gradients are under the tape's scope, tf_moe's
        # custom gradients under their forward's ("<scope>/gradient").
        if stage != "outside the layer" and (
                "gradient_tape" in op_name or "/gradient/" in op_name):
            stage += " (gradient)"
        by_stage[stage] += seconds / args.steps
        by_type[op_type] += seconds / args.steps
    total = sum(by_stage.values())
    print(f"{args.worker}: {step_seconds:.3f} s/step unprofiled; "
          f"{total:.3f} s of op time per step (all threads)\n")
    print("| stage | op s/step | share |")
    print("|---|---|---|")
    for stage, seconds in by_stage.most_common():
        print(f"| {stage} | {seconds:.3f} | {seconds / total:.0%} |")
    print("\n| op type | op s/step | share |")
    print("|---|---|---|")
    for op_type, seconds in by_type.most_common(args.top_ops):
        print(f"| {op_type} | {seconds:.3f} | {seconds / total:.0%} |")
    print("\n| op | op s/step | share |")
    print("|---|---|---|")
    top_ops = by_op.most_common(args.top_ops)
    for op, seconds in top_ops:
        print(f"| {op} | {seconds:.3f} | {seconds / total:.0%} |")
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
        json.dump({"config": vars(args), "step_seconds": step_seconds,
                   "op_seconds_by_stage": dict(by_stage),
                   "op_seconds_by_type": dict(by_type),
                   "top_ops_seconds": dict(top_ops)}, f, indent=2)
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
