"""Worked examples. Run them from the repository root so that ``examples.*`` is importable."""
