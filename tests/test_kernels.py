"""The kernels of the experts' products, and their choice by measurement."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_moe
from tf_moe import kernels
from tf_moe import plan as plan_lib

E, C, A, B = 3, 4, 5, 6


def _operands_and_products(S):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(S, E, C, A)).astype(np.float32)
    w = rng.normal(size=(E, A, B)).astype(np.float32)
    dy = rng.normal(size=(S, E, C, B)).astype(np.float32)
    return {
        "forward": ((x, w), np.einsum("seca,eab->secb", x, w)),
        "weight_gradient": ((x, dy), np.einsum("seca,secb->eab", x, dy)),
        "input_gradient": ((dy, w), np.einsum("secb,eab->seca", dy, w)),
    }


@pytest.mark.parametrize("product,name,shards", [
    (product, name, shards) for product in kernels.PRODUCTS
    for name in kernels.CANDIDATES[product] for shards in (1, 2)
    if kernels._applies(name, kernels.ProductShape(
        product, "CPU", "float32", shards, E, C, A, B))])
def test_every_candidate_computes_its_product(product, name, shards):
    (left, right), expected = _operands_and_products(shards)[product]
    actual = kernels.CANDIDATES[product][name](tf.constant(left),
                                               tf.constant(right))
    np.testing.assert_allclose(actual.numpy(), expected, rtol=1e-5,
                               atol=1e-5)


def _fake_timings(monkeypatch, seconds_of):
    """Every candidate "timed" at `seconds_of(shape, name)`; returns the
    list of the shapes timed."""
    timed = []

    def fake_time(candidate, shape):
        timed.append(shape)
        name, = [n for n, c in kernels.CANDIDATES[shape.product].items()
                 if c is candidate]
        return seconds_of(shape, name)

    monkeypatch.setattr(kernels, "_time", fake_time)
    return timed


def test_auto_runs_the_fastest_candidate_and_times_each_shape_once(
        kernel_mode, monkeypatch):
    kernel_mode("auto")
    seconds = {"forward": {"tensorflow": 2.0, "xla": 1.0, "per_expert": 3.0},
               "weight_gradient": {"tensorflow": 1.0, "xla": 2.0,
                                   "per_expert": 1.0},
               "input_gradient": {"tensorflow": 3.0,
                                  "tensorflow_transposed": 1.0, "xla": 2.0,
                                  "per_expert": 2.0}}
    timed = _fake_timings(
        monkeypatch, lambda shape, name: seconds[shape.product][name])
    chosen = kernels.choose(1, 8, None, 16, 32, tf.float32)
    assert chosen == ("xla", "tensorflow", "tensorflow_transposed")
    assert len(timed) == 10
    assert {shape.rows for shape in timed} == {kernels.DEFAULT_ROWS}
    assert kernels.choose(1, 8, None, 16, 32, tf.float32) == chosen
    assert len(timed) == 10  # Cached.
    kernels.choose(1, 8, 64, 16, 32, tf.float32)
    assert len(timed) == 20  # A new shape is timed.
    # Too many experts (or shards) for one op per expert: not a candidate.
    kernels.choose(1, kernels.PER_EXPERT_MAX_EXPERTS + 1, 64, 16, 32,
                   tf.float32)
    kernels.choose(2, 8, 64, 16, 32, tf.float32)
    assert len(timed) == 34
    report = kernels.measurements()
    assert [m["chosen"] for m in report[:3]] == [
        "xla", "tensorflow", "tensorflow_transposed"]
    assert report[0]["seconds"] == seconds["forward"]


@pytest.mark.parametrize("storage", ["stacked", "per_expert"])
@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
def test_auto_chooses_by_timing_inside_a_traced_layer(kernel_mode, policy,
                                                      storage):
    keras.config.set_dtype_policy(policy)
    layer = tf_moe.MoE(4, 8, k=2, seed=0, expert_storage=storage)
    tokens = tf.random.normal((32, 6))
    expected = layer(tokens, training=False)
    kernel_mode("auto")
    actual = tf.function(lambda x: layer(x, training=False))(tokens)
    tolerance = 1e-5 if policy == "float32" else 2e-2
    np.testing.assert_allclose(actual.numpy(), expected.numpy(),
                               rtol=tolerance, atol=tolerance)
    report = kernels.measurements()
    # The layout, and the padded layout's two expert layers (6 -> 8,
    # 8 -> 6), three products each, timed at the rows of a balanced
    # routing in the compute dtype.
    layouts = [m for m in report if m["product"] == "layout"]
    products = [m for m in report if m["product"] != "layout"]
    assert len(layouts) == 1 and len(products) == 6
    assert set(layouts[0]["seconds"]) == set(kernels.LAYOUTS)
    assert layouts[0]["chosen"] == kernels._faster_layout(
        layouts[0]["seconds"])
    for measured in products:
        assert measured["chosen"] == kernels._fastest(measured["seconds"])
    for measured in report:
        assert measured["rows"] == plan_lib.balanced_rows(32, 4, 2) == 16
        assert measured["dtype"] == layer.compute_dtype
        assert all(s > 0 for s in measured["seconds"].values())


def test_padded_layout_is_timed_at_a_fixed_capacity(kernel_mode):
    # Capacity factor 2: the padded buffers have ceil(2 * 2 * 32 / 4) = 32
    # rows per expert, twice the 16 kept rows of a balanced routing that
    # the packed layout computes.
    layer = tf_moe.MoE(4, 8, k=2, capacity_factor=2.0, seed=0)
    tokens = tf.random.normal((32, 6))
    layer(tokens[:8], training=False)
    kernel_mode("auto")
    tf.function(lambda x: layer(x, training=False))(tokens)
    layout, = [m for m in kernels.measurements() if m["product"] == "layout"]
    assert layout["rows"] == 16 and layout["padded_rows"] == 32
    # Capacity factor 0.5: 8 rows per expert, which both layouts keep.
    kernels.clear_measurements()
    tf_moe.MoE(4, 8, k=2, capacity_factor=0.5, seed=0)(tokens,
                                                       training=False)
    layout, = [m for m in kernels.measurements() if m["product"] == "layout"]
    assert layout["rows"] == 8 and layout["padded_rows"] == 8
    # Dropless: both at the balanced rows.
    kernels.clear_measurements()
    tf_moe.MoE(4, 8, k=2, seed=0)(tokens, training=False)
    layout, = [m for m in kernels.measurements() if m["product"] == "layout"]
    assert layout["rows"] == 16 and layout["padded_rows"] is None


@pytest.mark.parametrize("storage", ["stacked", "per_expert"])
def test_dropless_padded_layout_is_timed_with_its_padding_and_overflow(
        storage, kernel_mode, monkeypatch):
    # The padded candidate runs the buffers a dropless plan makes for a
    # balanced routing (`typical_dropless_buffers`), not the balanced rows.
    # Both take the weights as the storage holds them: 4 `[E, ...]`
    # tensors, or 64 of each.
    kernel_mode("auto")
    experts = tf_moe.Experts(64, 8, output_size=6, storage=storage)
    experts.build((None, 6))
    candidates = {}
    shapes = []
    monkeypatch.setattr(
        kernels, "choose_layout",
        lambda shape, make: shapes.append(shape) or candidates.update(
            make(shape.experts)) or "padded")
    experts.layout(32, tf.float32)
    assert shapes[0].storage == storage
    weight_operands = 4 * (1 if storage == "stacked" else 64)
    capacity, overflow_experts, overflow_rows = (
        plan_lib.typical_dropless_buffers(32 * 64, 64))
    assert overflow_experts > 0 and overflow_rows > 0
    run_padded, padded_operands = candidates["padded"]
    main, overflow = padded_operands[:2]
    assert main.shape == (1, 64, capacity, 6)
    assert overflow.shape == (overflow_experts, overflow_rows, 6)
    assert run_padded(*padded_operands).shape == ()
    assert len(padded_operands) == 2 + weight_operands
    run_packed, packed_operands = candidates["packed"]
    assert len(packed_operands) == 1 + weight_operands
    assert packed_operands[0].shape == (64 * 32, 6)
    assert run_packed(*packed_operands).shape == (64 * 32, 6)


def test_other_kernels_must_beat_tensorflows_by_the_required_speedup():
    margin = 1 - kernels.REQUIRED_SPEEDUP
    assert kernels._fastest({"tensorflow": 1.0, "xla": 0.99 * margin}) == (
        "xla")
    assert kernels._fastest({"tensorflow": 1.0, "xla": 1.01 * margin}) == (
        "tensorflow")
    assert kernels._fastest({"tensorflow": 1.0, "xla": 0.5,
                             "tensorflow_transposed": 0.4}) == (
        "tensorflow_transposed")


def test_forced_modes_and_programs_without_xla(kernel_mode):
    kernel_mode("xla")
    chosen = kernels.choose(1, 4, 8, 2, 3, tf.float32)
    assert chosen == ("xla",) * 3
    assert chosen.functions() == tuple(
        kernels.CANDIDATES[p]["xla"] for p in kernels.PRODUCTS)
    kernel_mode("auto")
    assert kernels.choose(1, 4, 8, 2, 3, tf.float32, allow_xla=False) == (
        "tensorflow",) * 3
    assert kernels.measurements() == []


def test_layout_is_timed_once_per_shape_and_the_faster_runs(kernel_mode):
    kernel_mode("auto")
    shape = kernels.LayoutShape("CPU", "float32", 8, 16, 4, 6, 4, "ffn")
    built = []
    matrix = tf.random.normal((256, 256))

    def make_candidates(experts):
        built.append(experts)
        x = tf.random.normal((experts, 4))

        def slow(x):  # Twenty 256 x 256 products against one addition.
            product = matrix
            for _ in range(20):
                product = tf.matmul(product, matrix) / 256.0
            return x * tf.reduce_mean(product)

        return {"padded": (slow, (x,)), "packed": (lambda x: x + 1.0, (x,))}

    assert kernels.choose_layout(shape, make_candidates) == "packed"
    assert kernels.choose_layout(shape, make_candidates) == "packed"
    assert built == [8]  # Timed once, on all 8 experts.
    report, = kernels.measurements()
    assert report["product"] == "layout" and report["chosen"] == "packed"
    assert report["seconds"]["packed"] < report["seconds"]["padded"]
    # More stacked experts than one op each allows: padded, untimed; held
    # per expert, the packed layout stays a candidate at any count.
    many = shape._replace(experts=kernels.PER_EXPERT_MAX_EXPERTS + 1)
    assert kernels.choose_layout(many, make_candidates) == "padded"
    assert kernels.choose_layout(many._replace(storage="per_expert"),
                                 make_candidates) == "packed"
    assert built == [8, 257]
    for mode, layout in [("tensorflow", "padded"), ("xla", "padded"),
                         ("per_expert", "packed")]:
        kernel_mode(mode)
        assert kernels.choose_layout(shape._replace(rows=3),
                                     make_candidates) == layout
    assert built == [8, 257]
    # "per_expert" runs TensorFlow's kernels on padded buffers.
    assert kernels.choose(1, 4, 8, 2, 3, tf.float32) == ("tensorflow",) * 3


def test_padded_must_beat_packed_by_the_required_speedup():
    margin = 1 - kernels.REQUIRED_SPEEDUP
    assert kernels._faster_layout({"packed": 1.0,
                                   "padded": 0.99 * margin}) == "padded"
    assert kernels._faster_layout({"packed": 1.0,
                                   "padded": 1.01 * margin}) == "packed"


def test_saved_choices_are_loaded_and_run_without_timing(kernel_mode,
                                                         monkeypatch,
                                                         tmp_path, request):
    kernel_mode("auto")
    _fake_timings(monkeypatch,
                  lambda shape, name: 0.5 if name == "xla" else 1.0)
    chosen = kernels.choose(1, 8, 64, 16, 32, tf.float32)
    assert chosen == ("xla",) * 3
    layout_shape = kernels.LayoutShape("CPU", "float32", 8, 16, 4, 6, 4,
                                       "ffn")
    x = tf.zeros((8, 4))
    layout = kernels.choose_layout(layout_shape, lambda experts: {
        "padded": (lambda x: x, (x,)), "packed": (lambda x: x, (x,))})
    path = str(tmp_path / "choices.json")
    kernels.save_choices(path)
    saved = kernels.measurements()

    kernels.clear_measurements()
    request.getfixturevalue("no_kernel_timing")  # From here on.
    kernels.load_choices(path)
    assert kernels.measurements() == saved
    assert kernels.choose(1, 8, 64, 16, 32, tf.float32) == chosen
    assert kernels.choose_layout(layout_shape, None) == layout
    with pytest.raises(AssertionError, match="timed"):  # Not in the file.
        kernels.choose(1, 8, 32, 16, 32, tf.float32)


@pytest.mark.parametrize("content,message", [
    ({"forward": "xla"}, "expected a JSON list"),
    ([{"product": "forward", "device": "CPU", "chosen": "xla"}],
     "is not a choice"),
    ([dict(product="forward", device="CPU", dtype="float32", shards=1,
           experts=8, rows=64, in_width=16, out_width=32, seconds={},
           chosen="cublas")], "expected one of"),
    ([dict(product="layout", device="CPU", dtype="float32", experts=8,
           rows=16, model_dim=4, hidden_width=6, output_size=4,
           expert_type="ffn", chosen="xla")], "expected one of"),
])
def test_bad_choice_files_are_refused_naming_the_file(content, message,
                                                      kernel_mode, tmp_path):
    path = tmp_path / "choices.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=message) as error:
        kernels.load_choices(str(path))
    assert str(path) in str(error.value)


def test_op_determinism_chooses_without_timing(kernel_mode,
                                               no_kernel_timing):
    from tensorflow.python.framework import config as tf_config
    kernel_mode("auto")
    tf.config.experimental.enable_op_determinism()
    try:
        assert kernels.choose(1, 8, 64, 16, 32, tf.float32) == (
            "tensorflow",) * 3
        shape = kernels.LayoutShape("CPU", "float32", 8, 16, 4, 6, 4, "ffn")
        assert kernels.choose_layout(shape, None) == "padded"
    finally:
        tf_config.disable_op_determinism()
    assert {m["chosen"] for m in kernels.measurements()} == {
        "tensorflow", "padded"}


def test_set_mode_refuses_an_unknown_mode():
    with pytest.raises(ValueError, match="kernel mode must be one of"):
        kernels.set_mode("fastest")


def test_large_shapes_are_timed_on_fewer_experts_of_the_same_shape():
    large = kernels.ProductShape("forward", "CPU", "float32", 1, 1024, 32,
                                 512, 1024)
    x, w = kernels._operands(large)
    assert x.shape[1:] == (x.shape[1], 32, 512) and w.shape[1:] == (512, 1024)
    assert 1 <= x.shape[1] == w.shape[0] < 1024
    assert x.shape.num_elements() + w.shape.num_elements() <= (
        kernels.MAX_TIMED_ELEMENTS)
    small = large._replace(experts=4, rows=8, in_width=16, out_width=8)
    x, w = kernels._operands(small)
    assert x.shape == (1, 4, 8, 16) and w.shape == (4, 16, 8)


def _mixture_model():
    return keras.Sequential([keras.Input((6,)), tf_moe.MoE(4, 8, k=2,
                                                           seed=0),
                             keras.layers.Dense(1)])


def test_auto_on_a_one_device_mesh_equals_one_device(kernel_mode):
    """A one-device mesh may run XLA: "auto" times its kernels from inside
    DTensor's traced step, and the step is the one-device step."""
    from tf_moe import sharding
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 6)).astype("float32")
    y = rng.normal(size=(16, 1)).astype("float32")
    single = _mixture_model()
    single.compile(keras.optimizers.Adam(0.01), "mse")
    kernel_mode("auto")
    mesh = sharding.make_mesh("devices:1", devices=["CPU:0"])
    placement = sharding.MeshPlacement(mesh, batch_axis="devices",
                                       expert_axis="devices")
    with placement.scope():
        model = _mixture_model()
        optimizer = keras.optimizers.Adam(0.01)
    sharding.set_weights(model, single.get_weights())
    trainer = sharding.MeshTrainer(model, optimizer, "mse", placement)
    mesh_losses = [trainer.train_step(x, y) for _ in range(2)]
    assert len(kernels.measurements()) == 6
    kernel_mode("tensorflow")
    single_losses = [single.train_on_batch(x, y)[0] for _ in range(2)]
    np.testing.assert_allclose(mesh_losses, single_losses, rtol=1e-5)
