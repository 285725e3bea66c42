"""The public API the CLI calls: load, run and report recipes."""

from __future__ import annotations

from pathlib import Path


def load_recipe(name_or_path: str, overrides: list[str] | None = None):
    """Load and validate a recipe (bundled name or YAML path) with ``key=value`` overrides."""
    from dsk_compress.recipes import load_recipe as _load

    return _load(name_or_path, overrides)


def run_recipe(
    spec_or_name,
    out: str | Path = "runs",
    resume: bool | str | Path = False,
    run_dir: str | Path | None = None,
    overrides: list[str] | None = None,
    rerun_from: str | None = None,
    threads: int | None = None,
) -> Path:
    """Run a recipe (a RecipeSpec, a bundled name or a path) and return its run directory; ``rerun_from`` (with
    ``resume``) runs that stage and the later ones again; ``threads`` (``--threads``) sets torch's CPU threads above the
    recipe's ``threads`` field, ``OMP_NUM_THREADS`` and the physical cores."""
    from dsk_compress.recipes.runner import run_recipe as _run

    spec = load_recipe(spec_or_name, overrides) if isinstance(spec_or_name, (str, Path)) else spec_or_name
    return _run(spec, out=out, resume=resume, run_dir=run_dir, rerun_from=rerun_from, threads=threads)
