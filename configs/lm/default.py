"""The main job's config: a small LSTM-MoE-LSTM on the embedded World
English Bible, sized to train, evaluate and export in minutes on 2 CPU
cores (README, first command)."""

from configs.lm import base


def get_config():
    config = base.base_config()
    config.data.vocab_size = 4000
    config.data.max_len = 96
    config.data.tokens_per_batch = 4096
    config.model.d_model = 128
    config.model.num_experts = 16
    config.model.k = 2
    config.model.expert_hidden = 256
    config.train.steps = 600
    config.train.learning_rate = 3e-3
    config.train.warmup_steps = 100
    config.train.log_every = 25
    config.train.checkpoint_every = 100
    return config
