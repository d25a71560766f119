"""Layer benchmark: MoE step time against the equal-FLOP dense FFN.

    python bench/bench_layer.py [--experts=16,64,256,1024] [--tokens=8192]
        [--gatings=noisy_top_k,top_k,expert_choice,batchwise]
        [--capacity_factors=none,1.25] [--expert_storages=stacked,per_expert]
        [--peers=gshard,garden,mixtral]

Times one forward+backward step (gradients of the input and of every
weight, balancing losses included) of `tf_moe.MoE` in training mode at initialisation (zero
gate: noisy, balanced routing, dropless; the gates without noise get a
random gate kernel instead, as a zero one would send every token to the
same experts) and of a dense two-layer FFN with
the same active FLOPs per token (hidden width k * hidden_size), beside the
per-expert dispatcher (bench/partition_baseline.py) and the other MoE
layers of the ecosystem (bench/peers.py: GShard's one-hot einsum, TF Model
Garden's MoeLayer, keras-hub's Mixtral block). Each
configuration runs in its own process, so its peak resident memory is its
own; all are measured in one run of this script. The dense FFN's process
stays up for the whole run, and every configuration's steps alternate with
its steps in rounds: a configuration's ratio to dense is the median of its
rounds' ratios, so a slow spell of this shared machine slows both sides of
a ratio rather than one row of the table. Prints a markdown table and writes
JSON (bench/results/layer.json by default). Asserts nothing about time.
"""

import argparse
import itertools
import json
import math
import os
import resource
import statistics
import sys
import time

import workers

_HERE = os.path.dirname(os.path.abspath(__file__))
# bench/peers.py's layers, by worker kind, with what each needs installed.
_PEERS = {"gshard": (), "garden": ("official", "tf_keras", "gin"),
          "mixtral": ("keras_hub",)}
_PEER_NAMES = {"gshard": "GShard one-hot einsum",
               "garden": "TF Model Garden MoeLayer",
               "mixtral": "keras-hub Mixtral block"}


def _parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--experts", default="16,64,256,1024",
                        help="Comma-separated expert counts.")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--model_dim", type=int, default=512)
    parser.add_argument("--hidden_size", type=int, default=1024)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument(
        "--gatings", default="noisy_top_k",
        help="Comma-separated routers of tf_moe.MoE, one row per router and "
             "expert count (keys of tf_moe.GATES).")
    parser.add_argument(
        "--kernels", default="auto",
        help="Comma-separated modes of the experts' product kernels "
             "(tf_moe.kernels.MODES: auto, tensorflow, xla), one row per "
             "mode. Run with TF_ENABLE_ONEDNN_OPTS=0 in the environment for "
             "TensorFlow's kernels without oneDNN.")
    parser.add_argument(
        "--capacity_factors", default="none",
        help="Comma-separated capacity factors of tf_moe.MoE, one row per "
             "factor: 'none' is dropless dispatch (the default), a number "
             "a fixed capacity of ceil(factor * k * tokens / E) per expert.")
    parser.add_argument(
        "--expert_storages", default="stacked",
        help="Comma-separated `expert_storage` values of tf_moe.MoE "
             "(tf_moe.expert_weights.STORAGES: stacked, per_expert), one row "
             "per storage.")
    parser.add_argument(
        "--steps", type=int, default=10,
        help="Timed steps per configuration, in as many rounds: each round "
             "times one step of the configuration and one of the dense FFN, "
             "and the ratio to dense is the median of the rounds' ratios "
             "(a slow spell of the machine slows both).")
    add_optimizer_flag(parser)
    parser.add_argument(
        "--warmup", type=int, default=3,
        help="Untimed steps before the timed ones, at least 1: the first "
             "traces the step and times the kernel choices (its seconds are "
             "the JSON's `first_step_seconds`).")
    parser.add_argument("--output",
                        default=os.path.join(_HERE, "results", "layer.json"))
    parser.add_argument(
        "--malloc", default="tcmalloc", choices=["tcmalloc", "system"],
        help="Allocator of the worker processes. TensorFlow on CPU allocates "
             "and frees large tensors every step; glibc's malloc maps and "
             "unmaps them each time, and the page faults that follow cost "
             "more than the gathers themselves. tcmalloc (Debian package "
             "libtcmalloc-minimal4) keeps them. Every layer runs under the "
             "same one.")
    parser.add_argument(
        "--partition_baseline", default=True,
        action=argparse.BooleanOptionalAction,
        help="Also time the per-expert dynamic_partition dispatcher "
             "(bench/partition_baseline.py) at every E.")
    parser.add_argument(
        "--experts_alone", default=True,
        action=argparse.BooleanOptionalAction,
        help="Also time tf_moe's experts alone on balanced, presorted rows "
             "(bench/experts_alone.py) at every E: the floor of any layer "
             "with these experts, before routing.")
    parser.add_argument(
        "--peers", default=",".join(_PEERS),
        help="Comma-separated other MoE layers to time at every E "
             "(bench/peers.py), or 'none'. A peer that is not installed, or "
             "would not fit in half this machine's memory, is skipped and "
             "the table says why.")
    parser.add_argument("--gshard_capacity_factor", type=float, default=1.25,
                        help="The GShard peer's capacity factor.")
    parser.add_argument(
        "--peer_group_size", type=int, default=1024,
        help="Tokens the GShard and TF Model Garden peers route together "
             "(their dispatch einsums' FLOPs grow with it); it must divide "
             "--tokens.")
    parser.add_argument("--worker", default=None,
                        help=argparse.SUPPRESS)  # see parse_worker
    parser.add_argument("--serve", action="store_true",
                        help=argparse.SUPPRESS)  # see workers.Server
    args = parser.parse_args(argv)
    if args.warmup < 1:
        parser.error(f"--warmup must be at least 1, got {args.warmup}")
    return args


