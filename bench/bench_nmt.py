"""The paper's translation comparison at CPU scale: the GNMT-style dense
baseline against the MoE models at matched ops/timestep, on the same data,
token budget and seed.

    python bench/bench_nmt.py --output=bench/results/nmt.json \
        [--steps=1500] [--models=gnmt,moe-32,moe-512-h] [--vocabulary=PATH]
        [--learning_rate=3e-3] [--expert_learning_rate_scale=square_root]
        [--model_override=dropout=0.4] [--eval_train_pairs=600]

Trains each `configs/nmt/paper.py:<model>,cpu` config on the embedded
English -> Spanish verses (one shared vocabulary), then prints a markdown
table: model, parameters (without embeddings and softmax), ops per
timestep, valid BLEU (sacrebleu, beam search), valid perplexity per token,
training tokens/s. With `--eval_every=N --curves=PATH.png`, each model is
evaluated on valid (BLEU and perplexity) every N steps too, and the curves
plot both against training tokens (JSON: each row's `learning_curve`).
`--eval_train_pairs=N` adds, at each evaluation, the perplexity per token of
the first N training pairs in inference mode, and a panel of valid over it:
how much each model has memorised of the pairs it trained on.
`--model_override=key=value` (repeatable) sets a field of every model's
`config.model` (a Python literal), as in bench_lm; the rows record the
overrides and their labels name them.
"""

import json
import os
import shutil
import sys
import tempfile
import time

from absl import flags

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from trainers.common import console  # noqa: E402

console.quiet_tensorflow(sys.argv)  # Before TensorFlow is imported.

import keras  # noqa: E402

import curves  # noqa: E402
from flag_values import number_or_name, override_model  # noqa: E402
from flag_values import parse_model_overrides  # noqa: E402
import kernel_choices  # noqa: E402
from configs.nmt import paper  # noqa: E402
from trainers.common import text  # noqa: E402
from trainers.common.distribution import Distribution  # noqa: E402
from trainers.nmt.train import TranslationRun  # noqa: E402
from tf_moe import kernels  # noqa: E402

_MODELS = flags.DEFINE_list("models", ["gnmt", "moe-32", "moe-512-h"],
                            "Models of configs/nmt/paper.py to train.")
_STEPS = flags.DEFINE_integer("steps", 0,
                              "Training steps (0: the config's, 1500).")
_BLEU_SENTENCES = flags.DEFINE_integer(
    "bleu_sentences", 0, "Valid sentences BLEU is computed on (0: the "
    "config's, 300; -1: every valid pair).")
_VOCABULARY = flags.DEFINE_string(
    "vocabulary", "", "A sentencepiece.model to train every model with (e.g. "
    "the main job's, DIR/sentencepiece.model: the same 6,000-piece settings); "
    "by default the first model learns one and the others reuse it.")
_EVAL_EVERY = flags.DEFINE_integer(
    "eval_every", 0, "Evaluate valid every this many steps too, for the "
    "learning curves (0: at the end only).")
_LEARNING_RATE = flags.DEFINE_float(
    "learning_rate", 0.0, "Peak learning rate of every model trained (0: the "
    "config's, 3e-3).")
_EXPERT_LEARNING_RATE_SCALE = flags.DEFINE_string(
    "expert_learning_rate_scale", "", "Multiplier of the routed experts' rate "
    "for every MoE model trained (config.train.expert_learning_rate_scale; "
    "tf_moe.optimizers): a number or square_root ('': the config's, 1).")
_EVAL_TRAIN_PAIRS = flags.DEFINE_integer(
    "eval_train_pairs", 0, "At each evaluation, also the perplexity per token "
    "of the first N training pairs in inference mode (curves: valid over it, "
    "how much a model memorises; 0: not measured).")
_MODEL_OVERRIDES = flags.DEFINE_multi_string(
    "model_override", [], "key=value: a field of config.model set in every "
    "model, the value a Python literal (e.g. dropout=0.4); the rows' labels "
    "name it.")
_OUTPUT = flags.DEFINE_string("output", "", "JSON results.")
_CURVES = flags.DEFINE_string(
    "curves", "", "PNG plot of valid BLEU and perplexity against training "
    "tokens, one line per model (with --eval_every).")
_ROWS_FROM = flags.DEFINE_list(
    "rows_from", [], "JSON results of earlier runs (--output) whose rows "
    "join this run's table, --output and --curves, before its own; with "
    "--models= (none), nothing is trained.")


