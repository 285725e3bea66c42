"""The recipe runner: plan stages, run them in a run directory, record a manifest, resume.

``runs/<recipe>-<timestamp>/manifest.json`` holds the resolved recipe, package and library
versions, seed, host and per-stage status, timings, outputs and metrics. A stage marked ``done``
is skipped on ``--resume``; an interrupted training stage continues from its last checkpoint.
"""

from __future__ import annotations

import platform
import socket
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

from dsk_compress.errors import DskError, RecipeError, RunError
from dsk_compress.io import atomic_write_json, read_json
from dsk_compress.registry import Registry

C = TypeVar("C")
MANIFEST_VERSION = 1


@dataclass
class StageResult:
    outputs: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)


class RunContext:
    """What stages share: the run directory, the recipe, the task, the teacher and earlier outputs."""

    def __init__(self, run_dir: Path, spec, resume: bool = False) -> None:
        self.run_dir = Path(run_dir)
        self.spec = spec
        self.resume = resume
        self.outputs: dict[str, dict[str, Any]] = {}
        self.metrics: dict[str, dict[str, Any]] = {}
        self._task = None
        self._teacher = None
        self._cache = None

    @property
    def task(self):
        if self._task is None:
            from dsk_compress.tasks import build_task

            self._task = build_task(self.spec.task.model_dump())
        return self._task

    def teacher(self):
        """The teacher model (float32, eval mode), loaded once."""
        if self._teacher is None:
            from dsk_compress.models.source import load_model_source

            self._teacher = load_model_source(self.spec.teacher.model_dump(exclude_none=True))
        return self._teacher

    def logit_cache(self):
        """The run's teacher-logit cache, or None when the recipe does not enable it."""
        if not self.spec.logit_cache.enabled:
            return None
        if self._cache is None:
            from dsk_compress.compress.logit_cache import TeacherLogitCache

            self._cache = TeacherLogitCache(self.run_dir / "teacher_logits", self.teacher(), self.task.fingerprint(), self.spec.logit_cache.top_k)
        return self._cache

    def stage_dir(self, name: str) -> Path:
        d = self.run_dir / name
        d.mkdir(parents=True, exist_ok=True)
        return d

    def path(self, rel: str | Path) -> Path:
        return self.run_dir / rel

    def rel(self, p: str | Path) -> str:
        return str(Path(p).relative_to(self.run_dir))

    def latest_output(self, key: str, before: str | None = None):
        """The most recent earlier stage output named ``key`` (e.g. the student model directory)."""
        found = None
        for stage, outs in self.outputs.items():
            if stage == before:
                break
            if key in outs:
                found = outs[key]
        return found


class Stage(Generic[C]):
    """A pipeline stage: a typed config and ``run(ctx) -> StageResult``."""

    name: ClassVar[str]

    def __init__(self, config: C) -> None:
        self.config = config

    def run(self, ctx: RunContext) -> StageResult:  # pragma: no cover - interface
        raise NotImplementedError


STAGES: Registry[type[Stage]] = Registry("stage")


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("dsk-compress", "torch", "transformers", "onnx", "onnxruntime", "torch-pruning", "numpy", "onnxslim"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    out["python"] = platform.python_version()
    return out


def host_info() -> dict[str, Any]:
    import os

    return {"hostname": socket.gethostname(), "machine": platform.machine(), "system": platform.system(),
            "processor": platform.processor(), "cpu_count": os.cpu_count()}


def latest_run(out: Path, recipe: str) -> Path | None:
    runs = sorted(p for p in Path(out).glob(f"{recipe}-*") if (p / "manifest.json").is_file())
    return runs[-1] if runs else None


def plan(spec) -> list[Stage]:
    """Instantiate the recipe's stages (the schema already checked their order)."""
    import dsk_compress.recipes.stages  # noqa: F401  (registers the built-in stages)

    return [STAGES.get(cfg.stage)(cfg) for cfg in spec.stages]


def describe_plan(spec) -> list[dict[str, Any]]:
    return [{"index": i, **cfg.model_dump()} for i, cfg in enumerate(spec.stages)]


def run_recipe(spec, out: str | Path = "runs", resume: bool | str | Path = False, run_dir: str | Path | None = None):
    """Run a validated recipe end to end.

    Args:
        spec: a RecipeSpec (see ``load_recipe``).
        out: parent directory for new runs.
        resume: True to continue the latest run of this recipe under ``out``, or a run directory.
        run_dir: an explicit directory for a new run.

    Returns:
        Path of the run directory (it holds manifest.json and the report).
    """
    stages = plan(spec)
    resolved = spec.model_dump(mode="json")
    manifest: dict[str, Any]
    if resume:
        rd = Path(resume) if not isinstance(resume, bool) else latest_run(Path(out), spec.name)
        if rd is None or not (rd / "manifest.json").is_file():
            raise RunError(f"no run of {spec.name!r} to resume under {out}", hint="run it without --resume first")
        manifest = read_json(rd / "manifest.json")
        if manifest.get("recipe") != resolved:
            raise RunError(f"the recipe differs from the one {rd} was started with", hint="resume with the same recipe and --set values, or start a new run")
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        rd = Path(run_dir) if run_dir else Path(out) / f"{spec.name}-{stamp}"
        if (rd / "manifest.json").exists():
            raise RunError(f"{rd} already holds a run", hint="use --resume to continue it or choose another --out")
        manifest = {
            "version": MANIFEST_VERSION,
            "name": spec.name,
            "recipe": resolved,
            "seed": spec.seed,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "host": host_info(),
            "versions": _versions(),
            "stages": [{"index": i, "stage": s.config.stage, "status": "pending"} for i, s in enumerate(stages)],
            "status": "running",
        }
    rd.mkdir(parents=True, exist_ok=True)
    ctx = RunContext(rd, spec, resume=bool(resume))
    import torch

    torch.manual_seed(spec.seed)
    mpath = rd / "manifest.json"
    atomic_write_json(mpath, manifest)
    for i, stage in enumerate(stages):
        entry = manifest["stages"][i]
        name = stage.config.stage
        if entry.get("status") == "done":
            ctx.outputs[name] = entry.get("outputs", {})
            ctx.metrics[name] = entry.get("metrics", {})
            continue
        entry.update(status="running", started=time.strftime("%Y-%m-%dT%H:%M:%S"), error=None)
        manifest["status"] = "running"
        atomic_write_json(mpath, manifest)
        t0 = time.perf_counter()
        try:
            result = stage.run(ctx)
        except KeyboardInterrupt:
            entry.update(status="interrupted", seconds=round(time.perf_counter() - t0, 2))
            manifest["status"] = "interrupted"
            atomic_write_json(mpath, manifest)
            raise
        except DskError as e:
            entry.update(status="failed", error=str(e), seconds=round(time.perf_counter() - t0, 2))
            manifest["status"] = "failed"
            atomic_write_json(mpath, manifest)
            raise
        except Exception as e:
            entry.update(status="failed", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc(limit=20),
                         seconds=round(time.perf_counter() - t0, 2))
            manifest["status"] = "failed"
            atomic_write_json(mpath, manifest)
            raise
        entry.update(status="done", finished=time.strftime("%Y-%m-%dT%H:%M:%S"),
                     seconds=round(time.perf_counter() - t0, 2),
                     outputs=result.outputs, metrics=result.metrics)
        ctx.outputs[name] = result.outputs
        ctx.metrics[name] = result.metrics
        atomic_write_json(rd / name / "metrics.json", result.metrics)
        atomic_write_json(mpath, manifest)
    manifest["status"] = "done"
    manifest["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    atomic_write_json(mpath, manifest)
    return rd

