"""The paper's Table 7 family, at paper scale or scaled to this CPU.

    --config=configs/lm/table7.py:moe-32          paper scale, tfds lm1b
    --config=configs/lm/table7.py:moe-32,cpu      the CPU scale, embedded text

Models (appendix C): MoE-4, -32, -256 (flat, k=4), MoE-256-h, -1024-h,
-4096-h (16 groups, k=2 per level), and the compute-matched dense baselines
LSTM-2048-512, 4xLSTM-512, MoE-1-Wide and MoE-1-Deep. At paper scale
(d=512, experts of 1024 hidden units) every model is about 8M ops/timestep;
the CPU scale divides every width by 8 (d=64, experts of 128), which keeps
the MoE models and the baselines matched (131k to 147k ops/timestep, but
MoE-4096-h's secondary gates bring it to 165k;
`python -m trainers.lm ... --mode=eval` prints the figure).
"""

from configs.lm import base

FLAT = {"moe-4": 4, "moe-32": 32, "moe-256": 256}
HIERARCHICAL = {"moe-256-h": 256, "moe-1024-h": 1024, "moe-4096-h": 4096}
BASELINES = ("lstm-2048-512", "4xlstm-512", "moe-1-wide", "moe-1-deep")
MODELS = tuple(FLAT) + tuple(HIERARCHICAL) + BASELINES
SCALES = ("paper", "cpu")


def _model(config, name, width):
    """Sets `config.model` for `name` with d_model = 512 / width."""
    model = config.model
    d = 512 // width
    model.d_model = d
    model.expert_hidden = 1024 // width
    model.blocks = ("lstm", "moe", "lstm")
    if name in FLAT:
        model.num_experts, model.k = FLAT[name], 4
    elif name in HIERARCHICAL:
        model.blocks = ("lstm", "hmoe", "lstm")
        model.num_groups = 16
        model.experts_per_group = HIERARCHICAL[name] // 16
        model.k_primary = model.k_secondary = 2
    elif name == "lstm-2048-512":
        model.blocks = ("projected_lstm",)
        model.projected_lstm_units = 2048 // width
    elif name == "4xlstm-512":
        model.blocks = ("lstm",) * 4
    elif name == "moe-1-wide":
        model.blocks = ("lstm", "ffn", "lstm")
        model.ffn_hidden = (4096 // width,)
    else:  # moe-1-deep
        model.blocks = ("lstm", "ffn", "lstm")
        model.ffn_hidden = (1024 // width,) * 4


def get_config(spec="moe-32"):
    name, _, scale = spec.partition(",")
    scale = scale or "paper"
    if name not in MODELS:
        raise ValueError(f"table7 model must be one of {MODELS}, got {name!r}.")
    if scale not in SCALES:
        raise ValueError(f"table7 scale must be one of {SCALES}, got "
                         f"{scale!r}.")
    config = base.base_config()
    if scale == "paper":
        _model(config, name, width=1)
        config.data.source = "lm1b"
        config.data.tokens_per_batch = 300_000  # ~300k words a batch.
        config.model.num_sampled = 8192  # The paper: importance sampling.
        return config
    _model(config, name, width=8)
    base.use_cpu_scale_training(config)
    return config
