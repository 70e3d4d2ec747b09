"""When a run stops before its last epoch: Ctrl-C (or, under torchrun, the launcher's signals), and weights
that give a non-finite loss step after step."""

from __future__ import annotations

import contextlib
import os
import signal

from ..config import TrainConfig
from ..errors import ERROR_STATUS, INTERRUPTED_STATUS, VaelabError, say
from ..models.vae import VAE
from .distributed import reports

NONFINITE_STOP = 10  # consecutive non-finite steps (all skipped, so on unchanged weights) that stop a run


class StopFlag:
    """First Ctrl-C asks the loop to stop after the current step; a second one interrupts at once.

    Under torchrun the launcher passes Ctrl-C on to every process as SIGINT, and stops them with SIGTERM when one
    of them fails: both ask to stop. The processes then stop together at the next step where they compare notes
    (`agreed`), so every one of them stops after the same step.

    A process that leaves the loop with an error answers SIGTERM from then on by printing the error's line (if it
    is the one that reports it) and exiting at once: when another process dies, the launcher's SIGTERM would
    otherwise end this one silently between noticing the loss and printing the line that says where its
    checkpoint stands, and a process waiting on a peer that is gone must still end when the launcher says so."""

    def __init__(self, signals: tuple[signal.Signals, ...] = (signal.SIGINT,)):
        self.requested = False
        self.agreed = False
        self.signals = signals
        self._previous: dict = {}

    def __enter__(self):
        for sig in self.signals:
            with contextlib.suppress(ValueError):  # not the main thread: no handler, Ctrl-C behaves as usual
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, kind, value, tb):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        if value is not None and signal.SIGTERM in self._previous:
            def say_and_exit(signum, frame):
                said = isinstance(value, VaelabError)
                if said and reports(value):
                    say(value)
                os._exit(ERROR_STATUS if said else INTERRUPTED_STATUS if isinstance(value, KeyboardInterrupt) else 1)

            signal.signal(signal.SIGTERM, say_and_exit)
        return False


def nonfinite_message(config: TrainConfig, model: VAE, epoch: int, step: int, streak: int) -> str:
    """The line that stops a run whose last `streak` steps were all non-finite, naming the likely causes."""
    causes = [f"the learning rate is too high (--lr {config.lr:g}; try {config.lr / 10:g})"]
    causes += model.likelihood.instability_causes(str(config.model.sigma))
    if config.optim.beta != 1.0:
        causes.append(f"--beta {config.optim.beta:g}")
    return (f"the loss was non-finite in the last {streak} steps up to epoch {epoch + 1}, step {step + 1} (their "
            "updates were skipped, so the weights themselves give it); likely cause: " + "; or ".join(causes) + "."
            + (" The last checkpoint (previous epoch) is kept." if epoch > 0 else " No checkpoint was written."))
