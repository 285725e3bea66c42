"""Deploy bundles: one folder per target device with the model, a model card, ``run.py`` and requirements.

``run.py`` (:mod:`dsk_compress.export.bundle_run`, copied as is) needs only numpy and onnxruntime (TensorRT
and torch optional on Jetson, ``tokenizers`` for a text model): it measures the model with dsk-compress's
benchmark method (shipped beside it as ``dsk_measure.py``, a copy of :mod:`dsk_compress.runtimes.measure`;
``dsk_trt.py`` is :mod:`dsk_compress.runtimes.trt_compat`) and evaluates it on the validation windows shipped
in the bundle, so the accuracy and latency a user sees on the device are measured there, and its
``results.json`` is a bench result that ``dsk-compress bench`` merges into the run's report. When the shipped
student has decoder graphs they are bundled as ``model.fused.onnx`` (:mod:`dsk_compress.export.fused`: ONNX Runtime's
fused operators, one shared KV buffer per layer, decoded with IO binding by ``dsk_decoder.py``, a copy of
:mod:`dsk_compress.runtimes.decoder`) and ``model.kv.onnx`` (the plain KV-cache graph, for GPU providers), and
``run.py --generate N`` measures greedy decode tokens/s (``--prompt TEXT`` prints the continuation, through the
bundle's tokenizer).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from dsk_compress.errors import RunError
from dsk_compress.io import atomic_write_json, atomic_write_text, format_bytes, free_space, storage_error
from dsk_compress.paths import check_component, inside, is_within
from dsk_compress.runtimes import decoder, measure, trt_compat

RUN_PY = Path(__file__).with_name("bundle_run.py")
"""The bundle's run.py (a script, never imported here: it expects to sit beside ``dsk_measure.py``)."""
CARD_VERSION = 2
BATCHES = (1, 8, 64)
ORT_FLOOR = "1.18"
"""The oldest onnxruntime that loads the exported graphs: the ORT-optimized files use the ``ai.onnx.ml`` opset 5,
which 1.17 refuses (checked with 1.17.3 and 1.18.1, numpy 1.26.4, on x86-64; see docs/devices.md)."""
NUMPY_FLOOR = "1.24"
TOKENIZERS_FLOOR = "0.20"
"""tokenizers 0.20 changed the BPE merges in tokenizer.json; 0.19.1 cannot read what 0.22 writes, 0.20.0 can (checked)."""

BUNDLE_MARKER = ".dsk-bundle.json"
"""Written last into every bundle: the files ``export`` wrote there. A later export to the same folder replaces those files
and no others (a venv, results or engines made in the bundle stay); a non-empty folder without it is refused."""
LEGACY_FILES = (
    "model.onnx",
    "model.fused.onnx",
    "model.kv.onnx",
    "eval_windows.npy",
    "tokenizer.json",
    "dsk_measure.py",
    "dsk_decoder.py",
    "dsk_trt.py",
    "run.py",
    "model_card.json",
    "requirements.txt",
    "README.md",
)
"""What a bundle written before :data:`BUNDLE_MARKER` existed holds (replaced in ``RUN/bundles/<device>`` only)."""
DEVICE_VENV = "sudo apt install python3-venv"
DEVICE_RECIPE = (
    "python3 -m venv .venv && .venv/bin/pip install -r requirements.txt && .venv/bin/python run.py "
    f"(where python3 -m venv says ensurepip is missing: {DEVICE_VENV})"
)
"""What ``export`` prints for the device: Raspberry Pi OS Bookworm / Debian 12 (PEP 668) refuse a bare ``pip install``
(externally-managed-environment), so the bundle's requirements go into a venv in its folder; JetPack's Ubuntu may lack
python3-venv. The README's recipe is the same."""
VARIANTS_DIR = "variants"
"""Where a bundle made with ``variants`` keeps the graphs of the variants other than the shipped one: ``variants/<name>/``."""
SPARE_BYTES = 1 << 20
"""Room asked beyond the bundle's files (the scripts, card and README, filesystem blocks)."""

_ROLE_FOR = {"int8": "final", "fp16": "student-fp16", "fp32": "student"}
_HINT_FOR = {"int8": "run a recipe with qat, export and bench stages", "fp32": "run a recipe with export and bench stages"}


