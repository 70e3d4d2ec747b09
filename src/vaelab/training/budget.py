"""--time-limit: when a run stops training so that it ends, evaluated and saved, within its minutes.

The clock starts when the run starts (data loading included). Training stops at the first step boundary where
the time left is less than the last evaluation took (nothing before the first one), so the evaluation that
follows still fits; a partial epoch is then checkpointed, evaluated and saved like a whole one.

One process checks the clock before every step. Several processes (torchrun) must all stop after the same
step without waiting on each other every step, so they plan ahead: at each progress report (every
PROGRESS_EVERY steps, where they already exchange the loss) rank 0 estimates, from the pace since the previous
report, the step at which its clock will pass the deadline, and every process learns it in that same exchange.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator

clock: Callable[[], float] = time.monotonic  # seconds; a module attribute, so tests can replace it


class Budget:
    """The time limit of one run (or of one continued run): `minutes` None for no limit."""

    def __init__(self, minutes: float | None, report_every: int):
        self.deadline = clock() + 60 * minutes if minutes else math.inf
        self.minutes = minutes
        self.report_every = report_every
        self.reserve = 0.0  # seconds the last evaluation took: kept free for the next one
        self.stop_at: int | None = None  # the step the processes agreed to stop before (several processes)
        self.hit = False  # training stopped for the limit
        self._mark = (clock(), 0)  # (time, step) of the last report

    @property
    def limited(self) -> bool:
        return math.isfinite(self.deadline)

    def _left(self) -> float:
        return self.deadline - self.reserve - clock()

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        """An evaluation: its duration becomes the time kept free for the next one."""
        t0 = clock()
        yield
        self.reserve = clock() - t0

    def start_epoch(self, step: int) -> None:
        self._mark = (clock(), step)

    def due(self, step: int, processes: int) -> bool:
        """Whether training stops before `step` (checked before every step)."""
        if not self.limited:
            return False
        due = self._left() <= 0 if processes == 1 else self.stop_at is not None and step >= self.stop_at
        self.hit = self.hit or due
        return due

    def expired(self, processes: int) -> bool:
        """Between epochs: whether the budget is spent (several processes: whether a planned stop is pending, which
        they all know alike)."""
        if not self.limited:
            return False
        expired = self._left() <= 0 if processes == 1 else self.stop_at is not None
        self.hit = self.hit or expired
        return expired

    def plan(self, step: int) -> float:
        """Rank 0, at the report after `step`: the step to stop before if the deadline falls before the next report,
        else 0, from the pace since the previous report."""
        now, (then, before) = clock(), self._mark
        self._mark = (now, step + 1)
        if not self.limited:
            return 0.0
        pace = (now - then) / max(step + 1 - before, 1)  # seconds per step
        steps = self._left() / pace if pace > 0 else math.inf
        return float(step + 1 + max(0, math.floor(steps))) if steps < self.report_every else 0.0

    def agree(self, planned: float) -> None:
        """Every process, after the report: the stop rank 0 planned, if any."""
        if planned > 0:
            self.stop_at = int(planned)
