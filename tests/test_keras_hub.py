"""tf_moe.keras_hub.sparsify: keras-hub's Mixtral and Qwen3-MoE models with
sparse MoE blocks, the same outputs and tokens as the dense originals."""

import keras
import numpy as np
import pytest

keras_hub = pytest.importorskip("keras_hub")  # The [keras-hub] extra.

import tf_moe  # noqa: E402
from tf_moe import keras_hub as tf_moe_keras_hub  # noqa: E402


def _mixtral(normalize=None):
    del normalize  # Mixtral always renormalises.
    return keras_hub.models.MixtralBackbone(
        vocabulary_size=61, num_layers=2, num_query_heads=4,
        num_key_value_heads=2, hidden_dim=16, intermediate_dim=12,
        num_experts=6, top_k=2, sliding_window=64)


def _qwen3_moe(normalize=False):
    return keras_hub.models.Qwen3MoeBackbone(
        vocabulary_size=61, num_layers=2, num_query_heads=4,
        num_key_value_heads=2, hidden_dim=16, intermediate_dim=24,
        moe_intermediate_dim=12, num_experts=6, head_dim=4, top_k=2,
        norm_top_k_prob=normalize)


BACKBONES = [(_mixtral, None), (_qwen3_moe, False), (_qwen3_moe, True)]
CAUSAL_LMS = {_mixtral: "MixtralCausalLM", _qwen3_moe: "Qwen3MoeCausalLM"}


def _inputs(seed=0, batch=3, length=9):
    rng = np.random.default_rng(seed)
    padding = np.ones((batch, length), bool)
    padding[1, 6:] = False
    return {"token_ids": rng.integers(1, 61, (batch, length)).astype("int32"),
            "padding_mask": padding}


def _blocks(backbone):
    return [block for decoder in backbone.transformer_layers
            for block in vars(decoder).values()
            if isinstance(block, keras.layers.Layer)
            and "MoeBlock" in type(block).__name__]


@pytest.mark.parametrize("make, normalize", BACKBONES)
def test_sparse_backbone_gives_the_same_outputs(make, normalize):
    keras.utils.set_random_seed(0)
    backbone = make(normalize)
    inputs = _inputs()
    expected = backbone(inputs)
    sparse = tf_moe_keras_hub.sparsify(backbone)

    assert type(sparse) is type(backbone)
    np.testing.assert_allclose(sparse(inputs), expected, rtol=1e-5,
                               atol=1e-5)
    blocks = _blocks(sparse)
    assert len(blocks) == 2
    assert all(isinstance(b, tf_moe_keras_hub.SparseMoeBlock) for b in blocks)
    # Only the routed pairs were computed: k experts per position.
    for block in blocks:
        assert block.moe.normalize_gates == (normalize is not False)
        assert int(np.sum(block.moe.expert_token_counts)) == 3 * 9 * 2
    # The dense experts are gone from the copy, and the original is intact.
    assert not any("expert_feedforward" in w.path for w in sparse.weights)
    assert all(not isinstance(b, tf_moe_keras_hub.SparseMoeBlock)
               for b in _blocks(backbone))
    np.testing.assert_allclose(backbone(inputs), expected)


@pytest.mark.parametrize("make", [_mixtral, _qwen3_moe])
def test_greedy_generate_gives_the_same_tokens(make):
    keras.utils.set_random_seed(1)
    causal_lm = getattr(keras_hub.models, CAUSAL_LMS[make])(
        backbone=make(), preprocessor=None)
    causal_lm.compile(sampler="greedy")
    prompt = {"token_ids": np.array([[5, 7, 9, 0, 0, 0, 0, 0, 0, 0]] * 2,
                                    "int32"),
              "padding_mask": np.array([[1, 1, 1] + [0] * 7] * 2, bool)}
    expected = causal_lm.generate(prompt, stop_token_ids=None)
    sparse = tf_moe_keras_hub.sparsify(causal_lm)
    sparse.compile(sampler="greedy")
    got = sparse.generate(prompt, stop_token_ids=None)
    np.testing.assert_array_equal(got["token_ids"], expected["token_ids"])
    logits = sparse(prompt)
    np.testing.assert_allclose(logits, causal_lm(prompt), rtol=1e-5,
                               atol=1e-5)


def test_saved_sparse_model_loads_and_sparsifies_again(tmp_path):
    keras.utils.set_random_seed(2)
    sparse = tf_moe_keras_hub.sparsify(_qwen3_moe(True))
    inputs = _inputs(seed=3)
    expected = sparse(inputs)
    path = str(tmp_path / "sparse.keras")
    sparse.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(loaded(inputs), expected, rtol=1e-5,
                               atol=1e-5)
    again = tf_moe_keras_hub.sparsify(loaded)
    np.testing.assert_allclose(again(inputs), expected, rtol=1e-5, atol=1e-5)


def test_models_without_supported_moe_blocks_are_refused():
    gpt2 = keras_hub.models.GPT2Backbone(
        vocabulary_size=61, num_layers=1, num_heads=2, hidden_dim=8,
        intermediate_dim=16, max_sequence_length=16)
    with pytest.raises(ValueError, match="no MoE block"):
        tf_moe_keras_hub.sparsify(gpt2)
    with pytest.raises(ValueError, match="Backbone or CausalLM"):
        tf_moe_keras_hub.sparsify(tf_moe.MoE(4, 8))


def test_benchmark_writes_table_and_json(tmp_path):
    import json
    import os
    import subprocess
    import sys
    output = tmp_path / "keras_hub.json"
    bench = os.path.join(os.path.dirname(__file__), "..", "bench",
                         "bench_keras_hub.py")
    result = subprocess.run(
        [sys.executable, bench, "--experts=4", "--hidden_dim=16",
         "--intermediate_dim=8", "--num_layers=1", "--batch=2",
         "--length=8", "--steps=1", "--warmup=1", f"--output={output}"],
        capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| 4 |" in result.stdout
    (pair,) = json.loads(output.read_text())["rows"]
    # The same parameters, dense or sparse.
    assert pair["dense"]["parameters"] == pair["sparse"]["parameters"]
    assert pair["sparse"]["step_seconds"] > 0
