"""Flag values shared by the trainer benchmarks (bench_lm, bench_nmt)."""


def number_or_name(value):
    """A flag's value as a float if it reads as one, else the string: the
    experts' learning-rate scale is a factor (0.5) or a rule (square_root)."""
    try:
        return float(value)
    except ValueError:
        return value
