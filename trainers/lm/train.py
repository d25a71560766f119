"""Training, evaluation and sampling of the language model from a config.

`LanguageModelRun(config, workdir, distribution)` sets up everything a mode
needs (vocabulary, model, optimizer, checkpoints), checking the config and
the workdir first so that bad input fails before any training starts.
"""

import math

import keras
import numpy as np
import tensorflow as tf

from trainers.common import checkpoints as checkpoints_lib
from trainers.common import loop
from trainers.common import text
from trainers.lm import data as data_lib
from trainers.lm import model as model_lib
from tf_moe import sharding


class LanguageModelRun(loop.TrainingRun):
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
        if config.train.eval_train_sentences < 0:
            raise ValueError(f"config.train.eval_train_sentences must be >= "
                             f"0, got {config.train.eval_train_sentences}.")
        if distribution.placement is not None and config.model.num_sampled:
            raise ValueError(
                "config.model.num_sampled must be 0 on a DTensor mesh: the "
                "sampled softmax's candidate sampler has no DTensor layout "
                "rule (use the full softmax, or --distribution=none or "
                "mirrored).")
        checkpoints_lib.check_workdir(workdir, dict(
            model=config.model.to_dict(), vocab_size=config.data.vocab_size,
            source=config.data.source))

        self.tokenizer = text.Tokenizer(
            data_lib.text_model(config.data, workdir))
        models = self.build_training(
            lambda: dict(zip(("body", "softmax"),
                             model_lib.build_language_model(
                                 config.model, self.tokenizer.vocab_size,
                                 seed=config.seed))),
            lambda: data_lib.train_batches(config.data, self.tokenizer,
                                           config.seed,
                                           distribution.num_replicas))
        self.body, self.softmax = models["body"], models["softmax"]
        self._eval_fn = None  # Compiled on the first evaluation.

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

    def loss_stats(self, batch, training):
        nll, mask = self._token_nll(batch, training)
        return tf.reduce_sum(nll), {
            "tokens": tf.reduce_sum(mask),
            "words": tf.cast(tf.reduce_sum(batch["words"]), tf.float32)}

    # Modes -----------------------------------------------------------------

    def progress_values(self, window):
        return {"ppl_word": loop.perplexity(window["nll"], window["words"])}

    def evaluate(self, split="valid", writer=None, max_sentences=None):
        """Per-word and per-token perplexity of `split` (inference mode), or
        of its first `max_sentences` sentences."""
        batches, too_long = data_lib.eval_batches(
            self.config.data, self.tokenizer, split,
            self.distribution.num_replicas, max_sentences)
        if self._eval_fn is None:
            self._eval_fn = self.distribution.compile_eval(self._eval_stats)
        eval_fn = self._eval_fn
        self.take_routing_metrics()  # Leaves out the training calls.
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
                      sentences_too_long=too_long,
                      routing=self.take_routing_metrics())
        print(f"eval {split} at step {result['step']}: perplexity per word "
              f"{result['perplexity_per_word']:.2f}, per token "
              f"{result['perplexity_per_token']:.2f} ({result['words']} "
              f"words; {too_long} sentences over max_len left out)",
              flush=True)
        for layer, metrics in result["routing"].items():
            print(f"  {layer}: CV(Importance) {metrics['importance_cv']:.2f}, "
                  f"CV(Load) {metrics['load_cv']:.2f}, max/mean load "
                  f"{metrics['load_max_over_mean']:.2f}", flush=True)
        if writer is not None:
            with writer.as_default(step=result["step"]):
                tf.summary.scalar(f"{split}/perplexity_per_word",
                                  result["perplexity_per_word"])
                tf.summary.scalar(f"{split}/perplexity_per_token",
                                  result["perplexity_per_token"])
                for layer, metrics in result["routing"].items():
                    for name, value in metrics.items():
                        tf.summary.scalar(f"{split}/{layer}/{name}", value)
        return result

    def curve_extras(self):
        """With `config.train.eval_train_sentences` = N > 0, the perplexity
        per word of the first N training sentences in inference mode (seen
        in training once a pass is done): against valid's, how much the
        model has memorised rather than learned."""
        count = self.config.train.eval_train_sentences
        if not count:
            return {}
        result = self.evaluate("train", max_sentences=count)
        return {"train_sample_perplexity_per_word":
                result["perplexity_per_word"]}

    def _eval_stats(self, batch):
        nll_sum, stats = self.loss_stats(batch, training=False)
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
