"""tf.distribute replicas: the one-device program on every replica, with
the balancing statistics summed over them."""

import threading

import tensorflow as tf

from tf_moe.distribution.strategy import OneDevice


class Replicas(OneDevice):
    """Data parallelism with `tf.distribute` (MirroredStrategy,
    MultiWorkerMirroredStrategy), or one device.

    Each replica sees a shard of the batch, but Importance and Load are sums
    over the whole batch, and CV^2 of a sum is not the mean of per-shard
    CV^2s. With the sums all-reduced every replica computes the
    single-device loss (Keras divides each replica's `add_loss` terms by the
    number of replicas, and the gradient of the all-reduce is the
    all-reduce of the gradients).
    """

    def sum_over_replicas(self, values):
        """Replicas must issue their all-reduces in the same order, so a
        layer makes one call per stage, each depending on the one before."""
        context = tf.distribute.get_replica_context()
        if context is None or context.num_replicas_in_sync == 1:
            return values
        return context.all_reduce(tf.distribute.ReduceOp.SUM, values)


class PerReplicaLosses:
    """Mixin for a Keras layer whose `add_loss` terms follow a cross-replica
    sync: each MirroredStrategy replica reports its own terms.

    MirroredStrategy runs its replicas as threads that take turns at every
    cross-replica sync, and Keras keeps a layer's losses in one list. With
    an all-reduce before `add_loss`, replica r would read the r+1 losses
    added so far (the reported loss, not the gradients, which are per
    thread).
    """

    def add_loss(self, loss):
        super().add_loss(loss)
        self._loss_threads[id(loss)] = threading.get_ident()

    @property
    def _loss_threads(self):
        """id(loss) -> the thread that added it."""
        if "_loss_thread_ids" not in self.__dict__:
            self.__dict__["_loss_thread_ids"] = {}
        return self.__dict__["_loss_thread_ids"]

    def _clear_losses(self):
        super()._clear_losses()
        self._loss_threads.clear()

    def _get_own_losses(self):
        losses = super()._get_own_losses()
        if tf.distribute.get_strategy().num_replicas_in_sync == 1:
            return losses
        thread = threading.get_ident()
        return [loss for loss in losses
                if self._loss_threads.get(id(loss), thread) == thread]
