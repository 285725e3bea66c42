"""What every stage is built on: the ``Stage`` base class, its ``StageResult``, the ``RunContext`` stages share,
and the ``STAGES`` registry (``@STAGES.register("prune")``).

The built-in stages live in :mod:`dsk_compress.recipes.stages` (one module per stage) and import this module;
:mod:`dsk_compress.recipes.runner` plans and runs them. Nothing here imports either, so there is no import cycle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

from dsk_compress.registry import Registry

C = TypeVar("C")


@dataclass
class StageResult:
    """What a stage hands on: ``outputs`` (paths relative to the run directory, read by later stages) and ``metrics``."""

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
        self._sharded_teacher = None
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

    def teacher_sharded(self) -> bool:
        """True when training stages run an FSDP-sharded copy of the teacher (``distributed.teacher: fsdp`` under torchrun)."""
        from dsk_compress.compress import dist

        return self.spec.distributed.teacher == "fsdp" and dist.env().enabled

    def kd_teacher(self):
        """The teacher as KD, Taylor importance and the logit cache run it: :meth:`teacher` (training stages move it
        to their device), or under ``distributed.teacher: fsdp`` a copy sharded across the ranks' training devices,
        built once (the whole teacher stays on the CPU for student construction and export)."""
        if not self.teacher_sharded():
            return self.teacher()
        if self._sharded_teacher is None:
            import copy

            from dsk_compress.compress import dist
            from dsk_compress.compress.trainer import default_device

            self._sharded_teacher = dist.shard_frozen(copy.deepcopy(self.teacher()), dist.device(dist.init(), default_device()))
        return self._sharded_teacher

    def logit_cache(self):
        """The run's teacher-logit cache, or None when the recipe does not enable it."""
        if not self.spec.logit_cache.enabled:
            return None
        if self._cache is None:
            from dsk_compress.compress.logit_cache import TeacherLogitCache

            self._cache = TeacherLogitCache(self.run_dir / "teacher_logits", self.teacher(), self.task.fingerprint(), self.spec.logit_cache.top_k,
                                            online=self.kd_teacher() if self.teacher_sharded() else None)
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
    """A pipeline stage: a typed config and ``run(ctx) -> StageResult``.

    ``ranks`` says where it runs under torchrun: ``"all"`` (every rank, rank 0 alone writes files) or
    ``"main"`` (rank 0 alone, the other ranks wait for its result); see :mod:`dsk_compress.recipes.runner`.
    """

    name: ClassVar[str]
    ranks: ClassVar[str] = "all"

    def __init__(self, config: C) -> None:
        self.config = config

    def run(self, ctx: RunContext) -> StageResult:  # pragma: no cover - interface
        raise NotImplementedError

    def effective_config(self, spec) -> C:
        """The config as :meth:`run` will use it in recipe ``spec``: defaults that depend on the rest of the recipe filled
        in. ``--dry-run`` prints this, so the plan shows what will run."""
        return self.config


STAGES: Registry[type[Stage]] = Registry("stage")
