"""Rich progress bars with loss, throughput and ETA; plain log lines when not on a terminal."""

from __future__ import annotations

import time
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)
log = Console()
"""Where a stage's step lines go off a terminal: stdout, beside the stage headers (stderr keeps errors to one line)."""


class _Bar:
    def __init__(self, progress: Progress | None, task_id, desc: str, total: int) -> None:
        self.progress = progress
        self.task_id = task_id
        self.desc = desc
        self.total = total
        self._last_log = 0.0

    def update(self, completed: int, loss: float | None, tokens_per_s: float, extra: dict | None = None) -> None:
        stats = (f"loss {loss:.4f} | " if loss is not None else "") + f"{tokens_per_s:,.0f} tok/s"
        if extra and "accuracy" in extra:
            stats += f" | val acc {extra['accuracy']:.2f}%"
        if self.progress is not None:
            self.progress.update(self.task_id, completed=completed, stats=stats)
        else:
            now = time.monotonic()
            if now - self._last_log > 30 or completed == self.total or extra:
                self._last_log = now
                console.print(f"[{self.desc}] step {completed}/{self.total} | {stats}", highlight=False, markup=False)


@contextmanager
def train_progress(desc: str, total: int, completed: int = 0):
    """A progress bar for a training loop (falls back to a log line every 30 s off-terminal)."""
    if not console.is_terminal:
        yield _Bar(None, None, desc, total)
        return
    columns = [
        TextColumn("[bold blue]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[stats]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=console, transient=False) as p:
        tid = p.add_task(desc, total=total, completed=completed, stats="")
        yield _Bar(p, tid, desc, total)


class _Steps:
    """The steps of a stage that does not train (export's graphs, bench's measurements): a spinner with the current step
    and the time so far on a terminal, one log line per step elsewhere."""

    def __init__(self, progress: Progress | None, task_id, desc: str) -> None:
        self.progress = progress
        self.task_id = task_id
        self.desc = desc
        self.count = 0
        self.t0 = time.monotonic()

    def step(self, label: str) -> None:
        self.count += 1
        if self.progress is not None:
            self.progress.update(self.task_id, completed=self.count - 1, label=f"step {self.count}: {label}")
        else:
            log.print(
                f"[{self.desc}] step {self.count} at {time.monotonic() - self.t0:.0f} s: {label}",
                highlight=False,
                markup=False,
                soft_wrap=True,
            )


_active: list[_Steps] = []


@contextmanager
def step_progress(desc: str):
    """Show the progress of a stage made of steps announced with :func:`step` (a no-op where none is active).

    Nested or concurrent uses keep the outer display; a training bar (:func:`train_progress`) must not run inside it.
    """
    if _active:  # already shown by an outer stage (e.g. `dsk-compress bench` inside a bench stage)
        yield _active[-1]
        return
    if not console.is_terminal:
        steps = _Steps(None, None, desc)
        _active.append(steps)
        try:
            yield steps
        finally:
            _active.remove(steps)
        return
    from rich.progress import SpinnerColumn

    columns = [SpinnerColumn(), TextColumn("[bold blue]{task.description}"), TextColumn("{task.fields[label]}"), TimeElapsedColumn()]
    with Progress(*columns, console=console, transient=False) as p:
        steps = _Steps(p, p.add_task(desc, total=None, label=""), desc)
        _active.append(steps)
        try:
            yield steps
            p.update(steps.task_id, label=f"{steps.count} steps done")
        finally:
            _active.remove(steps)


def step(label: str) -> None:
    """Announce the next step (``"teacher: fp32 ONNX + parity check"``) to the active :func:`step_progress`, if any."""
    if _active:
        _active[-1].step(label)
