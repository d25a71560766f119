"""Checks of constructor arguments, with errors that name the argument."""


def check_positive_int(name, value):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"`{name}` must be an int >= 1, got {value!r}.")


def check_non_negative(name, value):
    if (not isinstance(value, (int, float)) or isinstance(value, bool)
            or value < 0):
        raise ValueError(f"`{name}` must be a number >= 0, got {value!r}.")


def check_activation(name, value):
    """A Keras activation name or a callable; the error names `name`."""
    if callable(value):
        return
    if isinstance(value, str):
        try:
            import keras
            keras.activations.get(value)
            return
        except (ValueError, TypeError):
            pass
    raise ValueError(f"`{name}` must be a callable or the name of a Keras "
                     f"activation, got {value!r}.")
