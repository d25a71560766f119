"""Every field of a translation config, at the paper's values.

Configs build on `base_config()` and change what differs; a field not here
is an error (`--config.no_such_field=1` fails before training starts).
The paper (section 5, appendix E): GNMT reduced to 3 encoder LSTM layers
(the first bidirectional) and 2 decoder layers, a MoE between encoder layers
2 and 3 and between decoder layers 1 and 2, additive attention, residual
connections around every LSTM and MoE layer, dropout 0.4, 32K shared
wordpieces, w_importance = w_load = 0.01, strictly balanced gating
(appendix F) for single-pair models; experts of about 2M parameters
(512 -> 2048 -> 512).
"""

import ml_collections
from ml_collections import config_dict


def base_config():
    config = ml_collections.ConfigDict()
    config.seed = 0

    config.data = data = ml_collections.ConfigDict()
    data.source = "embedded"  # "embedded", "text" or "wmt14".
    # Directions trained, "source-target" language codes. embedded: en, es
    # (World English Bible / Reina-Valera 1909); wmt14: en with fr or de.
    # More than one: a multilingual model (a target-language token leads
    # every source sentence).
    data.pairs = ("en-es",)
    # For source "text" (one pair): aligned files, one sentence per line.
    data.train_source_path = ""
    data.train_target_path = ""
    data.valid_source_path = ""
    data.valid_target_path = ""
    data.test_source_path = ""
    data.test_target_path = ""
    data.tfds_data_dir = ""  # For source "wmt14" (tfds's default if empty).
    data.vocab_size = 32000  # Shared SentencePiece pieces learned from train.
    data.vocab_sentences = 1_000_000  # Sentences (both sides) it learns on.
    data.max_len = 128  # Pairs with a longer side (in pieces) are left out.
    data.tokens_per_batch = 8192  # Padded tokens per global batch (a side).
    data.shuffle_buffer = 100_000

    config.model = model = ml_collections.ConfigDict()
    model.d_model = 512  # Embeddings, LSTMs, attention and the MoE's input.
    model.dropout = 0.4
    # On the hidden units of every expert (and of the dense baseline's
    # feed-forward layer) in training: Switch Transformer's "expert dropout"
    # (Fedus et al. 2021, section 2.4), for models larger than their data.
    model.expert_dropout = 0.0
    # What sits between encoder layers 2 and 3 and decoder layers 1 and 2:
    # "moe", "hmoe" (hierarchical) or "ffn" (the dense baseline).
    model.moe = "moe"
    model.num_experts = 32
    model.k = 4
    model.expert_hidden = 2048
    model.gating = "batchwise"  # Appendix F; or "noisy_top_k".
    model.noisy_gating = True  # For "noisy_top_k".
    model.importance_weight = 0.01
    model.load_weight = 0.01
    model.capacity_factor = ml_collections.config_dict.placeholder(float)
    # "stacked" or "per_expert" (tf_moe.MoE's expert_storage; not on a mesh).
    model.expert_storage = "stacked"
    model.num_groups = 16  # "hmoe".
    model.experts_per_group = 32
    model.k_primary = 2
    model.k_secondary = 2
    model.ffn_hidden = 8192  # "ffn": one hidden layer (= k experts' ops).

    config.train = train = ml_collections.ConfigDict()
    train.steps = 100_000
    train.learning_rate = 1e-3
    # The routed experts' weights step at this times the rate (Adam;
    # tf_moe.optimizers): 1.0 is the paper's one rate for all,
    # "square_root" sqrt(k / E) of it for each MoE layer.
    train.expert_learning_rate_scale = config_dict.FieldReference(
        1.0, field_type=object)  # A number or a rule's name.
    train.warmup_steps = 2000
    train.constant_steps = 8000  # At the peak rate before the decay.
    train.clip_norm = 1.0  # Global norm; 0 for none.
    train.log_every = 100
    train.checkpoint_every = 1000
    train.checkpoints_to_keep = 3
    train.eval_every = 0  # 0: evaluate at the end only.
    # > 0: each evaluation also measures the first this many usable training
    # pairs (the learning curve's train_sample_perplexity, per token).
    train.eval_train_pairs = 0

    config.decode = decode = ml_collections.ConfigDict()
    decode.beam_size = 4  # 1: greedy decoding.
    decode.length_penalty = 0.6  # GNMT's alpha: ((5 + |Y|) / 6) ** alpha.
    # Output at most max_length_ratio * source pieces + 10 pieces.
    decode.max_length_ratio = 2.0
    decode.batch_size = 64  # Sentences decoded together.
    decode.bleu_sentences = 0  # Evaluate BLEU on the first N (0: all).
    return config


def get_config():
    """The base fields as a config of their own (the paper's MoE-32)."""
    return base_config()
