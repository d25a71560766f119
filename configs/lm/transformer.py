"""Decoder-only Transformer language models with MoE feed-forward layers.

    --config=configs/lm/transformer.py:mixtral-8              paper-like, lm1b
    --config=configs/lm/transformer.py:mixtral-8,cpu          CPU scale
    --config=configs/lm/transformer.py:moe-32,cpu,every-other MoE in every
                                                              other block

Every model is pre-norm with rotary positions and differs only in its
feed-forward sublayers, all at the same ops/timestep: each token runs
through `F = 8 * d_model` hidden units of feed-forward per block (the
paper's four experts of 1024 at d = 512):

    dense       a ReLU FFN of F hidden units
    moe-32      the paper's noisy top-4 of 32 experts of F/4, importance
                and load losses (0.1 each)
    switch-32   Switch (Fedus et al., 2021): top-1 of 32 experts of F,
                softmax gate, the Switch loss (0.01)
    mixtral-8   Mixtral (Jiang et al., 2024): top-2 of 8 SwiGLU experts of
                F/3 (a GLU expert has three matrices), the two gates
                renormalised, the Switch loss (0.01)
    moe-256-h   hierarchical, 16 groups of 16 experts of F/4, noisy top-2
                at each level

Options after the model: "cpu" (every width / 8: d = 64, 4 blocks of 4
heads, the embedded corpus, 1000 steps; minutes here) and "every-other" (the
odd blocks keep the dense FFN, as GShard and Switch).
"""

from configs.lm import base

MODELS = ("dense", "moe-32", "switch-32", "mixtral-8", "moe-256-h")
OPTIONS = ("cpu", "every-other")


def _feed_forward(model, name):
    """Sets the feed-forward fields of `model` for `name`; returns the kind
    of sublayer ("ffn", "moe" or "hmoe")."""
    width = 8 * model.d_model
    model.ffn_hidden = (width,)
    if name == "dense":
        return "ffn"
    if name == "moe-32":
        model.num_experts, model.k = 32, 4
        model.expert_hidden = width // 4
        return "moe"
    if name == "switch-32":
        model.gating, model.balancing = "top_k", "switch"
        model.num_experts, model.k = 32, 1
        model.expert_hidden = width
        return "moe"
    if name == "mixtral-8":
        model.gating, model.balancing = "top_k", "switch"
        model.normalize_gates = True
        model.expert_type = "glu"
        model.num_experts, model.k = 8, 2
        model.expert_hidden = round(width / 3)
        return "moe"
    model.num_groups = model.experts_per_group = 16
    model.k_primary = model.k_secondary = 2
    model.expert_hidden = width // 4
    return "hmoe"


def get_config(spec="mixtral-8"):
    name, *options = spec.split(",")
    if name not in MODELS:
        raise ValueError(f"transformer model must be one of {MODELS}, got "
                         f"{name!r}.")
    for option in options:
        if option not in OPTIONS:
            raise ValueError(f"transformer config option must be one of "
                             f"{OPTIONS}, got {option!r}.")
    config = base.base_config()
    model = config.model
    model.architecture = "transformer"
    if "cpu" in options:
        model.d_model, model.num_heads, num_blocks = 64, 4, 4
        base.use_cpu_scale_training(config)
    else:
        model.d_model, model.num_heads, num_blocks = 512, 8, 6
        config.data.source = "lm1b"
        config.data.tokens_per_batch = 65_536
        model.num_sampled = 8192
    kind = _feed_forward(model, name)
    if "every-other" in options:
        model.blocks = tuple("ffn" if i % 2 == 0 else kind
                             for i in range(num_blocks))
    else:
        model.blocks = (kind,) * num_blocks
    return config
