"""The training loop both trainers run: steps, progress, logs, checkpoints.

A trainer's run class derives from `TrainingRun` and provides its model's
loss (`loss_stats`), its evaluation (`evaluate`) and what its progress line
shows (`progress_values`); the loop does the rest the same way for both:

- one compiled step per global batch under the run's `Distribution`;
- a progress line (step, loss, the run's values, tokens/s, ETA) every
  `config.train.log_every` steps, with TensorBoard summaries of the same,
  of the balancing terms, the MoE layers' routing metrics and their
  expert-load histograms;
- DIR/train_losses.jsonl, one line per step, cut back to the checkpoint a
  killed run resumes from so that it reads as one uninterrupted run;
- checkpoints every `config.train.checkpoint_every` steps and at the end,
  with DIR/kernel_choices.json beside them: the experts' kernels and layouts
  that `tf_moe.kernels` chose by timing. A run started in a workdir that
  holds that file runs by it instead of timing again, so a resumed run
  keeps its kernels, and a run with the same seed in a workdir given a copy
  of the file repeats the first to the last digit.
"""

import abc
import json
import math
import os

from absl import logging
import keras
import tensorflow as tf

from trainers.common import checkpoints as checkpoints_lib
from trainers.common import progress as progress_lib
from trainers.common.schedule import WarmupInverseSqrt
from tf_moe import kernels
from tf_moe import optimizers
from tf_moe import sharding
from tf_moe.mixture import moe_layers

KERNEL_CHOICES_FILE = "kernel_choices.json"


class Window:
    """Sums of the step statistics (any keys) between two reports."""

    def __init__(self):
        self.sums = {}
        self.steps = 0

    def add(self, stats):
        for key, value in stats.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.steps += 1

    def __getitem__(self, key):
        return self.sums.get(key, 0.0)

    @property
    def nll_per_token(self):
        return self["nll"] / max(self["tokens"], 1)

    @property
    def balancing_loss(self):
        return self["aux"] / max(self.steps, 1)


