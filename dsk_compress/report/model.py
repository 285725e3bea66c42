"""The data model of ``report.json``: typed, versioned, validated on load.

A report is what :func:`dsk_compress.report.build_report` writes at the end of a run: run
metadata, one :class:`Variant` per measured model and a :class:`Summary` (teacher, final and
recommended variant, Pareto front, distillation margins). The renderers (markdown, HTML,
terminal) read a :class:`Report`; ``report.json`` is ``Report.to_dict()`` written as JSON.

Numbers are kept as written: an integer stays an integer and a float a float (no coercion),
so a report read and written again is the same JSON. Fields added after version 1 was first
written (``summary.distillation``, a variant's ``metrics``/``decode``) are optional, and
:meth:`Report.to_dict` leaves out what a report did not have, so older reports load and
dump unchanged.

Version 2 says where every number was measured. ``variants`` are the rows of the run's host (the
machine whose bench stage measured them: ``device: "host"``, ``measured_on`` its hostname); each
entry of ``devices`` is a :class:`DeviceSection`: the rows measured on one device (over SSH with
``dsk-compress bench``, or on another machine), labelled ``measured`` or ``emulated``, with that
device's own Pareto front. A host number never appears in a device's section. Version 1 reports
(no ``devices``, no ``measured_on``) still load.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, PlainValidator, StrictInt, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from dsk_compress.errors import RunError
from dsk_compress.io import atomic_write_json

REPORT_SCHEMA_VERSION = 2
"""Version of the ``report.json`` layout; :func:`load_report` refuses newer ones and reads older ones."""

HOST = "host"
"""The ``device`` of the rows measured on the run's own host (the bench stage)."""

REPORT_JSON = "report.json"

VARIANT_KEYS = (
    "name",
    "role",
    "stage",
    "params",
    "size_bytes",
    "accuracy",
    "bits_per_byte",
    "latency_ms",
    "throughput",
    "peak_memory_mb",
    "runtime",
    "device",
    "precision",
    "artifact",
    "notes",
)
"""Keys every measured variant handed to ``build_report`` must have (a loaded report may lack some)."""

_REWRITE_HINT = "delete it and re-run the report stage"


def finite(x: Any) -> float | None:
    """Return ``x`` as a finite float, or None when it is missing, not a number or NaN/inf."""
    if x is None or isinstance(x, bool):
        return None
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _number(x: Any) -> int | float:
    # Plain int/float, kept as given: coercing 88 to 88.0 would change the JSON on a round trip.
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise PydanticCustomError("number_type", "Input should be a number")
    return x


def _host(x: Any) -> str | dict[str, Any]:
    if isinstance(x, str):
        return x
    if isinstance(x, Mapping) and all(isinstance(k, str) for k in x):
        return dict(x)
    raise PydanticCustomError("host_type", "Input should be a string or a mapping")


Number = Annotated[Union[int, float], PlainValidator(_number, json_schema_input_type=Union[int, float])]
"""An int or a float (NaN and inf allowed, as measured), never a bool or a numeric string."""

Host = Annotated[Union[str, dict[str, Any]], PlainValidator(_host, json_schema_input_type=Union[str, dict[str, Any]])]
"""Where the run was measured: a sentence, or a mapping such as ``{"hostname": ...}``."""


class Latency(BaseModel):
    """Latency percentiles of one variant in milliseconds (batch size of the bench stage).

    ``extra="allow"``: the bench stage owns what it measures; other statistics pass through.
    """

    model_config = ConfigDict(extra="allow")

    p50: Number | None = None
    p90: Number | None = None
    p99: Number | None = None
    mean: Number | None = None


class Decode(BaseModel):
    """Greedy decoding with a variant's KV-cache graph (prefill, then single-token steps).

    ``extra="allow"`` for the same reason as :class:`Latency`.
    """

    model_config = ConfigDict(extra="allow")

    artifact: str | None = None
    prompt_tokens: StrictInt | None = None
    new_tokens: StrictInt | None = None
    repeats: StrictInt | None = None
    prefill_ms: Number | None = None
    decode_ms_p50: Number | None = None
    decode_ms_p90: Number | None = None
    decode_tokens_per_s: Number | None = None
    peak_memory_mb: Number | None = None
    fused_ops: dict[str, StrictInt] | None = Field(None, description="fused / integer operators of the decoder graph, by count")