def _pick_variant(report: dict, precision: str, manifest: dict, device: str) -> dict:
    """The host row that ships at ``precision``: the QAT student (int8), its fp16 export, or the last fp32 student
    (rows of the reference runtime: not the ``name [runtime]`` rows of further runtimes)."""
    want = [v for v in report["variants"] if v.get("role") == _ROLE_FOR[precision] and " [" not in v["name"]][-1:]
    if not want or not want[0].get("artifact"):
        hint = fp16_hint(manifest, device) if precision == "fp16" else _HINT_FOR[precision]
        raise RunError(f"the run has no {precision} student artifact to bundle", hint=hint)
    return want[0]


def fp16_hint(manifest: dict, device: str) -> str:
    """A command that gives a run an fp16 student: the export stage's ``precisions`` take part in what a run computes, so a
    resume with another value is refused ("the recipe differs"); a new run of the same recipe with the export stage's
    ``precisions`` set to ``[fp32, fp16]`` makes one (its distill and prune stages start afresh)."""
    import shlex

    from dsk_compress.recipes.runner import recipe_argument

    src = manifest.get("source") if isinstance(manifest.get("source"), dict) else {}
    recipe = recipe_argument(src.get("recipe") or manifest.get("name") or "RECIPE")
    stages = [e.get("stage") for e in manifest.get("stages", []) if isinstance(e, dict)]
    sets = [str(x) for x in src.get("overrides") or []]
    if "export" in stages:
        sets.append(f"stages.{stages.index('export')}.precisions=[fp32, fp16]")
    else:
        return f"run a recipe with export (precisions: [fp32, fp16]) and bench stages, then dsk-compress export RUN --device {device}"
    cmd = "dsk-compress recipe " + shlex.quote(recipe) + "".join(f" --set {shlex.quote(x)}" for x in sets)
    return f"start a new run with an fp16 export: {cmd}, then dsk-compress export NEW_RUN --device {device}"


def _export_artifacts(manifest: dict) -> dict:
    """The export stage's artifacts as :class:`~dsk_compress.artifacts.Artifact` (a damaged entry fails in one line)."""
    from dsk_compress.artifacts import read_artifacts

    for st in manifest.get("stages", []):
        if st.get("stage") == "export":
            return read_artifacts((st.get("outputs") or {}).get("artifacts"), "manifest.json: the export stage's artifacts")
    return {}


def _tensorrt_model(run_dir: Path, v: dict, art, device: str) -> tuple[Path, dict]:
    """The portable ONNX TensorRT parses for this variant (the ORT-optimized file holds contrib ops) and its check."""
    from dsk_compress.export.trt_check import check_tensorrt_onnx, format_problems

    rel = (art.qdq_path if art is not None else None) if v.get("precision") == "int8" else v["artifact"]
    if not rel:
        raise RunError(
            f"the run's {v['name']} has no TensorRT-portable ONNX (it predates portable exports)",
            hint=f"rerun the export stage with device: {device}",
        )
    path = _in_run(run_dir, rel, "manifest.json: the export stage's qdq_path")
    problems = check_tensorrt_onnx(path)
    if problems:
        hint = (
            "retrain with the qat stage's activations: symmetric, then export with device: " + device
            if any(p.kind in ("uint8", "zero_point") for p in problems)
            else "rerun the export stage with device: " + device
        )
        raise RunError(f"{v['name']} cannot run in TensorRT on {device}: {format_problems(problems, 3)}", hint=hint)
    return path, {"checked": "dsk_compress.export.trt_check: 0 problems"}


@contextlib.contextmanager
def staging_folder(dest: Path, needed: int, what: str, probe: Path | None = None):
    """A private temp folder beside ``dest`` for an export of about ``needed`` bytes (``what``: "the bundle", ...),
    which the block fills and moves into place (:func:`_install`). A disk without that room (measured at ``probe``,
    default ``dest``'s parent), a folder that cannot be written, or a storage error inside the block is one RunError;
    on any failure the temp folder is removed."""
    free, total, folder = free_space(probe or dest.parent)
    if total and free < needed:  # (a pseudo filesystem such as /proc has no size: writing there fails below, said as such)
        raise RunError(
            f"export to {dest}: the disk is full: {format_bytes(free)} free on {folder}; {what} needs about {format_bytes(needed)}",
            hint="free some space or give --out a folder on another disk",
        )
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    except OSError as e:
        raise (
            storage_error(e, dest.parent, f"export to {dest}", needed)
            or RunError(f"export: cannot write {what} to {dest}: {e.strerror or e}", hint="give --out a folder you can write to")
        ) from None
    try:
        yield tmp
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)  # ours: made above
        found = storage_error(e, dest.parent, f"export to {dest}", needed) if isinstance(e, Exception) else None
        if found is None and isinstance(e, OSError):
            found = RunError(
                f"export: cannot write {what} to {dest}: {e.strerror or e}" + (f": {e.filename}" if e.filename else ""),
                hint="choose another --out",
            )
        if found is not None:
            raise found from None
        raise


