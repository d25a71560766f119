"""Training, evaluation (BLEU, perplexity) and translation from a config.

`TranslationRun(config, workdir, distribution)` sets up everything a mode
needs (vocabulary, model, optimizer, checkpoints), checking the config and
the workdir first so that bad input fails before any training starts. The
loop itself is the LM trainer's (`trainers.common.loop`).
"""


import numpy as np
import sacrebleu
import tensorflow as tf

from trainers.common import checkpoints as checkpoints_lib
from trainers.common import loop
from trainers.common import text
from trainers.nmt import data as data_lib
from trainers.nmt import export as export_lib
from trainers.nmt import model as model_lib
from tf_moe import sharding


class TranslationRun(loop.TrainingRun):
    """A config's translation model in a workdir, under a distribution.

    Args:
        config: the `ml_collections.ConfigDict` (see configs/nmt/base.py).
        workdir: vocabulary, checkpoints, summaries and exports go here.
        distribution: a `trainers.common.distribution.Distribution`.
    """

    def __init__(self, config, workdir, distribution):
        self.config = config
        self.workdir = workdir
        self.distribution = distribution
        data_lib.check_data_config(config.data)
        model_lib.check_model_config(config.model)
        if config.decode.beam_size < 1:
            raise ValueError(f"config.decode.beam_size must be >= 1, got "
                             f"{config.decode.beam_size}.")
        if config.train.eval_train_pairs < 0:
            raise ValueError(f"config.train.eval_train_pairs must be >= 0, "
                             f"got {config.train.eval_train_pairs}.")
        checkpoints_lib.check_workdir(workdir, dict(
            model=config.model.to_dict(), vocab_size=config.data.vocab_size,
            source=config.data.source, pairs=list(config.data.pairs)))

        self.languages = data_lib.target_languages(config.data)
        self.tokenizer = text.Tokenizer(
            data_lib.text_model(config.data, workdir))
        self.first_tag_id = self.tokenizer.piece_id(
            data_lib.language_token(self.languages[0]))
        self.model = self.build_training(
            lambda: {"model": self._build_model()},
            lambda: data_lib.train_batches(config.data, self.tokenizer,
                                           self.first_tag_id, config.seed,
                                           distribution.num_replicas)
        )["model"]
        self._eval_fn = None  # Compiled on the first evaluation.
        self._translator = None
        self._serving_model = None  # Off the mesh, for decoding.

    def _build_model(self):
        model = model_lib.Seq2Seq(self.config.model,
                                  self.tokenizer.vocab_size,
                                  seed=self.config.seed)
        model.build_all()
        return model

    @property
    def num_parameters(self):
        return model_lib.count_parameters(self.model)

    @property
    def ops_per_timestep(self):
        return model_lib.ops_per_timestep(self.config.model)

    def filter_counts(self, split):
        """`data.filter_counts` of a split: its pairs, and those left out
        (an empty side, a side over max_len)."""
        return data_lib.filter_counts(
            data_lib.tokenized(data_lib.sentence_pairs(self.config.data,
                                                       split),
                               self.tokenizer), self.config.data.max_len)

    def single_device_model(self):
        """The model, or on a mesh a plain copy of it with its current
        values (beam search and export run off the mesh)."""
        if self.distribution.placement is None:
            return self.model
        if self._serving_model is None:
            self._serving_model = self._build_model()
        self._serving_model.set_weights(
            [sharding.to_numpy(v) for v in self.model.weights])
        return self._serving_model

    def translator(self):
        """The serving module over this run's model (its current values)."""
        model = self.single_device_model()
        if self._translator is None:
            self._translator = export_lib.Translator(
                self.tokenizer, model, self.languages,
                self.first_tag_id, self.config.decode)
        return self._translator

    # Loss ------------------------------------------------------------------

    def loss_stats(self, batch, training):
        logits = self.model(batch["source"], batch["inputs"],
                            training=training)
        targets = batch["targets"]
        mask = tf.cast(targets != text.PAD_ID, tf.float32)
        nll = tf.nn.sparse_softmax_cross_entropy_with_logits(
            labels=targets, logits=logits)
        return tf.reduce_sum(nll * mask), {"tokens": tf.reduce_sum(mask)}

    def progress_values(self, window):
        return {"perplexity": loop.perplexity(window["nll"],
                                              window["tokens"])}

    # Modes -----------------------------------------------------------------

    def evaluate(self, split="valid", writer=None):
        """Per-token perplexity and BLEU (sacrebleu, on detokenized
        output against the raw references) of `split`."""
        pairs, counts = data_lib.eval_pairs(self.config.data, self.tokenizer,
                                            split)
        if counts["pairs"] == counts["empty"] + counts["too_long"]:
            raise ValueError(
                f"the {split} split has no pair with both sides non-empty "
                f"and at most config.data.max_len="
                f"{self.config.data.max_len} pieces.")
        nll, tokens = self._nll_and_tokens(pairs)
        limit = self.config.decode.bleu_sentences
        if limit:
            pairs = pairs.take(limit)
        sources, references, languages = [], [], []
        for pair in pairs.as_numpy_iterator():
            sources.append(pair["source"].decode())
            references.append(pair["target"].decode())
            languages.append(self.languages[pair["language"]])
        hypotheses = self.translate(sources, languages)
        metric = sacrebleu.BLEU()
        bleu = metric.corpus_score(hypotheses, [references])
        result = dict(split=split, step=int(self.step.numpy()),
                      bleu=bleu.score,
                      bleu_signature=str(metric.get_signature()),
                      perplexity=float(np.exp(nll / tokens)),
                      tokens=int(tokens), bleu_sentences=len(sources),
                      **{f"pairs_{key}": value
                         for key, value in counts.items()})
        print(f"eval {split} at step {result['step']}: BLEU "
              f"{result['bleu']:.2f} on {len(sources)} sentences, "
              f"perplexity per token {result['perplexity']:.2f} "
              f"({counts['pairs']} pairs; {counts['empty']} with an empty "
              f"side and {counts['too_long']} over max_len left out)",
              flush=True)
        if writer is not None:
            with writer.as_default(step=result["step"]):
                tf.summary.scalar(f"{split}/bleu", result["bleu"])
                tf.summary.scalar(f"{split}/perplexity", result["perplexity"])
        return result

    def curve_extras(self):
        """With `config.train.eval_train_pairs` = N > 0, the per-token
        perplexity of the first N usable training pairs in inference mode
        (seen in training once a pass is done): against valid's, how much
        the model has memorised rather than learned."""
        count = self.config.train.eval_train_pairs
        if not count:
            return {}
        pairs = data_lib.tokenized(
            data_lib.sentence_pairs(self.config.data, "train"),
            self.tokenizer).filter(data_lib.usable(self.config.data.max_len))
        nll, tokens = self._nll_and_tokens(pairs.take(count))
        return {"train_sample_perplexity": float(np.exp(nll / tokens))}

    def _nll_and_tokens(self, pairs):
        """Summed negative log-likelihood of the target tokens of `pairs`
        (usable tokenized pairs, as `eval_pairs` gives) in inference mode,
        and their count."""
        if self._eval_fn is None:
            self._eval_fn = self.distribution.compile_eval(self._eval_stats)
        nll = tokens = 0.0
        for batch in data_lib.eval_batches(pairs, self.config.data,
                                           self.first_tag_id,
                                           self.distribution.num_replicas):
            stats = self._eval_fn({key: value.numpy()
                                   for key, value in batch.items()})
            nll += float(stats["nll"])
            tokens += float(stats["tokens"])
        return nll, tokens

    def _eval_stats(self, batch):
        nll_sum, stats = self.loss_stats(batch, training=False)
        return dict(stats, nll=nll_sum)

    def translate(self, sources, languages=None):
        """Translations of `sources` (strings) into `languages` (codes, one
        per source; default the first target language), in order."""
        languages = languages or [self.languages[0]] * len(sources)
        translator = self.translator()
        size = self.config.decode.batch_size
        # Sorted by length, so that a batch's sentences pad little.
        order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
        output = [None] * len(sources)
        for start in range(0, len(order), size):
            chosen = order[start:start + size]
            translations = translator.translate_to(
                tf.constant([sources[i] for i in chosen]),
                tf.constant([languages[i] for i in chosen]))
            for i, translation in zip(chosen, translations.numpy()):
                output[i] = translation.decode()
        return output
