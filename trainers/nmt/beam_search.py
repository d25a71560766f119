"""Batched beam search with GNMT's length penalty, all TensorFlow ops.

A hypothesis of `n` pieces (its end of sentence included) with summed
log-probability `log_p` scores `log_p / length_penalty(n)`, where

    length_penalty(n) = ((5 + n) / 6) ** alpha      (Wu et al., 2016)

Each step extends every live hypothesis by every piece, keeps the `2 *
beam` best extensions (enough that `beam` of them are not finished), moves
those ending in end of sentence to the finished pool (the `beam` best kept)
and continues with the `beam` best others. A sentence stops when its pool is
full and no live hypothesis can beat its worst member any more: live
log-probabilities only fall and, for alpha >= 0, the penalty at
`max_length` is the most any could be divided by. At `max_length`
unfinished hypotheses compete with the finished ones, scored at their
length. A beam of 1 is greedy decoding.
"""

import tensorflow as tf

_NEG_INF = -1e9


def length_penalty(length, alpha):
    """GNMT's `((5 + length) / 6) ** alpha`."""
    return tf.pow((5.0 + tf.cast(length, tf.float32)) / 6.0, alpha)


def _gather_beams(tensor, indices, batch, beam):
    """Rows of `tensor [batch * beam, ...]` picked per sentence by `indices
    [batch, new_beam]` (beam positions) -> `[batch * new_beam, ...]`."""
    shaped = tf.reshape(tensor, tf.concat([[batch, beam],
                                           tf.shape(tensor)[1:]], 0))
    picked = tf.gather(shaped, indices, batch_dims=1)
    return tf.reshape(picked, tf.concat([[-1], tf.shape(tensor)[1:]], 0))