def make_bundle(run_dir: str | Path, device: str, out: str | Path | None = None, variants: str | list[str] | None = None) -> Path:
    """Write a deploy bundle of a finished run for ``device`` and return its folder.

    The bundle goes to ``out`` (default ``RUN/bundles/<device>``): a new or empty folder, or one an earlier export wrote
    (:data:`BUNDLE_MARKER`), whose files from that export are replaced and whose other files stay. A folder holding
    anything else, the run itself or a folder inside the run other than ``RUN/bundles/<name>`` is refused, and nothing is
    deleted that this function did not write. The files are written to a temp folder beside the bundle first; on a
    full disk it is removed and the error says how much space the bundle needs.

    ``variants`` (``"all"`` or names of the run's host rows) also bundles those variants, each under
    ``variants/<name>/`` (its graph, and its decoder graphs) and listed in the card's ``variants``, so the bundle's
    ``run.py --variant all`` measures every one in one session. With ``"all"`` a variant that cannot run on the
    device (too big for its memory, not TensorRT-portable) is left out and named in the card's ``variants_skipped``;
    a variant named explicitly is refused instead. Without it the bundle is the shipped variant alone, as before.

    Raises:
        RunError: the run, its report or its artifacts are damaged, the destination is refused, or the disk is full.
        DeviceError: an unknown or invalid device profile.
    """
    from pydantic import ValidationError

    from dsk_compress.devices import load_device
    from dsk_compress.integrity import check_run_artifacts
    from dsk_compress.recipes.schema import RecipeSpec
    from dsk_compress.report import load_report
    from dsk_compress.tasks import build_task

    run_dir = Path(run_dir)
    # a report.json there is validated first (its rows' names and artifact paths stay inside the run); then the recorded
    # hashes must match and every ONNX file load, before anything is copied; a run without a report stops after that
    report = load_report(run_dir) if (run_dir / "report.json").is_file() else None
    manifest = check_run_artifacts(run_dir)
    report = report if report is not None else load_report(run_dir)
    prof = load_device(device)  # its name is a safe folder name (DeviceProfile checks it)
    dest = Path(out) if out is not None else run_dir / "bundles" / prof.name
    owned = _claim(dest, run_dir, "--out" if out is not None else "the bundle folder")
    precision = prof.preferred_precision  # fp32, fp16 or int8, as the device profile prefers
    v = _pick_variant(report, precision, manifest, prof.name)
    try:
        spec = RecipeSpec.model_validate(manifest["recipe"])
    except ValidationError as e:
        raise RunError(
            f"{run_dir / 'manifest.json'}: its recipe does not validate ({e.error_count()} problem(s), first at "
            f"{'.'.join(str(x) for x in e.errors()[0]['loc'])})",
            hint="the manifest is damaged; rerun the recipe",
        ) from None
    task = build_task(spec.task.model_dump())
    if getattr(task, "seq_len", None) is None or not hasattr(task, "eval_windows"):
        raise RunError(
            f"bundles are written for language-model runs, and this run's task is {spec.task.model_dump().get('name', 'your own')}",
            hint="measure your own model's ONNX files with dsk-compress bench RUN on the machine itself",
        )
    runtime = "tensorrt" if prof.preferred_runtime == "tensorrt" else "onnxruntime"
    model_src, trt_card = _in_run(run_dir, v["artifact"], f"report.json: variant {v['name']!r} artifact"), None
    if runtime == "tensorrt":
        model_src, trt_card = _tensorrt_model(run_dir, v, _export_artifacts(manifest).get(v["name"]), prof.name)
        exp = next((st for st in spec.stages if st.stage == "export"), None)
        t = exp.tensorrt if exp is not None else None
        trt_card.update(
            {
                "precision": precision,
                "workspace_gb": t.workspace_gb if t else 1.0,
                "max_batch": t.max_batch if t else 8,
                "opt_batch": t.opt_batch if t else 1,
                "max_seq_len": t.max_seq_len if t else None,
            }
        )
    copies = graph_copies(run_dir, _export_artifacts(manifest).get(v["name"]), model_src, v["name"], prof, runtime)
    model_name = next(iter(copies))
    td = task.describe()
    windows = task.eval_windows()
    vocab = max(int(td.get("vocab_size") or 256), int(windows.max()) + 1)
    windows = windows.astype(window_dtype(vocab))
    scoring = {"eval_logits": _eval_batch_size(task) * task.seq_len * vocab, "logits_dtype": np.dtype(task.logits_dtype).name}
    extra, skipped = _variant_copies(run_dir, report, manifest, prof, runtime, v, variants, scoring)
    from dsk_compress.export import graph_files

    needed = (
        sum(graph_files.size(f) for f in copies.values())
        + windows.nbytes
        + SPARE_BYTES  # .data files included
        + sum(graph_files.size(f) for _, files, _ in extra for f in files.values())
    )
    check_fits_device(copies, prof, v["name"], v.get("precision") or precision, **scoring)
    with staging_folder(dest, needed, "the bundle") as tmp:
        for name, src in copies.items():
            graph_files.copy(src, tmp / name)  # a graph past 1 GiB brings its .data file, renamed after it
        listed = []
        for row, files, trt in extra:  # the shipped variant's entry names the top-level files; the others their own folder
            sub = None if row["name"] == v["name"] else f"{VARIANTS_DIR}/{row['name']}"
            files, trt = (copies, trt_card) if sub is None else (files, trt)
            for name, src in files.items() if sub is not None else ():
                (tmp / sub).mkdir(parents=True, exist_ok=True)
                graph_files.copy(src, tmp / sub / name)

            def at(name, sub=sub, files=files):
                return None if name not in files else name if sub is None else f"{sub}/{name}"

            listed.append(
                {
                    "variant": row["name"],
                    "role": row.get("role"),
                    "precision": row.get("precision") or precision,
                    "model": at(next(iter(files))),
                    "kv_model": at("model.kv.onnx"),
                    "fused_model": at("model.fused.onnx"),
                    "params": row.get("params"),
                    "size_bytes": row.get("size_bytes"),
                    "tensorrt_check": trt,
                    "measured_on_build_host": {
                        "accuracy": row.get("accuracy"),
                        "latency_ms": row.get("latency_ms"),
                        "runtime": row.get("runtime"),
                    },
                }
            )
        np.save(tmp / "eval_windows.npy", windows, allow_pickle=False)
        tokenizer = _save_tokenizer(task, tmp) if td["name"] == "text-lm" else None
        for src, name in (
            (measure.__file__, "dsk_measure.py"),
            (decoder.__file__, "dsk_decoder.py"),
            (trt_compat.__file__, "dsk_trt.py"),
            (RUN_PY, "run.py"),
        ):
            atomic_write_text(tmp / name, Path(src).read_text())
        card = {
            "version": CARD_VERSION,
            "model": model_name,
            "variant": v["name"],
            "role": v.get("role"),
            "precision": v.get("precision") or precision,
            "device": prof.name,
            "runtime": runtime,
            "execution_providers": list(prof.execution_providers),
            "threads": prof.threads,
            "graph_optimization": "extended",
            "batches": list(BATCHES),
            "seq_len": task.seq_len,
            "task": td,
            "eval_windows": "eval_windows.npy",
            "eval_batch_size": _eval_batch_size(task),
            "logits_dtype": np.dtype(task.logits_dtype).name,
            "vocab_size": vocab,
            "tokenizer": tokenizer,
            "tensorrt": trt_card,
            "kv_model": "model.kv.onnx" if (tmp / "model.kv.onnx").is_file() else None,
            "fused_model": "model.fused.onnx" if (tmp / "model.fused.onnx").is_file() else None,
            "params": v.get("params"),
            "size_bytes": v.get("size_bytes"),
            "measured_on_build_host": {
                "accuracy": v.get("accuracy"),
                "metrics": v.get("metrics"),
                "latency_ms": v.get("latency_ms"),
                "runtime": v.get("runtime"),
                "host": report.get("host"),
            },
            "source_run": run_dir.resolve().name,
            "recipe": spec.name,
        }
        if variants is not None:  # a bundle of the shipped variant alone keeps the card it always had
            card.update(variants=listed, variants_skipped=skipped, variants_request=variants)
        atomic_write_json(tmp / "model_card.json", card)
        ort_floor = onnxruntime_floor(sorted(tmp.rglob("*.onnx")))
        atomic_write_text(tmp / "requirements.txt", requirements(runtime, tokenizer is not None, ort_floor))
        atomic_write_text(tmp / "README.md", _readme(spec.name, prof, v, precision, trt_card, tmp, tokenizer is not None))
        if listed:
            atomic_write_text(tmp / "README.md", (tmp / "README.md").read_text() + _variants_readme(listed))
        written = sorted(p.name for p in tmp.iterdir())
        atomic_write_json(tmp / BUNDLE_MARKER, {"written_by": "dsk-compress export", "files": written})
        _install(tmp, dest, owned, [*written, BUNDLE_MARKER])
    return dest


