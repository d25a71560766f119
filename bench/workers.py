"""One benchmark configuration per process: each has its own peak memory
and its own TensorFlow state. A worker prints `RESULT <json>`.

`measure` runs a worker to the end; `Server` keeps one alive and times one
step at a time, so that the steps of two configurations can alternate in
rounds and be compared round by round (`Server.step`)."""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time


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


class Server:
    """A worker started with `--serve`, timing one step per `step()` call.

    The worker builds its step and runs its warm-up, prints `READY`, then
    reads commands on stdin: `step` times one step and prints `TIME
    <seconds>`; `result` prints its `RESULT <json>` (over the steps timed
    so far) and exits. The constructor returns once the worker is ready,
    so that its start (building, the kernels' timing, the warm-up) runs
    beside no other worker's timed step. A context manager: leaving it
    kills a worker that has not finished.
    """

    def __init__(self, script, worker, args, names, env=None):
        self.worker = worker
        command = [sys.executable, script, f"--worker={worker}", "--serve"]
        command += [f"--{name}={getattr(args, name)}" for name in names]
        # stderr to a file: TensorFlow's logs would fill a pipe and block.
        self._stderr = tempfile.TemporaryFile(mode="w+")
        self._process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self._stderr, text=True, env=env)
        self._read_until("READY")

    def step(self):
        """Seconds of one timed step of this worker."""
        return float(self._ask("step", "TIME "))

    def result(self):
        """The worker's RESULT dict; the worker then exits."""
        result = json.loads(self._ask("result", "RESULT "))
        self._process.wait()
        return result

    def _ask(self, command, prefix):
        try:
            self._process.stdin.write(command + "\n")
            self._process.stdin.flush()
        except BrokenPipeError:
            self._fail()
        return self._read_until(prefix)

    def _read_until(self, prefix):
        """The rest of the worker's next stdout line that starts with
        `prefix`."""
        for line in self._process.stdout:
            if line.startswith(prefix):
                return line[len(prefix):]
        self._fail()

    def _fail(self):
        self._process.wait()
        self._stderr.seek(0)
        raise RuntimeError(f"benchmark worker {self.worker} failed:\n"
                           f"{self._stderr.read()[-4000:]}")

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        if self._process.poll() is None:
            self._process.kill()
            self._process.wait()
        self._stderr.close()


def machine():
    """What the figures were taken on: the CPU's model and features, the
    cores, and whether TensorFlow's oneDNN kernels were asked off."""
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


def write_results(path, args, **results):
    """Writes `{"config": vars(args), "machine": machine(), **results}` as
    JSON to `path` (making its folder) and says so."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"config": vars(args), "machine": machine(), **results},
                  f, indent=2)
    print(f"\nwrote {path}")


def time_in_rounds(functions, rounds):
    """Times each of `functions` (`{name: () -> None}`, each returning once
    its work is done) once per round, in turn, so that the machine's drift
    falls on all alike.

    Returns:
        `(medians, seconds)`: `{name: median seconds}` and `{name: [seconds
        of each round]}`.
    """
    seconds = {name: [] for name in functions}
    for _ in range(rounds):
        for name, function in functions.items():
            start = time.perf_counter()
            function()
            seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(s) for name, s in seconds.items()}, seconds