def add_optimizer_flag(parser):
    """`--optimizer`, which `make_step` reads (the workers get it)."""
    parser.add_argument(
        "--optimizer", default="none", choices=["none", "adam"],
        help="'adam': every timed step of every layer (the dense FFN and "
             "the other layers too) also applies Keras's Adam to all its "
             "weights, as a training step does; 'none': the gradients only.")


def parse_worker(worker):
    """`(kind, experts, gating, kernel mode, capacity factor, expert
    storage)` of a worker name: `dense`,
    `moe:E[:gating[:kernels[:capacity factor[:storage]]]]`, `partition:E`,
    `experts:E` (bench/experts_alone.py), `hierarchical:GxB` or a peer's
    `<peer>:E` (`_PEERS`).
    Missing fields are "" (experts, gating, kernels), None (capacity
    factor: dropless) or "stacked" (storage)."""
    kind, experts, gating, kernel_mode, capacity, storage = (
        worker.split(":") + [""] * 5)[:6]
    return (kind, experts, gating, kernel_mode,
            None if capacity in ("", "none") else float(capacity),
            storage or "stacked")


def make_step(args, worker):
    """The layer a worker name says (`parse_worker`), built, and its
    training step.

    Returns:
        `(layer, step, inputs)`: `step(inputs)` returns the loss and the sum
        of every gradient (of the input and every weight), and applies them
        with `args.optimizer` where it is "adam".
    """
    import keras
    import tensorflow as tf

    import tf_moe

    keras.utils.set_random_seed(0)
    kind, experts, gating, kernel_mode, capacity_factor, storage = (
        parse_worker(worker))
    tf_moe.kernels.set_mode(kernel_mode or "auto")
    # The experts alone take each token's k rows, presorted: the experts'
    # input without routing.
    rows = args.tokens * (args.k if kind == "experts" else 1)
    inputs = tf.random.normal((rows, args.model_dim))
    if kind == "dense":
        layer = keras.Sequential([
            keras.layers.Dense(args.k * args.hidden_size, activation="relu"),
            keras.layers.Dense(args.model_dim),
        ])
    elif kind == "partition":
        from partition_baseline import PartitionedMoE
        layer = PartitionedMoE(int(experts), args.hidden_size, args.k, seed=0)
    elif kind == "experts":
        from experts_alone import ExpertsAlone
        layer = ExpertsAlone(int(experts), args.hidden_size)
    elif kind == "hierarchical":
        # "GxB": G groups of B experts, k_primary * k_secondary = k.
        groups, per_group = (int(n) for n in experts.split("x"))
        k_primary = 2 if args.k % 2 == 0 and groups > 1 else 1
        layer = tf_moe.HierarchicalMoE(
            groups, per_group, args.hidden_size, k_primary=k_primary,
            k_secondary=args.k // k_primary, seed=0)
    elif kind in _PEERS:
        layer = _make_peer(args, kind, int(experts))
    else:
        gating = gating or "noisy_top_k"
        layer = tf_moe.MoE(
            int(experts), args.hidden_size, k=args.k, gating=gating,
            capacity_factor=capacity_factor, expert_storage=storage,
            gate_initializer=("zeros" if gating == "noisy_top_k"
                              else "glorot_uniform"), seed=0)
    # The peers' capacities and the experts' alone split follow the rows,
    # so they are built at the real batch (on 8 tokens some peers would get
    # no buffer rows).
    layer(inputs if kind in _PEERS or kind == "experts" else inputs[:8],
          training=True)
    variables = layer.trainable_variables
    optimizer = None
    if args.optimizer == "adam":
        optimizer = keras.optimizers.Adam(1e-4)
        optimizer.build(variables)  # Its slots, outside the traced step.

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            # The input gradient too, as for a layer inside a model.
            tape.watch(x)
            outputs = layer(x, training=True)
            loss = tf.reduce_mean(tf.square(outputs)) + tf.add_n(
                [tf.constant(0.0)] + layer.losses)
        grads = tape.gradient(loss, [x] + variables)
        if optimizer is not None:
            optimizer.apply_gradients(zip(grads[1:], variables))
        # Reduce every gradient so none of the work can be pruned away.
        return loss, tf.add_n([tf.reduce_sum(g) for g in grads])

    return layer, step, inputs


def _make_peer(args, kind, num_experts):
    import peers

    if kind == "gshard":
        return peers.GShardMoE(num_experts, args.hidden_size, args.k,
                               capacity_factor=args.gshard_capacity_factor,
                               group_size=args.peer_group_size, seed=0)
    if kind == "garden":
        return peers.garden_moe(num_experts, args.hidden_size, args.k,
                                group_size=args.peer_group_size)
    return peers.mixtral_moe(num_experts, args.hidden_size, args.k,
                             args.model_dim)


def _mixtral_bytes(args, num_experts):
    """About what a Mixtral block's training step holds: its `[E, T, h]`
    gate, up and hidden activations and `[E, T, d]` outputs in float32
    (it runs every expert on every token), kept for the backward pass and
    matched there by their gradients and the temporaries between (three
    times in all)."""
    return (4 * num_experts * args.tokens
            * (3 * args.hidden_size + args.model_dim) * 3)


def _peer_skip_reason(args, peer, num_experts):
    """Why `peer` cannot run here at E=`num_experts`, or None."""
    import importlib.util

    missing = [module for module in _PEERS[peer]
               if importlib.util.find_spec(module) is None]
    if missing:
        return f"not installed ({', '.join(missing)})"
    if peer == "mixtral":
        needed = _mixtral_bytes(args, num_experts)
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        if needed > memory / 2:
            return (f"needs about {needed / 2**30:.0f} GB, over half of "
                    f"this machine's {memory / 2**30:.0f} GB")
    return None


def _run_worker(args):
    """Times one configuration in this process; prints one JSON line."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import numpy as np
    import tensorflow as tf

    import tf_moe

    layer, step, inputs = make_step(args, args.worker)
    kind, experts, gating, _, capacity_factor, storage = parse_worker(
        args.worker)
    variables = layer.trainable_variables
    # The first step traces the step and times the kernel choices.
    start = time.perf_counter()
    step(inputs)[1].numpy()
    first_step_seconds = time.perf_counter() - start
    for _ in range(args.warmup - 1):
        step(inputs)[1].numpy()

    def timed_step():
        start = time.perf_counter()
        step(inputs)[1].numpy()
        return time.perf_counter() - start

    if args.serve:  # workers.Server: one timed step per command.
        print("READY", flush=True)
        times = []
        for command in sys.stdin:
            if command.strip() != "step":
                break
            times.append(timed_step())
            print(f"TIME {times[-1]!r}", flush=True)
    else:
        times = [timed_step() for _ in range(args.steps)]

    result = {
        "layer": kind,
        "gating": gating or None,
        "capacity_factor": capacity_factor,
        "expert_storage": storage if kind == "moe" else None,
        "num_experts": (None if not experts
                        else math.prod(int(n) for n in experts.split("x"))),
        "step_seconds": float(np.median(times)),
        "step_seconds_all": times,
        "first_step_seconds": first_step_seconds,
        "parameters": int(sum(np.prod(v.shape) for v in variables)),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_gpu_mb": _peak_gpu_mb(tf),
        "kernels": tf_moe.kernels.get_mode(),
        "kernel_measurements": tf_moe.kernels.measurements(),
        "onednn": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default"),
        # Every worker imports tf_moe, which pools TensorFlow's CPU
        # allocator (`tf_moe.allocator`): the dense FFN and the peers too.
        "cpu_allocator_pooled": tf_moe.allocator.cpu_allocator_pooled(),
    }
    if kind in ("moe", "hierarchical"):
        # The routing of one more step: its load, and the buffer rows the
        # plan computes per routed slot (padding included).
        gate, _ = layer._route(inputs, None, training=True)
        plan = tf_moe.make_dispatch_plan(gate.expert_ids, layer.num_experts,
                                         slot_mask=gate.slot_mask)
        counts = plan.expert_counts.numpy()
        result["max_over_mean_load"] = float(counts.max() / counts.mean())
        if capacity_factor is None:
            rows = plan.buffer_slot.shape[0]
        else:  # Every expert's buffer has the capacity; the rest is dropped.
            capacity = tf_moe.plan.fixed_capacity(
                args.tokens, layer.num_experts, args.k, capacity_factor)
            rows = capacity * layer.num_experts
            result["dropped_fraction"] = float(
                np.maximum(counts - capacity, 0).sum() / counts.sum())
        result["rows_over_routed"] = float(rows / counts.sum())
    print("RESULT " + json.dumps(result))


def _dispatch_name(row):
    """"dropless" or "capacity factor F", and the storage where it is not
    the default, for the table."""
    name = ("dropless" if row["capacity_factor"] is None
            else f"capacity factor {row['capacity_factor']:g}")
    if row.get("expert_storage", "stacked") != "stacked":
        name += f", {row['expert_storage']} weights"
    return name


def _peak_gpu_mb(tf):
    """Peak memory TensorFlow's allocator held on the first GPU (None
    without a GPU)."""
    if not tf.config.list_logical_devices("GPU"):
        return None
    return tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**20


def _memory_cell(row):
    """The table's memory figure: GPU peak on a GPU, else peak RSS."""
    if row.get("peak_gpu_mb") is not None:
        return f"{row['peak_gpu_mb']:,.0f}"
    return f"{row['peak_rss_mb']:,.0f}"