def _variant_copies(
    run_dir: Path, report: dict, manifest: dict, prof, runtime: str, shipped: dict, variants: str | list[str] | None, scoring: dict
) -> tuple[list[tuple[dict, dict, dict | None]], list[dict]]:
    """The host rows ``variants`` selects (``"all"``: every row of the reference runtime with an ONNX artifact) as
    ``(row, {bundle file name: source}, TensorRT check)``, the shipped variant's files left for the caller (an empty
    dict is filled by it); and, for ``"all"``, the rows left out with why. A named variant that is missing or cannot
    run on the device (``scoring``: :func:`check_fits_device`'s evaluation batch) is a RunError."""
    from dsk_compress.paths import check_component

    if variants is None:
        return [], []
    rows = [r for r in report["variants"] if " [" not in r["name"] and str(r.get("artifact") or "").endswith(".onnx")]
    if variants == "all":
        chosen = rows
    else:
        names = list(dict.fromkeys(variants))
        by_name = {r["name"]: r for r in rows}
        unknown = [n for n in names if n not in by_name]
        if unknown or not names:
            raise RunError(
                f"the run has no exported variant {', '.join(map(repr, unknown)) or '(none named)'}",
                hint=f"name some of: {', '.join(by_name) or '(none)'}, or all",
            )
        chosen = [by_name[n] for n in names]
    arts = _export_artifacts(manifest)
    out, skipped = [], []
    for row in chosen:
        check_component(row["name"], "a variant's name")  # it becomes the folder variants/<name>
        if row["name"] == shipped["name"]:
            out.append((row, {}, None))
            continue
        try:
            art, trt = arts.get(row["name"]), None
            src = _in_run(run_dir, row["artifact"], f"report.json: variant {row['name']!r} artifact")
            if runtime == "tensorrt":
                src, trt = _tensorrt_model(run_dir, row, art, prof.name)
            files = graph_copies(run_dir, art, src, row["name"], prof, runtime)
            check_fits_device(files, prof, row["name"], row.get("precision") or "fp32", **scoring)
        except RunError as e:
            if variants != "all":
                raise
            skipped.append({"variant": row["name"], "why": e.message})
            continue
        out.append((row, files, trt))
    return out, skipped


