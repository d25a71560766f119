"""Every field of a language-model config, at the paper's values.

Configs build on `base_config()` and change what differs; a field not here
is an error (`--config.no_such_field=1` fails before training starts).
The paper (appendix C): embedding, LSTM and MoE all 512 wide; experts with
one ReLU hidden layer of 1024; k=4 (flat) or 2 per level (hierarchical);
w_importance = w_load = 0.1; Adam, 1000 warm-up steps then inverse-square-
root decay; a sampled softmax over its 793k-word vocabulary.
"""

import ml_collections
from ml_collections import config_dict


def base_config():
    config = ml_collections.ConfigDict()
    config.seed = 0

    config.data = data = ml_collections.ConfigDict()
    data.source = "embedded"  # "embedded", "text" or "lm1b".
    data.corpora = ("web",)  # For "embedded": trainers/corpora, interleaved.
    data.train_path = ""  # For source "text": one sentence per line.
    data.valid_path = ""
    data.test_path = ""
    data.tfds_data_dir = ""  # For source "lm1b" (tfds's default if empty).
    data.vocab_size = 32000  # SentencePiece pieces learned from train.
    data.vocab_sentences = 1_000_000  # Train sentences the vocab is learned on.
    data.max_len = 128  # Longer sentences (in pieces) are left out.
    data.tokens_per_batch = 8192  # Padded tokens per global batch.
    data.shuffle_buffer = 100_000

    config.model = model = ml_collections.ConfigDict()
    model.architecture = "lstm"  # Or "transformer" (configs/lm/transformer.py).
    # "lstm": the block list. "transformer": each Transformer block's
    # feed-forward sublayer ("moe", "hmoe" or "ffn").
    model.blocks = ("lstm", "moe", "lstm")
    model.d_model = 512
    model.dropout = 0.1
    # On the hidden units of every expert (and of dense "ffn" blocks) in
    # training: Switch Transformer's "expert dropout" (Fedus et al. 2021,
    # section 2.4), for models larger than their data.
    model.expert_dropout = 0.0
    model.num_experts = 32
    model.k = 4
    model.expert_hidden = 1024
    model.gating = "noisy_top_k"  # tf_moe's routers (README, Routers).
    model.noisy_gating = True
    model.normalize_gates = False  # "top_k": renormalise the k gates.
    model.balancing = ml_collections.config_dict.placeholder(str)  # Router's.
    model.aux_loss_weight = 0.01  # balancing="switch".
    model.expert_type = "ffn"  # Or "glu" (SwiGLU experts).
    model.importance_weight = 0.1
    model.load_weight = 0.1
    model.capacity_factor = ml_collections.config_dict.placeholder(float)
    # "stacked" or "per_expert" (tf_moe.MoE's expert_storage; not on a mesh).
    model.expert_storage = "stacked"
    model.num_groups = 16  # Hierarchical ("hmoe") blocks.
    model.experts_per_group = 16
    model.k_primary = 2
    model.k_secondary = 2
    model.ffn_hidden = (4096,)  # Dense "ffn" blocks (MoE-1-Wide / -Deep).
    model.projected_lstm_units = 2048  # "projected_lstm" (LSTM-2048-512).
    model.num_sampled = 0  # > 0: sampled softmax over this many classes.
    model.num_heads = 8  # Transformer attention.
    model.positions = "rotary"  # Transformer: "rotary" or "learned".
    model.max_positions = 512  # Learned positions' table.

    config.train = train = ml_collections.ConfigDict()
    train.steps = 27_000
    train.learning_rate = 1e-3
    # The routed experts' weights step at this times the rate (Adam;
    # tf_moe.optimizers): 1.0 is the paper's one rate for all,
    # "square_root" sqrt(k / E) of it for each MoE layer.
    train.expert_learning_rate_scale = config_dict.FieldReference(
        1.0, field_type=object)  # A number or a rule's name.
    train.warmup_steps = 1000
    train.constant_steps = 0  # At the peak rate before the decay.
    train.clip_norm = 1.0  # Global norm; 0 for none.
    train.log_every = 50
    train.checkpoint_every = 500
    train.checkpoints_to_keep = 3
    train.eval_every = 0  # 0: evaluate at the end only.
    # > 0: each evaluation also measures the first this many training
    # sentences (the learning curve's train_sample_perplexity_per_word).
    train.eval_train_sentences = 0

    config.sample = sample = ml_collections.ConfigDict()
    sample.max_tokens = 30
    sample.temperature = 1.0
    return config


def use_cpu_scale_training(config):
    """The embedded corpus and the budget of the CPU-scale families
    (table7.py and transformer.py ",cpu"): a 4,000-piece vocabulary, 1,000
    steps of 2,048 tokens; minutes per model on 2 cores."""
    config.data.vocab_size = 4000
    config.data.max_len = 96
    config.data.tokens_per_batch = 2048
    config.train.steps = 1000
    config.train.learning_rate = 3e-3
    config.train.warmup_steps = 100
    config.train.log_every = 100
    config.train.checkpoint_every = 1000


def get_config():
    """The base fields as a config of their own (a paper-scale MoE-32)."""
    return base_config()