_TCMALLOC = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"


def _worker_env(malloc):
    env = dict(os.environ)
    if malloc == "tcmalloc":
        if not os.path.exists(_TCMALLOC):
            raise SystemExit(f"--malloc=tcmalloc needs {_TCMALLOC} "
                             "(apt-get install libtcmalloc-minimal4), "
                             "or pass --malloc=system")
        env["LD_PRELOAD"] = _TCMALLOC
    return env


def _worker_flags(worker):
    flags = ("tokens", "model_dim", "hidden_size", "k", "steps", "warmup",
             "optimizer")
    if parse_worker(worker)[0] in _PEERS:
        flags += ("gshard_capacity_factor", "peer_group_size")
    return flags


def _measure(args, worker):
    """One worker's RESULT, its steps timed in a row (bench_hierarchical
    passes its own `args`, without the peers' flags)."""
    return workers.measure(os.path.abspath(__file__), worker, args,
                           _worker_flags(worker), env=_worker_env(args.malloc))


def _server(args, worker):
    return workers.Server(os.path.abspath(__file__), worker, args,
                          _worker_flags(worker), env=_worker_env(args.malloc))


def _measure_beside(args, worker, dense):
    """`worker`'s RESULT, timed in `args.steps` rounds beside the dense
    FFN's `workers.Server`: `ratio_to_dense` is the median of the rounds'
    ratios (`ratios_to_dense_all`, of `step_seconds_all` over
    `dense_step_seconds_all`)."""
    with _server(args, worker) as server:
        dense_seconds = []
        for _ in range(args.steps):
            dense_seconds.append(dense.step())
            server.step()
        result = server.result()
    result["dense_step_seconds_all"] = dense_seconds
    result["ratios_to_dense_all"] = [
        seconds / dense_step for seconds, dense_step
        in zip(result["step_seconds_all"], dense_seconds)]
    result["ratio_to_dense"] = statistics.median(result["ratios_to_dense_all"])
    return result