def graph_copies(run_dir: Path, art, model_src: Path, name: str, prof, runtime: str) -> dict[str, Path]:
    """The graphs a bundle ships for the variant ``name``, ``{bundle file name: source}``, the one run.py measures first.

    One copy of the weights where the device allows it: on a CPU-only onnxruntime device, a variant with a fused decoder
    graph ships that graph alone (``model.fused.onnx``): run.py scores and times it as a full-sequence model (each window
    from an empty cache, :class:`~dsk_compress.runtimes.decoder.FusedFullSequence`) and decodes with it. Elsewhere
    (TensorRT, GPU providers) the full-sequence graph ``model.onnx`` and the decoder graphs the run has.
    """
    decoders = {}
    for key, fname in (("fused_path", "model.fused.onnx"), ("kv_cache_path", "model.kv.onnx")):
        if art is not None and getattr(art, key):  # greedy decode runs on onnxruntime, whatever the full-sequence runtime
            src = _in_run(run_dir, getattr(art, key), f"manifest.json: the export stage's {key} of {name!r}")
            if src.is_file():
                decoders[fname] = src
    cpu_only = all(p == "CPUExecutionProvider" for p in prof.execution_providers)
    if runtime == "onnxruntime" and cpu_only and "model.fused.onnx" in decoders:
        return {"model.fused.onnx": decoders["model.fused.onnx"]}
    return {"model.onnx": model_src, **decoders}


def _variants_readme(listed: list[dict]) -> str:
    names = ", ".join(f"`{e['variant']}`" for e in listed)
    return (
        f"\nThis bundle also carries the run's other variants ({names}; the others' graphs under `{VARIANTS_DIR}/`): "
        "`.venv/bin/python run.py --variant all` measures each in its own process and writes one record per variant "
        "into `results.json` (`--variant NAME,NAME` for some of them).\n"
    )


def _in_run(run_dir: Path, rel, what: str) -> Path:
    """``run_dir / rel`` for a path a run's file names, refused when it leads outside the run."""
    try:
        return inside(run_dir, rel, what)
    except ValueError as e:
        raise RunError(f"{run_dir}: {e}", hint="the run's files were altered; rerun the recipe (or restore them)") from None


