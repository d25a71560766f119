"""The kernels of the experts' batched products, chosen by measurement.

A layer of experts runs three products per training step (`tf_moe.matmul`):
the forward `x @ W`, the weight gradient `x^T @ dy` and the input gradient
`dy @ W^T`, each batched over experts: `[S, E, C, a] x [E, a, b]`. Each can
run on one of several kernels:

- "tensorflow": TensorFlow's batched matmul (BatchMatMulV2), which reaches
  oneDNN where TensorFlow's oneDNN kernels are on;
- "tensorflow_transposed" (input gradient only): the same kernel as
  `(W @ dy^T)^T`, which some CPU kernels run faster at few rows;
- "xla": the same product compiled by XLA;
- "per_expert": one 2-D MatMul per expert (up to `PER_EXPERT_MAX_EXPERTS`,
  one shard), as a per-expert dispatcher runs them.

Which is fastest depends on the machine, not on the model: on one 2-core
CPU (AVX-512, oneDNN on) TensorFlow's kernel took 0.22 s and XLA's 0.31 s
for the forward product of 256 experts x [128, 512] x [512, 1024]; with
`TF_ENABLE_ONEDNN_OPTS=0` on the same CPU, 0.41 s against 0.33 s
(`bench/bench_matmul.py`). So in the default mode, "auto", the first call
of each product at a new shape times every candidate on random operands of
that shape, once per process, and runs the fastest from then on (another
kernel than TensorFlow's must be `REQUIRED_SPEEDUP` faster;
`measurements()` lists what was timed and chosen). A mode can also be
forced for the whole process: `set_mode("xla")`, or the environment
variable `TF_MOE_EXPERT_KERNELS` read at import.

A level up, `choose_layout` picks the experts' buffer layout the same way:
"padded" (`[E, C, d]`, the batched products above) or "packed" (`[N, d]`
sorted by expert, one MatMul pair per expert on exactly its rows, as a
per-expert dispatcher runs them; `tf_moe.plan`). Timed per expert FFN,
forward and backward, since a 2-D MatMul can fuse with its bias and
activation, which a product alone does not show. Mode "per_expert" forces
the packed layout where a layer can run it (one token shard, and
`packed_applies`), with TensorFlow's kernels elsewhere.

Timings vary between processes, so two runs of the same seed can choose
differently where candidates are close, and then add in another order: "auto"
alone does not repeat a run to the last digit. `save_choices` writes what was
chosen and `load_choices` runs by it without timing again (the trainers keep
the file in their workdir); where TensorFlow's op determinism is on
(`tf.config.experimental.enable_op_determinism()`), "auto" times nothing and
runs TensorFlow's kernels in the padded layout, as mode "tensorflow" does.

Where a program cannot run an XLA-compiled function (a mesh of several
devices), the callers ask for `allow_xla=False` and get TensorFlow's kernel.
`choose` returns the names of the chosen candidates (`Choice`), so that a
caller can run a product of other shapes in the same orientation.
"""

import functools
import json
import os
import time
from typing import NamedTuple, Optional

import numpy as np
import tensorflow as tf
from tensorflow.python.framework import config as tf_config

MODES = ("auto", "tensorflow", "xla", "per_expert")
LAYOUTS = ("padded", "packed")
PRODUCTS = ("forward", "weight_gradient", "input_gradient")

# Rows per expert to time at when the caller cannot say (dynamic batch).
DEFAULT_ROWS = 256
# At most this many elements in the operands of one timing (256 MB in
# float32): larger layers are timed on fewer experts of the same shape,
# since a batched kernel's time grows linearly in the experts.
MAX_TIMED_ELEMENTS = 1 << 26
# Another candidate replaces TensorFlow's kernel only when it times at
# least this much faster. Timings of the same kernel on a shared CPU vary
# by about that much, and what a timing alone leaves out favours
# TensorFlow's kernel inside a step: an XLA call runs outside TensorFlow's
# executor and overlaps with no other op. (At E=256, d=512, h=1024, XLA's
# forward timed 10% faster alone and made the whole step 10% slower.)
REQUIRED_SPEEDUP = 0.1
# Timed calls per candidate after one warm-up (the compile, for XLA); the
# fastest call counts, since interference only ever adds time.
TIMED_CALLS = 3


