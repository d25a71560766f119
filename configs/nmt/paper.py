"""The paper's translation models (appendix E), at paper scale or on CPU.

    --config=configs/nmt/paper.py:moe-2048-h        paper scale, WMT'14 En->Fr
    --config=configs/nmt/paper.py:moe-32,cpu        CPU scale, embedded En->Es
    --config=configs/nmt/paper.py:moe-32,de         paper scale, WMT'14 En->De

Models: MoE-32 (flat, k=4), MoE-512-h (16 groups of 32) and MoE-2048-h (32
groups of 64), k=2 per level, all with strictly balanced gating; and the
GNMT-style dense baseline, whose MoE layers are a feed-forward layer of
4 x 2048 hidden units: the same expert ops per timestep as 4 experts, so the
MoE models and the baseline are matched on compute (the gates aside). The
CPU scale divides every width by 4 (d=128, experts of 512).
"""

from configs.nmt import base

FLAT = {"moe-32": 32}
HIERARCHICAL = {"moe-512-h": (16, 32), "moe-2048-h": (32, 64)}
BASELINE = "gnmt"
MODELS = tuple(FLAT) + tuple(HIERARCHICAL) + (BASELINE,)
VARIANTS = ("paper", "de", "cpu")


def _model(model, name, width):
    model.d_model = 512 // width
    model.expert_hidden = 2048 // width
    if name in FLAT:
        model.moe = "moe"
        model.num_experts, model.k = FLAT[name], 4
    elif name in HIERARCHICAL:
        model.moe = "hmoe"
        model.num_groups, model.experts_per_group = HIERARCHICAL[name]
        model.k_primary = model.k_secondary = 2
    else:
        model.moe = "ffn"
        model.ffn_hidden = 4 * model.expert_hidden


def get_config(spec="moe-32"):
    name, _, variant = spec.partition(",")
    variant = variant or "paper"
    if name not in MODELS:
        raise ValueError(f"nmt model must be one of {MODELS}, got {name!r}.")
    if variant not in VARIANTS:
        raise ValueError(f"nmt variant must be one of {VARIANTS}, got "
                         f"{variant!r}.")
    config = base.base_config()
    if variant in ("paper", "de"):
        _model(config.model, name, width=1)
        config.data.source = "wmt14"
        config.data.pairs = ("en-de",) if variant == "de" else ("en-fr",)
        return config
    _model(config.model, name, width=4)
    config.data.vocab_size = 6000
    config.data.max_len = 64
    config.data.tokens_per_batch = 3072
    config.model.dropout = 0.1
    config.train.steps = 1500
    config.train.learning_rate = 3e-3
    config.train.warmup_steps = 100
    config.train.constant_steps = 100
    config.train.log_every = 100
    config.train.checkpoint_every = 500
    config.decode.bleu_sentences = 300
    return config