def _claim(dest: Path, run_dir: Path, what: str) -> set[str]:
    """The files in ``dest`` an export may replace: none for a new or empty folder, the files an earlier export wrote
    (:data:`BUNDLE_MARKER`, or :data:`LEGACY_FILES` in ``RUN/bundles/<name>``); anything else is refused (RunError)."""
    try:
        return _claim_checked(dest, run_dir, what)
    except OSError as e:  # a name too long, a folder that cannot be searched
        raise RunError(f"{what} {dest} cannot be used: {e.strerror or e}", hint="give a new folder you can write to") from None


def _claim_checked(dest: Path, run_dir: Path, what: str) -> set[str]:
    bundles = run_dir / "bundles"
    if dest.exists() and not dest.is_dir():
        raise RunError(f"{what} {dest} is a file, not a folder", hint="give a folder for the bundle")
    if is_within(run_dir, dest):
        raise RunError(
            f"{what} {dest} holds the run {run_dir}: a bundle never replaces a run or what is around it",
            hint=f"give a new folder, e.g. {bundles / dest.name if dest.name else 'BUNDLE'} or one outside the run",
        )
    if is_within(dest, run_dir) and bundles.resolve() not in dest.resolve().parents:
        raise RunError(
            f"{what} {dest} is inside the run {run_dir}, outside its bundles folder",
            hint=f"leave out --out (the bundle goes to {bundles}/<device>) or give a folder outside the run",
        )
    if not dest.exists():
        return set()
    try:
        entries = [e.name for e in dest.iterdir()]
    except OSError as e:
        raise RunError(f"{what} {dest} cannot be read: {e.strerror or e}", hint="choose another folder") from None
    if not entries:
        return set()
    marker = dest / BUNDLE_MARKER
    if marker.is_file():
        try:
            files = json.loads(marker.read_text(encoding="utf-8")).get("files")
        except (OSError, ValueError, AttributeError):
            files = None
        if isinstance(files, list):
            return {f for f in files if _plain(f)}
    if bundles.resolve() in dest.resolve().parents and (dest / "model_card.json").is_file() and (dest / "run.py").is_file():
        return set(LEGACY_FILES)  # RUN/bundles/<device> from a dsk-compress that wrote no marker
    raise RunError(
        f"{what} {dest} is not empty and was not written by dsk-compress export ({len(entries)} entries): nothing in it "
        "is replaced or deleted",
        hint=f"give a new or empty folder, e.g. {dest / 'bundle'}",
    )


def _plain(name) -> bool:
    try:
        check_component(name)
    except ValueError:
        return False
    return True


def _install(tmp: Path, dest: Path, owned: set[str], names: list[str]) -> None:
    """Move the bundle's files from ``tmp`` into ``dest`` (the marker last), then remove what an earlier export wrote and
    this one did not; files ``dest`` held from elsewhere stay."""
    if not dest.exists():
        os.rename(tmp, dest)  # one rename: the bundle appears whole
        return
    for name in names:
        if (tmp / name).is_dir() and name in owned and (dest / name).is_dir() and not (dest / name).is_symlink():
            shutil.rmtree(dest / name)  # variants/: written by the earlier export (owned), replaced whole
        os.replace(tmp / name, dest / name)
    for name in sorted(owned - set(names)):
        old = dest / name
        if old.is_file() and not old.is_symlink():
            old.unlink()
        elif name == VARIANTS_DIR and old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
    tmp.rmdir()


def window_dtype(vocab_size: int):
    """The smallest unsigned dtype that holds every token id below ``vocab_size`` (uint8, uint16, else int32)."""
    return np.uint8 if vocab_size <= 1 << 8 else np.uint16 if vocab_size <= 1 << 16 else np.int32


ORT_OPERATOR_FLOORS = (
    ("MatMulNBits", lambda attrs: attrs.get("bits", 4) != 4, "1.22"),
    ("GatherBlockQuantized", lambda attrs: "bits" in attrs, "1.23"),
    ("MatMulNBits", lambda attrs: "weight_prepacked" in attrs, "1.29"),
)
"""Operators that raise the floor above :data:`ORT_FLOOR`, each with a test of its attributes and the oldest onnxruntime
that loads it (checked on x86-64 by loading a default run's graphs): 8-bit MatMulNBits (an int4 QAT model's LM head;
1.21.1 "Only 4b quantization is supported"), GatherBlockQuantized with a ``bits`` attribute (its int8 embedding; 1.22.0
"Unrecognized attribute: bits"), and a ``weight_prepacked`` attribute (written by ONNX Runtime 1.32's optimizer; 1.26.0
refuses it, 1.29.0 loads)."""


