"""The built-in stages, one module per stage: distill -> prune -> qat -> export -> bench.

Importing this package registers them in :data:`dsk_compress.recipes.base.STAGES` (the runner's ``plan``
does). Each module is that stage's story: read its config, call the library (``compress/``, ``export/``,
``runtimes/``), write its artifacts, return a ``StageResult``; ``common.py`` holds what they share.
A new stage: a config in ``recipes/schema.py``, a module here registered with ``@STAGES.register(name)``,
and its import below.
"""

from dsk_compress.recipes.stages import bench, distill, export, prune, qat  # noqa: F401  (registers the stages)