# With one shard (off a mesh) the products are plain batched matmuls over
# E, with the transposes as the kernel's adjoint flags: TensorFlow's einsum
# transposes its operands in memory for the weight gradient's "seca,secb"
# (0.26 s against 0.18 s for 16 experts x [2048, 512] x [2048, 1024]:
# `python bench/bench_matmul.py --experts=16 --rows=2048`).
# Several shards (a mesh) keep the einsums, which DTensor expands.


def _forward(x, w):
    """`x @ w` per expert: `[S, E, C, a]`, `[E, a, b]` -> `[S, E, C, b]`."""
    if x.shape[0] == 1:
        return tf.expand_dims(tf.matmul(tf.squeeze(x, 0), w), 0)
    return tf.einsum("seca,eab->secb", x, w)


def _weight_gradient(x, dy):
    """`x^T @ dy` per expert, summed over shards: `[S, E, C, a]`,
    `[S, E, C, b]` -> `[E, a, b]`."""
    if x.shape[0] == 1:
        return tf.matmul(tf.squeeze(x, 0), tf.squeeze(dy, 0), adjoint_a=True)
    return tf.einsum("seca,secb->eab", x, dy)


def _input_gradient(dy, w):
    """`dy @ w^T` per expert: `[S, E, C, b]`, `[E, a, b]` -> `[S, E, C, a]`."""
    if dy.shape[0] == 1:
        return tf.expand_dims(
            tf.matmul(tf.squeeze(dy, 0), w, adjoint_b=True), 0)
    return tf.einsum("secb,eab->seca", dy, w)


def _input_gradient_transposed(dy, w):
    """`dy @ w^T` as `(w @ dy^T)^T`: same arguments and result."""
    if dy.shape[0] == 1:
        product = tf.matmul(w, tf.squeeze(dy, 0), adjoint_b=True)
        return tf.expand_dims(tf.transpose(product, [0, 2, 1]), 0)
    dy_t = tf.transpose(dy, [1, 3, 0, 2])  # [E, b, S, C]
    shape = tf.shape(dy)
    product = tf.matmul(w, tf.reshape(dy_t, [shape[1], shape[3], -1]))
    product = tf.reshape(product, [shape[1], -1, shape[0], shape[2]])
    return tf.transpose(product, [2, 0, 3, 1])


def _per_expert(matmul):
    """A product as one 2-D MatMul per expert, for one shard: the kernel a
    per-expert dispatcher runs. TensorFlow's batched kernel without oneDNN
    is slower than its 2-D one (forward: 0.53 s against 0.31 s for 256
    experts x [128, 512] x [512, 1024]: `TF_ENABLE_ONEDNN_OPTS=0 python
    bench/bench_matmul.py`)."""
    def product(left, right):
        lefts = tf.unstack(tf.squeeze(left, 0))
        rights = tf.unstack(tf.squeeze(right, 0) if right.shape.rank == 4
                            else right)
        products = tf.stack([matmul(a, b) for a, b in zip(lefts, rights)])
        # The weight gradient is [E, a, b]; the others keep the shard.
        return products if right.shape.rank == 4 else tf.expand_dims(
            products, 0)
    return product


def _compiled(function):
    return tf.function(function, jit_compile=True, reduce_retracing=True)


# Every product's candidates by name, each `(left, right) -> product`.
CANDIDATES = {
    "forward": {
        "tensorflow": _forward, "xla": _compiled(_forward),
        "per_expert": _per_expert(tf.matmul)},
    "weight_gradient": {
        "tensorflow": _weight_gradient, "xla": _compiled(_weight_gradient),
        "per_expert": _per_expert(
            lambda x, dy: tf.matmul(x, dy, transpose_a=True))},
    "input_gradient": {
        "tensorflow": _input_gradient,
        "tensorflow_transposed": _input_gradient_transposed,
        "xla": _compiled(_input_gradient),
        "per_expert": _per_expert(
            lambda dy, w: tf.matmul(dy, w, transpose_b=True))},
}
# "per_expert" builds E ops per product: a candidate up to this many
# experts (a bound on the graph's size), with one shard. The packed layout
# keeps the bound for stacked weights only (`packed_applies`).
PER_EXPERT_MAX_EXPERTS = 256


