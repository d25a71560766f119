"""Batches by tokens, and datasets whose iterator a checkpoint can hold."""

import tensorflow as tf


def token_batches(examples, length, tokens_per_batch, longest,
                  padded_shapes, multiple=1):
    """Bucketed, padded batches of about `tokens_per_batch` tokens each.

    Args:
        examples: a dataset of dicts of 1-D sequences (and scalars).
        length: `example -> scalar int32`, the length that is bucketed on
            (padding included, a batch is `rows * bucket length` tokens).
        tokens_per_batch: the tokens a batch holds, padding included.
        longest: the longest `length` an example can have.
        padded_shapes: `dataset.padded_batch`'s, for the example's keys.
        multiple: batch sizes are a multiple of this (the replicas).
    """
    boundaries = []
    bucket = 8
    while bucket < longest:
        boundaries.append(bucket)
        bucket *= 2
    sizes = [max(multiple, (tokens_per_batch // b) // multiple * multiple)
             for b in boundaries + [longest]]
    return examples.bucket_by_sequence_length(
        length, bucket_boundaries=[b + 1 for b in boundaries],
        bucket_batch_sizes=sizes, padded_shapes=padded_shapes)


def checkpointable(ds):
    """`ds`, deterministic, with an iterator that `tf.train.Checkpoint` can
    save although it reads the tokenizer's table: the table is constant,
    so its state need not be saved (tf.data refuses otherwise)."""
    options = tf.data.Options()
    options.experimental_external_state_policy = (
        tf.data.experimental.ExternalStatePolicy.IGNORE)
    options.deterministic = True
    return ds.with_options(options)
