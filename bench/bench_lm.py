"""The paper's Tables 7 and 6 at CPU scale, on the embedded corpus with one
shared vocabulary, the same token budget and the same seed.

Table 7, the MoE family against the dense baselines at matched ops/timestep:

    python bench/bench_lm.py --output=bench/results/lm_table7.json \
        --plot=bench/results/lm_table7.png [--steps=1000] [--models=...]

trains each `configs/lm/table7.py:<model>,cpu` config, evaluates valid
perplexity per word, and prints a markdown table: model, parameters (without
embedding and softmax), ops per timestep, valid perplexity per word,
training tokens/s. The plot shows perplexity against the number of experts
(baselines as horizontal lines). With `--eval_every=N --curves=PATH.png`,
each model is evaluated every N steps too, and the curves plot valid
perplexity against training tokens (JSON: each row's `learning_curve`).
`--eval_train_sentences=N` adds, at each evaluation, the perplexity of the
first N training sentences in inference mode, and a second panel of valid
over it: how much each model has memorised of the text it trained on.

Table 6, the balancing losses' weights on MoE-256 (CPU scale):

    python bench/bench_lm.py --table=6 --output=bench/results/lm_table6.json

trains it with each (w_importance, w_load) of the paper and prints valid
perplexity per word and the mean CV(Importance), CV(Load) and
max(Load)/mean(Load), Load being the tokens each expert received: over the
valid batches at inference (no noise), and over the last report window of
training (the noisy gate the losses act on).

Each row records the corpora it trained on (`--corpora`, default the
config's), its valid routing metrics (`routing`) and those of the last
training window (`train_routing`).

`--model_override=key=value` (repeatable) sets a field of every model's
`config.model`, the value read as a Python literal (`ffn_hidden=(4096,)`,
`gating=top_k`; a bare word is a string), for variants outside the table;
rows record the overrides and their labels name them.

The Transformer table, `configs/lm/transformer.py:<model>,cpu` (a dense
FFN, the paper's noisy top-4, Switch top-1, Mixtral top-2 with SwiGLU
experts and a hierarchical MoE, all at matched ops/timestep), same columns:

    python bench/bench_lm.py --table=transformer \
        --output=bench/results/lm_transformer.json [--every_other]
"""

import itertools
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
from configs.lm import table7  # noqa: E402
from configs.lm import transformer  # noqa: E402
from trainers.common import text  # noqa: E402
from trainers.common.distribution import Distribution  # noqa: E402
from trainers.lm.train import LanguageModelRun  # noqa: E402
from tf_moe import kernels  # noqa: E402

_TABLE = flags.DEFINE_enum("table", "7", ["6", "7", "transformer"],
                           "The paper's table, or the Transformer family.")
_MODELS = flags.DEFINE_list(
    "models", [], "Models of the table to train (default: all of them).")
_EVERY_OTHER = flags.DEFINE_bool(
    "every_other", False, "Transformer table: MoE in every other block.")
_STEPS = flags.DEFINE_integer("steps", 0,
                              "Training steps (0: the config's, 1000).")
_EVAL_EVERY = flags.DEFINE_integer(
    "eval_every", 0, "Evaluate valid every this many steps too, for the "
    "learning curves (0: at the end only).")
_EVAL_TRAIN_SENTENCES = flags.DEFINE_integer(
    "eval_train_sentences", 0, "At each evaluation, also the perplexity of "
    "the first N training sentences in inference mode (curves: valid over "
    "it, how much a model memorises; 0: not measured).")
_LEARNING_RATES = flags.DEFINE_list(
    "learning_rates", [], "Peak learning rates: each model trains once at "
    "each (default: the config's, 3e-3 at CPU scale). Rows are labelled "
    "`<model> lr=<rate>`.")
_EXPERT_LEARNING_RATE_SCALES = flags.DEFINE_list(
    "expert_learning_rate_scales", [], "Multipliers of the routed experts' "
    "rate (config.train.expert_learning_rate_scale; tf_moe.optimizers): "
    "numbers or `square_root` (sqrt(k / E) per MoE layer). Each model "
    "trains once at each rate and each scale; the rows' labels name it.")