def onnxruntime_floor(graphs) -> str:
    """The oldest onnxruntime that loads every ONNX file in ``graphs``: :data:`ORT_FLOOR`, raised by the operators of
    :data:`ORT_OPERATOR_FLOORS` they use (read without their external data)."""
    import onnx
    from packaging.version import Version

    floor = ORT_FLOOR
    for path in graphs:
        for node in onnx.load(str(path), load_external_data=False).graph.node:
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            for op, needs, version in ORT_OPERATOR_FLOORS:
                if node.op_type == op and needs(attrs) and Version(version) > Version(floor):
                    floor = version
    return floor


def requirements(runtime: str, tokenizer: bool, ort_floor: str = ORT_FLOOR) -> str:
    """``requirements.txt`` of a bundle: floors that load its files (``ort_floor``: :func:`onnxruntime_floor` of them)."""
    reqs = [f"numpy>={NUMPY_FLOOR}", f"onnxruntime>={ort_floor}"]
    if tokenizer:
        reqs.append(f"tokenizers>={TOKENIZERS_FLOOR}")
    if runtime == "tensorrt":
        reqs.append(
            "# on Jetson: TensorRT and torch come with JetPack (onnxruntime-gpu from NVIDIA's Jetson wheels adds the CUDA and "
            "TensorRT providers); run.py falls back to onnxruntime on the CPU without them"
        )
    return "\n".join(reqs) + "\n"


def _eval_batch_size(task) -> int:
    """The batch the task scores its validation windows in (its ``evaluate`` default): run.py scores in the same batches."""
    import inspect

    return int(inspect.signature(task.evaluate).parameters["batch_size"].default)


SESSION_PEAK = {"fp32": 1.0, "fp16": 1.0}
"""Resident bytes of an onnxruntime session over its graph's bytes, by precision; others (int8, int4) 1.65: ONNX Runtime
prepacks their integer weights beside the stored ones. Measured with run.py on the full-size scale run's bundles
(2026-12-07, x86-64, onnxruntime 1.32): the 375M student's int8 fused graph (333 MB) 1.68x, its fp32 one (1.32 GB)
0.95x."""
INT_SESSION_PEAK = 1.65
EVAL_TEMPORARIES = 3
"""Copies of one evaluation batch's logits ``score_windows`` makes beside the model's float32 output (shift, exp,
reduction; in ``logits_dtype``): the int8 bundle above peaked 452 MiB higher when it also scored its windows (4 x 256
tokens x 30,466 entries, float32: 4 x 125 MB)."""
RUNTIME_BASE_BYTES = 64 << 20
"""Python, numpy and onnxruntime before the model loads (run.py's ``rss_before_load_mb``: 65 MiB)."""
DEVICE_MEMORY_FRACTION = 0.8
"""Share of a device's memory a bundle may plan to use (the OS and the application need the rest)."""


def runtime_peak_bytes(copies: dict[str, Path], precision: str = "int8", eval_logits: int = 0, logits_dtype: str = "float32") -> int:
    """Modelled peak of the bundle's run.py, which holds one session at a time: its largest graph's session, one evaluation
    batch's ``eval_logits`` (batch x sequence x vocabulary) with scoring's copies, and the interpreter. Within 1.4% (int8)
    and 9% (fp32, above) of what run.py measured on the scale run's bundles."""
    from dsk_compress.export import graph_files

    session = SESSION_PEAK.get(precision, INT_SESSION_PEAK) * max(graph_files.size(f) for f in copies.values())
    scoring = eval_logits * (4 + EVAL_TEMPORARIES * np.dtype(logits_dtype).itemsize)
    return int(session + scoring + RUNTIME_BASE_BYTES)


def check_fits_device(
    copies: dict[str, Path], prof, variant: str, precision: str = "int8", eval_logits: int = 0, logits_dtype: str = "float32"
) -> None:
    """Refuse a bundle whose modelled runtime peak (:func:`runtime_peak_bytes`) passes :data:`DEVICE_MEMORY_FRACTION` of
    the device's memory."""
    peak, mem = runtime_peak_bytes(copies, precision, eval_logits, logits_dtype), prof.memory_gb * 1024**3
    if peak > DEVICE_MEMORY_FRACTION * mem:
        raise RunError(
            f"the {prof.name} bundle of {variant!r} needs about {peak / 1024**3:.1f} GiB at run time (its largest graph of "
            f"{', '.join(sorted(copies))} held open) but {prof.name} has {prof.memory_gb:g} GB",
            hint="bundle an int8 variant (add a qat stage), prune or cut a smaller student, or use a device profile "
            "with more memory (memory_gb in devices/*.yaml)",
        )


