"""``dsk-compress``: distill, prune, quantize, export and benchmark models for the edge."""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from dsk_compress import __version__
from dsk_compress.cli._options import OutDir, SetOpt, ThreadsOpt
from dsk_compress.errors import DskError

app = typer.Typer(
    name="dsk-compress",
    help="Distill MoE teachers into dense students, prune, quantize, export to ONNX/TensorRT and benchmark.\n\n"
    "Example: dsk-compress recipe quant-prune-distill",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)
_COLUMN_KEYS = (
    "variant",
    "role",
    "params",
    "size",
    "accuracy",
    "bits-per-byte",
    "p50",
    "p99",
    "p50-range",
    "speedup",
    "size-ratio",
    "delta-vs-host",
    "measured-on",
    "runtime",
    "throughput",
    "decode",
)
"""dsk_compress.report.format.COLUMN_KEYS, spelled out so that --help imports no report code (a test keeps them equal)."""

zoo_app = typer.Typer(help="Built-in zoo models: list them or train one.\n\nExample: dsk-compress zoo list", no_args_is_help=True)
app.add_typer(zoo_app, name="zoo")


def _console(wide: bool = False):
    """stdout's console: a terminal's own width; off a terminal (CI logs, pipes) $COLUMNS, else 100 (200 for ``wide``
    tables). Tables never cut a variant name at any width: other cells fold onto a second line instead."""
    import os

    from rich.console import Console

    if sys.stdout.isatty():
        return Console()
    columns = os.environ.get("COLUMNS", "")
    return Console(width=int(columns) if columns.isdigit() and int(columns) > 0 else (200 if wide else 100))