class Variant(BaseModel):
    """One measured model (teacher, student, final, PTQ / pruned / baseline variants ...).

    The fields up to ``decode`` are measured by the bench stage; the three ``*_vs_teacher``
    fields are derived by ``build_report`` (None without a teacher). The order of the fields
    is the order of the keys in ``report.json``.

    ``extra="allow"`` on purpose: stages attach what they measure to a variant (today
    ``metrics`` and ``decode`` are declared here; anything new is carried through to
    ``report.json`` unchanged rather than dropped or refused).
    """

    model_config = ConfigDict(extra="allow")

    name: str
    role: str | None = None
    stage: str | None = None
    params: Number | None = None
    size_bytes: Number | None = None
    accuracy: Number | None = Field(None, description="primary task metric (%) of the artifact as shipped")
    bits_per_byte: Number | None = None
    metrics: dict[str, Number] | None = Field(None, description="every task metric, rounded")
    latency_ms: Latency | None = None
    throughput: Number | None = None
    peak_memory_mb: Number | None = None
    runtime: str | None = None
    device: str | None = None
    precision: str | None = None
    artifact: str | None = Field(None, description="path of the artifact, relative to the run directory")
    notes: str | None = None
    fused_ops: dict[str, StrictInt] | None = Field(
        None, description="fused / integer operators of the artifact (ONNX Runtime contrib ops, QLinear*, MatMulInteger*), by count"
    )
    decode_tokens_per_s: Number | None = None
    decode: Decode | None = None
    measured_on: str | None = Field(None, description="where the row was measured: the host's name, or the device (and how it was reached)")
    measurement: Literal["measured", "emulated"] | None = Field(
        None, description="emulated: e.g. an arm64 Python under QEMU (accuracy is meaningful, timings are not)"
    )
    throughput_by_batch: dict[str, Number] | None = Field(
        None, description="items/s by batch size ('1', '8', '64') where the model allowed it"
    )
    session_ms: Number | None = Field(None, description="session / engine creation time")
    first_inference_ms: Number | None = None
    accuracy_delta_vs_host: Number | None = Field(
        None, description="device rows: accuracy - the host's accuracy of the same variant (points)"
    )
    speedup_vs_teacher: Number | None = Field(None, description="teacher p50 / variant p50")
    size_ratio_vs_teacher: Number | None = Field(None, description="teacher size_bytes / variant size_bytes")
    accuracy_delta_vs_teacher: Number | None = Field(None, description="variant accuracy - teacher accuracy (points)")

    @field_validator("name")
    @classmethod
    def _one_name(cls, v: str) -> str:
        from dsk_compress.paths import check_component

        return check_component(v, "a variant's name")  # it becomes a folder (bundles' raw results) and a card's variant

    @field_validator("artifact")
    @classmethod
    def _in_run(cls, v: str | None) -> str | None:
        from dsk_compress.paths import check_relative

        return v if v is None else check_relative(v, "the artifact path")  # read as RUN/<artifact>

    @property
    def p50(self) -> float | None:
        """The finite p50 latency in ms, or None."""
        return finite(self.latency_ms.p50) if self.latency_ms else None

    @property
    def p99(self) -> float | None:
        """The finite p99 latency in ms, or None."""
        return finite(self.latency_ms.p99) if self.latency_ms else None


class DistillationMargin(BaseModel):
    """Accuracy gap between the distilled student and one distill-stage baseline (points)."""

    model_config = ConfigDict(extra="forbid")

    variant: str
    baseline: str
    compares: str = Field(description="what the gap measures, e.g. 'KD vs no KD, same init'")
    accuracy: Number
    baseline_accuracy: Number
    margin: Number = Field(description="accuracy - baseline_accuracy, rounded to 4 decimals; positive: variant better")


