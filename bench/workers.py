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


def machine():
    """What the figures were taken on: the CPU's model and features, the
    cores, and whether TensorFlow's oneDNN kernels were asked off."""
    import os
    flags, model = set(), None
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model is None:
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(),
            "avx512": "avx512f" in flags, "amx": "amx_tile" in flags,
            "onednn": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default")}
