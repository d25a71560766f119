"""The GNMT-MoE translation trainer (the paper's section 5, appendix E).

    python -m trainers.nmt --config=configs/nmt/default.py --workdir=DIR
        [--config.train.steps=2000 ...]
        [--mode=train|eval|translate|export]
        [--distribution=none|mirrored|dtensor --mesh=batch:2,expert:4]

train      trains (resuming from the workdir's last checkpoint), evaluates
           BLEU and perplexity on valid, then exports a SavedModel to
           DIR/export.
eval       BLEU and per-token perplexity of --split.
translate  translates --input (default stdin), one sentence per line, to
           stdout, into --target_language (default the first target).
export     writes the SavedModel (raw text in, translations out).
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

MODES = ("train", "eval", "translate", "export")

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "The experiment config file (configs/nmt/*.py); its "
    "fields can be overridden with --config.<field>=<value>.",
    lock_config=True)
_MODE = flags.DEFINE_enum("mode", "train", MODES, "What to do.")
_SPLIT = flags.DEFINE_enum("split", "test", ("valid", "test"),
                           "The split --mode=eval reports.")
_INPUT = flags.DEFINE_string(
    "input", "", "The file --mode=translate reads, one sentence per line "
    "(default: stdin).")
_TARGET_LANGUAGE = flags.DEFINE_string(
    "target_language", "", "The language --mode=translate translates into "
    "(default: the config's first target language).")

flags.mark_flags_as_required(["config"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    distribution = app_flags.distribution()
    # Imported here: TensorFlow must not initialise before the logical CPUs
    # are configured.
    from trainers.nmt import export as export_lib
    from trainers.nmt.train import TranslationRun

    config = _CONFIG.value
    workdir = app_flags.WORKDIR.value
    run = TranslationRun(config, workdir, distribution)
    # Translations alone go to stdout in translate mode.
    log = sys.stderr if _MODE.value == "translate" else sys.stdout
    print(f"model: {config.model.moe} between the LSTMs, "
          f"{run.num_parameters:,} parameters without embeddings and "
          f"softmax, {run.ops_per_timestep:,} ops/timestep, pairs "
          f"{list(config.data.pairs)}, vocabulary "
          f"{run.tokenizer.vocab_size} pieces", file=log, flush=True)

    if _MODE.value == "train":
        counts = run.filter_counts("train") \
            if config.data.source != "wmt14" else None
        if counts:
            print(f"train: {counts['pairs']} pairs; {counts['empty']} with "
                  f"an empty side and {counts['too_long']} over max_len "
                  f"left out", flush=True)
        run.train()
    if _MODE.value == "eval":
        run.evaluate(_SPLIT.value)
    if _MODE.value in ("train", "export"):
        export_lib.export(run.translator(), app_flags.export_dir())
        print(f"exported SavedModel to {app_flags.export_dir()}", flush=True)
    if _MODE.value == "translate":
        language = _TARGET_LANGUAGE.value or run.languages[0]
        if language not in run.languages:
            raise app.UsageError(
                f"--target_language={language!r}: this model translates "
                f"into {run.languages}.")
        if _INPUT.value:
            with open(_INPUT.value, encoding="utf-8") as f:
                lines = f.read().splitlines()
        else:
            lines = sys.stdin.read().splitlines()
        for translation in run.translate(lines, [language] * len(lines)):
            print(translation, flush=True)


if __name__ == "__main__":
    console.run(main)