class ProductShape(NamedTuple):
    """What a kernel choice is made for (and cached by)."""

    product: str
    device: str
    dtype: str
    shards: int
    experts: int
    rows: int
    in_width: int   # a of `[S, E, C, a] x [E, a, b]`
    out_width: int  # b


_mode = None
_chosen = {}  # ProductShape -> name
_timings = {}  # ProductShape -> {name: seconds}


def set_mode(mode):
    """Sets how the experts' products pick their kernels, process-wide.

    Args:
        mode: "auto" (time the candidates once per shape, run the fastest),
            "tensorflow" (TensorFlow's kernels), "xla" (XLA-compiled) or
            "per_expert" (the packed layout, `choose_layout`).
    """
    global _mode
    if mode not in MODES:
        raise ValueError(f"The experts' kernel mode must be one of {MODES}, "
                         f"got {mode!r}.")
    _mode = mode


def get_mode():
    """The mode `set_mode` set, "auto" by default."""
    return _mode


def clear_measurements():
    """Forgets every choice made in "auto" mode (they are timed again)."""
    _chosen.clear()
    _timings.clear()


def measurements():
    """What "auto" mode chose: one dict per product shape (`ProductShape`)
    and per layout shape (`LayoutShape`, with "product": "layout"), with
    the seconds of every candidate (none where the choice was loaded
    without them or made without timing) and the one chosen."""
    return [dict({"product": "layout"}, **shape._asdict(),
                 seconds=dict(_timings[shape]), chosen=_chosen[shape])
            for shape in _timings]


def save_choices(path):
    """Writes every choice made so far, with its timings (`measurements()`),
    as JSON to `path`, for `load_choices`."""
    # Written whole, then renamed: a process that loads the file (another
    # host of the run) never reads half of it.
    partial = f"{path}.{os.getpid()}.partial"
    with open(partial, "w") as f:
        json.dump(measurements(), f, indent=1)
    os.replace(partial, path)


def load_choices(path):
    """Runs by the choices that `save_choices` wrote to `path`: a shape
    found there is not timed, so that a run repeated or resumed with the
    same seed runs the same kernels and adds in the same order. The file's
    choices replace those made for the same shapes in this process; load
    before the layers are first called."""
    with open(path) as f:
        entries = json.load(f)
    if not isinstance(entries, list):
        raise ValueError(f"Kernel choices {path!r}: expected a JSON list of "
                         f"what `save_choices` writes, got "
                         f"{type(entries).__name__}.")
    for entry in entries:
        shape, names = _parse_choice(entry, path)
        if entry.get("chosen") not in names:
            raise ValueError(
                f"Kernel choices {path!r}: {entry!r} chose "
                f"{entry.get('chosen')!r}, expected one of {names}.")
        _timings[shape] = dict(entry.get("seconds", {}))
        _chosen[shape] = entry["chosen"]


def _parse_choice(entry, path):
    """`(shape, names it can choose)` of one entry of `measurements()`."""
    fields = {key: value for key, value in entry.items()
              if key not in ("seconds", "chosen")}
    try:
        if fields.get("product") == "layout":
            del fields["product"]
            return LayoutShape(**fields), LAYOUTS
        return ProductShape(**fields), tuple(CANDIDATES[fields["product"]])
    except (TypeError, KeyError) as error:
        raise ValueError(f"Kernel choices {path!r}: {entry!r} is not a "
                         f"choice `save_choices` writes ({error}).") from None


def _choose_untimed_under_determinism(shape, name):
    """Chooses `name` for `shape`, untimed, if `shape` has no choice yet
    and TensorFlow's op determinism is on: a timing would make the choice
    (and with it the order of the sums) differ between runs."""
    enabled = getattr(tf_config, "is_op_determinism_enabled", None)
    if shape not in _chosen and enabled and enabled():
        _timings[shape], _chosen[shape] = {}, name


