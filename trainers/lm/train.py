"""Training, evaluation and sampling of the language model from a config.

`LanguageModelRun(config, workdir, distribution)` sets up everything a mode
needs (vocabulary, model, optimizer, checkpoints), checking the config and
the workdir first so that bad input fails before any training starts.
"""

import json
import math
import os

from absl import logging
import keras
import numpy as np
import tensorflow as tf

from trainers.common import checkpoints as checkpoints_lib
from trainers.common import progress as progress_lib
from trainers.common import text
from trainers.common.schedule import WarmupInverseSqrt
from trainers.lm import data as data_lib
from trainers.lm import model as model_lib
from tf_moe import sharding


def _moe_layers(body):
    return [layer for layer in body.layers if hasattr(layer, "_metric_trackers")]


class LanguageModelRun:
    """A config's model in a workdir, under a distribution.

    Args:
        config: the `ml_collections.ConfigDict` (see configs/lm/base.py).
        workdir: vocabulary, checkpoints, summaries and exports go here.
        distribution: a `trainers.common.distribution.Distribution`.
    """

    def __init__(self, config, workdir, distribution):
        self.config = config
        self.workdir = workdir
        self.distribution = distribution
        data_lib.check_data_config(config.data)
        model_lib.check_model_config(config.model)
        if distribution.placement is not None:
            # Keras's LSTM loops over time with TensorList ops, which DTensor
            # (TF 2.21) cannot lay out; unrolled over a fixed length it ran,
            # but its updates drifted from one device's by 5e-4 and its
            # checkpoint (with the data iterator) failed to save.
            raise ValueError(
                "the LSTM language model does not run on a DTensor mesh yet: "
                "use --distribution=none or mirrored (tf_moe layers in "
                "models without LSTMs do; see tf_moe.sharding).")
        checkpoints_lib.check_workdir(workdir, dict(
            model=config.model.to_dict(), vocab_size=config.data.vocab_size,
            source=config.data.source))

        self.tokenizer = text.Tokenizer(
            data_lib.vocabulary(config.data, workdir))
        keras.utils.set_random_seed(config.seed)
        with distribution.scope():
            self.body, self.softmax = model_lib.build_language_model(
                config.model, self.tokenizer.vocab_size, seed=config.seed)
            self.schedule = WarmupInverseSqrt(
                config.train.learning_rate, config.train.warmup_steps)
            self.optimizer = keras.optimizers.Adam(
                self.schedule,
                global_clipnorm=config.train.clip_norm or None)
            self.optimizer.build(self.trainable_variables)
            self.step = tf.Variable(0, dtype=tf.int64, trainable=False,
                                    name="step")
        self.train_iterator = iter(data_lib.train_batches(
            config.data, self.tokenizer, config.seed,
            distribution.num_replicas))
        self.checkpoints = checkpoints_lib.Checkpoints(
            os.path.join(workdir, "checkpoints"), self.step,
            max_to_keep=config.train.checkpoints_to_keep,
            body=self.body, softmax=self.softmax, optimizer=self.optimizer,
            data=self.train_iterator,
            rng=checkpoints_lib.random_states(self.body))
        self.restored_from = self.checkpoints.restore()
        self._eval_fn = None  # Compiled on the first evaluation.
        self.trained_tokens = 0.0  # Target tokens trained on by train().

    @property
    def trainable_variables(self):
        return self.body.trainable_variables + self.softmax.trainable_variables

    @property
    def num_parameters(self):
        return model_lib.count_parameters(self.body)

    @property
    def ops_per_timestep(self):
        return model_lib.ops_per_timestep(self.config.model)

    def single_device_model(self):
        """`(body, softmax)` off any mesh, for export."""
        if self.distribution.placement is None:
            return self.body, self.softmax
        body = sharding.to_single_device(self.body)
        softmax = keras.layers.Dense(self.tokenizer.vocab_size, name="softmax")
        softmax.build((None, self.config.model.d_model))
        softmax.set_weights([sharding.to_numpy(v) for v in self.softmax.weights])
        return body, softmax

    @staticmethod
    def _host_batch(batch):
        return {key: value.numpy() for key, value in batch.items()}

    # Loss ------------------------------------------------------------------

    def _token_nll(self, batch, training):
        """Per-position NLL `[batch, time]` (0 at padding) and the mask."""
        hidden = self.body(batch["inputs"], training=training)
        targets = batch["targets"]
        mask = tf.cast(targets != text.PAD_ID, tf.float32)
        num_sampled = self.config.model.num_sampled
        if training and num_sampled:
            flat_hidden = tf.reshape(hidden, [-1, hidden.shape[-1]])
            nll = tf.nn.sampled_softmax_loss(
                weights=tf.transpose(self.softmax.kernel),
                biases=self.softmax.bias,
                labels=tf.reshape(tf.cast(targets, tf.int64), [-1, 1]),
                inputs=flat_hidden, num_sampled=num_sampled,
                num_classes=self.tokenizer.vocab_size)
            nll = tf.reshape(nll, tf.shape(targets))
        else:
            nll = tf.nn.sparse_softmax_cross_entropy_with_logits(
                labels=targets, logits=self.softmax(hidden))
        return nll * mask, mask

    def _stats(self, batch, training):
        nll, mask = self._token_nll(batch, training)
        return tf.reduce_sum(nll), {
            "tokens": tf.reduce_sum(mask),
            "words": tf.cast(tf.reduce_sum(batch["words"]), tf.float32)}

    # Modes -----------------------------------------------------------------

    def train(self):
        """Trains to `config.train.steps`, resuming from the last checkpoint;
        returns the final valid metrics."""
        config = self.config.train
        step_fn = self.distribution.compile(
            lambda batch: self._stats(batch, training=True),
            self.trainable_variables, self.optimizer, [self.body])
        writer = tf.summary.create_file_writer(
            os.path.join(self.workdir, "train"))
        losses_path = os.path.join(self.workdir, "train_losses.jsonl")
        start = int(self.step.numpy())
        _truncate_log(losses_path, start)
        if self.restored_from:
            print(f"resumed from {self.restored_from} at step {start}",
                  flush=True)
        progress = progress_lib.Progress(config.steps, start)
        window = _Window()
        with open(losses_path, "a") as losses_log:
            while int(self.step.numpy()) < config.steps:
                batch = self._host_batch(next(self.train_iterator))
                stats = {key: float(value) for key, value in
                         step_fn(batch).items()}
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
                    window = _Window()
                if (step % config.checkpoint_every == 0
                        or step == config.steps):
                    self.checkpoints.save()
                if config.eval_every and step % config.eval_every == 0 \
                        and step != config.steps:
                    self.evaluate("valid", writer=writer)
        return self.evaluate("valid", writer=writer)

    def _report(self, step, window, progress, writer):
        nll_per_token = window.nll / max(window.tokens, 1)
        line, tokens_per_second = progress.report(
            step, loss=nll_per_token + window.aux / window.steps,
            ppl_word=math.exp(min(window.nll / max(window.words, 1), 50)))
        print(line, flush=True)
        with writer.as_default(step=step):
            tf.summary.scalar("loss", nll_per_token + window.aux / window.steps)
            tf.summary.scalar("nll_per_token", nll_per_token)
            tf.summary.scalar("perplexity_per_word", math.exp(
                min(window.nll / max(window.words, 1), 50)))
            tf.summary.scalar("balancing_loss", window.aux / window.steps)
            tf.summary.scalar("tokens_per_second", tokens_per_second)
            tf.summary.scalar("learning_rate",
                              float(self.schedule(self.step - 1)))
            for layer in _moe_layers(self.body):
                for name, tracker in layer._metric_trackers.items():
                    tf.summary.scalar(f"{layer.name}/{name}",
                                      float(sharding.to_numpy(
                                          tracker.result())))
                    tracker.reset_state()
                counts = sharding.to_numpy(layer.expert_token_counts)
                tf.summary.histogram(
                    f"{layer.name}/expert_load",
                    tf.repeat(tf.range(tf.size(counts)), counts))
        writer.flush()

    def evaluate(self, split="valid", writer=None):
        """Per-word and per-token perplexity of `split` (inference mode)."""
        batches, too_long = data_lib.eval_batches(
            self.config.data, self.tokenizer, split,
            self.distribution.num_replicas)
        if self._eval_fn is None:
            self._eval_fn = self.distribution.compile_eval(self._eval_stats)
        eval_fn = self._eval_fn
        nll = tokens = words = 0.0
        for batch in batches:
            stats = eval_fn(self._host_batch(batch))
            nll += float(stats["nll"])
            tokens += float(stats["tokens"])
            words += float(stats["words"])
        if tokens == 0:
            raise ValueError(
                f"the {split} split has no sentence of at most "
                f"config.data.max_len={self.config.data.max_len} pieces.")
        result = dict(split=split, step=int(self.step.numpy()),
                      perplexity_per_word=math.exp(nll / words),
                      perplexity_per_token=math.exp(nll / tokens),
                      words=int(words), tokens=int(tokens),
                      sentences_too_long=too_long)
        print(f"eval {split} at step {result['step']}: perplexity per word "
              f"{result['perplexity_per_word']:.2f}, per token "
              f"{result['perplexity_per_token']:.2f} ({result['words']} "
              f"words; {too_long} sentences over max_len left out)",
              flush=True)
        if writer is not None:
            with writer.as_default(step=result["step"]):
                tf.summary.scalar(f"{split}/perplexity_per_word",
                                  result["perplexity_per_word"])
                tf.summary.scalar(f"{split}/perplexity_per_token",
                                  result["perplexity_per_token"])
        return result

    def _eval_stats(self, batch):
        nll_sum, stats = self._stats(batch, training=False)
        return dict(stats, nll=nll_sum)

    def unigram_perplexity(self, split="valid"):
        """Per-word perplexity of the training pieces' unigram distribution
        on `split`: the bar a model must go far below."""
        counts = np.ones(self.tokenizer.vocab_size)
        for sentence in data_lib.tokenized(
                data_lib.sentences(self.config.data, "train"), self.tokenizer):
            pieces = sentence["pieces"].numpy()
            np.add.at(counts, pieces, 1)
            counts[text.EOS_ID] += 1
        log_p = np.log(counts / counts.sum())
        nll = words = 0.0
        for sentence in data_lib.tokenized(
                data_lib.sentences(self.config.data, split), self.tokenizer):
            pieces = sentence["pieces"].numpy()
            if pieces.size > self.config.data.max_len:
                continue
            nll -= log_p[pieces].sum() + log_p[text.EOS_ID]
            words += int(sentence["words"])
        return math.exp(nll / words)


class _Window:
    """Sums of the step statistics between two progress reports."""

    def __init__(self):
        self.nll = self.tokens = self.words = self.aux = 0.0
        self.steps = 0

    def add(self, stats):
        self.nll += stats["nll"]
        self.tokens += stats["tokens"]
        self.words += stats["words"]
        self.aux += stats["aux"]
        self.steps += 1


def _truncate_log(path, step):
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
