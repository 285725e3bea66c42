"""What every stage is built on: the ``Stage`` base class and its ``StageConfig``, its ``StageResult``, the
``RunContext`` stages share, and the ``STAGES`` registry (``@STAGES.register("prune")``).

A stage is one module: a config (``StageConfig`` subclass with ``stage: Literal["name"]``) and a ``Stage[Config]``
subclass that declares the outputs it ``requires`` (an earlier stage must make them), ``consumes`` (read when an earlier
stage made them) and ``provides``, and whether it is ``repeatable``. The recipe schema builds its ``stages`` union from
the registry and derives the stage order and the "stage X needs Y" errors from these declarations
(:meth:`StageRegistry.order_problem`), so registering a stage is all it takes to use it in a recipe.

The built-in stages live in :mod:`dsk_compress.recipes.stages` (one module per stage) and import this module;
:mod:`dsk_compress.recipes.schema` imports them, :mod:`dsk_compress.recipes.runner` plans and runs them. Nothing here
imports any of those, so there is no import cycle.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar, get_args, get_origin

from pydantic import BaseModel, ConfigDict

from dsk_compress.registry import Registry

C = TypeVar("C")


class StrictModel(BaseModel):
    """Base of every recipe model: unknown keys are refused, and NaN and infinities in every float field (a NaN bound
    turns a check off, an inf temperature NaNs the loss)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class StageConfig(StrictModel):
    """Base of every stage config; ``stage`` is the discriminator (a subclass narrows it to ``Literal["name"]``)."""

    stage: str


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
        """The teacher model (eval mode) in ``teacher.dtype`` (auto: the checkpoint's dtype, fp32 for fp16 weights), loaded
        once, and again after :meth:`release_teacher` if a later stage still asks for it."""
        if self._teacher is None:
            from dsk_compress.models.source import load_model_source

            self._teacher = load_model_source(self.spec.teacher.model_dump(exclude_none=True))
            self.teacher_loads = getattr(self, "teacher_loads", 0) + 1
            self._teacher_config = self._teacher.config if hasattr(self._teacher, "config") else None
        return self._teacher

    def teacher_config(self):
        """The teacher's Hugging Face config (None for a torch factory's model), without loading the teacher again once
        it has been loaded (and released)."""
        if getattr(self, "_teacher_config", None) is None:
            return getattr(self.teacher(), "config", None)
        return self._teacher_config

    def teacher_loaded(self) -> bool:
        return self._teacher is not None

    def release_teacher(self) -> bool:
        """Drop the teacher (and its FSDP copy) so its memory goes back before later stages run; the logit cache keeps
        what it computed and reloads the teacher only on a miss. Returns whether anything was released."""
        if self._teacher is None and self._sharded_teacher is None:
            return False
        import gc

        self._teacher = None
        self._sharded_teacher = None
        if self._cache is not None:
            self._cache.teacher = None  # reloaded lazily (TeacherLogitCache.loader) on a miss
        gc.collect()
        try:  # glibc keeps freed arenas; hand them back so the peak of the next stage is its own
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        return True

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

            self._cache = TeacherLogitCache(
                self.run_dir / "teacher_logits",
                self.teacher(),
                self.task.fingerprint(),
                self.spec.logit_cache.top_k,
                online=self.kd_teacher() if self.teacher_sharded() else None,
                loader=self.kd_teacher,
            )
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

    What it declares (names of :attr:`StageResult.outputs` keys):

    * ``provides``: the outputs its ``run`` returns, e.g. ``("model",)``;
    * ``requires``: outputs an earlier stage must provide (no such stage in the recipe is an error naming the stages
      that would provide them);
    * ``consumes``: outputs it reads when an earlier stage provided them (and otherwise does without, e.g. starts from
      the recipe's student);
    * ``repeatable``: whether a recipe may hold it more than once.

    A stage that requires or consumes an output comes after every stage that provides it; that is the whole order rule.
    ``ranks`` says where it runs under torchrun: ``"all"`` (every rank, rank 0 alone writes files) or
    ``"main"`` (rank 0 alone, the other ranks wait for its result); see :mod:`dsk_compress.recipes.runner`.

    Library code it calls raises :class:`~dsk_compress.errors.InvalidArgument` naming its own argument; the runner
    says it as the recipe field (:func:`field_error`): a field of the stage's config of the same name, or the one
    ``arguments`` maps it to (e.g. ``{"widths": "channel_ratio"}``), or a recipe-wide field (:data:`RUN_FIELDS`).
    """

    name: ClassVar[str]
    config_type: ClassVar[type[StageConfig]]  # set by STAGES.register from Stage[Config]
    ranks: ClassVar[str] = "all"
    provides: ClassVar[tuple[str, ...]] = ()
    requires: ClassVar[tuple[str, ...]] = ()
    consumes: ClassVar[tuple[str, ...]] = ()
    repeatable: ClassVar[bool] = False
    arguments: ClassVar[dict[str, str]] = {}

    def __init__(self, config: C) -> None:
        self.config = config

    def run(self, ctx: RunContext) -> StageResult:  # pragma: no cover - interface
        raise NotImplementedError

    def uses_teacher(self, spec) -> bool:
        """Whether :meth:`run` runs the teacher model (so the run keeps it loaded until this stage is done). A training
        stage does when it distils online: KD without the logit cache (or for your own torch model, which has none),
        Taylor importance or a hidden-state term; with the cache only a miss runs it, and the cache reloads it then.
        A stage with no KD settings is assumed to (override it)."""
        c = self.config
        kd = getattr(c, "kd_weight", None)
        if kd is None:
            return True
        online = kd > 0 and (not spec.logit_cache.enabled or spec.student.torch is not None)
        return online or getattr(c, "importance", None) == "taylor" or (getattr(c, "hidden_mse", 0) or 0) > 0

    def budget(self, spec) -> str:
        """What the stage header says this stage will spend; empty for the header's own (steps x batch, timed runs)."""
        return ""

    def effective_config(self, spec) -> C:
        """The config as :meth:`run` will use it in recipe ``spec``: defaults that depend on the rest of the recipe filled
        in. ``--dry-run`` prints this, so the plan shows what will run."""
        return self.config


# library arguments the recipe sets outside the stages: where (for InvalidArgument raised by library code)
RUN_FIELDS = {
    "student": "student",
    "task_tokenizer": "task.tokenizer",
    "layers": "student.from_teacher.layers",
    "keep_every": "student.from_teacher.keep_every",
    "intermediate_size": "student.from_teacher.intermediate_size",
    "ffn_init": "student.from_teacher.ffn_init",
}


def field_error(e, stage: Stage | None = None, index: int | None = None):
    """The library's InvalidArgument ``e`` as a RecipeError naming the recipe field the user edits: ``stages.<index>.``
    and the field of ``stage``'s config it is about, else the recipe-wide field (:data:`RUN_FIELDS`), else ``e``'s own
    words under the stage's name."""
    from dsk_compress.errors import RecipeError

    if stage is not None:
        arg = stage.arguments.get(e.argument, e.argument)
        if arg.split(".")[0] in type(stage.config).model_fields:
            return e.as_field(f"stages.{index}.{arg}")
    if e.argument in RUN_FIELDS:
        return e.as_field(RUN_FIELDS[e.argument])
    where = f"stages.{index} ({stage.name}): " if stage is not None else ""
    return RecipeError(where + e.message, hint=e.hint)


def _config_type(cls: type) -> type[StageConfig] | None:
    """``Config`` of a class declared as ``class X(Stage[Config])`` (or of its nearest such base)."""
    for klass in cls.__mro__:
        for base in getattr(klass, "__orig_bases__", ()):
            if get_origin(base) is Stage:
                args = get_args(base)
                if args and isinstance(args[0], type) and issubclass(args[0], StageConfig):
                    return args[0]
    return None


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


class StageRegistry(Registry[type[Stage]]):
    """The stage registry: ``@STAGES.register(name)`` checks the stage's config and declarations, and tells the
    listeners (the recipe schema, which rebuilds its ``stages`` union) whenever a stage comes or goes."""

    def __init__(self) -> None:
        super().__init__("stage")
        self._listeners: list[Callable[[], None]] = []

    def register(self, name: str) -> Callable[[type[Stage]], type[Stage]]:
        def deco(cls: type[Stage]) -> type[Stage]:
            if name in self._items:
                raise ValueError(f"stage {name!r} is already registered")
            config = getattr(cls, "config_type", None) or _config_type(cls)
            if config is None:
                raise ValueError(f"stage {name!r}: declare its config as `class {cls.__name__}(Stage[MyConfig])`")
            tag = config.model_fields.get("stage")
            if tag is None or get_args(tag.annotation) != (name,):
                raise ValueError(f"stage {name!r}: {config.__name__} needs `stage: Literal[{name!r}] = {name!r}`")
            for attr in ("provides", "requires", "consumes"):
                if isinstance(getattr(cls, attr), str):
                    raise ValueError(f"stage {name!r}: {attr} is a tuple of output names, e.g. ({getattr(cls, attr)!r},)")
            Registry.register(self, name)(cls)
            cls.name, cls.config_type = name, config
            self._changed()
            return cls

        return deco

    def unregister(self, name: str) -> None:
        """Remove stage ``name`` (a test's toy stage); the listeners hear of it."""
        del self._items[name]
        self._changed()

    def subscribe(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` after every register / unregister."""
        self._listeners.append(listener)

    def _changed(self) -> None:
        for listener in self._listeners:
            listener()

    def names(self) -> list[str]:
        """Registered stage names in pipeline order (:meth:`order`)."""
        return self.order()

    def __iter__(self):
        return iter(self.order())

    def classes(self) -> list[type[Stage]]:
        """The registered stage classes in pipeline order."""
        return [self._items[n] for n in self.order()]

    def providers(self, output: str) -> list[str]:
        """Names of the stages that provide ``output``, in pipeline order."""
        return [n for n in self.order() if output in self._items[n].provides]

    def order(self) -> list[str]:
        """Every registered stage, each after the stages whose outputs it requires or consumes; ties keep the order of
        registration (the built-ins register as distill, prune, qat, export, bench)."""
        names = list(self._items)
        needs = {n: set(self._items[n].requires) | set(self._items[n].consumes) for n in names}
        after = {n: {m for m in names if m != n and needs[n] & set(self._items[m].provides)} for n in names}
        out: list[str] = []
        while len(out) < len(names):
            ready = [n for n in names if n not in out and after[n] <= set(out)]
            out.append(ready[0] if ready else next(n for n in names if n not in out))  # a cycle: registration order
        return out

    def order_problem(self, stages: list[str]) -> str | None:
        """What is wrong with the stage sequence ``stages`` (names), or None: a stage repeated that is not repeatable,
        a stage after one that reads what it provides, or a required output that no earlier stage provides."""
        for i, name in enumerate(stages):
            cls = self.get(name)
            if name in stages[:i] and not cls.repeatable:
                return f"stages.{i}: a second {name!r} stage is not supported"
            for earlier in dict.fromkeys(stages[:i]):
                e = self._items[earlier]
                if earlier != name and (set(e.requires) | set(e.consumes)) & set(cls.provides):
                    return f"stages.{i}: {name!r} cannot come after {earlier!r}; order stages as {' -> '.join(self.order())}"
        for i, name in enumerate(stages):
            for output in self._items[name].requires:
                if not any(output in self._items[m].provides for m in stages[:i]):
                    providers = self.providers(output)
                    if not providers:
                        return f"stages.{i}: {name!r} needs {output!r}, which no registered stage provides"
                    which = " or ".join(f"{p!r}" for p in providers)
                    return f"{_article(name)} {name!r} stage needs {_article(providers[0])} {which} stage before it"
        return None


STAGES = StageRegistry()
