"""The bench stage's latency rounds: each variant's p50 is the median of interleaved rounds (each round starting one
variant further along), the rounds are kept in the record and the report shows their range."""

from __future__ import annotations

import pytest
from test_report_devices import ARTS, record

from dsk_compress.runtimes import BenchConfig
from dsk_compress.runtimes.result import BenchResult, parse_record


class _Task:
    @staticmethod
    def example_inputs(n):
        import numpy as np

        return np.zeros((n, 8), np.int64)


def test_p50_is_the_median_of_interleaved_rounds(monkeypatch, tmp_path):
    from dsk_compress.recipes.stages import bench
    from dsk_compress.recipes.stages.bench import Plan, latency_rounds

    recs = [parse_record(record(n, ARTS[n]["role"], "fp32", 60.0, p50)) for n, p50 in (("teacher", 10.0), ("student", 4.0), ("final", 2.0))]
    later = {"teacher": iter([30.0, 11.0]), "student": iter([1.0, 5.0]), "final": iter([2.5, 2.5])}  # round 2, round 3
    order, seen = [], []

    def fake_time(plan, run_dir, inputs, cfg):
        order.append(plan.path)
        seen.append(cfg)
        rec = record(plan.path, "x", "fp32", 0.0, next(later[plan.path]))
        return BenchResult(runtime=rec["runtime"], timing=rec["timing"])

    monkeypatch.setattr(bench, "_time", fake_time)
    refs = {r.variant: (i, Plan("onnx", r.variant)) for i, r in enumerate(recs)}
    out = latency_rounds(tmp_path, recs, refs, _Task(), BenchConfig(throughput_batches=(8, 64)), rounds=3)

    assert order == ["student", "final", "teacher", "final", "teacher", "student"]  # round r starts r variants along
    assert all(c.throughput_batches == () for c in seen)  # extra rounds time the latency batch alone
    got = {r.variant: r.timing.batches[0] for r in out}
    assert got["teacher"].p50 == 11.0 and got["teacher"].p50_rounds == [10.0, 30.0, 11.0]
    assert got["student"].p50 == 4.0 and got["student"].p50_rounds == [4.0, 1.0, 5.0]
    assert got["final"].p50 == 2.5
    # every statistic merges the rounds: round 1's p99 (10.0) below the median p50 (11.0) was a report with p50 > p99
    t = got["teacher"]
    assert t.p50 <= t.p90 <= t.p99 and (t.p99, t.min, t.max, t.mean) == (11.0, 10.0, 30.0, 17.0)
    assert t.items_per_s == pytest.approx(1000 / 17.0)
    assert [r.timing.batches[1] for r in out] == [r.timing.batches[1] for r in recs]  # throughput batches untouched
    assert recs[0].timing.batches[0].p50 == 10.0  # the input records are not changed


def test_report_shows_the_range_of_the_rounds(tmp_path):
    from dsk_compress.recipes.stages.bench import host_rows
    from dsk_compress.report import build_report
    from dsk_compress.report.format import P50_RANGE_COLUMN, table_columns, table_rows

    recs = []
    for n, rounds in (("teacher", [10.0, 12.0, 11.0]), ("student", [4.0, 3.5, 6.0]), ("final", [2.0, 2.0, 2.5])):
        rec = parse_record(record(n, ARTS[n]["role"], "fp32", 60.0, sorted(rounds)[1]))
        first = rec.timing.batches[0].model_copy(update={"p50_rounds": rounds})
        recs.append(rec.model_copy(update={"timing": rec.timing.model_copy(update={"batches": [first, *rec.timing.batches[1:]]})}))
    report = build_report(tmp_path / "run", host_rows(recs, ARTS), {"run": "run", "recipe": "r", "task": "code-lm", "host": "h"})
    cols = table_columns(report)
    assert cols[cols.index("p50 (ms)") + 1] == P50_RANGE_COLUMN
    cells = {row[0]: row[cols.index(P50_RANGE_COLUMN)] for row in table_rows(report)}
    assert cells == {"teacher": "10.00–12.00", "student": "3.50–6.00", "final": "2.00–2.50"}
    assert cells and "p50 range (ms)" in (tmp_path / "run" / "report.md").read_text()


@pytest.mark.parametrize("rounds", [0, 21])
def test_rounds_out_of_range_is_refused(rounds):
    from pydantic import ValidationError

    from dsk_compress.recipes.stages.bench import BenchStageConfig

    with pytest.raises(ValidationError):
        BenchStageConfig(rounds=rounds)
