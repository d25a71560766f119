"""The papers' learning-rate schedule: linear warm-up, an optional constant
stretch, then decay proportional to the inverse square root of the step."""

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="tf_moe_trainers")
class WarmupInverseSqrt(keras.optimizers.schedules.LearningRateSchedule):
    """`base * min(s / warmup, 1)` until `warmup + constant`, then
    `base * sqrt((warmup + constant) / s)`, with `s = step + 1`.

    The LM of the paper uses `constant_steps=0` (1000 warm-up steps, then
    inverse-square-root decay); its NMT models keep the rate constant for a
    while first.
    """

    def __init__(self, base_rate, warmup_steps, constant_steps=0):
        if base_rate <= 0:
            raise ValueError(f"`base_rate` must be > 0, got {base_rate}.")
        if warmup_steps < 0 or constant_steps < 0:
            raise ValueError("`warmup_steps` and `constant_steps` must be "
                             f">= 0, got {warmup_steps}, {constant_steps}.")
        self.base_rate = float(base_rate)
        self.warmup_steps = int(warmup_steps)
        self.constant_steps = int(constant_steps)

    def __call__(self, step):
        s = tf.cast(step, tf.float32) + 1.0
        warmup = tf.minimum(s / max(self.warmup_steps, 1), 1.0)
        decay_start = float(max(self.warmup_steps + self.constant_steps, 1))
        decay = tf.sqrt(decay_start / tf.maximum(s, decay_start))
        return self.base_rate * warmup * decay

    def get_config(self):
        return dict(base_rate=self.base_rate, warmup_steps=self.warmup_steps,
                    constant_steps=self.constant_steps)