class Summary(BaseModel):
    """What to ship and why, from the measured numbers only."""

    model_config = ConfigDict(extra="forbid")

    teacher: str | None
    final: str | None
    recommended: str | None
    recommendation: str = Field(description="a sentence built from the measured numbers")
    pareto: list[str] = Field(description="Pareto-optimal variant names (lowest p50, highest accuracy), in variant order")
    max_accuracy_drop: Number = Field(description="accuracy points the shipped variant may lose against the teacher")
    distillation: list[DistillationMargin] = Field(default_factory=list)
    chance_accuracy: Number | None = Field(
        None,
        description="accuracy (%) of always predicting the most frequent token; nothing below NEAR_CHANCE_FACTOR times it is recommended",
    )


class DeviceSection(BaseModel):
    """The rows measured on one device (or another machine): where, how, and its own Pareto front."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="the device profile name (rpi5), or the hostname of a machine that benchmarked the run locally")
    measurement: Literal["measured", "emulated"]
    where: str | None = Field(None, description="user@host[:port] of an SSH device, or the hostname")
    machine: str | None = None
    cpu: str | None = None
    gpu: str | None = None
    os: str | None = None
    python: str | None = None
    runtime: str | None = Field(None, description="runtime, version and execution provider(s) of its rows")
    measured_at: str | None = None
    tool: str | None = Field(None, description="what measured the rows: run.py (a bundle on the device) or bench_worker (this machine)")
    results: str = Field(description="the results file the section was built from, relative to the run directory")
    variants: list[Variant]
    pareto: list[str] = Field(default_factory=list, description="Pareto-optimal rows of this device (p50 vs accuracy)")

    @property
    def label(self) -> str:
        """``rpi5 (emulated)``, ``rpi5 (pi@rpi5.local)``, ``gpu-box (measured)`` (a machine named by its hostname)."""
        if self.measurement == "emulated":
            return f"{self.name} (emulated)"
        return f"{self.name} ({self.where if self.where not in (None, self.name) else 'measured'})"


class Report(BaseModel):
    """The accuracy-vs-latency report of one run: the content of ``report.json``."""

    model_config = ConfigDict(extra="forbid")

    schema_version: StrictInt = Field(ge=0, description=f"layout version (this code writes {REPORT_SCHEMA_VERSION})")
    run: str | None = None
    recipe: str | None = None
    task: str | None = None
    host: Host | None = None
    created: str | None = Field(None, description="UTC time the report was built, ISO 8601")
    variants: list[Variant] = Field(description="rows measured on the run's host")
    summary: Summary | None = None
    devices: list[DeviceSection] = Field(default_factory=list, description="rows measured on devices, one section per device")
    run_dir: str | None = Field(None, description="set in memory by compare_reports; build_report never writes it")

    @field_validator("variants")
    @classmethod
    def _rows_say_what_they_are(cls, rows: list[Variant]) -> list[Variant]:
        # the bench stage writes every host row with the role the export stage gave it (export picks the row to ship by role)
        for i, v in enumerate(rows):
            if not (isinstance(v.role, str) and v.role.strip()):
                raise PydanticCustomError(
                    "role_missing", "row {i} ({name}) has no role (teacher, student, final, ...)", {"i": i, "name": repr(v.name)}
                )
        return rows

    def to_dict(self) -> dict[str, Any]:
        """The report as the plain dict written to ``report.json``: only the fields it was given, numbers as given."""
        return self.model_dump(exclude_unset=True)

    def variant(self, name: str | None) -> Variant | None:
        """The variant called ``name``, or None."""
        return next((v for v in self.variants if v.name == name), None)


def _short(x: Any, limit: int = 60) -> str:
    text = repr(x)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe_error(e: ValidationError, data: Any) -> str:
    """One line naming the first invalid field of ``data`` (and its variant's name), what is wrong and the value."""
    errors = e.errors(include_url=False)
    err = errors[0]
    loc = err["loc"]
    where = ".".join(str(p) for p in loc) or "the top level"
    if len(loc) >= 2 and loc[0] == "variants" and isinstance(loc[1], int) and isinstance(data, Mapping):
        v = data["variants"][loc[1]]
        if isinstance(v, Mapping) and isinstance(v.get("name"), str):
            where += f" (variant {v['name']!r})"
    got = "" if err["type"] == "missing" else f", got {_short(err['input'])}"
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return f"{where}: {err['msg'].removeprefix('Value error, ')}{got}{more}"


def parse_report(data: Any, source: str = "report") -> Report:
    """Validate a report dict (e.g. from ``json.loads``) into a :class:`Report`.

    Args:
        data: the parsed JSON.
        source: what to call it in an error message (usually the file's path).

    Raises:
        RunError: one line naming ``source`` and the first invalid field.
    """
    try:
        return Report.model_validate(data)
    except ValidationError as e:
        raise RunError(f"{source}: {describe_error(e, data)}", hint=_REWRITE_HINT) from None


def as_report(report: Report | Mapping[str, Any]) -> Report:
    """``report`` itself when it is a :class:`Report`, else the dict validated (see :func:`parse_report`)."""
    return report if isinstance(report, Report) else parse_report(report)


def read_report(run_dir: Path) -> Report:
    """Read and validate ``report.json`` of a run directory (see :func:`load_report`)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"run directory not found: {run_dir}", hint="check the path, e.g. runs/<name>")
    path = run_dir / REPORT_JSON
    if not path.is_file():
        raise RunError(f"no {REPORT_JSON} in {run_dir}", hint="the run has not finished; resume it with dsk-compress recipe")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        detail = f"{e.msg} at line {e.lineno}" if isinstance(e, json.JSONDecodeError) else "not UTF-8"
        raise RunError(f"corrupt JSON in {path}: {detail}", hint=_REWRITE_HINT) from None
    except OSError as e:
        raise RunError(f"cannot read {path}: {e.strerror}") from None
    if not isinstance(data, dict) or not isinstance(data.get("variants"), list):
        raise RunError(f"{path} is not a report", hint=_REWRITE_HINT)
    # The version is checked before the fields: a newer layout is "upgrade", not "malformed".
    version = data.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise RunError(f"{path} has no valid schema_version", hint=_REWRITE_HINT)
    if version > REPORT_SCHEMA_VERSION:
        raise RunError(
            f"{path} has schema_version {version}, newer than the supported {REPORT_SCHEMA_VERSION}",
            hint="upgrade dsk-compress",
        )
    return parse_report(data, str(path))


def load_report(run_dir: Path) -> dict:
    """Read ``report.json`` from a run directory, validated against :class:`Report`.

    Args:
        run_dir: the run directory.

    Returns:
        The report dict, equal to the JSON in the file.

    Raises:
        RunError: the directory or file is missing, the JSON is corrupt or not a report,
            its ``schema_version`` is newer than :data:`REPORT_SCHEMA_VERSION`, or a field
            is malformed (the message names the file and the field).
    """
    return read_report(run_dir).to_dict()


def save_report(run_dir: Path, report: Report) -> Path:
    """Write ``report`` as ``run_dir/report.json`` (atomically) and return the path."""
    return atomic_write_json(Path(run_dir) / REPORT_JSON, report.to_dict())


def compare_reports(run_dirs: list[Path]) -> list[dict]:
    """Load the reports of several runs for a side-by-side comparison.

    Each returned report gets ``run_dir`` (str) added, and ``run`` set to the directory
    name when the report has none. Pass the result to :func:`render_comparison` or
    :func:`comparison_rows`.

    Args:
        run_dirs: run directories, each holding a ``report.json``.

    Returns:
        The loaded report dicts, in the order given.

    Raises:
        RunError: no directory given, or one of them has no readable report.
    """
    if not run_dirs:
        raise RunError("no run directories to compare", hint="dsk-compress report runs/A runs/B")
    reports = []
    for d in run_dirs:
        rep = load_report(Path(d))
        rep["run_dir"] = str(d)
        if not rep.get("run"):
            rep["run"] = Path(d).name
        reports.append(rep)
    names = [r["run"] for r in reports]
    for i, rep in enumerate(reports):  # copies of one run (or runs of one name) are told apart by their folder
        group = [j for j in range(len(reports)) if names[j] == names[i]]
        if len(group) > 1:
            bases = [Path(reports[j]["run_dir"]).name for j in group]
            where = Path(rep["run_dir"]).name if len(set(bases)) == len(bases) else rep["run_dir"]
            same = [j for j in group if reports[j]["run_dir"] == rep["run_dir"]]
            rep["run"] = f"{names[i]} ({where})" + (f" #{same.index(i) + 1}" if len(same) > 1 else "")
    return reports
