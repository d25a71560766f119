"""The LSTM-MoE language-model trainer (the paper's section 5, appendix C).

    python -m trainers.lm --config=configs/lm/default.py --workdir=DIR
        [--config.train.steps=2000 ...] [--mode=train|eval|export|sample]
        [--distribution=none|mirrored|dtensor --mesh=batch:2,expert:4]

train   trains (resuming from the workdir's last checkpoint), evaluates on
        valid, then exports a SavedModel to DIR/export.
eval    per-word and per-token perplexity of --split.
export  writes the SavedModel (raw text in: score and sample).
sample  continues each --prefix.
"""

import os
import sys

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from trainers.common import console  # noqa: E402

# Before TensorFlow is imported: its C++ log level is read then.
console.quiet_tensorflow(sys.argv)

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from trainers.common import app_flags  # noqa: E402

MODES = ("train", "eval", "export", "sample")

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "The experiment config file (configs/lm/*.py); its "
    "fields can be overridden with --config.<field>=<value>.",
    lock_config=True)
_MODE = flags.DEFINE_enum("mode", "train", MODES, "What to do.")
_SPLIT = flags.DEFINE_enum("split", "test", ("valid", "test"),
                           "The split --mode=eval reports.")
_PREFIX = flags.DEFINE_multi_string(
    "prefix", ["In the beginning"], "Text --mode=sample continues "
    "(repeat the flag for several).")

flags.mark_flags_as_required(["config"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    distribution = app_flags.distribution()
    # Imported here: TensorFlow must not initialise before the logical CPUs
    # are configured.
    import tensorflow as tf
    from trainers.lm import export as export_lib
    from trainers.lm.train import LanguageModelRun

    config = _CONFIG.value
    run = LanguageModelRun(config, app_flags.WORKDIR.value, distribution)
    print(f"model: blocks {list(config.model.blocks)}, "
          f"{run.num_parameters:,} parameters without embedding and softmax, "
          f"{run.ops_per_timestep:,} ops/timestep, vocabulary "
          f"{run.tokenizer.vocab_size} pieces", flush=True)
    export_dir = app_flags.export_dir()

    if _MODE.value == "train":
        run.train()
        print(f"unigram perplexity per word on valid: "
              f"{run.unigram_perplexity('valid'):.1f}", flush=True)
    if _MODE.value == "eval":
        run.evaluate(_SPLIT.value)
    if _MODE.value in ("train", "export"):
        export_lib.export(run.tokenizer, *run.single_device_model(),
                          export_dir)
        print(f"exported SavedModel to {export_dir}", flush=True)
    if _MODE.value == "sample":
        server = export_lib.LanguageModelServer(run.tokenizer, run.body,
                                                run.softmax)
        continuations = server.sample(
            tf.constant(_PREFIX.value), config.sample.max_tokens,
            config.sample.temperature, config.seed)
        for prefix, continuation in zip(_PREFIX.value,
                                        continuations.numpy()):
            print(f"{prefix} | {continuation.decode()}", flush=True)


if __name__ == "__main__":
    console.run(main)
