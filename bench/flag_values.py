"""Flag values shared by the trainer benchmarks (bench_lm, bench_nmt)."""

import ast


def number_or_name(value):
    """A flag's value as a float if it reads as one, else the string: the
    experts' learning-rate scale is a factor (0.5) or a rule (square_root)."""
    try:
        return float(value)
    except ValueError:
        return value


def parse_model_overrides(items):
    """`--model_override`'s `["key=value", ...]` as `{key: value}`, each
    value a Python literal (a bare word is taken as a string)."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--model_override expects key=value, got "
                             f"{item!r}.")
        try:
            overrides[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            overrides[key] = value
    return overrides


def override_model(name, model, overrides):
    """Sets `overrides` (`{key: value}`) in model `name`'s `config.model`,
    refusing a key the config does not have."""
    unknown = sorted(set(overrides) - set(model))
    if unknown:
        raise ValueError(f"--model_override: {name}'s config.model has no "
                         f"field {', '.join(unknown)}.")
    for key, value in overrides.items():
        model[key] = value
