"""The Pareto front of latency vs accuracy (shared by the report's host rows and its device sections)."""

from __future__ import annotations

from collections.abc import Sequence

from dsk_compress.report.model import finite


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the non-dominated points when minimising latency and maximising accuracy.

    A point is dominated when another point is at least as fast *and* at least as
    accurate, and strictly better in one of the two. Identical points do not dominate
    each other, so both stay on the front. Points with a missing or non-finite
    coordinate are never on the front.

    Args:
        points: ``(latency, accuracy)`` pairs.

    Returns:
        Indices into ``points`` of the Pareto-optimal points, in ascending index order.
    """
    clean: list[tuple[int, float, float]] = []
    for i, p in enumerate(points):
        lat, acc = finite(p[0]), finite(p[1])
        if lat is not None and acc is not None:
            clean.append((i, lat, acc))
    front = []
    for i, li, ai in clean:
        dominated = any(lj <= li and aj >= ai and (lj < li or aj > ai) for j, lj, aj in clean if j != i)
        if not dominated:
            front.append(i)
    return front
