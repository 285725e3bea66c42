"""dsk-compress: distill MoE teachers into dense students, prune, quantize, export, benchmark."""

from __future__ import annotations

__version__ = "0.1.0"

from dsk_compress.errors import DskError  # noqa: E402


def load_recipe(name_or_path, overrides=None):
    """Load and validate a recipe. See :func:`dsk_compress.api.load_recipe`."""
    from dsk_compress.api import load_recipe as _f

    return _f(name_or_path, overrides)


def run_recipe(spec_or_name, out="runs", resume=False, run_dir=None, overrides=None):
    """Run a recipe end to end. See :func:`dsk_compress.api.run_recipe`."""
    from dsk_compress.api import run_recipe as _f

    return _f(spec_or_name, out=out, resume=resume, run_dir=run_dir, overrides=overrides)


__all__ = ["DskError", "load_recipe", "run_recipe", "__version__"]
