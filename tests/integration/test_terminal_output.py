"""What a recipe prints in a 100-column terminal: the run directory when the run opens, a header per stage (what it will
do and, on a second run, how long the comparable stage took), and a report table with no cell cut.

The chain is the default recipe's (distill with a baseline -> prune -> qat -> export with PTQ baselines -> bench) on a
tiny teacher at a few steps, so the table holds the default run's variant names and more."""

from __future__ import annotations

import re

import pytest
from conftest import run_main, tiny_llama_recipe

STAGES = [
    {"stage": "distill", "steps": 2, "batch_size": 4, "lr": 3e-3, "baselines": ["random-init-nokd"]},
    {"stage": "prune", "ffn_ratio": 0.5, "steps": 2, "batch_size": 4},
    {"stage": "qat", "steps": 2, "batch_size": 4, "observer_steps": 1},
    {"stage": "export", "ptq_calibration_batches": 1},
    {"stage": "bench", "runs": 2, "warmup": 1, "throughput_batches": []},
]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """The recipe run twice through the console entry point with COLUMNS=100 (stdout is not a terminal here)."""
    d = tmp_path_factory.mktemp("terminal")
    recipe = tiny_llama_recipe(d, "tiny-terminal", STAGES)
    mp = pytest.MonkeyPatch()
    mp.setenv("COLUMNS", "100")
    outs = []
    try:
        for _ in range(2):
            cap = _Capture()
            with cap:
                code, out, err = run_main(["recipe", str(recipe), "--out", str(d / "runs")], cap)
            assert code == 0, err[-3000:]
            outs.append((out, err))
    finally:
        mp.undo()
    return outs


class _Capture:
    """A capsys stand-in for a module-scoped fixture: stdout and stderr of the block."""

    def __enter__(self):
        import contextlib
        import io

        self._out, self._err = io.StringIO(), io.StringIO()
        self._cms = [contextlib.redirect_stdout(self._out), contextlib.redirect_stderr(self._err)]
        for cm in self._cms:
            cm.__enter__()
        return self

    def __exit__(self, *exc):
        for cm in reversed(self._cms):
            cm.__exit__(*exc)

    def readouterr(self):
        return self._out.getvalue(), self._err.getvalue()


def test_report_table_at_100_columns_cuts_no_cell(two_runs):
    out, _ = two_runs[0]
    assert "…" not in out, out
    table = out[out.index("Compression report") : out.index("Recommendation")]
    rows = [ln for ln in table.splitlines() if re.match(r"\s*(★ )?(teacher|student|ptq|final)", ln)]
    names = [ln.split()[1] if ln.split()[0] == "★" else ln.split()[0] for ln in rows]
    assert {"teacher", "student-distill", "student-random-init-nokd", "student-prune", "ptq-dynamic", "ptq-static", "final"} <= set(
        names
    ), table
    assert all(len(ln) <= 100 for ln in table.splitlines()), table
    for ln in rows:  # one line per variant: nothing folded onto a second line
        assert len(ln.split()) >= 6, ln


def test_run_directory_is_printed_when_the_run_opens(two_runs):
    out, _ = two_runs[0]
    lines = out.splitlines()
    opened = next(i for i, ln in enumerate(lines) if ln.startswith("run directory: "))
    first_header = next(i for i, ln in enumerate(lines) if ln.startswith("[1/5] distill: "))
    assert opened < first_header
    assert lines[opened].split("run directory: ")[1] in out[out.index("report: ") :]


def test_each_stage_prints_a_header_and_the_second_run_says_how_long_the_last_took(two_runs):
    (first, _), (second, _) = two_runs
    for out in (first, second):
        for i, name in enumerate(("distill", "prune", "qat", "export", "bench"), 1):
            assert f"[{i}/5] {name}: " in out, out
    assert "2 steps x batch 4" in first and "Last comparable run" not in first
    headers = [ln for ln in second.splitlines() if re.match(r"\[\d/5\] ", ln)]
    assert len(headers) == 5 and all(re.search(r"Last comparable run: \d+ (s|min \d+ s) \(.*tiny-terminal-", h) for h in headers), headers


def test_export_and_bench_announce_their_steps(two_runs):
    out, err = two_runs[0]  # off a terminal: one log line per step on stdout, beside the stage headers
    assert "[export] step 1 at" in out and "teacher: fp32 ONNX" in out
    assert "final: INT8 Q/DQ graph" in out
    assert "[bench] step 1 at" in out and "accuracy and latency in" in out
    assert "[export] step" not in err
    # libraries' own chatter stays out of the terminal: ONNX Runtime's quantizer hints, transformers' cache deprecation
    assert "Quantization parameters" not in out + err and "pre-processing" not in out + err, err[-2000:]
    assert "past_key_values" not in out + err, err[-2000:]