_CORPORA = flags.DEFINE_list(
    "corpora", [], "Embedded corpora to train and evaluate on, interleaved "
    "(trainers/corpora; default: the config's, the World English Bible).")
_MODEL_OVERRIDES = flags.DEFINE_multi_string(
    "model_override", [], "key=value: a field of config.model set in every "
    "model, the value a Python literal (e.g. ffn_hidden=(4096,)); the rows' "
    "labels name it.")
_TOKENS_PER_BATCH = flags.DEFINE_integer(
    "tokens_per_batch", 0, "Padded tokens per batch (0: the config's, 2,048 "
    "at CPU scale); the rows' labels name it.")
_OUTPUT = flags.DEFINE_string("output", "", "JSON results.")
_PLOT = flags.DEFINE_string("plot", "", "PNG plot of perplexity vs experts.")
_CURVES = flags.DEFINE_string(
    "curves", "", "PNG plot of valid perplexity against training tokens, "
    "one line per model (with --eval_every).")

_CURVES_FROM = flags.DEFINE_list(
    "curves_from", [], "JSON results of earlier runs: draw --curves from "
    "their rows (with --eval_every curves) and train nothing.")

_EXPERTS = dict(table7.FLAT, **table7.HIERARCHICAL)
# The paper's Table 6: (w_importance, w_load).
BALANCE_WEIGHTS = ((0.0, 0.0), (0.2, 0.0), (0.0, 0.2), (0.1, 0.1),
                   (0.01, 0.01), (1.0, 1.0))
BALANCE_MODEL = "moe-256"


def _cpu_config(name):
    """The CPU-scale config of `name` from the table's config file."""
    if _TABLE.value == "transformer":
        options = ",cpu,every-other" if _EVERY_OTHER.value else ",cpu"
        return transformer.get_config(name + options)
    return table7.get_config(f"{name},cpu")


def _experts(model):
    """Experts per MoE layer of a model config (1 for a dense model)."""
    if "hmoe" in model.blocks:
        return model.num_groups * model.experts_per_group
    return model.num_experts if "moe" in model.blocks else 1


def train_one(name, steps, workdir, vocabulary, learning_rate=None,
              expert_learning_rate_scale=None, label=None,
              **model_overrides):
    """Trains `name` at CPU scale; returns its row (valid evaluation)."""
    config = _cpu_config(name)
    if steps:
        config.train.steps = steps
    if learning_rate:
        config.train.learning_rate = learning_rate
    if expert_learning_rate_scale is not None:
        config.train.expert_learning_rate_scale = expert_learning_rate_scale
    config.train.eval_every = _EVAL_EVERY.value
    config.train.eval_train_sentences = _EVAL_TRAIN_SENTENCES.value
    if _CORPORA.value:
        config.data.corpora = tuple(_CORPORA.value)
    if _TOKENS_PER_BATCH.value:
        config.data.tokens_per_batch = _TOKENS_PER_BATCH.value
    override_model(name, config.model, model_overrides)
    os.makedirs(workdir, exist_ok=True)
    if vocabulary:  # One text model for all: learned once, copied.
        shutil.copy(vocabulary, os.path.join(workdir, text.MODEL_FILE))
    keras.backend.clear_session()
    run = LanguageModelRun(config, workdir, Distribution())
    start = time.perf_counter()
    result = run.train()
    seconds = time.perf_counter() - start
    return dict(
        model=name, label=label or name, experts=_experts(config.model),
        learning_rate=config.train.learning_rate,
        expert_learning_rate_scale=config.train.expert_learning_rate_scale,
        parameters=run.num_parameters, ops_per_timestep=run.ops_per_timestep,
        valid_perplexity_per_word=result["perplexity_per_word"],
        steps=config.train.steps, train_seconds=seconds,
        # Real (unpadded) tokens per second of the whole train() call,
        # the final evaluation included.
        tokens_per_second=run.trained_tokens / seconds,
        corpora=list(config.data.corpora),
        tokens_per_batch=config.data.tokens_per_batch,
        model_overrides={key: config.model[key] for key in model_overrides},
        routing=result["routing"],
        train_routing=run.train_routing,
        learning_curve=[_curve_point(point) for point in run.learning_curve])


