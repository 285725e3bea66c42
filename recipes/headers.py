"""The one-line header a run prints before each stage: what the stage will do, and how long the last comparable run of
it took (the same stage, config, teacher, student and task in another run beside this one), when there is one.

    [2/5] prune: Structured pruning (...) with a KD fine-tune after each step; 100 steps x batch 32. Last comparable run: 1 min 17 s (runs/quant-prune-distill-20261207-043200)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MAX_RUNS_SCANNED = 50
"""Only the newest run directories beside this one are read (a manifest each)."""


def format_seconds(seconds: float) -> str:
    """``49 s``, ``6 min 36 s``, ``1 h 02 min``."""
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def what_it_does(stage) -> str:
    """The first sentence of the stage class's docstring, one line."""
    doc = " ".join((type(stage).__doc__ or "").split("\n\n")[0].split())
    return doc.rstrip(".") or type(stage).__name__


def _budget(cfg) -> str:
    steps, batch = getattr(cfg, "steps", None), getattr(cfg, "batch_size", None)
    if isinstance(steps, int) and steps > 0 and isinstance(batch, int):
        return f"{steps} steps x batch {batch}"
    if getattr(cfg, "stage", None) == "bench" and isinstance(getattr(cfg, "runs", None), int):
        return f"{cfg.runs} timed runs per variant"
    if getattr(cfg, "stage", None) == "export" and isinstance(getattr(cfg, "teacher", None), str):
        return f"teacher: {cfg.teacher}"  # effective_config resolved auto (onnx / torch / skip by the modelled export peak)
    return ""


def last_comparable(run_dir: Path, resolved: dict[str, Any], index: int) -> tuple[float, Path] | None:
    """``(seconds, run directory)`` of the newest other run beside ``run_dir`` whose stage ``index`` finished with the same
    config, teacher, student and task as ``resolved`` (the recipe as JSON, as manifests store it); None when there is none."""
    mine = Path(run_dir).resolve()
    config = resolved["stages"][index]
    wanted = {k: resolved.get(k) for k in ("teacher", "student", "task")}
    try:
        manifests = sorted(Path(run_dir).parent.glob("*/manifest.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    except OSError:
        return None
    for path in manifests[:MAX_RUNS_SCANNED]:
        if path.parent.resolve() == mine:
            continue
        try:
            m = json.loads(path.read_text(encoding="utf-8"))
            recipe, entry = m["recipe"], m["stages"][index]
            same = recipe["stages"][index] == config and all(recipe.get(k) == v for k, v in wanted.items())
        except (OSError, ValueError, KeyError, IndexError, TypeError):
            continue  # a damaged or foreign manifest says nothing about timing
        if same and entry.get("status") == "done" and isinstance(entry.get("seconds"), (int, float)):
            return float(entry["seconds"]), path.parent
    return None


def stage_header(index: int, total: int, stage, spec, run_dir: Path) -> str:
    """``[i/n] name: what it does; budget. Last comparable run: T (where)`` for the stage about to run."""
    cfg = stage.effective_config(spec)
    budget = stage.budget(spec) or _budget(cfg)
    line = f"[{index + 1}/{total}] {cfg.stage}: {what_it_does(stage)}" + (f"; {budget}" if budget else "") + "."
    last = last_comparable(run_dir, spec.model_dump(mode="json"), index)
    if last is not None:
        line += f" Last comparable run: {format_seconds(last[0])} ({last[1]})"
    return line