def main(argv=None):
    args = _parse_args(argv)
    if args.worker:
        _run_worker(args)
        return
    experts = [int(e) for e in args.experts.split(",")]
    gatings = args.gatings.split(",")
    kernel_modes = args.kernels.split(",")
    capacity_factors = args.capacity_factors.split(",")
    storages = args.expert_storages.split(",")
    peer_kinds = [] if args.peers == "none" else args.peers.split(",")
    for peer in peer_kinds:
        if peer not in _PEERS:
            raise SystemExit(f"--peers: {peer!r} is not one of "
                             f"{tuple(_PEERS)} (or 'none')")
    print(f"tokens={args.tokens} d={args.model_dim} "
          f"hidden_size={args.hidden_size} k={args.k} "
          f"(dense FFN hidden={args.k * args.hidden_size}); "
          f"optimizer={args.optimizer}; "
          f"malloc={args.malloc}; TF_ENABLE_ONEDNN_OPTS="
          f"{os.environ.get('TF_ENABLE_ONEDNN_OPTS', 'unset')}; "
          f"{args.steps} rounds (one step of a layer and one of the dense FFN "
          f"each) after {args.warmup} warm-up; ratios are medians of the "
          f"rounds' ratios", flush=True)
    with _server(args, "dense") as dense_server:
        rows, peer_rows = _measure_configurations(
            args, experts, gatings, kernel_modes, capacity_factors,
            storages, peer_kinds, dense_server)
        dense = dense_server.result()
    print(f"TensorFlow's CPU allocator pooled (tf_moe.allocator): "
          f"{dense['cpu_allocator_pooled']}")
    print(f"dense: {dense['step_seconds']:.3f} s/step (median of its "
          f"{len(dense['step_seconds_all'])} steps)", flush=True)

    print()
    def ratio_cell(row, name):
        key = f"{name}_ratio_to_dense"
        return f"{row[key]:.2f}" if key in row else "-"

    memory = "GPU" if dense.get("peak_gpu_mb") is not None else "RSS"
    print("| layer | experts | step (s) | / dense | dynamic_partition / dense "
          "| experts alone / dense "
          f"| parameters | peak {memory} (MB) | max/mean load | rows/routed |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(f"| dense FFN ({args.k * args.hidden_size}) | - | "
          f"{dense['step_seconds']:.3f} | 1.00 | - | - | "
          f"{dense['parameters']:,} | {_memory_cell(dense)} | - | - |")
    for row in rows:
        print(f"| tf_moe.MoE {row['gating']} k={args.k} "
              f"({row['kernels']} kernels, {_dispatch_name(row)}) | "
              f"{row['num_experts']} | "
              f"{row['step_seconds']:.3f} | {row['ratio_to_dense']:.2f} | "
              f"{ratio_cell(row, 'partition')} | "
              f"{ratio_cell(row, 'experts_alone')} | {row['parameters']:,} | "
              f"{_memory_cell(row)} | {row['max_over_mean_load']:.2f} | "
              f"{row['rows_over_routed']:.2f} |")

    if peer_kinds:
        _print_peer_table(args, experts, rows, peer_rows)

    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
        json.dump({"config": {k: v for k, v in vars(args).items()
                              if k != "worker"},
                   "machine": workers.machine(),
                   "dense": dense, "moe": rows, "peers": peer_rows},
                  f, indent=2)
    print(f"\nwrote {args.output}")