def beam_search(step_fn, state, batch, beam_size, max_length, alpha,
                bos_id, eos_id):
    """The `beam_size` best outputs of every sentence.

    Args:
        step_fn: `(ids [batch * beam], state) -> (log_probs [batch * beam,
            vocab], state)`; `state` is a list of `[batch * beam, ...]`
            tensors (row `i * beam + j` is sentence i's hypothesis j).
        state: the initial state, rows as above.
        batch: the number of sentences (scalar int32 tensor).
        beam_size: a Python int >= 1.
        max_length: the most pieces an output has (scalar int32 tensor).
        alpha: the length penalty's exponent (>= 0).
        bos_id, eos_id: the first input and the end of sentence.
    Returns:
        `(ids [batch, beam, length] int32, scores [batch, beam])`, best
        first; an output ends with `eos_id` (unless cut at `max_length`),
        then 0s.
    """
    beam = beam_size
    alpha = tf.cast(alpha, tf.float32)
    max_length = tf.cast(max_length, tf.int32)
    live_log_p = tf.tile([[0.0] + [_NEG_INF] * (beam - 1)], [batch, 1])
    live_ids = tf.zeros([batch, beam, 0], tf.int32)
    last = tf.fill([batch * beam], bos_id)
    finished_ids = tf.zeros([batch, beam, 0], tf.int32)
    finished_scores = tf.fill([batch, beam], _NEG_INF)

    def sentence_done(live_log_p, finished_scores):
        best_possible = live_log_p[:, 0] / length_penalty(max_length, alpha)
        return ((finished_scores[:, -1] > _NEG_INF / 2)
                & (finished_scores[:, -1] >= best_possible))

    def condition(step, live_log_p, live_ids, last, state, finished_ids,
                  finished_scores):
        return (step < max_length) & ~tf.reduce_all(
            sentence_done(live_log_p, finished_scores))

    def body(step, live_log_p, live_ids, last, state, finished_ids,
             finished_scores):
        log_probs, state = step_fn(last, state)
        vocab = tf.shape(log_probs)[-1]
        candidates = (live_log_p[:, :, None]
                      + tf.reshape(log_probs, [batch, beam, vocab]))
        top_log_p, top_index = tf.math.top_k(
            tf.reshape(candidates, [batch, beam * vocab]), k=2 * beam)
        origin = top_index // vocab  # The live hypothesis extended.
        piece = top_index % vocab
        top_ids = tf.concat([tf.gather(live_ids, origin, batch_dims=1),
                             piece[:, :, None]], -1)
        ends = tf.equal(piece, eos_id)

        # Live: the best extensions that do not end.
        live_log_p, keep = tf.math.top_k(
            tf.where(ends, _NEG_INF, top_log_p), k=beam)
        live_ids = tf.gather(top_ids, keep, batch_dims=1)
        chosen = tf.gather(origin, keep, batch_dims=1)
        state = [_gather_beams(s, chosen, batch, beam) for s in state]
        last = tf.reshape(tf.gather(piece, keep, batch_dims=1), [-1])

        # Finished: the pool and the extensions that end, best kept.
        # (Extensions of the padding hypotheses the first step starts with
        # stay out.)
        new_scores = tf.where(
            ends & (top_log_p > _NEG_INF / 2),
            top_log_p / length_penalty(step + 1, alpha), _NEG_INF)
        pool_ids = tf.concat(
            [tf.pad(finished_ids, [[0, 0], [0, 0], [0, 1]]), top_ids], 1)
        finished_scores, best = tf.math.top_k(
            tf.concat([finished_scores, new_scores], 1), k=beam)
        finished_ids = tf.gather(pool_ids, best, batch_dims=1)
        return (step + 1, live_log_p, live_ids, last, state, finished_ids,
                finished_scores)

    loop_vars = (tf.constant(0), live_log_p, live_ids, last, list(state),
                 finished_ids, finished_scores)
    invariants = (tf.TensorShape([]), tf.TensorShape([None, beam]),
                  tf.TensorShape([None, beam, None]), tf.TensorShape([None]),
                  [tf.TensorShape([None]).concatenate(s.shape[1:])
                   for s in state],
                  tf.TensorShape([None, beam, None]),
                  tf.TensorShape([None, beam]))
    (steps, live_log_p, live_ids, _, _, finished_ids,
     finished_scores) = tf.while_loop(condition, body, loop_vars,
                                      shape_invariants=invariants)
    # Hypotheses still live at the end compete, scored at their length.
    live_scores = tf.where(live_log_p > _NEG_INF / 2,
                           live_log_p / length_penalty(steps, alpha),
                           _NEG_INF)
    scores, best = tf.math.top_k(
        tf.concat([finished_scores, live_scores], 1), k=beam)
    ids = tf.gather(tf.concat([finished_ids, live_ids], 1), best,
                    batch_dims=1)
    return ids, scores


def greedy_search(step_fn, state, batch, max_length, bos_id, eos_id):
    """The most probable piece at every step, until the end of sentence.

    Args and returns as `beam_search`'s with one hypothesis a sentence:
    `(ids [batch, 1, length], scores [batch, 1])`, scores the summed
    log-probabilities.
    """
    max_length = tf.cast(max_length, tf.int32)

    def condition(step, ids, last, state, done, log_p):
        return (step < max_length) & ~tf.reduce_all(done)

    def body(step, ids, last, state, done, log_p):
        log_probs, state = step_fn(last, state)
        piece = tf.argmax(log_probs, axis=-1, output_type=tf.int32)
        log_p += tf.where(done, 0.0, tf.reduce_max(log_probs, axis=-1))
        piece = tf.where(done, 0, piece)
        ids = tf.concat([ids, piece[:, None]], 1)
        return step + 1, ids, piece, state, done | (piece == eos_id), log_p

    loop_vars = (tf.constant(0), tf.zeros([batch, 0], tf.int32),
                 tf.fill([batch], bos_id), list(state),
                 tf.zeros([batch], tf.bool), tf.zeros([batch]))
    invariants = (tf.TensorShape([]), tf.TensorShape([None, None]),
                  tf.TensorShape([None]),
                  [tf.TensorShape([None]).concatenate(s.shape[1:])
                   for s in state],
                  tf.TensorShape([None]), tf.TensorShape([None]))
    _, ids, _, _, _, log_p = tf.while_loop(condition, body, loop_vars,
                                           shape_invariants=invariants)
    return ids[:, None], log_p[:, None]