class TrainingRun(abc.ABC):
    """The loop over a run's state. Subclasses set `config` (with `seed`
    and `config.train`: steps, learning_rate, expert_learning_rate_scale,
    warmup_steps, constant_steps, clip_norm, log_every, checkpoint_every,
    checkpoints_to_keep, eval_every), `workdir` and `distribution`, call
    `build_training`, and implement `loss_stats`, `evaluate` and
    `progress_values`.
    """

    def build_training(self, build_models, train_batches):
        """Sets up what training needs and restores the last checkpoint.

        Args:
            build_models: `() -> {name: Keras model or layer}`, run in the
                distribution's scope; the models' variables are trained,
                their losses (balancing terms) join the objective, and they
                are checkpointed under their names.
            train_batches: `() -> tf.data.Dataset` of global training
                batches, made after the seed is set (the shuffle's order
                depends on the global seed too); its iterator (the data
                position) is checkpointed.
        Returns:
            The models, by name.

        Sets `models`, `schedule`, `optimizer` (Adam with global norm
        clipping, the routed experts' rate scaled by
        `train.expert_learning_rate_scale`: `tf_moe.optimizers`), `step`,
        `train_iterator`, `checkpoints`, `restored_from` (the checkpoint
        restored, or None), `trained_tokens` and `learning_curve`.
        """
        train = self.config.train
        if os.path.exists(self._kernel_choices_path):
            kernels.load_choices(self._kernel_choices_path)
        keras.utils.set_random_seed(self.config.seed)
        with self.distribution.scope():
            models = build_models()
            self.models = list(models.values())
            self.schedule = WarmupInverseSqrt(
                train.learning_rate, train.warmup_steps, train.constant_steps)
            self.optimizer = self.distribution.prepare_optimizer(
                optimizers.ExpertAdam(
                    self.schedule,
                    weight_scales=optimizers.expert_weight_scales(
                        train.expert_learning_rate_scale, *self.models),
                    global_clipnorm=train.clip_norm or None))
            self.optimizer.build(self.trainable_variables)
            self.step = tf.Variable(0, dtype=tf.int64, trainable=False,
                                    name="step")
        self.train_iterator = iter(train_batches())
        self.checkpoints = checkpoints_lib.Checkpoints(
            os.path.join(self.workdir, "checkpoints"), self.step,
            data=self.train_iterator,
            max_to_keep=train.checkpoints_to_keep, optimizer=self.optimizer,
            rng=checkpoints_lib.random_states(*self.models), **models)
        self.restored_from = self.checkpoints.restore()
        self.trained_tokens = 0.0  # Target tokens trained on by train().
        # train()'s evaluations on valid, each with `trained_tokens` then.
        self.learning_curve = []
        # The routing metrics of the last report window (training mode,
        # noise on): `{layer name: {metric: value}}`.
        self.train_routing = {}
        return models

    @abc.abstractmethod
    def loss_stats(self, batch, training):
        """`(nll_sum, stats)` of a batch: `stats` scalars summed over the
        replicas, with "tokens" (the target tokens the NLL is over)."""

    @abc.abstractmethod
    def evaluate(self, split="valid", writer=None):
        """The run's evaluation of `split`; returns a dict of metrics."""

    @abc.abstractmethod
    def progress_values(self, window):
        """`{name: value}` shown in the progress line and summarised, from
        a `Window` of step statistics."""

    def take_routing_metrics(self):
        """`{layer name: {metric: value}}` of every MoE layer of the run's
        models (see `tf_moe.MoE.routing_metrics`): the means over the calls
        since the last report or take, which start again."""
        return {layer.name: layer.routing_metrics(reset=True)
                for model in self.models for layer in moe_layers(model)}

    @property
    def trainable_variables(self):
        return [v for model in self.models for v in model.trainable_variables]

    def train(self):
        """Trains to `config.train.steps`, resuming from the last checkpoint;
        returns the final evaluation on valid."""
        config = self.config.train
        step_fn = self.distribution.compile(
            lambda batch: self.loss_stats(batch, training=True),
            self.trainable_variables, self.optimizer, self.models)
        writer = tf.summary.create_file_writer(
            os.path.join(self.workdir, "train"))
        losses_path = os.path.join(self.workdir, "train_losses.jsonl")
        start = int(self.step.numpy())
        truncate_log(losses_path, start)
        if self.restored_from:
            print(f"resumed from {self.restored_from} at step {start}",
                  flush=True)
        progress = progress_lib.Progress(config.steps, start)
        window = Window()
        with open(losses_path, "a") as losses_log:
            while int(self.step.numpy()) < config.steps:
                batch = {key: value.numpy() for key, value in
                         next(self.train_iterator).items()}
                stats = {key: float(value)
                         for key, value in step_fn(batch).items()}
                self.step.assign_add(1)
                step = int(self.step.numpy())
                loss = stats["nll"] / stats["tokens"] + stats["aux"]
                if not math.isfinite(loss):
                    raise FloatingPointError(
                        f"loss is {loss} at step {step}; stopping.")
                losses_log.write(json.dumps(dict(step=step, loss=loss)) + "\n")
                losses_log.flush()
                window.add(stats)
                self.trained_tokens += stats["tokens"]
                progress.add_tokens(stats["tokens"])
                if step % config.log_every == 0 or step == config.steps:
                    self._report(step, window, progress, writer)
                    window = Window()
                if (step % config.checkpoint_every == 0
                        or step == config.steps):
                    self.checkpoints.save()
                    kernels.save_choices(self._kernel_choices_path)
                if config.eval_every and step % config.eval_every == 0 \
                        and step != config.steps:
                    self._evaluate_valid(writer)
        result = self._evaluate_valid(writer)
        kernels.save_choices(self._kernel_choices_path)  # Eval's shapes too.
        return result

    @property
    def _kernel_choices_path(self):
        return os.path.join(self.workdir, KERNEL_CHOICES_FILE)

    def curve_extras(self):
        """`{name: value}` measured beside valid at each point of the
        learning curve; none unless a trainer adds some."""
        return {}

    def _evaluate_valid(self, writer):
        result = self.evaluate("valid", writer=writer)
        self.learning_curve.append(
            dict(result, trained_tokens=self.trained_tokens,
                 **self.curve_extras()))
        return result

    def _report(self, step, window, progress, writer):
        loss = window.nll_per_token + window.balancing_loss
        values = self.progress_values(window)
        line, tokens_per_second = progress.report(step, loss=loss, **values)
        print(line, flush=True)
        with writer.as_default(step=step):
            tf.summary.scalar("loss", loss)
            tf.summary.scalar("nll_per_token", window.nll_per_token)
            for name, value in values.items():
                tf.summary.scalar(name, value)
            tf.summary.scalar("balancing_loss", window.balancing_loss)
            tf.summary.scalar("tokens_per_second", tokens_per_second)
            tf.summary.scalar("learning_rate",
                              float(self.schedule(self.step - 1)))
            self.train_routing = self.take_routing_metrics()
            for model in self.models:
                for layer in moe_layers(model):
                    _summarise_routing(layer, self.train_routing[layer.name])
        writer.flush()


def _summarise_routing(layer, metrics):
    """`metrics`, the layer's routing metrics of the report window, and a
    histogram of its last batch's expert load."""
    for name, value in metrics.items():
        tf.summary.scalar(f"{layer.name}/{name}", value)
    counts = sharding.to_numpy(layer.expert_token_counts)
    tf.summary.histogram(f"{layer.name}/expert_load",
                         tf.repeat(tf.range(tf.size(counts)), counts))


def truncate_log(path, step):
    """Drops the lines of steps after `step` (run after the checkpoint a
    killed run resumes from), so the log reads as one uninterrupted run."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [line for line in f
                 if line.strip() and json.loads(line)["step"] <= step]
    with open(path, "w") as f:
        f.writelines(lines)
    logging.info("loss log kept to step %d", step)


def perplexity(nll, count):
    """`exp(nll / count)`, capped so an untrained model reports a finite
    number."""
    return math.exp(min(nll / max(count, 1), 50))
