"""The translation main job: a small GNMT-MoE from English to Spanish on the
embedded verse-aligned Bibles, sized to train, evaluate BLEU and export in
minutes on 2 CPU cores."""

from configs.nmt import base


def get_config():
    config = base.base_config()
    config.data.vocab_size = 6000
    config.data.max_len = 64
    config.data.tokens_per_batch = 2048
    config.model.d_model = 128
    config.model.dropout = 0.1
    config.model.num_experts = 16
    config.model.k = 2
    config.model.expert_hidden = 256
    config.train.steps = 700
    config.train.learning_rate = 3e-3
    config.train.warmup_steps = 100
    config.train.constant_steps = 100
    config.train.log_every = 25
    config.train.checkpoint_every = 100
    config.decode.bleu_sentences = 300
    return config