def _measure_configurations(args, experts, gatings, kernel_modes,
                            capacity_factors, storages, peer_kinds, dense):
    """`(tf_moe rows, peer rows)`: every configuration, each timed beside
    the dense FFN's server `dense` (`_measure_beside`)."""
    rows = []
    peer_rows = []
    for num_experts in experts:
        this_e = []
        for gating in gatings:
            for mode in kernel_modes:
                for capacity, storage in itertools.product(
                        capacity_factors, storages):
                    moe = _measure_beside(
                        args, f"moe:{num_experts}:{gating}:{mode}:{capacity}"
                              f":{storage}", dense)
                    print(f"E={num_experts} {gating} kernels={mode} "
                          f"{_dispatch_name(moe)}: "
                          f"{moe['step_seconds']:.3f} s/step "
                          f"({moe['ratio_to_dense']:.2f}x dense)", flush=True)
                    this_e.append(moe)
        rows += this_e
        # The references every row of this E is read against.
        for enabled, worker, key, name in (
                (args.partition_baseline, "partition", "partition",
                 "dynamic_partition baseline"),
                (args.experts_alone, "experts", "experts_alone",
                 "experts alone")):
            if not enabled:
                continue
            reference = _measure_beside(args, f"{worker}:{num_experts}",
                                        dense)
            for row in this_e:
                row[f"{key}_step_seconds"] = reference["step_seconds"]
                row[f"{key}_ratio_to_dense"] = reference["ratio_to_dense"]
            print(f"E={num_experts} {name}: "
                  f"{reference['step_seconds']:.3f} s/step "
                  f"({reference['ratio_to_dense']:.2f}x dense)", flush=True)
        for peer in peer_kinds:
            result = {"layer": peer, "num_experts": num_experts}
            result["skipped"] = _peer_skip_reason(args, peer, num_experts)
            if result["skipped"] is None:
                result = _measure_beside(args, f"{peer}:{num_experts}", dense)
                print(f"E={num_experts} {_PEER_NAMES[peer]}: "
                      f"{result['step_seconds']:.3f} s/step "
                      f"({result['ratio_to_dense']:.2f}x dense)", flush=True)
            else:
                print(f"E={num_experts} {_PEER_NAMES[peer]}: skipped, "
                      f"{result['skipped']}", flush=True)
            peer_rows.append(result)
    return rows, peer_rows


