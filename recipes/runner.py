"""The recipe runner: plan stages, run them in a run directory, record a manifest, resume.

``runs/<recipe>-<timestamp>/manifest.json`` holds the resolved recipe, package and library
versions, seed, host, torch threads (``threads``: count, source, physical cores, logical CPUs; see
:mod:`dsk_compress.threads`) and per-stage status, timings, outputs and metrics. A stage marked ``done``
is skipped on ``--resume``; an interrupted training stage continues from its last checkpoint. A resume may use other
threads than the run started with (the recipe's ``threads`` field is not compared): they change speed, not results
beyond float summation order.

Under ``torchrun --nproc_per_node N`` (see ``dsk_compress.compress.dist``) every rank runs this
same function:

* **Run directory and resume state**: rank 0 alone chooses and creates the run directory, reads or
  writes the manifest, and broadcasts ``(run directory, manifest)``; every rank then checks that it
  sees the directory (multi-node jobs need ``--out`` on a filesystem all nodes mount) and all ranks
  skip the same ``done`` stages. Only rank 0 writes ``manifest.json`` and ``<stage>/metrics.json``.
* **Stages whose** ``ranks`` **is** ``"all"`` (distill, prune, qat) run on every rank: their KD
  fine-tunes are data-parallel (each rank its slice of every global batch, DDP-averaged gradients);
  what is not training (student construction, torch-pruning surgery, QAT calibration, evaluation) is
  deterministic and runs identically on every rank, which keeps the ranks' models the same without
  shipping weights around (DDP also broadcasts rank 0's weights and checks shapes when it wraps a
  model). Only rank 0 writes files; a measured decision (prune's latency target) is measured on
  rank 0 and broadcast. This is simpler than running them on rank 0 alone: that would make every
  fine-tune single-process.
* **Stages whose** ``ranks`` **is** ``"main"`` (export, bench) run on rank 0 alone while the other
  ranks wait for its result (``dist.on_main``); inside, rank 0 works as a single process.
* A barrier ends every stage, so a stage never reads files the previous one is still writing.

Failures: a stage error raised on rank 0 is recorded in the manifest (``failed`` or
``interrupted``) before it propagates. A rank that raises never enters another collective: it
exits, and torchrun then stops the other ranks, so the job fails instead of hanging. Before
exiting, a rank other than 0 waits a few seconds for rank 0 to record the same failure (a
deterministic error reaches every rank at once). When only another rank failed, rank 0 either gets
an error from its pending collective (Gloo: the peer's connection closed), recorded as the stage's
failure, or is stopped by torchrun with the stage still ``running`` (NCCL); torchrun's log names the
failing rank, and ``--resume`` continues from the last checkpoint either way. In ``"main"`` stages
rank 0's error reaches the waiting ranks as a :class:`RunError`.
"""

from __future__ import annotations

import platform
import re
import shlex
import socket
import time
import traceback
from pathlib import Path
from typing import Any

from dsk_compress.errors import DskError, InvalidArgument, RunError, RunInterrupted
from dsk_compress.integrity import read_manifest, record_files, verify_stage
from dsk_compress.io import atomic_write_json, ensure_dir, format_bytes, read_json, remove_temp_files, storage_error, write_json_in_place
from dsk_compress.recipes.base import STAGES, RunContext, Stage, field_error

