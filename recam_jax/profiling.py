"""Where a run's time goes: goodput metrics, and a jax.profiler trace of chosen steps.

Both are measured on the host and never wait for the device: the host queues steps ahead of it, so
a host-side wait (for data, say) costs device time only once that queue has drained. The host does
wait for the device where the loop already does (log points, checkpoints, exports) and at the last
traced step.
"""

from __future__ import annotations

import collections
import contextlib
import time

import jax

from recam_jax import storage

# Time that is not training steps, by what the loop was doing.
OVERHEADS = ("eval", "checkpoint", "export", "sample")


class Goodput:
    """Host seconds by activity since the run's first step ended, turned into metrics at log points:

    - `train_step_time_s`: wall time per step since the last log point, less eval, checkpoint,
      export and sample time (`step_time_s` includes all but the sample time);
    - `data_wait_s`: seconds spent waiting for batches since the last log point;
    - `goodput_s`: seconds of training steps since this start (after its first step; neither
      overheads nor data waits), and `goodput`, its fraction of `wall_time_s` (since this start,
      compiling and restoring included: `time_to_first_step_s`).
    """

    def __init__(self):
        self.started = time.perf_counter()
        self.first_step_ended = None
        self.spent = collections.defaultdict(float)
        self._last_log = None  # (time, spent, step) at the last log point

    @contextlib.contextmanager
    def timing(self, activity: str):
        """Counts the time in the `with` block as `activity` (data_wait or one of OVERHEADS)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.first_step_ended is not None:
                self.spent[activity] += time.perf_counter() - start

    def first_step(self, step: int) -> float:
        """Marks the end of this start's first step; returns the time to reach it."""
        self.first_step_ended = time.perf_counter()
        self._last_log = (self.first_step_ended, dict(self.spent), step)
        return self.first_step_ended - self.started

    def metrics(self, step: int) -> dict[str, float]:
        """The goodput metrics at log point `step` (after `first_step`)."""
        now = time.perf_counter()
        last_time, last_spent, last_step = self._last_log
        self._last_log = (now, dict(self.spent), step)
        interval_overheads = sum(self.spent[a] - last_spent.get(a, 0.0) for a in OVERHEADS)
        training = now - self.first_step_ended - sum(self.spent.values())
        wall = now - self.started
        return {
            "train_step_time_s": (now - last_time - interval_overheads) / max(step - last_step, 1),
            "data_wait_s": self.spent["data_wait"] - last_spent.get("data_wait", 0.0),
            "goodput_s": training, "wall_time_s": wall, "goodput": training / wall,
        }


class Profiler:
    """Traces steps first … first + count − 1 with jax.profiler into WORKDIR/tensorboard, where
    TensorBoard's profile plugin (xprof) reads it (plugins/profile/RUN/HOST.xplane.pb)."""

    def __init__(self, workdir: str, first: int, count: int, last_step: int):
        self.logdir = storage.join(storage.absolute(workdir), "tensorboard")
        self.first, self.last = first, min(first + count - 1, last_step)
        self.enabled = count > 0
        self.tracing = False

    def before_step(self, step: int) -> None:
        if self.enabled and step == self.first:
            jax.profiler.start_trace(self.logdir)
            self.tracing = True

    def after_step(self, step: int, state) -> None:
        """Ends the trace after the last traced step, once the device has run it."""
        if self.tracing and step >= self.last:
            jax.block_until_ready(state)
            jax.profiler.stop_trace()
            self.tracing = False
