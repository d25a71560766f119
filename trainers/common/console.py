"""What a trainer prints: its own lines by default, TensorFlow's on request,
and a user's mistake as one line.

By default a run shows its configuration summary, the progress lines, the
evaluations and where it wrote things. TensorFlow's C++ log (CUDA probes on
a machine without a GPU, oneDNN notes), its Python INFO lines (checkpoint
callbacks, signature renaming at export) and its warnings are hidden; any
`--verbosity` / `-v` flag (absl's) brings them back, as does setting
`TF_CPP_MIN_LOG_LEVEL` yourself.

A mistake of the user's (a config field that does not exist, a missing data
file, a workdir holding another model) ends in one line, `error: ...`, with
the nearest valid name where there is one, and exit status 2; with
`--verbosity` the traceback follows.
"""

import difflib
import os
import sys

from absl import app
from absl import flags

# What a trainer raises for bad input: the messages name the field, file or
# directory (see trainers/lm/data.py, trainers/common/checkpoints.py).
USER_ERRORS = (ValueError, FileNotFoundError, KeyError)


def _verbose(argv):
    return any(arg.startswith(("--verbosity", "-v", "--v="))
               for arg in argv[1:])


def quiet_tensorflow(argv):
    """Hides TensorFlow's logging unless the command line asks for it (or
    `TF_CPP_MIN_LOG_LEVEL` is set already).

    Call before TensorFlow is imported: this imports it.
    """
    if _verbose(argv) or "TF_CPP_MIN_LOG_LEVEL" in os.environ:
        return
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    # TensorFlow's shared libraries log while they load, before its log
    # level applies (abseil's "before InitializeLog" lines: the oneDNN and
    # CUDA probes), so the import runs with stderr closed. Importing does
    # not initialise the devices: logical CPUs can still be configured.
    saved_stderr = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        import tensorflow  # noqa: F401
    finally:
        os.dup2(saved_stderr, 2)
        os.close(saved_stderr)
        os.close(devnull)
    # The Python side; absl shows only warnings and errors of its own by
    # default.
    import logging
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    logging.getLogger("absl").setLevel(logging.WARNING)
    import warnings
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=UserWarning,
                            module="keras")


def fail(message, argv):
    """Ends the run with one line (and the traceback when verbose)."""
    if _verbose(argv):
        import traceback
        traceback.print_exc()
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def _config_overrides(argv):
    """`(flag name, field path)` of each `--<config>.<path>=value`."""
    for arg in argv[1:]:
        if not arg.startswith("--") or "." not in arg.split("=")[0]:
            continue
        name, _, path = arg[2:].split("=")[0].partition(".")
        yield name, path


def _unknown_field(config, path):
    """`(the first missing part of path, the names valid there)`, or None
    when the path exists."""
    node = config
    for depth, part in enumerate(path.split(".")):
        keys = list(node.keys()) if hasattr(node, "keys") else []
        if part not in keys:
            return ".".join(path.split(".")[:depth + 1]), keys
        node = node[part]
    return None


def _load_config(spec):
    """The ConfigDict of `--config=<file>[:<argument>]`, loaded afresh (the
    flag itself may be left half-parsed by the failed override)."""
    import importlib.util
    path, _, argument = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(argument) if argument else module.get_config()


def _explain_override_error(argv):
    """The one line for a failed `--config.<path>=value` naming a field
    that does not exist, or None when every override names a field (the
    error is another one)."""
    files = dict(arg[2:].split("=", 1) for arg in argv[1:]
                 if arg.startswith("--") and "=" in arg
                 and "." not in arg.split("=")[0])
    for name, path in _config_overrides(argv):
        if name not in files:
            continue
        try:
            config = _load_config(files[name])
        except Exception:  # pylint: disable=broad-except
            return None  # The config file's own error is reported as is.
        unknown = _unknown_field(config, path)
        if unknown is not None:
            missing, valid = unknown
            close = difflib.get_close_matches(missing.split(".")[-1], valid,
                                              n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            return (f"--{name}.{path}: the config has no field "
                    f"{missing!r}{hint} (fields there: {', '.join(valid)})")
    return None


def parse_flags(argv):
    """absl's flag parsing, with a config override's mistake as one line."""
    try:
        return flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, TypeError,
            ValueError) as error:
        if any(True for _ in _config_overrides(argv)):
            message = _explain_override_error(argv)
            if message is not None:
                fail(message, argv)
        fail(f"{error} (--help lists the flags)", argv)


def run(main):
    """`app.run(main)` with the quiet default and one-line user errors."""
    quiet_tensorflow(sys.argv)

    def guarded(argv):
        if not _verbose(sys.argv):
            # After absl has applied its --verbosity default.
            from absl import logging as absl_logging
            import tensorflow as tf
            absl_logging.set_verbosity(absl_logging.WARNING)
            tf.get_logger().setLevel("ERROR")
        try:
            return main(argv)
        except USER_ERRORS as error:
            message = error.args[0] if error.args else repr(error)
            fail(message, sys.argv)

    app.run(guarded, flags_parser=parse_flags)