def train_one(name, workdir, vocabulary, model_overrides):
    config = paper.get_config(f"{name},cpu")
    override_model(name, config.model, model_overrides)
    if _STEPS.value:
        config.train.steps = _STEPS.value
    if _BLEU_SENTENCES.value:  # The config's 0 is every pair.
        config.decode.bleu_sentences = max(_BLEU_SENTENCES.value, 0)
    if _LEARNING_RATE.value:
        config.train.learning_rate = _LEARNING_RATE.value
    if _EXPERT_LEARNING_RATE_SCALE.value:
        config.train.expert_learning_rate_scale = number_or_name(
            _EXPERT_LEARNING_RATE_SCALE.value)
    config.train.eval_every = _EVAL_EVERY.value
    config.train.eval_train_pairs = _EVAL_TRAIN_PAIRS.value
    os.makedirs(workdir, exist_ok=True)
    if vocabulary:  # One text model for all: learned once, copied.
        shutil.copy(vocabulary, os.path.join(workdir, text.MODEL_FILE))
    keras.backend.clear_session()
    run = TranslationRun(config, workdir, Distribution())
    start = time.perf_counter()
    result = run.train()  # Ends with the valid evaluation.
    seconds = time.perf_counter() - start
    return dict(
        model=name, label=row_label(name, config.train),
        learning_rate=config.train.learning_rate,
        expert_learning_rate_scale=config.train.expert_learning_rate_scale,
        parameters=run.num_parameters,
        ops_per_timestep=run.ops_per_timestep, valid_bleu=result["bleu"],
        bleu_sentences=result["bleu_sentences"],
        valid_perplexity=result["perplexity"], steps=config.train.steps,
        model_overrides={key: config.model[key] for key in model_overrides},
        train_seconds=seconds,
        # Real (unpadded) target tokens per second of the whole train()
        # call, its closing evaluation included.
        tokens_per_second=run.trained_tokens / seconds,
        learning_curve=[_curve_point(point) for point in run.learning_curve])


def _curve_point(evaluation):
    """A learning curve's point in the JSON, from one of `train()`'s
    evaluations of valid."""
    point = dict(step=evaluation["step"],
                 trained_tokens=evaluation["trained_tokens"],
                 valid_bleu=evaluation["bleu"],
                 valid_perplexity=evaluation["perplexity"])
    if "train_sample_perplexity" in evaluation:
        point["train_sample_perplexity"] = evaluation[
            "train_sample_perplexity"]
        point["valid_over_train_sample"] = (
            evaluation["perplexity"] / evaluation["train_sample_perplexity"])
    return point


def row_label(name, train):
    """The model's name, and the rates where they are not the config's."""
    label = name
    if _LEARNING_RATE.value:
        label += f" lr={train.learning_rate:g}"
    if _EXPERT_LEARNING_RATE_SCALE.value:
        label += f" expert_lr_scale={_EXPERT_LEARNING_RATE_SCALE.value}"
    return label + "".join(f" {item}" for item in _MODEL_OVERRIDES.value)


def plot_curves(rows, path):
    """Valid BLEU and perplexity per token against training tokens, a line
    a model, and valid over the training sample's perplexity for the rows
    that measured it (--eval_train_pairs)."""
    panels = [("valid_bleu", "valid BLEU", False),
              ("valid_perplexity", "valid perplexity per token", True)]
    if any("valid_over_train_sample" in point
           for row in rows for point in row["learning_curve"]):
        panels.append(("valid_over_train_sample",
                       "valid / training sample perplexity", False))
    curves.plot_learning_curves(
        rows, path, panels, "Translation learning curves (matched "
        "ops/timestep)", lambda model: model != paper.BASELINE)


def main(argv):
    del argv
    if _CURVES.value:
        import matplotlib  # noqa: F401  Fails now, not after the training.
    rows = []
    for path in _ROWS_FROM.value:
        with open(path) as f:
            rows += json.load(f)["rows"]
    overrides = parse_model_overrides(_MODEL_OVERRIDES.value)
    kernel_choices.load()
    root = tempfile.mkdtemp(prefix="bench_nmt_")
    vocabulary = _VOCABULARY.value or None
    for name in _MODELS.value:
        workdir = os.path.join(root, name)
        rows.append(train_one(name, workdir, vocabulary, overrides))
        vocabulary = os.path.join(workdir, text.MODEL_FILE)
    kernel_choices.save()
    print("\n| model | parameters | ops/timestep | valid BLEU | valid ppl "
          "| tokens/s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.get('label', r['model'])} | {r['parameters']:,} | "
              f"{r['ops_per_timestep']:,} | {r['valid_bleu']:.2f} | "
              f"{r['valid_perplexity']:.2f} | {r['tokens_per_second']:,.0f} |")
    if _OUTPUT.value:
        with open(_OUTPUT.value, "w") as f:
            json.dump(dict(steps=_STEPS.value or 1500,
                           eval_every=_EVAL_EVERY.value,
                           rows_from=_ROWS_FROM.value, rows=rows,
                           kernel_choices=kernels.measurements()), f,
                      indent=2)
    if _CURVES.value:
        plot_curves(rows, _CURVES.value)
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    console.run(main)  # Quiet by default; --verbosity=0 for the rest.
