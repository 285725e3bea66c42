"""The built-in stages, one module per stage: distill -> prune -> qat -> export -> bench.

Importing this package imports every module in it, and each registers its stage in
:data:`dsk_compress.recipes.base.STAGES`. Each module is that stage's story: its config, the outputs it requires,
consumes and provides, and its ``run``: read its config, call the library (``compress/``, ``export/``,
``runtimes/``), write its artifacts, return a ``StageResult``; ``common.py`` holds what they share.
A new stage is one module: a ``StageConfig`` subclass with ``stage: Literal["name"]`` and a ``Stage[Config]`` subclass
registered with ``@STAGES.register("name")``. The recipe schema takes it from the registry (order, "needs" errors and
the ``stages`` union follow from its declarations); a stage outside this package registers the same way when its
module is imported.
"""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")  # registers the stage(s) it defines
