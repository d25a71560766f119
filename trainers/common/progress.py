"""The one-line training progress report: step, loss, tokens/s and ETA."""

import time


def format_duration(seconds):
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


class Progress:
    """Tokens/s and ETA over the steps since the last report.

    Args:
        total_steps: the step training ends at.
        start_step: the step it starts (or resumes) from.
    """

    def __init__(self, total_steps, start_step):
        self.total_steps = total_steps
        self._step = start_step
        self._time = time.perf_counter()
        self._tokens = 0

    def add_tokens(self, tokens):
        self._tokens += tokens

    def report(self, step, **values):
        """Returns `(line, tokens_per_second)` and starts a new window."""
        now = time.perf_counter()
        elapsed = max(now - self._time, 1e-9)
        steps = max(step - self._step, 1)
        tokens_per_second = self._tokens / elapsed
        eta = (self.total_steps - step) * elapsed / steps
        fields = " | ".join(f"{name} {value:.4g}"
                            for name, value in values.items())
        line = (f"step {step}/{self.total_steps} | {fields} | "
                f"{tokens_per_second:,.0f} tok/s | ETA {format_duration(eta)}")
        self._step, self._time, self._tokens = step, now, 0
        return line, tokens_per_second
