"""keras-hub's MoE models made sparse: `sparsify(model)`.

keras-hub's Mixtral and Qwen3-MoE blocks run every expert on every token
and weight the outputs by a mostly-zero gate matrix (`einsum("th,ehm->etm")`
over all experts). `sparsify` returns a copy of a keras-hub backbone or
CausalLM in which each of those blocks is a `tf_moe.MoE` holding the same
weights and routing exactly as the original: softmax over the router
logits, the top k, renormalised or not as the model's config says; the
experts are SwiGLU (`expert_type="glu"`). Only the routed (token, expert)
pairs are computed.

    import keras_hub, tf_moe.keras_hub
    model = keras_hub.models.MixtralCausalLM.from_preset(...)
    sparse = tf_moe.keras_hub.sparsify(model)   # same class, same outputs

The layer keeps the block's interface (`(hidden_states, attention_mask)
-> (outputs, router_logits)`); its balancing loss is tf_moe's Switch term
with the block's coefficient (over all positions, padding included, where
keras-hub's leaves padding out), and the jitter the block's.

A saved sparse model (`.keras`) loads as the original class, dense again
with the same weights (keras-hub rebuilds its blocks from the config, and
the sparse blocks save their weights in the dense blocks' layout too);
`sparsify(keras.saving.load_model(path))` makes it sparse again.

Needs keras-hub (`pip install "tf_moe[keras-hub]"`); this module imports it
only inside `sparsify`.
"""

import keras
import numpy as np
import tensorflow as tf

from tf_moe import distribution
from tf_moe.moe import MoE


class _SavedAs(keras.layers.Layer):
    """Stands, in a saved file, for a layer of the keras-hub block that a
    `SparseMoeBlock` replaced: it saves (and loads) the sparse layer's
    weights as that layer's variables, so that the file loads into the
    original model class."""

    def __init__(self, save, load, **kwargs):
        super().__init__(**kwargs)
        self._save, self._load = save, load
        self.built = True

    def save_own_variables(self, store):
        for index, array in enumerate(self._save()):
            store[str(index)] = array

    def load_own_variables(self, store):
        self._load([store[str(index)] for index in range(len(store))])


class SparseMoeBlock(keras.layers.Layer):
    """A keras-hub MoE block's interface over a `tf_moe.MoE`.

    Saved, it writes its weights in the original block's layout too (the
    router as `_sparse_feedforward_gate_dense`, the experts as
    `expert_bank`), which is what keras-hub reads back.

    Args:
        moe: the `tf_moe.MoE`.
        expert_bank_split: `kernel_in -> [arrays]`, the expert bank's
            variables before its output kernel (keras-hub's layout).

    Call arguments:
        hidden_states: `[batch, time, d]`.
        attention_mask: the decoder's padding mask (not used for routing:
            every position is routed, as in the original block).
        training: training mode (jitter, balancing losses).

    Returns:
        `(outputs [batch, time, d], router_logits [batch * time, E])`.
    """

    def __init__(self, moe, expert_bank_split=None, **kwargs):
        super().__init__(**kwargs)
        self.moe = moe
        split = expert_bank_split or (lambda kernel_in: [kernel_in])

        def save_bank():  # The experts exist once the layer is built.
            experts = moe.experts
            return split(_numpy(experts.kernel_in)) + [
                _numpy(experts.kernel_out)]

        def load_bank(arrays):
            experts = moe.experts
            distribution.assign(experts.kernel_in,
                                np.concatenate(arrays[:-1], axis=-1))
            distribution.assign(experts.kernel_out, arrays[-1])

        self._sparse_feedforward_gate_dense = _SavedAs(
            lambda: [_numpy(moe.gate.gate_kernel)],
            lambda arrays: distribution.assign(moe.gate.gate_kernel,
                                               arrays[0]),
            name="sparse_feedforward_gate_dense")
        self.expert_bank = _SavedAs(save_bank, load_bank, name="experts")

    def build(self, input_shape):
        self.moe.build(input_shape)

    def call(self, hidden_states, attention_mask=None, training=None):
        del attention_mask  # Every position is routed, as in keras-hub.
        outputs = self.moe(hidden_states, training=training)
        tokens = tf.reshape(hidden_states, [-1, hidden_states.shape[-1]])
        router_logits = tf.matmul(tf.cast(tokens, self.moe.gate.compute_dtype),
                                  self.moe.gate.kernel)
        return outputs, tf.cast(router_logits, hidden_states.dtype)


def _numpy(variable):
    return distribution.to_numpy(variable)