def _curve_point(evaluation):
    """A learning curve's point in the JSON, from one of `train()`'s
    evaluations of valid."""
    point = dict(step=evaluation["step"],
                 trained_tokens=evaluation["trained_tokens"],
                 valid_perplexity_per_word=evaluation["perplexity_per_word"])
    if "train_sample_perplexity_per_word" in evaluation:
        point["train_sample_perplexity_per_word"] = evaluation[
            "train_sample_perplexity_per_word"]
        point["valid_over_train_sample"] = (
            evaluation["perplexity_per_word"]
            / evaluation["train_sample_perplexity_per_word"])
    return point


def plot_curves(rows, path):
    """Valid perplexity per word against training tokens, a line a model,
    and beside it valid over the training sample's perplexity for the rows
    that measured it (--eval_train_sentences)."""
    panels = [("valid_perplexity_per_word", "valid perplexity per word", True)]
    if any("valid_over_train_sample" in point
           for row in rows for point in row["learning_curve"]):
        panels.append(("valid_over_train_sample",
                       "valid / training sample perplexity", False))
    curves.plot_learning_curves(
        rows, path, panels, "Learning curves (matched ops/timestep)",
        lambda m: m in _EXPERTS)


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    moe = sorted((r for r in rows if r["model"] in _EXPERTS),
                 key=lambda r: (r["model"].endswith("-h"), r["experts"]))
    figure, axes = plt.subplots(figsize=(6, 4))
    for hierarchical, marker in ((False, "o-"), (True, "s--")):
        points = [r for r in moe if r["model"].endswith("-h") == hierarchical]
        if points:
            axes.plot([r["experts"] for r in points],
                      [r["valid_perplexity_per_word"] for r in points], marker,
                      label="hierarchical MoE" if hierarchical else "flat MoE")
    for row in rows:
        if row["model"] not in _EXPERTS:
            axes.axhline(row["valid_perplexity_per_word"], linestyle=":",
                         color="gray")
            axes.annotate(row["model"],
                          (0.01, row["valid_perplexity_per_word"]),
                          xycoords=("axes fraction", "data"),
                          textcoords="offset points", xytext=(0, 2),
                          fontsize=7, color="gray")
    axes.set_xscale("log", base=2)
    axes.set_xlabel("experts")
    axes.set_ylabel("valid perplexity per word")
    axes.set_title("Table 7 at CPU scale (matched ops/timestep)")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def family_rows(root, family):
    """One row per model of `family` (or of --models) and learning rate, in
    order."""
    rows = []
    vocabulary = None
    rates = [float(rate) for rate in _LEARNING_RATES.value] or [None]
    scales = [number_or_name(scale) for scale in
              _EXPERT_LEARNING_RATE_SCALES.value] or [None]
    overrides = parse_model_overrides(_MODEL_OVERRIDES.value)
    suffix = "".join(f" {item}" for item in _MODEL_OVERRIDES.value)
    if _TOKENS_PER_BATCH.value:
        suffix += f" tokens_per_batch={_TOKENS_PER_BATCH.value}"
    for name in _MODELS.value or family:
        for rate, scale in itertools.product(rates, scales):
            label = name if rate is None else f"{name} lr={rate:g}"
            if scale is not None:
                label += f" expert_lr_scale={scale:g}" if isinstance(
                    scale, float) else f" expert_lr_scale={scale}"
            label += suffix
            workdir = os.path.join(root, str(len(rows)))
            rows.append(train_one(name, _STEPS.value, workdir, vocabulary,
                                  learning_rate=rate,
                                  expert_learning_rate_scale=scale,
                                  label=label, **overrides))
            vocabulary = os.path.join(workdir, text.MODEL_FILE)
    return rows