MANIFEST_VERSION = 1


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

    return {
        "hostname": socket.gethostname(),
        "machine": platform.machine(),
        "system": platform.system(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
    }


def latest_run(out: Path, recipe: str) -> Path | None:
    """The newest ``<out>/<recipe>-<YYYYmmdd-HHMMSS>`` folder whose manifest names ``recipe`` (so ``tiny-edge`` never
    picks ``tiny-edge-jetson-...``); a manifest that cannot be read still counts, and is reported when it is opened."""
    stamp = re.compile(re.escape(recipe) + r"-\d{8}-\d{6}")
    runs = []
    for p in Path(out).glob(f"{glob_escape(recipe)}-*"):
        if not (stamp.fullmatch(p.name) and (p / "manifest.json").is_file()):
            continue
        try:
            name = read_json(p / "manifest.json").get("name", recipe)
        except (RunError, AttributeError):
            name = recipe
        if name == recipe:
            runs.append(p)
    return sorted(runs)[-1] if runs else None


def glob_escape(text: str) -> str:
    """``text`` with glob wildcards quoted (a run name may contain ``[``? no, but a path part may)."""
    import glob

    return glob.escape(text)


def recipe_argument(name_or_path: str) -> str:
    """How a command names the recipe again from any folder: a bundled recipe by its name, a recipe file by its absolute path."""
    from dsk_compress.recipes import bundled_recipes

    s = str(name_or_path)
    if not Path(s).suffix and s in bundled_recipes():
        return s
    return str(Path(s).absolute())


def resume_command(spec, rd: Path, rerun_from: str | None = None) -> str:
    """The command that continues the run in ``rd`` (the recipe and ``--set`` values it was loaded with), from any folder."""
    origin = getattr(spec, "_origin", None) or (spec.name, ())
    sets = "".join(f" --set {shlex.quote(s)}" for s in origin[1])
    tail = f" --rerun-from {rerun_from}" if rerun_from else ""
    return (
        f"dsk-compress recipe {shlex.quote(recipe_argument(origin[0]))}{sets} --run-dir {shlex.quote(str(Path(rd).absolute()))} "
        f"--resume{tail}"
    )


def plan(spec) -> list[Stage]:
    """Instantiate the recipe's stages (the schema already checked their order)."""
    import dsk_compress.recipes.stages  # noqa: F401  (registers the built-in stages)

    return [STAGES.get(cfg.stage)(cfg) for cfg in spec.stages]


def describe_plan(spec) -> list[dict[str, Any]]:
    """Every stage's config as it will run (``Stage.effective_config``: defaults that depend on the recipe filled in)."""
    return [{"index": i, **st.effective_config(spec).model_dump()} for i, st in enumerate(plan(spec))]


def _same_recipe(stored: dict | None, resolved: dict) -> bool:
    """Whether a run's stored recipe means ``resolved`` under this version's schema (fields added since then take
    their defaults, so a run started by an older dsk-compress still resumes)."""
    from pydantic import ValidationError

    from dsk_compress.recipes.schema import RecipeSpec

    def identity(d: dict) -> dict:  # threads change speed, not what a run computes (beyond float summation order)
        return {k: v for k, v in d.items() if k != "threads"}

    try:
        return identity(RecipeSpec.model_validate(stored).model_dump(mode="json")) == identity(resolved)
    except ValidationError:
        return False


def _mark_for_rerun(rd: Path, manifest: dict[str, Any], stage: str) -> None:
    """Mark ``stage`` and every later stage pending again; their directories are kept as ``<stage>.replaced-<time>``."""
    names = [e["stage"] for e in manifest["stages"]]
    if stage not in names:
        raise RunError(f"--rerun-from {stage!r}: the run has no such stage", hint=f"choose one of: {', '.join(names)}")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for entry in manifest["stages"][names.index(stage) :]:
        old = rd / entry["stage"]
        if old.exists():
            old.rename(rd / f"{entry['stage']}.replaced-{stamp}")
        for k in ("outputs", "metrics", "error", "traceback", "finished", "seconds", "files", "signal"):
            entry.pop(k, None)
        entry["status"] = "pending"
    manifest["status"] = "running"


def _open_run(
    spec,
    stages: list[Stage],
    resolved: dict,
    out: Path,
    resume: bool | str | Path,
    run_dir: str | Path | None,
    world_size: int,
    rerun_from: str | None = None,
    threads: dict | None = None,
):
    """The run directory, its manifest and the lock held on it: read for ``resume``, else created and written (rank 0 only)."""
    from dsk_compress.runlock import RunLock

    manifest: dict[str, Any]
    if resume:
        if isinstance(resume, bool):
            if Path(out).exists() and not Path(out).is_dir():
                raise RunError(f"--out {out} is a file, not a folder", hint="give the folder that holds the runs")
            rd = latest_run(Path(out), spec.name)
            if rd is None:
                raise RunError(f"no run of {spec.name!r} to resume under {out}", hint="run it without --resume first")
        else:
            rd = Path(resume)
            if rd.exists() and not rd.is_dir():
                raise RunError(f"--run-dir {rd} is a file, not a run folder", hint="give the folder of the run to resume")
            if not (rd / "manifest.json").is_file():
                raise RunError(
                    f"{rd} holds no run to resume (no manifest.json)", hint="give the folder of an earlier run, or run without --resume"
                )
        lock = RunLock(rd).acquire()  # before reading the manifest: a live run would be rewriting it
        try:
            manifest = read_manifest(rd)
            if not _same_recipe(manifest.get("recipe"), resolved):
                raise RunError(
                    f"the recipe differs from the one {rd} was started with",
                    hint="resume with the same recipe and --set values, or start a new run",
                )
            names = [s.config.stage for s in stages]
            if [e["stage"] for e in manifest["stages"]] != names:
                raise RunError(
                    f"{rd / 'manifest.json'} lists stages {[e['stage'] for e in manifest['stages']]}, the recipe {names}",
                    hint="the manifest is damaged; start a new run",
                )
            # what stays done is read by the stages that run now: check it before anything is moved aside
            keep = names.index(rerun_from) if rerun_from in names else len(names)
            for entry in manifest["stages"][:keep]:
                if entry.get("status") == "done":
                    verify_stage(rd, manifest, entry)
            if rerun_from is not None:
                _mark_for_rerun(rd, manifest, rerun_from)
        except BaseException:
            lock.release()
            raise
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        if run_dir:
            rd = Path(run_dir)
            if rd.exists() and not rd.is_dir():
                raise RunError(f"--run-dir {rd} is a file, not a folder", hint="give a folder for the run")
        else:
            rd = Path(out) / f"{spec.name}-{stamp}"
            if Path(out).exists() and not Path(out).is_dir():
                raise RunError(f"--out {out} is a file, not a folder", hint="give a folder for the runs")
            if Path(out).resolve() not in rd.resolve().parents:  # the schema allows no separator or '..' in names; belt and braces
                raise RunError(f"run name {spec.name!r} would leave --out {out}", hint="use a plain name")
        ensure_dir(rd, "--run-dir" if run_dir else "--out")
        lock = RunLock(rd).acquire()  # two fresh runs into one folder: the second stops here, naming the first
        if (rd / "manifest.json").exists():
            lock.release()
            raise RunError(f"{rd} already holds a run", hint="use --resume to continue it or choose another --out")
        origin = getattr(spec, "_origin", None)
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
        if origin is not None:  # how to name this recipe again in a resume or rebuild command
            manifest["source"] = {"recipe": recipe_argument(origin[0]), "overrides": list(origin[1])}
    manifest["world_size"] = world_size  # of this (latest) launch
    if threads is not None:
        manifest["threads"] = threads  # of this (latest) launch, per process
    try:
        atomic_write_json(rd / "manifest.json", manifest)
    except BaseException as e:
        lock.release()
        found = storage_error(e, rd, f"opening the run {rd}") if isinstance(e, Exception) else None
        if found is not None:  # a full or read-only disk, a permission: one line naming this disk's free space
            raise found from None
        raise
    return rd, manifest, lock


def _record_failure(mpath: Path, manifest: dict[str, Any]) -> str | None:
    """Write the manifest that records a failed or interrupted stage; on a full disk, where a temp file has no room, in
    place. Returns a note when it could not be written at all (never raises: the stage's own error is what to say)."""
    try:
        atomic_write_json(mpath, manifest)
        return None
    except Exception:
        try:
            write_json_in_place(mpath, manifest)
            return None
        except Exception as e:
            return f"manifest.json could not record this either ({getattr(e, 'strerror', None) or e})"


def _wait_for_record(mpath: Path, index: int, seconds: float = 5.0) -> None:
    """On a rank other than 0 that failed: give rank 0 a moment to record the failure before torchrun stops it."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if read_json(mpath)["stages"][index].get("status") != "running":
                return
        except (OSError, ValueError, KeyError, IndexError):
            pass
        time.sleep(0.2)


def run_recipe(
    spec,
    out: str | Path = "runs",
    resume: bool | str | Path = False,
    run_dir: str | Path | None = None,
    rerun_from: str | None = None,
    threads: int | None = None,
):
    """Run a validated recipe end to end (in one process, or on every rank of a torchrun job).

    Args:
        spec: a RecipeSpec (see ``load_recipe``).
        out: parent directory for new runs.
        resume: True to continue the latest run of this recipe under ``out``, or a run directory.
        run_dir: an explicit directory for a new run.
        rerun_from: with ``resume``, run this stage and every later one again (e.g. ``export`` after an upgrade);
            their old directories are kept as ``<stage>.replaced-<time>``.
        threads: torch CPU threads (``--threads``), above the recipe's ``threads``, ``OMP_NUM_THREADS`` and the
            physical cores (:func:`dsk_compress.threads.choose_threads`); set for the run, recorded in the manifest,
            and set back when it returns.

    Returns:
        Path of the run directory (it holds manifest.json and the report); the same on every rank.
    """
    from dsk_compress.compress import dist

    if rerun_from is not None and not resume:
        raise RunError("--rerun-from needs a run to continue", hint="add --resume (or --run-dir DIR --resume)")
    from dsk_compress.interrupts import terminate_as_interrupt
    from dsk_compress.recipes.preflight import preflight
    from dsk_compress.threads import choose_threads, threads_in_effect

    stages = plan(spec)
    resolved = spec.model_dump(mode="json")
    choice = choose_threads(threads, spec.threads)  # a bad --threads is refused before anything starts
    denv = dist.init()  # joins the process group under torchrun; a no-op in a single process
    with threads_in_effect(choice):
        dist.on_main(lambda: preflight(spec), "checking the recipe")  # files, shapes and memory, before any work
        held: dict[str, Any] = {}

        def open_run():
            rd, manifest, held["lock"] = _open_run(
                spec, stages, resolved, out, resume, run_dir, denv.world_size, rerun_from, choice.as_dict()
            )
            return rd, manifest

        rd, manifest = dist.on_main(open_run, "opening the run directory")
        try:
            if denv.is_main:  # on stdout, once the run is open: a refused command's stderr stays its one error line
                print(choice.describe(), flush=True)
                print(f"run directory: {rd}" + (" (resumed)" if resume else ""), flush=True)
            # under torchrun the launcher stops workers with SIGTERM: keep its default there
            with terminate_as_interrupt(enabled=not denv.enabled):
                return _run_stages(spec, stages, rd, manifest, denv, resume)
        finally:
            if held.get("lock") is not None:
                held["lock"].release()


def _run_stages(spec, stages: list[Stage], rd: Path, manifest: dict[str, Any], denv, resume) -> Path:
    """Run the stages not yet done in ``rd``, recording each one's status, outputs, metrics and files in the manifest."""
    from dsk_compress.compress import dist
    from dsk_compress.interrupts import exit_code, signal_name

    if denv.enabled:
        blind = [r for r, seen in enumerate(dist.all_gather_object((rd / "manifest.json").is_file())) if not seen]
        if blind:
            raise RunError(
                f"rank(s) {blind} cannot see the run directory {rd} that rank 0 created",
                hint="multi-node runs need --out (or --run-dir) on a filesystem every node mounts",
            )
    main = denv.is_main
    ctx = RunContext(rd, spec, resume=bool(resume))
    import torch

    torch.manual_seed(spec.seed)
    mpath = rd / "manifest.json"

    def record() -> None:
        if main:
            atomic_write_json(mpath, manifest)

    def on_full_disk(e: BaseException, what: str, partial: int = 0) -> RunError | None:
        """One line for a stage that stopped on a full or read-only disk or a permission: free space, how to continue."""
        hint = f"free some space (or give the run's disk more), then continue with: {resume_command(spec, rd)}"
        found = storage_error(e, rd, what, hint=hint)
        if found is not None and partial:
            found.message += f" (it had written {format_bytes(partial)} of temporary files, now removed)"
        return found

    def guarded(fn, what: str) -> None:  # a manifest write outside a stage (the disk was full before it started)
        try:
            fn()
        except Exception as e:
            found = on_full_disk(e, what)
            if found is None:
                raise
            raise found from None

    for i, stage in enumerate(stages):
        entry = manifest["stages"][i]
        name = stage.config.stage
        if entry.get("status") == "done":
            ctx.outputs[name] = entry.get("outputs", {})
            ctx.metrics[name] = entry.get("metrics", {})
            continue
        if main:  # what this stage will do and how long it took last time, before minutes of silence in some stages
            from dsk_compress.recipes.headers import stage_header

            print(stage_header(i, len(stages), stage, spec, rd), flush=True)
        # what this stage reads from earlier ones must be what they wrote (hashes are cached, so each file is read once)
        dist.on_main(
            lambda: [verify_stage(rd, manifest, e) for e in manifest["stages"][:i] if e.get("status") == "done"],  # noqa: B023 (called now)
            "checking the earlier stages' files",
        )
        if main:
            remove_temp_files(rd / name)  # half-written by an attempt that was killed outright
        entry.pop("traceback", None)  # left by an earlier failed attempt
        entry.pop("signal", None)
        entry.update(status="running", started=time.strftime("%Y-%m-%dT%H:%M:%S"), error=None)
        manifest["status"] = "running"
        guarded(record, f"stage {name!r}")
        if ctx.teacher_loaded() and not stage.uses_teacher(spec):  # its memory goes to this stage; reloaded if a later one asks
            ctx.release_teacher()
        t0 = time.perf_counter()
        try:
            if denv.enabled and stage.ranks == "main":
                result = dist.on_main(lambda: stage.run(ctx), f"stage {name!r}")  # noqa: B023 (called now)
            else:
                result = stage.run(ctx)
            files = None
            if main:
                if not spec.keep_checkpoints:  # the model copy + AdamW state of its last checkpoint (keep_checkpoints: true keeps it)
                    from dsk_compress.compress.trainer import remove_checkpoints

                    freed = remove_checkpoints(rd / name)
                    if freed:
                        result.metrics.setdefault("checkpoints_removed_bytes", freed)
                atomic_write_json(rd / name / "metrics.json", result.metrics)
                files = record_files(rd, name)
            entry.update(
                status="done",
                finished=time.strftime("%Y-%m-%dT%H:%M:%S"),
                seconds=round(time.perf_counter() - t0, 2),
                outputs=result.outputs,
                metrics=result.metrics,
            )
            if files is not None:
                entry["files"] = files
            record()
        except (KeyboardInterrupt, Exception) as raised:
            # library code names its own argument; the user reads (and the manifest records) the recipe field
            e = field_error(raised, stage, i) if isinstance(raised, InvalidArgument) else raised
            for k in ("finished", "outputs", "metrics", "files"):  # a finished stage whose record could not be written
                entry.pop(k, None)
            partial = remove_temp_files(rd / name) if main else 0  # incomplete by definition; on a full disk, room to record
            full_disk = None
            if isinstance(e, KeyboardInterrupt):
                entry.update(status="interrupted", signal=signal_name(e), seconds=round(time.perf_counter() - t0, 2))
                manifest["status"] = "interrupted"
            else:
                full_disk = on_full_disk(e, f"stage {name!r}", partial)  # also under a DskError raised while writing
                error = full_disk.message if full_disk else str(e) if isinstance(e, DskError) else f"{type(e).__name__}: {e}"
                entry.update(status="failed", error=error, seconds=round(time.perf_counter() - t0, 2))
                if not isinstance(e, DskError) and full_disk is None:
                    entry["traceback"] = traceback.format_exc(limit=20)
                manifest["status"] = "failed"
            unrecorded = _record_failure(mpath, manifest) if main else None
            if not main and not isinstance(e, KeyboardInterrupt):
                _wait_for_record(mpath, i)
            if isinstance(e, KeyboardInterrupt) and main:
                raise RunInterrupted(
                    f"stage {name!r} stopped by {signal_name(e)}; finished stages and the last checkpoint are kept "
                    f"in {rd}; continue with: {resume_command(spec, rd)}",
                    exit_code(e),
                ) from None
            if full_disk is not None:
                raise RunError(full_disk.message + (f"; {unrecorded}" if unrecorded else ""), hint=full_disk.hint) from None
            if unrecorded and isinstance(e, DskError):
                e.message = f"{e.message}; {unrecorded}"
            if e is not raised:
                raise e from None
            raise
        ctx.outputs[name] = result.outputs
        ctx.metrics[name] = result.metrics
        dist.barrier()  # the next stage reads this one's files only once rank 0 has written them
    manifest["status"] = "done"
    manifest["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    guarded(record, "finishing the run")
    dist.barrier()  # every rank returns a finished run
    return rd