class Choice(NamedTuple):
    """The candidate (a key of `CANDIDATES[product]`) run for each
    product."""

    forward: str
    weight_gradient: str
    input_gradient: str

    def functions(self):
        """`(forward, weight_gradient, input_gradient)`, functions of
        `(x, w)`, `(x, dy)` and `(dy, w)`."""
        return tuple(CANDIDATES[product][name]
                     for product, name in zip(PRODUCTS, self))


def choose(shards, experts, rows, in_width, out_width, dtype,
           allow_xla=True):
    """The kernels to run `[S, E, C, a] x [E, a, b]`'s products on.

    Args:
        shards, experts, in_width, out_width: S, E, a and b.
        rows: C, or None when it is known only at run time; the kernels are
            then timed at `DEFAULT_ROWS`. (A caller that knows the expected
            rows per expert better passes them.)
        dtype: the operands' `tf.DType`.
        allow_xla: False where the program cannot run XLA-compiled
            functions: TensorFlow's kernels are used.

    Returns:
        A `Choice`.
    """
    mode = _mode if allow_xla else "tensorflow"
    if mode == "per_expert":  # The packed layout's; padded buffers here.
        mode = "tensorflow"
    if mode != "auto":
        return Choice(mode, mode, mode)
    device = device_type()
    return Choice(*(
        _choose(ProductShape(
            product, device, tf.as_dtype(dtype).name, int(shards),
            int(experts), int(rows or DEFAULT_ROWS), int(in_width),
            int(out_width)))
        for product in PRODUCTS))


class LayoutShape(NamedTuple):
    """What a layout choice is made for (and cached by): a layer of
    experts and the rows per expert."""

    device: str
    dtype: str
    experts: int
    rows: int  # of each expert in the packed layout
    model_dim: int
    hidden_width: int  # of the first matmul (2h for a glu expert)
    output_size: int
    expert_type: str
    # Of each expert's padded buffer where a fixed capacity sets them (each
    # layout is timed at the rows it computes); None: `rows`.
    padded_rows: Optional[int] = None
    # How the weights are held (`tf_moe.expert_weights`): each layout pays
    # a copy of them in one storage and not in the other.
    storage: str = "stacked"