def print_table7(rows):
    print("\n| model | parameters | ops/timestep | valid ppl/word | tokens/s |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.get('label', r['model'])} | {r['parameters']:,} | "
              f"{r['ops_per_timestep']:,} | "
              f"{r['valid_perplexity_per_word']:.1f} | "
              f"{r['tokens_per_second']:,.0f} |")


def table6_rows(root):
    rows = []
    vocabulary = None
    overrides = parse_model_overrides(_MODEL_OVERRIDES.value)
    clash = {"importance_weight", "load_weight"} & set(overrides)
    if clash:
        raise ValueError(f"--model_override: Table 6 sets {sorted(clash)} "
                         "itself.")
    for w_importance, w_load in BALANCE_WEIGHTS:
        workdir = os.path.join(root, f"{w_importance}_{w_load}")
        row = train_one(BALANCE_MODEL, _STEPS.value, workdir, vocabulary,
                        importance_weight=w_importance, load_weight=w_load,
                        **overrides)
        (routing,) = row.pop("routing").values()  # The one MoE layer.
        (train_routing,) = row.pop("train_routing").values()
        rows.append(dict(row, w_importance=w_importance, w_load=w_load,
                         **_balance_measures(routing, ""),
                         **_balance_measures(train_routing, "train_")))
        vocabulary = os.path.join(workdir, text.MODEL_FILE)
    return rows


def _balance_measures(routing, prefix):
    """Table 6's three balance measures of one layer's routing metrics, as
    `{prefix + name: value}`."""
    return {prefix + name: routing[name] for name in
            ("importance_cv", "load_cv", "load_max_over_mean")}


def print_table6(rows):
    print(f"\n{BALANCE_MODEL} (CPU scale): the valid set at inference (no "
          "noise), and training (noise on, the last report window)\n")
    print("| w_importance | w_load | valid ppl/word | CV(Importance) | "
          "CV(Load) | max/mean(Load) | train CV(Importance) | "
          "train CV(Load) | train max/mean(Load) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        measures = " | ".join(
            f"{r[prefix + name]:.2f}" for prefix in ("", "train_")
            for name in ("importance_cv", "load_cv", "load_max_over_mean"))
        print(f"| {r['w_importance']:g} | {r['w_load']:g} | "
              f"{r['valid_perplexity_per_word']:.1f} | {measures} |")


def main(argv):
    del argv
    if _CURVES_FROM.value:
        if not _CURVES.value:
            raise SystemExit("--curves_from needs --curves=PATH.png")
        rows = []
        for path in _CURVES_FROM.value:
            with open(path) as f:
                rows += json.load(f)["rows"]
        plot_curves(rows, _CURVES.value)
        return
    if _PLOT.value or _CURVES.value:
        import matplotlib  # noqa: F401  Fails now, not after the training.
    kernel_choices.load()
    root = tempfile.mkdtemp(prefix="bench_lm_")
    if _TABLE.value == "7":
        rows = family_rows(root, table7.MODELS)
        print_table7(rows)
    elif _TABLE.value == "transformer":
        rows = family_rows(root, transformer.MODELS)
        print_table7(rows)
    else:
        rows = table6_rows(root)
        print_table6(rows)
    kernel_choices.save()
    if _OUTPUT.value:
        with open(_OUTPUT.value, "w") as f:
            json.dump(dict(table=_TABLE.value, every_other=_EVERY_OTHER.value,
                           steps=_STEPS.value or 1000,
                           eval_every=_EVAL_EVERY.value, rows=rows,
                           kernel_choices=kernels.measurements()),
                      f, indent=2)
    if _PLOT.value and _TABLE.value == "7":
        plot(rows, _PLOT.value)
    if _CURVES.value:
        plot_curves(rows, _CURVES.value)
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    console.run(main)  # Quiet by default; --verbosity=0 for the rest.
