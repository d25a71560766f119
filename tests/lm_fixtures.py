"""Small language-model configs and data for the trainer tests."""

import os
import subprocess
import sys

from configs.lm import base
from trainers import corpora

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_text_splits(directory, train=400, valid=40, test=40,
                      max_words=None):
    """The first verses of the embedded corpus as text files, one sentence
    per line (cut to their first `max_words` words if given); returns
    `{split: path}`."""
    verses = [" ".join(verse.split()[:max_words])
              for _, verse in corpora.read_verses("web")]
    counts = {"train": train, "valid": valid, "test": test}
    paths, start = {}, 0
    for split, count in counts.items():
        paths[split] = os.path.join(directory, f"{split}.txt")
        with open(paths[split], "w") as f:
            f.write("\n".join(verses[start:start + count]) + "\n")
        start += count
    return paths


def small_config(paths, **model):
    """A tiny LSTM-MoE-LSTM on text files: seconds per step on 2 cores."""
    config = base.base_config()
    config.data.source = "text"
    for split, path in paths.items():
        config.data[f"{split}_path"] = path
    config.data.vocab_size = 600
    config.data.max_len = 64
    config.data.tokens_per_batch = 512
    config.data.shuffle_buffer = 1000
    config.model.d_model = 16
    config.model.num_experts = 4
    config.model.k = 2
    config.model.expert_hidden = 32
    config.model.dropout = 0.1
    for field, value in model.items():
        config.model[field] = value
    config.train.steps = 6
    config.train.warmup_steps = 2
    config.train.log_every = 2
    config.train.checkpoint_every = 2
    return config


def small_transformer_config(paths, **model):
    """A tiny two-block Transformer (a dense FFN block, then a top-2 block
    of SwiGLU experts) on text files; `model` overrides its fields."""
    defaults = dict(architecture="transformer", blocks=("ffn", "moe"),
                    num_heads=2, ffn_hidden=(32,), gating="top_k",
                    normalize_gates=True, expert_type="glu")
    return small_config(paths, **dict(defaults, **model))


def config_flags(config, base_module=base, groups=("data", "model", "train")):
    """`--config.<field>=<value>` flags that turn `base_module`'s (default
    configs/lm/base.py's) defaults into `config` (for runs in a
    subprocess)."""
    flags = []
    default = base_module.base_config()
    for group in groups:
        for field, value in config[group].items():
            if value != default[group][field]:
                if isinstance(value, tuple):
                    value = ",".join(map(str, value))
                flags.append(f"--config.{group}.{field}={value}")
    return flags


def run_trainer(workdir, config, *extra, wait=True):
    """Runs `python -m trainers.lm` on configs/lm/base.py with `config`'s
    changes; returns the CompletedProcess (or the Popen if not `wait`)."""
    command = [sys.executable, "-m", "trainers.lm",
               f"--config={REPO}/configs/lm/base.py",
               f"--workdir={workdir}"] + config_flags(config) + list(extra)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")
    if not wait:
        return subprocess.Popen(command, cwd=REPO, env=env,
                                stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