def _save_tokenizer(task, dest: Path) -> str:
    """Write the text-lm task's tokenizer as ``tokenizer.json`` (the ``tokenizers`` format run.py reads)."""
    backend = getattr(task.tok, "backend_tokenizer", None)
    if backend is None:
        raise RunError(
            "text-lm bundles ship the tokenizer as a tokenizers tokenizer.json, and this teacher's tokenizer is a slow (Python) one",
            hint="give the teacher a fast tokenizer (tokenizer.json beside its config)",
        )
    backend.save(str(dest / "tokenizer.json"))
    return "tokenizer.json"


def _decoder_files(fused: bool, kv: bool, full: bool = True) -> str:
    if fused and not full:
        return (
            "`model.fused.onnx` is the model, one decoder graph of ONNX Runtime's fused operators (GroupQueryAttention "
            "appending to one preallocated KV buffer per layer): run.py scores and times it on whole windows from an empty "
            "cache and decodes with it (IO binding), so the weights ship once"
        )
    parts = (
        [
            "`model.fused.onnx` is the same model as one decoder graph of ONNX Runtime's fused operators (GroupQueryAttention "
            "appending to one preallocated KV buffer per layer, decoded with IO binding; used on the CPU)"
        ]
        if fused
        else []
    ) + (["`model.kv.onnx` is the same model with a plain KV cache" + (" (used with a GPU provider)" if fused else "")] if kv else [])
    return "; ".join(parts)


def _readme(recipe: str, prof, v: dict, precision: str, trt_card: dict | None, folder: Path, tokenizer: bool) -> str:
    p50 = (v.get("latency_ms") or {}).get("p50")
    fused, kv, full = ((folder / f).is_file() for f in ("model.fused.onnx", "model.kv.onnx", "model.onnx"))
    prompt = "'The '" if tokenizer else "'def '"
    return (
        f"# {recipe} for {prof.name}\n\n{prof.description}\n\n"
        f"Model: `{v['name']}` ({v['precision']}, {v.get('params') or 0:,} parameters, {(v.get('size_bytes') or 0) / 1e6:.2f} MB).\n"
        f"Measured on the build host ({v.get('runtime')}{'' if full else ', its full-sequence graph'}): accuracy {v.get('accuracy') or 0:.2f}%"
        + (f", p50 {p50:.2f} ms at batch 1" if p50 is not None else "")
        + ".\n"
        "These are not device figures: measure on the device. Raspberry Pi OS Bookworm and Debian 12 refuse `pip install` "
        "outside a virtual environment (externally-managed-environment), so make one in this folder:\n\n"
        f"```bash\n{DEVICE_VENV}        # if python3 -m venv says ensurepip is missing\n"
        "python3 -m venv .venv && .venv/bin/pip install -r requirements.txt\n"
        ".venv/bin/python run.py --out results.json\n```\n\n"
        "`results.json` holds session creation time, first inference, p50/p90/p99 at batch 1, throughput at batch 8 and 64 "
        "where the model allows, peak memory, accuracy on the bundled evaluation windows and where it was measured "
        "(CPU, runtime and version, execution provider, threads). `dsk-compress bench RUN --device "
        f"{prof.name} --host user@board` does all of this over SSH and adds the numbers to the run's report.\n"
        + (
            f"\n{_decoder_files(fused, kv, full)}: `.venv/bin/python run.py --generate 64 --prompt {prompt}` also "
            "measures greedy decode (prefill ms, ms per token, tokens/s) and prints the continuation"
            + (" (text through the bundled `tokenizer.json`)" if tokenizer else "")
            + ".\n"
            if fused or kv
            else ""
        )
        + (
            "\nWith TensorRT (JetPack) and torch present, the first run builds a TensorRT engine for this GPU "
            f"({precision}, profile batch 1..{trt_card['max_batch']}) and caches it as `model.<trt version>.<gpu>.engine`; "
            "later runs load it. Without them, run.py falls back to onnxruntime. onnxruntime's CUDA and TensorRT execution "
            "providers are used when the installed onnxruntime has them.\n"
            if trt_card is not None
            else ""
        )
    )
