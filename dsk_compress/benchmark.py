"""``dsk-compress bench``: measure a run (or a bundle) where it will run, and add the numbers to the run's report.

Three places, one method (:mod:`dsk_compress.runtimes.measure`) and one result schema
(:class:`~dsk_compress.runtimes.result.BenchRecord`):

- **a device over SSH** (``host=``): the run's bundle for ``device`` (exported first when missing) is copied to
  the device, its venv is made or reused (:mod:`dsk_compress.runtimes.remote`), ``run.py`` measures it there
  and its ``results.json`` comes back, validated, labelled ``measured`` or ``emulated`` (an arm64 Python
  under QEMU is detected; there only batch 1 is timed, as the emulator's timings say nothing of a device)
  and with the SSH host;
- **this machine, a run** (no ``host``): every artifact of the run in every runtime this machine offers (the
  bench stage's plans: ONNX Runtime CPU and the execution providers of ``device``'s profile, torch on CUDA,
  TensorRT engines), labelled with this machine's name;
- **this machine, a bundle**: its ``run.py`` with this Python.

Results go to ``RUN/devices/<name>/results.json`` (``<name>``: the device profile for SSH, this machine's
hostname otherwise), merged with what is there (a newer record of the same variant, runtime and place
replaces the older one; others stay), and the run's report is rebuilt from its files, so re-running is
safe and a failed device run leaves earlier rows (and its ``run.log``) in place. A bundle outside a run
keeps its results in ``BUNDLE/results/<name>.json``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from dsk_compress.errors import DeviceError, RunError

DEFAULT_REMOTE_DIR = "~/dsk-compress"


@dataclass
class BenchOutcome:
    """What :func:`bench` measured and where it wrote it."""

    name: str
    records: list = field(default_factory=list)
    results: Path | None = None
    run_dir: Path | None = None
    errors: list[str] = field(default_factory=list)
    measurement: str = "measured"


def _is_bundle(p: Path) -> bool:
    return (p / "model_card.json").is_file() and (p / "run.py").is_file()


def _is_run(p: Path) -> bool:
    return (p / "manifest.json").is_file()


def read_card(bundle: Path) -> dict:
    """A bundle's ``model_card.json``, checked before any of it becomes a path: ``variant`` and ``source_run`` are single
    file names, ``device`` a device profile name, ``model`` a file inside the bundle. Raises RunError naming the field."""
    from dsk_compress.paths import check_component, check_name, inside

    path = bundle / "model_card.json"
    hint = "the bundle was altered; write it again with: dsk-compress export RUN --device DEVICE"
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        why = f"{e.msg} at line {e.lineno}" if isinstance(e, json.JSONDecodeError) else getattr(e, "strerror", None) or str(e)
        raise RunError(f"cannot read {path}: {why}", hint=hint) from None
    if not isinstance(card, dict):
        raise RunError(f"{path} is not a model card (a JSON {type(card).__name__}, not an object)", hint=hint)
    checks = (
        ("variant", lambda v: check_component(v, "variant")),
        ("device", lambda v: check_name(v, "device name")),
        ("precision", lambda v: check_component(v, "precision")),
        ("model", lambda v: inside(bundle, v, "model")),
    )
    for key, check in checks:
        if key not in card:
            raise RunError(f"{path}: field {key!r} is missing", hint=hint)
        try:
            check(card[key])
        except ValueError as e:
            raise RunError(f"{path}: field {key!r}: {e}", hint=hint) from None
    if card.get("source_run") is not None:
        try:
            check_component(card["source_run"], "source_run")
        except ValueError as e:
            raise RunError(f"{path}: field 'source_run': {e}", hint=hint) from None
    return card


def _bundle_run_dir(bundle: Path, card: dict) -> Path | None:
    """The run a bundle was written from, when it still sits inside it (``RUN/bundles/<device>``)."""
    run = bundle.resolve().parent.parent
    return run if (run / "report.json").is_file() and run.name == card.get("source_run") else None


def bench(
    target: str | Path,
    device: str | None = None,
    host: str | None = None,
    identity: str | Path | None = None,
    known_hosts: str | Path | None = None,
    accept_new_host_key: bool = False,
    wheelhouse: str | Path | None = None,
    python: str = "python3",
    remote_dir: str | None = None,
    runs: int | None = None,
    threads: int | None = None,
    generate: int | None = None,
    timeout: float | None = None,
    other_arch: bool = False,
    variants: str | None = None,
    batches: str | None = None,
    log=print,
) -> BenchOutcome:
    """Measure a run or a bundle on a device over SSH (``host``) or on this machine, and merge the results into the run's report.

    Args:
        target: a run directory or a deploy bundle folder.
        device: the device profile (with ``host`` and a run: which bundle to send; without ``host``: whose threads and
            execution providers apply here, refused for another CPU architecture). Default: the bundle's, or host-cpu.
        host: ``[user@]host[:port]`` of the device; None measures on this machine.
        identity, known_hosts, accept_new_host_key, python: SSH settings (see :class:`~dsk_compress.runtimes.remote.Remote`).
        wheelhouse: a folder of wheels for the device, installed offline into its venv.
        remote_dir: the folder on the device for bundles (``bundles/<run>-<device>``) and venvs (``venvs/``);
            default ``~/dsk-compress``.
        runs, threads: timed runs per batch size and intra-op threads (default: the bundle's / the profile's).
        generate: greedy decode steps (``run.py --generate N``; the bench stage's count on this machine).
        timeout: seconds for the device's venv install and for ``run.py`` (default :data:`VARIANT_TIMEOUT_S` per variant
            the session measures).
        other_arch: with ``host``, measure even when the device's CPU architecture is not the profile's; the results are
            then recorded under the device's own host name, never the profile's (without it such a device is refused).
        variants: ``all`` or ``NAME,NAME,...`` of the run's exported variants to measure in one session (one copy, one
            venv, one record each): a run's bundle for ``device`` is then written with them to ``RUN/bundles/<device>+variants``
            (:func:`~dsk_compress.export.bundle.make_bundle` with ``variants``); a bundle must carry them. Default: the
            variant the profile ships, alone.
        batches: ``run.py --batches`` (e.g. ``"1"``: the latency batch only; default the bundle's 1, 8, 64).
        log: where progress lines go.

    Returns:
        A :class:`BenchOutcome`.

    Raises:
        RunError: the target is neither a run nor a bundle, or the run has no artifact for the device.
        DeviceError: a profile that cannot apply here, or an SSH / device failure (subclasses in runtimes.remote).
    """
    target = Path(target)
    if not target.is_dir() or not (_is_bundle(target) or _is_run(target)):
        raise RunError(
            f"{target} is neither a run directory (manifest.json) nor a deploy bundle (model_card.json, run.py)",
            hint="pass runs/<recipe>-<time> or a folder written by dsk-compress export",
        )
    chosen = parse_variants(variants)
    batches = parse_batches(batches)
    if chosen is not None and host is None and not _is_bundle(target):
        raise DeviceError("--variants goes with --host (or a bundle)", hint="on this machine bench RUN measures every variant already")
    if batches is not None and host is None and not _is_bundle(target):
        raise DeviceError(
            "--batches goes with --host (or a bundle)", hint="on this machine the recipe's bench stage settings apply (throughput_batches)"
        )
    if host is not None:
        from dsk_compress.paths import remote_dir as confined

        try:  # before anything is exported or sent: the device user's home unless an absolute path is given
            folder = confined(DEFAULT_REMOTE_DIR if remote_dir is None else remote_dir)
        except ValueError as e:
            raise DeviceError(str(e), hint="e.g. --remote-dir ~/dsk-compress (under the device user's home) or an absolute path") from None
        return _bench_remote(
            target,
            device,
            host,
            identity,
            known_hosts,
            accept_new_host_key,
            wheelhouse,
            python,
            folder,
            runs,
            threads,
            generate,
            timeout,
            log,
            other_arch=other_arch,
            variants=chosen,
            batches=batches,
        )
    if other_arch:
        raise DeviceError("--other-arch goes with --host", hint="on this machine the architecture is checked against --device")
    if _is_bundle(target):
        return _bench_bundle_here(target, device, runs, threads, generate, timeout, log, variants=chosen, batches=batches)
    return _bench_run_here(target, device, runs, threads, generate, log)


# --------------------------------------------------------------------------- over SSH


_ARM_CORES = {
    "0xd03": "Cortex-A53",
    "0xd04": "Cortex-A35",
    "0xd05": "Cortex-A55",
    "0xd07": "Cortex-A57",
    "0xd08": "Cortex-A72",
    "0xd09": "Cortex-A73",
    "0xd0a": "Cortex-A75",
    "0xd0b": "Cortex-A76",
    "0xd0c": "Neoverse-N1",
    "0xd0d": "Cortex-A77",
    "0xd41": "Cortex-A78",
    "0xd42": "Cortex-A78AE",
    "0xd4b": "Cortex-A78C",
    "0xd44": "Cortex-X1",
    "0xd46": "Cortex-A510",
    "0xd47": "Cortex-A710",
    "0xd48": "Cortex-X2",
    "0xd4d": "Cortex-A715",
    "0xd80": "Cortex-A520",
    "0xd81": "Cortex-A720",
}


def check_device_fits_profile(probe, profile, host) -> str | None:
    """Refuse a device whose Python's CPU architecture is not the profile's (one line, DeviceError); return a warning when
    its CPU core is known and is not the one the profile describes (else None)."""
    import re

    from dsk_compress.devices import _normalize_arch

    arch = _normalize_arch(probe.python_machine) or probe.python_machine
    if arch != profile.arch:
        raise DeviceError(
            f"{host} is {arch} ({probe.cpu or 'unknown CPU'}), not {profile.arch} like the {profile.name} profile: "
            f"its numbers would be reported as {profile.name}'s",
            hint=f"bench a {profile.arch} device with --device "
            f"{profile.name}, or pass --other-arch to measure it anyway under its own name ({host.hostname})",
        )
    m = re.search(r"part (0x[0-9a-f]+)", probe.cpu or "", re.I)
    core = _ARM_CORES.get(m.group(1).lower()) if m else None
    named = re.findall(r"Cortex-[AX]\d+\w*|Neoverse-\w+", profile.description)
    if core and named and core not in named:
        return f"{host}'s CPU is a {core}, not the {named[0]} of the {profile.name} profile: its numbers are that CPU's (recorded with it)"
    return None


def parse_variants(text: str | None) -> str | list[str] | None:
    """``--variants``: None, ``"all"``, or the names of ``NAME,NAME,...`` (each a single file name: it becomes a folder)."""
    from dsk_compress.paths import check_component

    if text is None:
        return None
    if text.strip() == "all":
        return "all"
    names = list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    try:
        if not names:
            raise ValueError(f"{text!r} names no variant")
        for n in names:
            check_component(n, "variant")
    except ValueError as e:
        raise RunError(f"--variants: {e}", hint="give all, or variant names from the report separated by commas") from None
    return names


VARIANT_TIMEOUT_S = 3600
"""The default time a bench session gets on the device per variant it measures (venv install and run.py): a Pi 4 or an
emulated board takes tens of minutes for a teacher's 1, 8 and 64-row batches."""


def session_timeout(timeout: float | None, card: dict, chosen) -> float:
    """``timeout``, or :data:`VARIANT_TIMEOUT_S` per variant the session measures (``chosen``: None, ``"all"`` or names)."""
    if timeout is not None:
        return float(timeout)
    n = 1 if chosen is None else len(card.get("variants") or [card]) if chosen == "all" else len(chosen)
    return float(VARIANT_TIMEOUT_S * max(n, 1))


def parse_batches(text: str | None) -> str | None:
    """``--batches``: ``N,N,...`` of positive batch sizes (the first is the latency batch), or None for the bundle's."""
    if text is None:
        return None
    try:
        sizes = [int(b) for b in text.split(",")]
        if not sizes or min(sizes) < 1:
            raise ValueError
    except ValueError:
        raise RunError(f"--batches: {text!r} is not a list of positive batch sizes", hint="e.g. --batches 1 or --batches 1,8") from None
    return ",".join(str(b) for b in sizes)


def _run_args(runs, threads, generate, batches) -> list[str]:
    """run.py's arguments for what the bench was asked (flags left out keep the bundle's defaults)."""
    given = (("--runs", runs), ("--threads", threads), ("--generate", generate), ("--batches", batches))
    return [a for flag, v in given if v for a in (flag, str(v))]


def _variants_arg(chosen) -> list[str]:
    return [] if chosen is None else ["--variant", chosen if chosen == "all" else ",".join(chosen)]


def _check_bundle_variants(bundle: Path, card: dict, chosen) -> None:
    """A bundle given with ``--variants`` carries them (run.py would refuse on the device, after the copy)."""
    if chosen is None:
        return
    carried = [e.get("variant") for e in card.get("variants") or [] if isinstance(e, dict)] or [card["variant"]]
    missing = [] if chosen == "all" else [n for n in chosen if n not in carried]
    if missing:
        raise RunError(
            f"{bundle} carries {', '.join(carried)}, not {', '.join(missing)}",
            hint="bench the run instead (dsk-compress bench RUN --device DEVICE --host HOST --variants ...): it bundles them",
        )


def _records(data, source: str) -> tuple[list, list[str]]:
    """The bench records of a run.py results.json: one record, or ``--variant``'s list of them with the variants that failed."""
    from dsk_compress.runtimes.result import parse_record

    if isinstance(data, dict) and data.get("schema") == "dsk-compress/variant-results":
        recs, errs = data.get("records"), data.get("errors") or []
        if not isinstance(recs, list) or not isinstance(errs, list):
            raise RunError(f"{source}: records or errors is not a list", hint="the bundle's run.py is damaged; export it again")
        return [parse_record(r, f"{source} record {i + 1}") for i, r in enumerate(recs)], [str(e) for e in errs]
    return [parse_record(data, source)], []


def _device_records(data, source: str, host, emulated: bool) -> tuple[list, list[str]]:
    """:func:`_records` of a device's results.json, each labelled with the SSH host and as emulated where it was."""
    recs, failed = _records(data, source)
    labelled = [
        r.model_copy(
            update={
                "provenance": r.provenance.model_copy(
                    update={
                        "ssh_host": str(host),
                        "measurement": "emulated" if emulated or r.provenance.measurement == "emulated" else "measured",
                    }
                )
            }
        )
        for r in recs
    ]
    return labelled, failed


def _bench_remote(
    target,
    device,
    host,
    identity,
    known_hosts,
    accept_new,
    wheelhouse,
    python,
    remote_dir,
    runs,
    threads,
    generate,
    timeout,
    log,
    other_arch=False,
    variants=None,
    batches=None,
):
    from dsk_compress.runtimes.remote import Remote, RemoteInterrupted, RemoteTimeout, parse_host

    h = parse_host(host)  # before anything is exported: a bad host is one line
    if _is_bundle(target):
        bundle, card = target, read_card(target)
        if device is not None and device != card["device"]:
            raise DeviceError(
                f"{bundle} is a bundle for {card['device']}, not {device}",
                hint=f"drop --device, or export one: dsk-compress export RUN --device {device}",
            )
        run_dir = _bundle_run_dir(bundle, card)
        _check_bundle_variants(bundle, card, variants)
    else:
        if device is None:
            raise DeviceError("--host needs --device with a run: which device's bundle to send", hint="e.g. --device rpi5")
        run_dir, bundle = target, _ensure_bundle(target, device, log, variants)
        card = read_card(bundle)
    skipped = (
        [
            f"{s.get('variant')}: not bundled for {card['device']}: {s.get('why')}"
            for s in card.get("variants_skipped") or []
            if isinstance(s, dict)
        ]
        if variants is not None
        else []
    )
    for line in skipped:
        log(f"warning: {line}")
    from dsk_compress.devices import load_device

    try:
        profile = load_device(card["device"])
    except DeviceError:  # a bundle written for a profile YAML that is not at hand: its architecture cannot be checked
        profile = None
    name = card["device"]
    args = _run_args(runs, threads, generate, batches)
    timeout = session_timeout(timeout, card, variants)
    with Remote(
        h, identity=identity, known_hosts=known_hosts, accept_new_host_key=accept_new, python=python, command_timeout=timeout
    ) as dev:
        p = dev.probe()  # before anything is copied: a device that is not the profile's is refused here
        if profile is not None:
            try:
                warning = check_device_fits_profile(p, profile, h)
            except DeviceError:
                if not other_arch:
                    raise
                from dsk_compress.paths import check_component

                try:
                    name = check_component(h.hostname, "host name")
                except ValueError:
                    name = "ssh-host"
                warning = (
                    f"{h} is {p.python_machine}, not {profile.arch}: measuring with the {profile.name} bundle, recorded "
                    f"under {name} (--other-arch), never as {profile.name}"
                )
            if warning:
                log(f"warning: {warning}")
        elif not other_arch:
            log(f"warning: the {card['device']} profile is not known here: {h}'s architecture ({p.python_machine}) is not checked")
        out = (run_dir / "devices" / name) if run_dir else (bundle / "results")
        raw = out / "raw" / (bundle.name if variants is not None else card["variant"])
        measurement = "emulated" if p.emulated else "measured"
        if p.emulated:  # an emulator's timings say nothing of the device: batch 1 only, no throughput batches
            if not batches:
                args += ["--batches", "1"]
            want = threads or card.get("threads")
            if not threads and want and p.cpu_count and want > p.cpu_count:
                # the profile's threads on fewer emulated cores spin against each other: many times slower for no figure
                args += ["--threads", str(p.cpu_count)]
                log(f"{h} is emulated on {p.cpu_count} core(s): {p.cpu_count} thread(s), not the profile's {want}")
        what = (
            f"{card['variant']}, {card['precision']}"
            if variants is None
            else ", ".join(e["variant"] for e in card.get("variants") or [card] if variants == "all" or e["variant"] in variants)
        )
        log(
            f"{h}: {p.python_machine} Python {p.python_version} ({p.cpu or 'unknown CPU'}){', emulated' if p.emulated else ''}; "
            f"running {bundle.name} ({what})"
        )
        suffix = "+variants" if variants is not None else ""  # the shipped bundle's folder on the device stays as it is
        try:
            res = dev.run_bundle(
                bundle,
                out_dir=raw,
                run_args=[*args, *_variants_arg(variants), "--measurement", measurement],
                wheelhouse=wheelhouse,
                timeout=timeout,
                remote_root=f"{remote_dir}/bundles/{card.get('source_run') or 'bundle'}-{card['device']}{suffix}",
                venvs_root=f"{remote_dir}/venvs",
                log=log,
            )
        except (RemoteTimeout, RemoteInterrupted) as e:  # the variants finished before the stop are kept
            if getattr(e, "partial", None):
                recs, _ = _device_records(e.partial, f"{raw / 'results.json'} (from {h}, stopped)", h, p.emulated)
                _save(out, name, recs, run_dir, bundle_file=None if run_dir else out / f"{name}.json")
                log(f"kept the {len(recs)} variant(s) {h} finished before the stop: {', '.join(r.variant for r in recs)}")
            raise
    recs, failed = _device_records(res["results"], f"{raw / 'results.json'} (from {h})", h, p.emulated)
    outcome = BenchOutcome(
        name=name,
        records=recs,
        run_dir=run_dir,
        errors=[*skipped, *failed, *(e for r in recs for e in r.errors)],
        measurement="emulated" if any(r.provenance.measurement == "emulated" for r in recs) else "measured",
    )
    outcome.results = _save(out, name, recs, run_dir, bundle_file=None if run_dir else out / f"{name}.json")
    return outcome


def clean_device(
    host: str,
    identity: str | Path | None = None,
    known_hosts: str | Path | None = None,
    accept_new_host_key: bool = False,
    python: str = "python3",
    remote_dir: str | None = None,
    log=print,
) -> list[tuple[str, int]]:
    """Remove what earlier benches left on a device: every entry of ``REMOTE_DIR/bundles`` and ``REMOTE_DIR/venvs`` (bundle
    copies, venvs, half-made ones, wheelhouses), after stopping a run.py still running in a bundle folder.

    Returns ``(path, bytes)`` of each entry removed (each is logged with its size); nothing outside those two folders is
    touched.
    """
    from dsk_compress.paths import remote_dir as confine
    from dsk_compress.runtimes.remote import _SIZES_SH, Remote, _size, parse_host

    try:
        folder = confine(DEFAULT_REMOTE_DIR if remote_dir is None else remote_dir)
    except ValueError as e:
        raise DeviceError(str(e), hint="e.g. --remote-dir ~/dsk-compress (under the device user's home) or an absolute path") from None
    h = parse_host(host)
    with Remote(h, identity=identity, known_hosts=known_hosts, accept_new_host_key=accept_new_host_key, python=python) as dev:
        root = dev.path(folder).rstrip("/")
        dirs = [f"{root}/bundles", f"{root}/venvs"]
        found = []
        for line in dev.run(["sh", "-c", _SIZES_SH, "sh", *dirs], timeout=600).stdout.splitlines():
            kb, _, path = line.partition("\t")
            if kb.strip().isdigit() and path and any(path.startswith(d + "/") for d in dirs):
                found.append((path, int(kb) * 1024))
        for path, _ in found:
            if path.startswith(dirs[0] + "/"):
                for what in dev.stop_run(path):
                    log(f"stopped on {h}: {what}")
        if found:
            dev.run(["rm", "-rf", "--", *(path for path, _ in found)], timeout=600)
        for path, size in found:
            log(f"removed {path} ({_size(size)})")
        log(
            f"{h}: removed {len(found)} item(s), {_size(sum(n for _, n in found))} freed under {root}"
            if found
            else f"{h}: nothing to remove under {root}"
        )
    return found


def _ensure_bundle(run_dir: Path, device: str, log, variants=None) -> Path:
    """``RUN/bundles/<device>``, exported first when missing or written by an older dsk-compress; with ``variants``,
    ``RUN/bundles/<device>+variants`` carrying them, exported again unless it was made for the same selection."""
    from dsk_compress.devices import load_device
    from dsk_compress.export.bundle import CARD_VERSION, make_bundle

    name = load_device(device).name  # a checked name (DeviceProfile): one folder under bundles/
    bundle = run_dir / "bundles" / (name if variants is None else f"{name}+variants")
    card = read_card(bundle) if (bundle / "model_card.json").is_file() else {}
    version = card.get("version", 1) if card else None
    if not isinstance(version, int) or version < CARD_VERSION or card.get("variants_request") != variants:
        log(f"exporting the {device} bundle{'' if variants is None else ' with variants'}: {bundle}")
        make_bundle(run_dir, device, bundle, variants=variants)
    return bundle


def _save(out: Path, name: str, records: list, run_dir: Path | None, bundle_file: Path | None = None) -> Path:
    """Merge ``records`` into ``out/results.json`` (or ``bundle_file``) and rebuild the run's report from its files."""
    from dsk_compress.io import atomic_write_json
    from dsk_compress.runtimes.result import DeviceResults, read_device_results

    path = bundle_file or out / "results.json"
    old = read_device_results(path) if path.is_file() else DeviceResults(device=name)
    atomic_write_json(path, old.merged(records).to_dict())
    if run_dir is not None:
        from dsk_compress.report import rebuild_report

        rebuild_report(run_dir)
    return path


# --------------------------------------------------------------------------- this machine


def _host_name() -> str:
    """This machine's hostname, the folder its results go to (``RUN/devices/<hostname>``); ``this-host`` if it is not a plain name."""
    import socket

    from dsk_compress.paths import check_component

    try:
        return check_component(socket.gethostname(), "hostname")
    except ValueError:
        return "this-host"


def _bench_run_here(run_dir: Path, device, runs, threads, generate, log) -> BenchOutcome:
    """Every artifact of the run in every runtime this machine offers (the bench stage's method and plans)."""
    from dsk_compress.artifacts import read_artifacts
    from dsk_compress.devices import load_device
    from dsk_compress.recipes.schema import BenchStageConfig, RecipeSpec
    from dsk_compress.recipes.stages.bench import check_profile_fits_host, measure_artifacts
    from dsk_compress.runtimes import BenchConfig
    from dsk_compress.tasks import build_task

    manifest = json.loads((run_dir / "manifest.json").read_text())
    spec = RecipeSpec.model_validate(manifest["recipe"])
    artifacts = next(((st.get("outputs") or {}).get("artifacts") for st in manifest.get("stages", []) if st.get("stage") == "export"), None)
    if not artifacts:
        raise RunError(f"{run_dir} has no exported artifacts to measure", hint="run (or resume) the recipe through its export stage")
    artifacts = read_artifacts(artifacts, f"{run_dir / 'manifest.json'}: the export stage's artifacts")  # one line if damaged
    profile = load_device(device or "host-cpu")
    check_profile_fits_host(profile)
    stage = next((st for st in spec.stages if st.stage == "bench"), None) or BenchStageConfig()
    task = build_task(spec.task.model_dump())
    bcfg = BenchConfig(
        warmup=stage.warmup,
        runs=runs or stage.runs,
        batch_size=stage.batch_size,
        throughput_batches=tuple(stage.throughput_batches),
        threads=threads or stage.threads or profile.threads,
        seq_len=getattr(task, "seq_len", None),
    )
    name = _host_name()
    out = run_dir / "devices" / name
    log(f"measuring {len(artifacts)} artifacts of {run_dir.name} on this machine ({name}, profile {profile.name}, {bcfg.threads} threads)")
    records, errors = measure_artifacts(
        run_dir, artifacts, task, profile, bcfg, run_dir.name, out / "partial.json", device_name=name, new_tokens=generate
    )
    (out / "partial.json").unlink(missing_ok=True)
    return BenchOutcome(name=name, records=records, results=_save(out, name, records, run_dir), run_dir=run_dir, errors=errors)


def _bench_bundle_here(bundle: Path, device, runs, threads, generate, timeout, log, variants=None, batches=None) -> BenchOutcome:
    """The bundle's run.py with this Python (the way a device runs it); ``variants``: those it carries, one record each."""
    card = read_card(bundle)
    _check_bundle_variants(bundle, card, variants)
    if device is not None and device != card["device"]:
        raise DeviceError(f"{bundle} is a bundle for {card['device']}, not {device}", hint="drop --device")
    bundle = bundle.absolute()  # run.py runs with the bundle as its working folder: every path it is given is absolute
    run_dir = _bundle_run_dir(bundle, card)
    name = _host_name()
    out = (run_dir / "devices" / name) if run_dir else (bundle / "results")
    raw = out / "raw" / (bundle.name if variants is not None else card["variant"])
    raw.mkdir(parents=True, exist_ok=True)
    args = _run_args(runs, threads, generate, batches) + _variants_arg(variants)
    timeout = session_timeout(timeout, card, variants)
    log(f"running {bundle}/run.py with {sys.executable}")
    r = subprocess.run(
        [sys.executable, str(bundle / "run.py"), "--out", str(raw / "results.json"), *args],
        cwd=bundle,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    (raw / "run.log").write_text(r.stdout + r.stderr)
    if r.returncode != 0:
        raise RunError(
            f"run.py failed (exit {r.returncode}): {(r.stderr.strip().splitlines() or ['no message'])[-1]}",
            hint=f"the full log is in {raw / 'run.log'}",
        )
    recs, failed = _records(json.loads((raw / "results.json").read_text()), str(raw / "results.json"))
    return BenchOutcome(
        name=name,
        records=recs,
        run_dir=run_dir,
        errors=[*failed, *(e for r in recs for e in r.errors)],
        results=_save(out, name, recs, run_dir, bundle_file=None if run_dir else out / f"{name}.json"),
    )