def _print_peer_table(args, experts, rows, peer_rows):
    """Every layer's step over the dense FFN's, one row per E: tf_moe's
    configurations, the per-expert dispatcher and the peers."""
    def tf_moe_name(row):
        return (f"tf_moe {row['gating']} ({row['kernels']} kernels, "
                f"{_dispatch_name(row)})")

    columns = list(dict.fromkeys(tf_moe_name(row) for row in rows))
    details = {"gshard": f" (cf {args.gshard_capacity_factor:g}, groups of "
                         f"{args.peer_group_size})",
               "garden": f" (groups of {args.peer_group_size})"}
    peer_names = [_PEER_NAMES[p] + details.get(p, "")
                  for p in dict.fromkeys(row["layer"] for row in peer_rows)]
    headers = (["experts alone (floor)"] * args.experts_alone
               + ["per-expert dispatcher"] * args.partition_baseline
               + columns + peer_names)
    print("\nstep / dense FFN step, medians of same-round ratios:\n")
    print("| experts | " + " | ".join(headers) + " |")
    print("|---" * (len(headers) + 1) + "|")
    for num_experts in experts:
        these = [row for row in rows if row["num_experts"] == num_experts]
        cells = []
        if args.experts_alone:
            cells.append(f"{these[0]['experts_alone_ratio_to_dense']:.2f}")
        if args.partition_baseline:
            cells.append(f"{these[0]['partition_ratio_to_dense']:.2f}")
        by_name = {tf_moe_name(row): row for row in these}
        cells += [f"{by_name[c]['ratio_to_dense']:.2f}" if c in by_name
                  else "-" for c in columns]
        for row in peer_rows:
            if row["num_experts"] == num_experts:
                cells.append(f"skipped: {row['skipped']}"
                             if row.get("skipped")
                             else f"{row['ratio_to_dense']:.2f}")
        print(f"| {num_experts} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
