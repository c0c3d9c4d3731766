"""Run guards: preemption (SIGTERM -> checkpoint at the next step boundary, exit 0) and loss spikes.

Single process: a SIGTERM handler sets a flag that the loop reads at each step boundary, and a
watchdog ends the process if no boundary is reached within the grace period (the last complete
checkpoint stays intact; orbax never exposes a half-written one).

Multi-host: every process must stop at the *same* step, or the collective save would hang. JAX's
preemption sync manager (started by `jax.distributed.initialize`) receives the notice (SIGTERM or
the TPU maintenance event) and `reached_preemption_sync_point(step)` turns true for the same step on
every process, so no Python handler is installed there.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
from typing import Optional


class PreemptionGuard:
    def __init__(self, grace_s: float, multihost: bool, log=lambda m: print(m, file=sys.stderr, flush=True)):
        self.grace_s, self.multihost, self.log = grace_s, multihost, log
        self.requested_at: Optional[float] = None
        self._done = threading.Event()
        self._previous = None
        if not multihost and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame) -> None:
        if self.requested_at is not None:
            return
        self.requested_at = time.monotonic()
        self.log(f"SIGTERM: saving a checkpoint at the next step boundary (grace {self.grace_s:.0f}s)")
        threading.Thread(target=self._watchdog, daemon=True).start()

    def _watchdog(self) -> None:
        if not self._done.wait(self.grace_s):
            self.log(f"preemption grace period of {self.grace_s:.0f}s ran out before the checkpoint was "
                     f"written; exiting now (the last complete checkpoint is intact)")
            os._exit(143)

    def should_stop(self, step: int) -> bool:
        """Called by every process at every step boundary with the same step."""
        if self.multihost:
            from jax.experimental import multihost_utils
            return bool(multihost_utils.reached_preemption_sync_point(step))
        return self.requested_at is not None

    def close(self) -> None:
        self._done.set()
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


class SpikeDetector:
    """Flags a loss above `factor` x its running mean (an EMA over roughly the last 1/(1-decay)
    steps), after `warmup` steps. Spiking losses do not enter the mean, so one spike does not hide
    the next."""

    def __init__(self, factor: float, decay: float = 0.9, warmup: int = 5):
        self.factor, self.decay, self.warmup = factor, decay, warmup
        self.mean: Optional[float] = None
        self.seen = 0

    def update(self, step: int, loss: float) -> Optional[str]:
        if not self.factor or not math.isfinite(loss):
            return None
        if self.mean is not None and self.seen >= self.warmup and loss > self.factor * self.mean:
            return f"loss spike at step {step}: {loss:.4f} > {self.factor:g} x running mean {self.mean:.4f}"
        self.mean = loss if self.mean is None else self.decay * self.mean + (1 - self.decay) * loss
        self.seen += 1
        return None
