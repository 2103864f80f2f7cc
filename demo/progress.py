"""Progress of a long loop with a known number of steps (the demo's zoo training, its searches).

On a terminal: a tqdm bar (steps, rate, ETA) redrawn in place. Otherwise (a log, a pipe, CI): one line when the
phase starts, one every `every_s` seconds with the step and ETA, and one when it ends, so that nothing stays silent
for long and no carriage returns end up in a log file.
"""

from __future__ import annotations

import sys
import time


class StepProgress:
    """`update(step)` after each step (1-based, up to `total`; `total=` changes the total, e.g. when a planned count
    becomes exact); `close(suffix)` ends the phase with one line. `unit`: what a step is ("step", "candidate")."""

    def __init__(self, label: str, total: int, stream=None, every_s: float = 20.0, unit: str = "step"):
        self.label, self.total, self.every_s, self.unit = label, total, every_s, unit
        self.stream = stream or sys.stderr
        self.t0 = self.last = time.perf_counter()
        self.bar = None
        if hasattr(self.stream, "isatty") and self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=label, file=self.stream, unit=unit, dynamic_ncols=True)
        else:
            self._line(f"{label}: {total} {unit}s ...")

    def _line(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()

    def update(self, step: int, total: int | None = None) -> None:
        if total is not None and total != self.total:
            self.total = total
            if self.bar is not None:
                self.bar.total = total
                self.bar.refresh()
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            return
        now = time.perf_counter()
        if now - self.last >= self.every_s and 0 < step < self.total:
            self.last = now
            eta = (now - self.t0) / step * (self.total - step)
            self._line(f"{self.label}: {self.unit} {step}/{self.total}, ETA {eta:.0f} s")

    def close(self, suffix: str = "") -> None:
        if self.bar is not None:
            self.bar.close()
        self._line(f"{self.label}: done in {time.perf_counter() - self.t0:.0f} s{suffix}")