def choose_layout(shape, make_candidates):
    """The buffer layout to run a layer of experts in: "padded" or
    "packed" (the module docstring).

    Args:
        shape: a `LayoutShape`; where `packed_applies(shape)` is false,
            always "padded".
        make_candidates: called once per shape in "auto" mode, eagerly:
            `experts -> {layout: (function, operands)}`, each function of
            the operands running the experts' forward pass on random
            operands with `experts` (at most `shape.experts`) experts.

    Returns:
        A name of `LAYOUTS`.
    """
    if not packed_applies(shape) or _mode in ("tensorflow", "xla"):
        return "padded"
    if _mode == "per_expert":
        return "packed"
    _choose_untimed_under_determinism(shape, "padded")
    if shape not in _chosen:
        with tf.init_scope(), tf.device(_timing_device()):
            rows = max(shape.rows, shape.padded_rows or 0)
            per_expert = rows * (shape.model_dim + shape.hidden_width
                                 + shape.output_size) + (
                shape.hidden_width + shape.output_size) * shape.model_dim
            experts = max(1, min(shape.experts,
                                 MAX_TIMED_ELEMENTS // per_expert))
            _timings[shape] = {
                layout: _time_calls(_with_gradients(function), operands)
                for layout, (function, operands)
                in make_candidates(experts).items()}
        _chosen[shape] = _faster_layout(_timings[shape])
    return _chosen[shape]


def packed_applies(shape):
    """Whether the packed layout is a candidate for `shape`, a
    `LayoutShape`: with stacked weights up to `PER_EXPERT_MAX_EXPERTS`,
    since the gradient of unstacking them into E slices stacks E gradients
    back into one `[E, ...]` tensor, a copy of every weight each step (4.3
    GB at E=1,024, d=512, h=1,024); weights held per expert have no such
    copy, and their layer already holds E variables of each, so any E."""
    return (shape.storage == "per_expert"
            or shape.experts <= PER_EXPERT_MAX_EXPERTS)


def _faster_layout(seconds):
    """"packed" unless "padded" times `REQUIRED_SPEEDUP` faster.

    Both are timed at what they compute: the packed layout at the rows
    kept, the padded one with the padding and overflow group of a typical
    plan (`tf_moe.experts.Experts.layout`). The margin is for what a lone
    timing leaves out: packed is the per-expert dispatcher's form, with no
    plan of capacities to make; and at E=64, d=512, h=1024, 512 rows, the
    padded layout once timed 8% faster alone (at balanced rows) and made
    the dropless step 16% slower.
    """
    if seconds["padded"] < (1 - REQUIRED_SPEEDUP) * seconds["packed"]:
        return "padded"
    return "packed"


def _with_gradients(function):
    """`function`'s forward and backward pass, to a scalar."""
    @tf.function
    def run(*operands):
        # Symbolic gradients, not a tape: the timing runs under
        # `tf.init_scope`, which stops every tape of the thread.
        output = tf.reduce_sum(function(*operands))
        return tf.add_n([tf.reduce_sum(g)
                         for g in tf.gradients(output, operands)])
    return run


def device_type():
    return "GPU" if tf.config.list_logical_devices("GPU") else "CPU"


def _timing_device():
    return tf.config.list_logical_devices(device_type())[0].name


def _choose(shape):
    _choose_untimed_under_determinism(shape, "tensorflow")
    if shape not in _chosen:
        # Eagerly, outside any function being traced, on a plain device
        # (not a DTensor mesh's).
        with tf.init_scope(), tf.device(_timing_device()):
            _timings[shape] = {
                name: _time(candidate, shape)
                for name, candidate in CANDIDATES[shape.product].items()
                if _applies(name, shape)}
        _chosen[shape] = _fastest(_timings[shape])
    return _chosen[shape]


def _applies(name, shape):
    """Whether candidate `name` can run `shape` (see "per_expert")."""
    return name != "per_expert" or (
        shape.shards == 1 and shape.experts <= PER_EXPERT_MAX_EXPERTS)


def _fastest(seconds):
    """The fastest candidate, "tensorflow" unless another beats it by
    `REQUIRED_SPEEDUP`."""
    fastest = min(seconds, key=seconds.get)
    if seconds[fastest] < (1 - REQUIRED_SPEEDUP) * seconds["tensorflow"]:
        return fastest
    return "tensorflow"


def _time(candidate, shape):
    return _time_calls(_summed(candidate), _operands(shape))


def _time_calls(function, operands):
    """Seconds of the fastest of `TIMED_CALLS` calls, after a warm-up."""
    function(*operands).numpy()
    times = []
    for _ in range(TIMED_CALLS):
        start = time.perf_counter()
        function(*operands).numpy()
        times.append(time.perf_counter() - start)
    return min(times)


@functools.lru_cache(maxsize=None)
def _summed(candidate):
    # A scalar out, so that timing does not include copying the product.
    return tf.function(lambda left, right: tf.reduce_sum(candidate(
        left, right)))


def _operands(shape):
    """Random operands of the product, on at most `MAX_TIMED_ELEMENTS`:
    all of `shape.experts`, or fewer of the same shape."""
    s, c, a, b = shape.shards, shape.rows, shape.in_width, shape.out_width
    per_expert = s * c * (a + b) + a * b
    experts = max(1, min(shape.experts, MAX_TIMED_ELEMENTS // per_expert))
    x = [s, experts, c, a]
    w = [experts, a, b]
    dy = [s, experts, c, b]
    left, right = {"forward": (x, w), "weight_gradient": (x, dy),
                   "input_gradient": (dy, w)}[shape.product]
    rng = np.random.default_rng(0)
    return tuple(tf.cast(rng.standard_normal(operand, np.float32),
                         shape.dtype) for operand in (left, right))


set_mode(os.environ.get("TF_MOE_EXPERT_KERNELS", "auto"))
