"""`--kernel_choices`, for the benchmarks that train (bench_lm, bench_nmt).

The experts' kernels and layouts are chosen by timing (`tf_moe.kernels`), and
timings differ between processes: two runs with the same seed can choose
differently and add in another order. With the same `--kernel_choices=PATH`,
the second run loads the first one's choices and repeats it to the last digit.
"""

import os

from absl import flags

from tf_moe import kernels

PATH = flags.DEFINE_string(
    "kernel_choices", "", "A JSON file of the experts' kernel choices "
    "(tf_moe.kernels.save_choices): loaded before training if it exists, so "
    "that a run with the same seed repeats the one that wrote it, and "
    "written at the end with every choice of this run.")


def load():
    """Runs by `--kernel_choices` where that file exists."""
    if PATH.value and os.path.exists(PATH.value):
        kernels.load_choices(PATH.value)


def save():
    """Writes this process's choices to `--kernel_choices`, if given."""
    if PATH.value:
        kernels.save_choices(PATH.value)
