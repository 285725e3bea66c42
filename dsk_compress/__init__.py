"""dsk-compress: distill MoE teachers into dense students, prune, quantize, export, benchmark."""

from __future__ import annotations

__version__ = "0.1.0"


def _source_checkout_path() -> None:
    # Imported from a source checkout's dsk_compress/ folder without an editable install (``python -m ...`` in the
    # checkout puts it first on sys.path, ahead of a non-editable install): the folders pyproject maps into the
    # package (compress/, recipes/, cli/, ...) sit beside this folder, not in it, so look for subpackages there too.
    import importlib.util
    import os

    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    if os.path.isdir(os.path.join(here, "recipes")) or not os.path.isfile(os.path.join(root, "recipes", "schema.py")):
        return  # installed (the subpackages are inside), or not a checkout
    if importlib.util.find_spec(__name__ + ".recipes") is None:  # no editable install maps them
        __path__.append(root)


_source_checkout_path()

from dsk_compress.errors import DskError  # noqa: E402


def load_recipe(name_or_path, overrides=None):
    """Load and validate a recipe. See :func:`dsk_compress.api.load_recipe`."""
    from dsk_compress.api import load_recipe as _f

    return _f(name_or_path, overrides)


def run_recipe(spec_or_name, out="runs", resume=False, run_dir=None, overrides=None, threads=None):
    """Run a recipe end to end. See :func:`dsk_compress.api.run_recipe`."""
    from dsk_compress.api import run_recipe as _f

    return _f(spec_or_name, out=out, resume=resume, run_dir=run_dir, overrides=overrides, threads=threads)


__all__ = ["DskError", "load_recipe", "run_recipe", "__version__"]