def _version(value: bool) -> None:
    if value:
        typer.echo(f"dsk-compress {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    """Distill MoE teachers into dense students, prune, quantize, export and benchmark.

    Example: dsk-compress recipe quant-prune-distill
    """


@app.command("recipes")
def recipes_cmd() -> None:
    """List the bundled recipes.

    Example: dsk-compress recipes
    """
    from rich.table import Table

    from dsk_compress.recipes import recipe_descriptions

    t = Table("recipe", "description")
    for name, desc in recipe_descriptions():
        t.add_row(name, desc)
    _console().print(t)


@app.command("recipe")
def recipe_cmd(
    recipe: Annotated[str, typer.Argument(help="A bundled recipe name or a path to a recipe YAML.")],
    set_: SetOpt = None,
    out: OutDir = Path("runs"),
    resume: Annotated[bool, typer.Option("--resume", help="Continue the latest run of this recipe under --out.")] = False,
    run_dir: Annotated[Path | None, typer.Option("--run-dir", help="Use (or, with --resume, continue) exactly this run directory.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Validate, print the resolved plan and exit.")] = False,
    rerun_from: Annotated[
        str | None,
        typer.Option(
            "--rerun-from",
            help="With --resume: run this stage and every later one again (old directories kept as <stage>.replaced-<time>).",
        ),
    ] = None,
    threads: ThreadsOpt = None,
) -> None:
    """Run a compression recipe end to end and print where the report is.

    Data-parallel on N GPUs (or CPU processes): torchrun --nproc_per_node N -m dsk_compress.cli.main recipe NAME

    Example: dsk-compress recipe quant-prune-distill --set stages.1.ffn_ratio=0.4
    Re-export and re-measure a finished run: dsk-compress recipe quant-prune-distill --resume --rerun-from export
    On a machine shared with other jobs: dsk-compress recipe quant-prune-distill --threads 1
    """
    import json

    from dsk_compress import api

    spec = api.load_recipe(recipe, set_ or [])
    if dry_run:
        from dsk_compress.recipes.preflight import describe_estimate, preflight
        from dsk_compress.recipes.runner import describe_plan
        from dsk_compress.threads import choose_threads

        choice = choose_threads(threads, spec.threads)
        estimate = preflight(spec)  # model files, shapes and memory, as a real run checks them first
        c = _console()
        # plain lines, never wrapped by rich (a terminal wraps them itself; a log keeps one line per stage)
        c.print(f"[bold]{spec.name}[/bold] (recipe version {spec.version}, seed {spec.seed})", soft_wrap=True)
        c.print(choice.describe(), markup=False, soft_wrap=True)
        c.print(
            f"teacher: {spec.teacher.model_dump(exclude_none=True)}  student: {spec.student.model_dump(exclude_none=True)}",
            markup=False,
            soft_wrap=True,
        )
        c.print(f"task: {spec.task.model_dump()}", markup=False, soft_wrap=True)
        for st in describe_plan(spec):
            c.print(
                f"  {st['index']}. {st['stage']}: " + json.dumps({k: v for k, v in st.items() if k not in ("index", "stage")}),
                markup=False,
                soft_wrap=True,
            )
        c.print(describe_estimate(estimate), markup=False, soft_wrap=True)
        return
    from dsk_compress.errors import RunInterrupted

    resume_arg: bool | Path = (run_dir if run_dir else True) if resume else False
    try:
        rd = api.run_recipe(spec, out=out, resume=resume_arg, run_dir=None if resume else run_dir, rerun_from=rerun_from, threads=threads)
    except RunInterrupted as e:  # the manifest says interrupted; the message says how to continue
        typer.secho(f"interrupted: {e.message}", err=True, fg="yellow")
        raise typer.Exit(e.exit_code) from None
    from dsk_compress.compress import dist

    if not dist.is_main():  # under torchrun rank 0 alone reports
        return
    from dsk_compress.report import load_report, render_summary_table

    c = _console()
    rep_path = rd / "report.md"
    if rep_path.is_file():
        render_summary_table(load_report(rd), c)
        c.print(f"report: {rep_path}  (also {rd / 'report.html'}, {rd / 'report.json'})", markup=False, soft_wrap=True)
    else:
        c.print(f"run finished: {rd} (no bench stage, so no report)", markup=False, soft_wrap=True)


@app.command("devices")
def devices_cmd() -> None:
    """List the device profiles.

    Example: dsk-compress devices
    """
    from rich.table import Table

    from dsk_compress.devices import list_devices

    t = Table("device", "arch", "cores", "memory GB", "runtime", "precision", "peak GFLOP/s", "GB/s")
    for d in list_devices():
        t.add_row(
            d.name,
            d.arch,
            str(d.cores),
            f"{d.memory_gb:g}",
            d.preferred_runtime,
            d.preferred_precision,
            f"{d.peak_gflops:g} ({d.peak_gflops_precision})",
            f"{d.memory_bandwidth_gbs:g}",
        )
    _console().print(t)


@app.command("report")
def report_cmd(
    run_dirs: Annotated[list[Path], typer.Argument(help="One run directory to show, or several to compare.")],
    wide: Annotated[
        bool,
        typer.Option("--wide", help="Every column (role, bits/byte, p99, size ratio, runtime, throughput, ...), not only the summary's."),
    ] = False,
    columns: Annotated[
        str | None,
        typer.Option(
            "--columns",
            help="Comma-separated columns to show, e.g. variant,accuracy,p50,p99,runtime (any of: " + ", ".join(_COLUMN_KEYS) + ").",
        ),
    ] = None,
) -> None:
    """Show a run's report, or compare several runs side by side.

    The summary table (variant, params, MB, accuracy, p50, speed-up, decode tokens/s) fits a 100-column terminal.

    Example: dsk-compress report runs/quant-prune-distill-20261123-101500 runs/other-run
    Every column: dsk-compress report runs/quant-prune-distill-20261123-101500 --wide
    """
    from dsk_compress.integrity import verify_run
    from dsk_compress.report import compare_reports, load_report, render_comparison, render_summary_table
    from dsk_compress.report.format import parse_columns

    chosen = "wide" if wide else (parse_columns(columns) if columns else None)  # a bad name: one line before any reading
    for rd in run_dirs:  # report.json and the artifacts it describes are what the run wrote
        if (rd / "manifest.json").exists():
            verify_run(rd)
    c = _console(wide=chosen is not None)
    if len(run_dirs) == 1:
        render_summary_table(load_report(run_dirs[0]), c, chosen)
    else:
        render_comparison(compare_reports(run_dirs), c)


class ExportFormat(str, Enum):
    bundle = "bundle"
    genai = "genai"
    optimum = "optimum"


@app.command("export")
def export_cmd(
    run_dir: Annotated[Path, typer.Argument(help="A finished run directory (with report.json).")],
    device: Annotated[
        str | None,
        typer.Option("--device", "-d", help="Target device profile (see `dsk-compress devices`) or a profile YAML; needed for a bundle."),
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Output folder (default RUN_DIR/bundles/DEVICE, or RUN_DIR/bundles/FORMAT-VARIANT).")
    ] = None,
    fmt: Annotated[
        ExportFormat,
        typer.Option(
            "--format",
            "-f",
            help="bundle: deploy bundle for --device (run.py); genai: an "
            "onnxruntime-genai model folder (og.Model); optimum: a Hugging Face Optimum folder "
            "(ORTModelForCausalLM).",
        ),
    ] = ExportFormat.bundle,
    variant: Annotated[
        str | None,
        typer.Option(
            "--variant", help="genai / optimum: which exported variant (default final, the QAT student, else the last float student)."
        ),
    ] = None,
) -> None:
    """Write a deploy bundle for a device (model, model card, run.py, requirements), or a model folder that
    onnxruntime-genai or Hugging Face Optimum loads and generates from.

    Example: dsk-compress export runs/quant-prune-distill-20261123-070000 --device rpi5
    """
    from dsk_compress.errors import RunError

    if out is not None and out.exists() and not out.is_dir():  # one line now, not after the run's checks
        raise RunError(
            f"--out {out} is a file, not a folder", hint="give a folder for the " + ("bundle" if fmt is ExportFormat.bundle else "model")
        )
    if fmt is not ExportFormat.bundle:
        from dsk_compress.export.runtime_folders import export_runtime_folder

        if device is not None:
            raise RunError(f"--device goes with --format bundle, not {fmt.value}", hint="choose the model with --variant")
        dest = export_runtime_folder(run_dir, fmt.value, out, variant)  # the bundle's rules for --out
        loads = "og.Model(folder)" if fmt is ExportFormat.genai else "ORTModelForCausalLM.from_pretrained(folder)"
        _console().print(f"{fmt.value} folder: {dest}  ({loads}; see its README.md)")
        return
    from dsk_compress.export.bundle import make_bundle

    if device is None:
        raise RunError(
            "a bundle needs --device", hint="dsk-compress export RUN --device rpi5 (see dsk-compress devices), or --format genai / optimum"
        )
    if variant is not None:
        raise RunError("--variant goes with --format genai or optimum", hint="a bundle ships the variant its device's precision picks")
    dest = make_bundle(run_dir, device, out)  # never replaces a folder it did not write (see make_bundle)
    from dsk_compress.export.bundle import DEVICE_RECIPE

    _console().print(f"bundle: {dest}  (on the device, in the bundle's folder: {DEVICE_RECIPE}; see its README.md)", markup=False)


@app.command("bench")
def bench_cmd(
    target: Annotated[Path | None, typer.Argument(help="A run directory, or a deploy bundle folder.")] = None,
    device: Annotated[
        str | None,
        typer.Option(
            "--device",
            "-d",
            help="Device profile: with --host and a RUN, whose bundle to send "
            "(exported when missing); without --host, whose threads and execution providers "
            "apply on this machine (another CPU architecture is refused).",
        ),
    ] = None,
    host: Annotated[
        str | None,
        typer.Option(
            "--host", help="Measure on this device over SSH: user@host[:port] (key authentication, host key checked against known_hosts)."
        ),
    ] = None,
    identity: Annotated[
        Path | None,
        typer.Option("--identity", "-i", help="SSH private key (default: ssh-agent / ~/.ssh/config).", exists=True, dir_okay=False),
    ] = None,
    known_hosts: Annotated[
        Path | None,
        typer.Option("--known-hosts", help="known_hosts file to check the device's host key against (default: ssh's own files)."),
    ] = None,
    accept_new_host_key: Annotated[
        bool,
        typer.Option(
            "--accept-new-host-key", help="Trust the device's host key when seen for the first time (a changed key is still refused)."
        ),
    ] = False,
    wheelhouse: Annotated[
        Path | None,
        typer.Option(
            "--wheelhouse",
            help="Folder of wheels for the device: its venv is installed offline from them (boards without internet).",
            exists=True,
            file_okay=False,
        ),
    ] = None,
    python: Annotated[str, typer.Option("--python", help="The device's Python (a name on its PATH or a path).")] = "python3",
    remote_dir: Annotated[
        str | None, typer.Option("--remote-dir", help="Folder on the device for bundles and venvs (default ~/dsk-compress).")
    ] = None,
    runs: Annotated[
        int | None, typer.Option("--runs", help="Timed runs per batch size (default: the bundle's 30 / the bench stage's).", min=1)
    ] = None,
    threads: Annotated[int | None, typer.Option("--threads", help="Intra-op threads (default: the device profile's).", min=1)] = None,
    generate: Annotated[
        int | None,
        typer.Option(
            "--generate",
            help="Also time greedy decode of N tokens with the fused decoder graph "
            "(model.fused.onnx on a CPU; the plain KV-cache graph where there is no fused one).",
            min=1,
        ),
    ] = None,
    other_arch: Annotated[
        bool,
        typer.Option(
            "--other-arch",
            help="Measure even when the device's CPU architecture is not the "
            "profile's; results are recorded under the device's host name, never the profile's.",
        ),
    ] = False,
    variants: Annotated[
        str | None,
        typer.Option(
            "--variants",
            metavar="all|NAME,...",
            help="With --host: measure every exported "
            "variant of the run (all) or those named, in one session on the device (one copy, "
            "one venv; the bundle RUN/bundles/DEVICE+variants carries them), so the device "
            "section has a table and a Pareto front. Default: the variant the profile ships.",
        ),
    ] = None,
    batches: Annotated[
        str | None,
        typer.Option(
            "--batches",
            metavar="N,N,...",
            help="Batch sizes run.py times, the first the latency batch (default the bundle's 1,8,64; 1 for latency only "
            "on a slow device).",
        ),
    ] = None,
    timeout: Annotated[
        float | None,
        typer.Option(
            "--timeout",
            help="Seconds the device session may take, venv install included (default one hour per variant measured).",
            min=1,
        ),
    ] = None,
    clean: Annotated[
        str | None,
        typer.Option(
            "--clean",
            metavar="HOST",
            help="Remove what earlier benches left on this device "
            "(bundles, venvs, wheelhouses under --remote-dir), listing their sizes; stops a "
            "run.py still running there.",
        ),
    ] = None,
) -> None:
    """Measure a run where it runs (a device over SSH, or this machine) and add the numbers to the run's report.

    Over SSH the run's bundle for --device is copied to the device, its venv made (or reused), run.py measures it
    there, and the results come back into RUN/devices/DEVICE/results.json and the report as that device's rows,
    labelled measured, or emulated for an emulated board. Without --host this machine measures every artifact
    of the run (or runs the bundle's run.py). Safe to re-run: newer rows replace older ones of the same device.

    Example: dsk-compress bench runs/quant-prune-distill-20261123-070000 --device rpi5 --host pi@rpi5.local
    Every variant on the device: dsk-compress bench runs/quant-prune-distill-20261123-070000 --device rpi5 --host pi@rpi5.local --variants all
    On a GPU server: dsk-compress bench runs/quant-prune-distill-20261123-070000 --device gpu-server
    """
    from dsk_compress.benchmark import bench
    from dsk_compress.errors import RunError
    from dsk_compress.progress import step_progress
    from dsk_compress.report import load_report, render_summary_table

    c = _console()
    if clean is not None:
        from dsk_compress.benchmark import clean_device

        if target is not None or host is not None:
            raise RunError("--clean HOST takes no run and no --host", hint="dsk-compress bench --clean pi@rpi5.local")
        clean_device(
            clean,
            identity=identity,
            known_hosts=known_hosts,
            accept_new_host_key=accept_new_host_key,
            python=python,
            remote_dir=remote_dir,
            log=lambda m: c.print(m, markup=False),
        )
        return
    if target is None:
        raise RunError("bench needs a run directory or a bundle", hint="dsk-compress bench RUN --device rpi5 --host pi@rpi5.local")
    from dsk_compress.interrupts import exit_code, terminate_as_interrupt

    try:
        # SIGTERM (a scheduler, `kill`) ends it as Ctrl-C does: what runs on the device is stopped first
        with terminate_as_interrupt(), step_progress("bench"):  # each measurement names itself as it starts (stderr)
            out = bench(
                target,
                device=device,
                host=host,
                identity=identity,
                known_hosts=known_hosts,
                accept_new_host_key=accept_new_host_key,
                wheelhouse=wheelhouse,
                python=python,
                remote_dir=remote_dir,
                runs=runs,
                threads=threads,
                generate=generate,
                other_arch=other_arch,
                variants=variants,
                batches=batches,
                timeout=timeout,
                log=lambda m: c.print(m, markup=False),
            )
    except KeyboardInterrupt as e:  # over SSH: what ran on the device has been stopped (RemoteInterrupted says what)
        typer.secho(getattr(e, "message", None) or "interrupted", err=True, fg="yellow")
        raise typer.Exit(exit_code(e.__context__ if isinstance(e.__context__, KeyboardInterrupt) else e)) from None
    for err in out.errors:
        c.print(f"[yellow]not measured:[/yellow] {err}")
    if out.run_dir is not None:
        render_summary_table(load_report(out.run_dir), c)
        c.print(f"{out.name} ({out.measurement}): {len(out.records)} result(s) in {out.results}; report: {out.run_dir / 'report.html'}")
    else:
        c.print(f"{out.name} ({out.measurement}): {len(out.records)} result(s) in {out.results} (the bundle is outside its run: no report)")


@zoo_app.command("list")
def zoo_list() -> None:
    """List the zoo models and whether their weights are present.

    Example: dsk-compress zoo list
    """
    from rich.table import Table

    from dsk_compress.models.zoo import ZOO, zoo_card

    t = Table("model", "description", "weights", "val accuracy %", "bits/byte", "trained tokens")
    for name in ZOO:
        card = zoo_card(name)
        v = (card or {}).get("validation", {})
        t.add_row(
            name,
            ZOO.get(name).description,
            "yes" if card else "no",
            f"{v['accuracy']:.2f}" if v else "-",
            f"{v['bits_per_byte']:.3f}" if v else "-",
            f"{card['training']['tokens']:,}" if card else "-",
        )
    _console().print(t)


@zoo_app.command("train")
def zoo_train(
    name: Annotated[str, typer.Argument(help="Zoo model to train, e.g. code-lm-moe.")],
    steps: Annotated[
        int | None,
        typer.Option(
            help="Optimizer steps, the length of the cosine schedule (default: the model's own). A resume may raise it: see below.", min=1
        ),
    ] = None,
    batch_size: Annotated[int | None, typer.Option(help="Sequences per step.", min=1)] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate.", min=0)] = None,
    work_dir: Annotated[Path | None, typer.Option(help="Checkpoint directory (default runs/zoo-NAME).")] = None,
    ckpt_every: Annotated[
        int,
        typer.Option(
            help="Write a checkpoint every N steps (and at the end). Each one is the model, "
            "its AdamW state and RNG (about 140 MB for code-lm-moe).",
            min=1,
        ),
    ] = 500,
    stdlib_root: Annotated[
        Path | None,
        typer.Option(
            help="Standard-library folder the code-lm corpus is read from (default: this "
            "interpreter's), e.g. a copy of another machine's lib/python3.11: the "
            "corpus fingerprint on the card then matches that machine's.",
            exists=True,
            file_okay=False,
        ),
    ] = None,
    resume: Annotated[bool, typer.Option("--resume/--no-resume", help="Continue from the last checkpoint.")] = True,
    install: Annotated[
        bool,
        typer.Option("--install/--no-install", help="Write weights + card into the package's zoo (--no-install: into WORK_DIR/final)."),
    ] = True,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="With --install: replace weights already in the zoo, such as the shipped "
            "teacher (they are copied to WORK_DIR/replaced-<time>/ first). Without it that is refused.",
        ),
    ] = False,
    threads: ThreadsOpt = None,
) -> None:
    """Train a zoo model on its task (bf16 autocast on CUDA, resumable; data-parallel under torchrun) and write its weights and card.

    Resuming with a different --steps continues from the checkpoint's step under a cosine schedule over the new total (the card records each leg); fewer steps than the checkpoint has done, or another --lr, is refused.

    Installed weights (the shipped teacher) are never replaced without --force; --no-install trains beside them.

    Example: dsk-compress zoo train code-lm-moe --steps 2000 --no-install
    Continue it to more steps: dsk-compress zoo train code-lm-moe --steps 3500 --no-install
    """
    from dsk_compress.compress import dist
    from dsk_compress.models.zoo import train_zoo

    card = train_zoo(
        name,
        work_dir=work_dir,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        resume=resume,
        install=install,
        ckpt_every=ckpt_every,
        stdlib_root=stdlib_root,
        threads=threads,
        force=force,
    )
    v = card["validation"]
    if dist.is_main():
        from dsk_compress.models.zoo import zoo_path

        where = zoo_path(name) if install else (work_dir or Path("runs") / f"zoo-{name}") / "final"
        _console().print(
            f"{name}: accuracy {v['accuracy']:.2f}%, {v['bits_per_byte']:.3f} bits/byte after "
            f"{card['training']['tokens']:,} tokens; weights and card in {where}",
            markup=False,
        )


def main() -> None:
    """Console entry point: user errors become one line and exit code 2."""
    try:
        code = app(standalone_mode=False)  # Ctrl-C outside a run comes back as 130 (typer turns it into Exit(130))
    except DskError as e:
        line = f"error: {e.message}" + (f" (hint: {e.hint})" if e.hint else "")
        typer.secho(" ".join(line.split()), err=True, fg="red")  # one line, whatever the message holds
        sys.exit(2)
    except KeyboardInterrupt:
        typer.secho("interrupted: finished stages are kept; continue with --resume", err=True, fg="yellow")
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as e:  # click usage errors
        from dsk_compress.io import storage_error

        found = storage_error(e, Path.cwd(), "")  # a full or read-only disk, a permission: one line
        if found is not None:
            typer.secho(" ".join(f"error: {found.message} (hint: {found.hint})".split()), err=True, fg="red")
            sys.exit(2)
        try:  # typer >= 0.2x vendors click as typer._click and does not install click
            from typer._click import exceptions as click_exceptions
        except ImportError:
            from click import exceptions as click_exceptions

        if isinstance(e, click_exceptions.ClickException):
            e.show()
            sys.exit(e.exit_code)
        if isinstance(e, typer.Abort):
            sys.exit(1)
        raise
    if isinstance(code, int) and code:
        sys.exit(code)


if __name__ == "__main__":
    main()
