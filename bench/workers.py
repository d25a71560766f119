"""One benchmark configuration per process: each has its own peak memory
and its own TensorFlow state. A worker prints `RESULT <json>`."""

import json
import subprocess
import sys


def measure(script, worker, args, names, env=None):
    """Runs `script --worker=<worker>` with `--<name>=<args.name>` for each
    of `names`; returns the worker's RESULT dict."""
    command = [sys.executable, script, f"--worker={worker}"]
    command += [f"--{name}={getattr(args, name)}" for name in names]
    completed = subprocess.run(command, capture_output=True, text=True,
                               check=False, env=env)
    for line in completed.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"benchmark worker {worker} failed:\n"
                       f"{completed.stderr[-4000:]}")
