"""Rich progress bars with loss, throughput and ETA; plain log lines when not on a terminal."""

from __future__ import annotations

import time
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)


class _Bar:
    def __init__(self, progress: Progress | None, task_id, desc: str, total: int) -> None:
        self.progress = progress
        self.task_id = task_id
        self.desc = desc
        self.total = total
        self._last_log = 0.0

    def update(self, completed: int, loss: float, tokens_per_s: float, extra: dict | None = None) -> None:
        stats = f"loss {loss:.4f} | {tokens_per_s:,.0f} tok/s"
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