def _mixtral(block):
    """`(MoE arguments, router kernel, kernel_in, kernel_out, expert bank
    split)` of a MixtralSparseMoeBlock."""
    bank = block.expert_bank
    kernel_in = np.concatenate(  # W_gate | W_up, tf_moe's glu layout.
        [_numpy(bank._expert_feedforward_gate_dense),
         _numpy(bank._expert_feedforward_intermediate_dense)], axis=-1)
    arguments = dict(normalize_gates=True,
                     aux_loss_weight=block.router_aux_loss_coef,
                     router_jitter=block.router_jitter_noise,
                     activation=bank.activation)
    return (arguments, _numpy(block._sparse_feedforward_gate_dense.kernel),
            kernel_in, _numpy(bank._expert_feedforward_output_dense),
            lambda kernel_in: np.split(kernel_in, 2, axis=-1))


def _qwen3_moe(block):
    """The same for a Qwen3SparseMoeBlock (its W_gate | W_up is already
    one weight)."""
    bank = block.expert_bank
    arguments = dict(normalize_gates=bool(block.norm_top_k_prob),
                     aux_loss_weight=block.router_aux_loss_coefficient,
                     activation=bank.activation)
    return (arguments, _numpy(block._sparse_feedforward_gate_dense.kernel),
            _numpy(bank._expert_feedforward_gate_dense),
            _numpy(bank._expert_feedforward_output_dense), None)


# The MoE blocks sparsify converts, by class name.
_CONVERTERS = {"MixtralSparseMoeBlock": _mixtral,
               "Qwen3SparseMoeBlock": _qwen3_moe}
# Known MoE blocks it cannot convert, and why.
_UNSUPPORTED = {
    "QwenSparseMoeBlock": "its shared expert is scaled by a sigmoid gate of "
                          "its own, which tf_moe's shared experts do not "
                          "have",
}


def _sparse_block(block):
    arguments, router, kernel_in, kernel_out, split = _CONVERTERS[
        type(block).__name__](block)
    num_experts, model_dim, double_hidden = kernel_in.shape
    moe = MoE(num_experts, double_hidden // 2, k=block.top_k, gating="top_k",
              balancing="switch", expert_type="glu", dtype=block.dtype_policy,
              name="moe", **arguments)
    wrapper = SparseMoeBlock(moe, split, dtype=block.dtype_policy,
                             name=block.name)
    wrapper.build((None, None, model_dim))
    moe.gate.gate_kernel.assign(router)
    moe.experts.kernel_in.assign(kernel_in)
    moe.experts.kernel_out.assign(kernel_out)
    return wrapper


def _replace(layer, name, new):
    """Sets `layer.<name> = new` on a built layer, untracking the old."""
    old = getattr(layer, name)
    layer._tracker.unlock()
    try:
        setattr(layer, name, new)
    finally:
        layer._tracker.lock()
    layer._layers[:] = [sub for sub in layer._layers if sub is not old]


def _moe_blocks(decoder):
    """`[(attribute name, block)]`: the decoder's MoE blocks."""
    found = []
    for name, value in vars(decoder).items():
        kind = type(value).__name__
        if kind in _UNSUPPORTED:
            raise ValueError(f"`model` has a {kind} (in {decoder.name}), "
                             f"which sparsify cannot convert: "
                             f"{_UNSUPPORTED[kind]}.")
        if kind in _CONVERTERS:
            found.append((name, value))
    return found


def sparsify(model):
    """A copy of a keras-hub MoE model with every MoE block sparse.

    Args:
        model: a keras-hub Backbone or CausalLM of a supported kind
            (Mixtral, Qwen3-MoE), built. Left unchanged.

    Returns:
        A new model of the same class and weights whose MoE blocks are
        `SparseMoeBlock`s over `tf_moe.MoE` layers.

    Raises:
        ValueError: `model` is not a keras-hub model with supported MoE
            blocks.
    """
    import keras_hub  # noqa: F401  (the models' classes must be registered)

    backbone = getattr(model, "backbone", model)
    decoders = getattr(backbone, "transformer_layers", None)
    if decoders is None:
        raise ValueError(
            "`model` must be a keras-hub Backbone or CausalLM with "
            f"transformer layers, got {type(model).__name__}.")
    if not any(_moe_blocks(decoder) for decoder in decoders):
        raise ValueError(
            f"`model` ({type(model).__name__}) has no MoE block sparsify "
            f"converts; supported: {sorted(_CONVERTERS)}.")
    copy = model.__class__.from_config(model.get_config())
    copy.set_weights(model.get_weights())
    for decoder in getattr(copy, "backbone", copy).transformer_layers:
        for name, block in _moe_blocks(decoder):
            _replace(decoder, name, _sparse_block(block))
    return copy
