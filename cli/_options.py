"""Option aliases shared by several commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

OutDir = Annotated[Path, typer.Option("--out", "-o", help="Parent directory for run directories.")]
ThreadsOpt = Annotated[
    int | None,
    typer.Option(
        "--threads",
        min=1,
        help="torch CPU threads for training and evaluation (default: a recipe's threads field, "
        "else OMP_NUM_THREADS, else this machine's physical cores); printed and recorded.",
    ),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override one recipe field, e.g. --set stages.1.ffn_ratio=0.4 (repeatable)."),
]
