"""Routing metrics of an MoE layer: the paper's Table 6 measures, the
balancing losses and the dropped fraction, as Keras metrics."""

import keras
import tensorflow as tf

from tf_moe import balance
from tf_moe import distribution

ROUTING_METRICS = ("importance_loss", "load_loss", "importance_cv",
                   "load_cv", "load_max_over_mean", "dropped_fraction")


class RoutingMetrics:
    """Mixin for an MoE layer: means of its routing metrics over the calls
    since the last reset, in `model.fit` logs as `<name>_<metric>`.

    CV(Importance), CV(Load) and max(Load)/mean(Load) are the paper's Table
    6 measures, with Load the tokens each expert received (what the smooth
    Load estimates).
    """

    def _make_metric_trackers(self, loss_names=()):
        """One Keras `Mean` per metric; `loss_names` are the gates' extra
        loss terms."""
        self._metric_trackers = {
            metric: keras.metrics.Mean(name=f"{self.name}_{metric}")
            for metric in ROUTING_METRICS + tuple(loss_names)
        }

    def _record_routing(self, importance, counts, num_dropped, num_routed,
                        losses):
        """Updates the metrics from a batch's `[E]` Importance and `[E]`
        routed slots per expert, the dropped and routed totals, and the
        dict of loss terms."""
        values = balance.routing_statistics(importance, counts, num_dropped,
                                            num_routed)
        values.update(losses)
        for metric, value in values.items():
            self._metric_trackers[metric].update_state(value)
        self.expert_token_counts.assign(tf.cast(counts, tf.int32))

    def routing_metrics(self, reset=False):
        """The routing metrics averaged over the calls since the last reset.

        Returns a dict of float scalars: `importance_loss`, `load_loss`
        (`threshold_loss` with batchwise gating), `importance_cv`,
        `load_cv` and `load_max_over_mean` (Load counted in tokens routed to
        each expert) and `dropped_fraction`. With `reset=True` the averages
        start again afterwards, e.g. between training and evaluation.
        """
        values = {name: float(distribution.to_numpy(tracker.result()))
                  for name, tracker in self._metric_trackers.items()}
        if reset:
            for tracker in self._metric_trackers.values():
                tracker.reset_state()
        return values
