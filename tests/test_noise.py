"""The gates' normal noise (tf_moe.noise): standard normal, seeded."""

import keras
import numpy as np
import pytest
import scipy.stats
import tensorflow as tf

from tf_moe import noise


@pytest.mark.parametrize("shape", [(200_001,), (317, 631)])
def test_samples_are_standard_normal(shape):
    samples = noise.standard_normal(list(shape), tf.float32, seed=3).numpy()
    assert samples.shape == shape
    samples = samples.ravel()
    assert np.all(np.isfinite(samples))
    # Mean 0 and variance 1 within 5 standard errors; the whole law by a
    # Kolmogorov-Smirnov test (p > 1e-3).
    n = samples.size
    assert abs(samples.mean()) < 5 / np.sqrt(n)
    assert abs(samples.var() - 1) < 5 * np.sqrt(2 / n)
    assert scipy.stats.kstest(samples, "norm").pvalue > 1e-3
    # The cosine and sine halves are independent of each other.
    half = n // 2
    assert abs(np.corrcoef(samples[:half], samples[half:2 * half])[0, 1]) < (
        5 / np.sqrt(half))


def test_a_seed_generator_draws_the_same_stream_again():
    first = keras.random.SeedGenerator(7)
    again = keras.random.SeedGenerator(7)
    a1, a2 = (noise.standard_normal([4, 5], tf.float32, first)
              for _ in range(2))
    b1 = noise.standard_normal([4, 5], tf.float32, again)
    np.testing.assert_array_equal(a1, b1)
    assert not np.array_equal(a1, a2)


def test_shape_known_only_at_run_time_and_dtype():
    @tf.function(input_signature=[tf.TensorSpec([None, 3])])
    def draw(x):
        return noise.standard_normal(tf.shape(x), tf.bfloat16, seed=1)

    samples = draw(tf.zeros([5, 3]))
    assert samples.shape == (5, 3) and samples.dtype == tf.bfloat16
    assert draw.get_concrete_function().structured_outputs.shape.as_list() \
        == [None, 3]
