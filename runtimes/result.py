"""The result of measuring one model in one runtime, on the host or on a device: one schema for all.

Written by the host's bench worker (:mod:`dsk_compress.runtimes.bench_worker`, through the bench stage and
``dsk-compress bench``) and by a deploy bundle's ``run.py`` on a device, which builds the same layout
with plain dicts (it cannot import pydantic) and is validated here on the way in
(:func:`parse_record`). The report (:mod:`dsk_compress.report`) reads these records.

Layout of a :class:`BenchRecord` (``schema_version`` 1)::

    schema, schema_version      "dsk-compress/bench-result", 1
    variant, role, precision    which model: the report row it measures
    artifact, size_bytes        the file measured (relative to the run or bundle) and its size
    runtime                     name (onnxruntime | torch | tensorrt), version, mode (ORT graph optimization
                                level, torch eager | compile), execution_provider, providers, device, dtype, threads
    provenance                  measurement (measured | emulated), location (host | device), device_profile,
                                hostname, machine, cpu, cpu_count, gpu, os, python, source_run, ssh_host, tool, created
    timing                      session_ms, first_inference_ms, warmup, runs | duration_s, input_shape,
                                batches [{batch_size, runs, p50, p90, p99, mean, std, min, max, items_per_s, tokens_per_s}],
                                skipped [{batch_size, reason}]
    memory                      peak_rss_mb, rss_before_load_mb, gpu_peak_mb, engine_device_memory_mb
    accuracy                    task, metrics {accuracy, bits_per_byte | nll, perplexity}, windows, tokens, batch_size
    decode                      greedy decode: prompt_tokens, new_tokens, repeats, prefill_ms, decode_ms_p50/p90,
                                decode_tokens_per_s, execution_provider, text (decoded, with --prompt)
    notes, errors               free text; a phase that failed (partial results are kept)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dsk_compress.errors import RunError
from dsk_compress.runtimes.measure import SCHEMA, SCHEMA_VERSION

Measurement = Literal["measured", "emulated"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LatencyStats(_Strict):
    """Latency of one batch size in ms over ``runs`` timed runs, and its throughput."""

    batch_size: int = Field(ge=1)
    runs: int = Field(ge=1)
    p50: float
    p90: float
    p99: float
    mean: float
    std: float
    min: float
    max: float
    items_per_s: float = Field(description="batch_size * 1000 / mean")
    tokens_per_s: float | None = Field(None, description="items_per_s * sequence length, for language models")
    p50_rounds: list[float] | None = Field(
        None, description="the p50 of each interleaved timing round (fresh worker each); p50 is then their median"
    )


class Skipped(_Strict):
    """A batch size the model or runtime did not run, and why."""

    batch_size: int = Field(ge=1)
    reason: str


class Timing(_Strict):
    """Session creation, first inference and the timed batches (see :mod:`dsk_compress.runtimes.measure`)."""

    session_ms: float | None = Field(None, description="session / engine creation (deserialisation or build included)")
    first_inference_ms: float
    warmup: int = Field(ge=0)
    runs: int | None = Field(None, ge=1, description="timed runs per batch size (None when timed by duration)")
    duration_s: float | None = Field(None, gt=0)
    input_shape: list[int] = Field(default_factory=list, description="shape of one item (e.g. [seq_len])")
    output_shape: list[int] = Field(default_factory=list, description="output shape at the first batch size")
    batches: list[LatencyStats] = Field(min_length=1)
    skipped: list[Skipped] = Field(default_factory=list)

    def batch(self, size: int) -> LatencyStats | None:
        """The statistics of batch ``size``, or None when it was not measured."""
        return next((b for b in self.batches if b.batch_size == size), None)


class Memory(_Strict):
    """Peak memory of the measuring process (host RSS) and of the GPU, in MiB."""

    peak_rss_mb: float | None = None
    rss_before_load_mb: float | None = None
    gpu_peak_mb: float | None = None
    engine_device_memory_mb: float | None = None


class RuntimeInfo(_Strict):
    """What ran the model."""

    name: Literal["onnxruntime", "torch", "tensorrt"]
    version: str
    mode: str | None = Field(None, description="onnxruntime: graph optimization level; torch: eager | compile")
    execution_provider: str | None = Field(None, description="the provider that runs the graph (onnxruntime), or None")
    providers: list[str] = Field(default_factory=list)
    device: str = Field("cpu", description="cpu, cuda:0, ...")
    dtype: str | None = Field(None, description="compute dtype where the runtime sets one (torch bf16 / fp16)")
    threads: int | None = Field(None, ge=1)

    @property
    def short(self) -> str:
        """The report's runtime column: ``onnxruntime-cpu``, ``onnxruntime-cuda``, ``torch-compile-cuda-bf16``, ``tensorrt``."""
        if self.name == "onnxruntime":
            ep = (self.execution_provider or "CPUExecutionProvider").removesuffix("ExecutionProvider").lower()
            return f"onnxruntime-{ep}"
        if self.name == "torch":
            dt = {"bfloat16": "bf16", "float16": "fp16"}.get(self.dtype or "", "")
            return "-".join(p for p in ("torch", self.mode or "eager", self.device.split(":")[0], dt) if p)
        return self.name

    @property
    def label(self) -> str:
        """``onnxruntime 1.32.0 CPU``, ``torch 2.13.0 compile cuda:0 bfloat16``, ``tensorrt 10.3.0 cuda:0``."""
        ep = self.execution_provider.removesuffix("ExecutionProvider") if self.execution_provider else None
        parts = [
            self.name,
            self.version,
            ep or "",
            self.mode if self.name == "torch" else "",
            self.device if self.device != "cpu" and self.name != "onnxruntime" else "",
            self.dtype or "",
        ]
        return " ".join(p for p in parts if p)


class BenchResult(_Strict):
    """What the bench worker measured of one model: the runtime, timing and memory sections of a record.

    The properties read the first (latency) batch size.
    """

    runtime: RuntimeInfo
    timing: Timing
    memory: Memory = Field(default_factory=Memory)
    gpu: str | None = Field(None, description="GPU name when the runtime ran on CUDA")

    @property
    def latency(self) -> LatencyStats:
        """Statistics of the first batch size."""
        return self.timing.batches[0]

    p50 = property(lambda self: self.latency.p50, doc="p50 latency in ms at the first batch size")
    p90 = property(lambda self: self.latency.p90, doc="p90 latency in ms at the first batch size")
    p99 = property(lambda self: self.latency.p99, doc="p99 latency in ms at the first batch size")
    mean = property(lambda self: self.latency.mean, doc="mean latency in ms at the first batch size")
    runs = property(lambda self: self.latency.runs, doc="timed runs at the first batch size")
    batch_size = property(lambda self: self.latency.batch_size, doc="the first batch size")
    throughput = property(lambda self: self.latency.items_per_s, doc="items/s at the first batch size")
    peak_memory_mb = property(lambda self: self.memory.peak_rss_mb, doc="peak RSS of the worker in MiB")
    device = property(lambda self: self.runtime.device, doc="cpu, cuda:0, ...")


class Provenance(_Strict):
    """Where and how a record was measured."""

    measurement: Measurement = Field(description="measured on real hardware, or emulated (e.g. arm64 Python under QEMU)")
    location: Literal["host", "device"] = Field(description="host: the machine that ran dsk-compress; device: a bundle's run.py")
    device_profile: str | None = Field(None, description="the profile whose settings applied (threads, providers, precision)")
    hostname: str | None = None
    machine: str | None = Field(None, description="platform.machine() of the measuring Python")
    cpu: str | None = None
    cpu_count: int | None = None
    gpu: str | None = None
    os: str | None = None
    python: str | None = None
    source_run: str | None = Field(None, description="the run directory the model comes from")
    ssh_host: str | None = Field(None, description="user@host[:port] when dsk-compress bench reached the device over SSH")
    tool: str = Field(description="bench_worker (host) or run.py (bundle)")
    created: str | None = None


class Accuracy(_Strict):
    """The task's metrics of the artifact on the run's evaluation windows."""

    task: str | None = None
    metrics: dict[str, float] = Field(description="code-lm: accuracy, bits_per_byte; text-lm: accuracy, nll, perplexity")
    windows: int | None = Field(None, ge=0)
    tokens: int | None = Field(None, ge=0)
    batch_size: int | None = Field(None, ge=1)


class DecodeStats(_Strict):
    """Greedy decoding with the KV-cache graph (batch 1)."""

    prompt_tokens: int = Field(ge=0)
    new_tokens: int = Field(ge=0)
    repeats: int = Field(ge=1)
    prefill_ms: float
    prefill_ms_runs: list[float] = Field(default_factory=list)
    decode_ms_p50: float | None = None
    decode_ms_p90: float | None = None
    decode_tokens_per_s: float | None = None
    decode_tokens_per_s_runs: list[float] = Field(default_factory=list)
    execution_provider: str | None = None
    artifact: str | None = Field(None, description="the decoder graph decoded (a bundle's model.fused.onnx or model.kv.onnx)")
    tokens: list[int] = Field(default_factory=list)
    text: str | None = Field(None, description="prompt continuation decoded with the bundle's tokenizer (run.py --prompt)")
    peak_memory_mb: float | None = None


class BenchRecord(_Strict):
    """One model measured in one runtime in one place (see the module docstring for the layout)."""

    schema_: Literal["dsk-compress/bench-result"] = Field(SCHEMA, alias="schema")
    schema_version: int = Field(SCHEMA_VERSION, ge=1)
    variant: str
    role: str | None = None
    precision: str | None = None
    artifact: str | None = None
    size_bytes: int | None = Field(None, ge=0)
    runtime: RuntimeInfo
    provenance: Provenance
    timing: Timing | None = Field(None, description="None when the run stopped before timing (see errors)")
    memory: Memory = Field(default_factory=Memory)
    accuracy: Accuracy | None = None
    decode: DecodeStats | None = None
    notes: str = ""
    errors: list[str] = Field(default_factory=list, description="phases that failed; what was measured before is kept")

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    def to_dict(self) -> dict[str, Any]:
        """The record as the JSON object run.py and the bench worker write."""
        return self.model_dump(by_alias=True, mode="json")

    @property
    def key(self) -> tuple:
        """What a newer record of the same measurement replaces: variant, runtime, provider, mode, dtype, place."""
        r, p = self.runtime, self.provenance
        return (self.variant, r.name, r.execution_provider, r.mode, r.dtype, r.device, p.location, p.hostname, p.ssh_host)


def parse_record(data: Any, source: str = "result") -> BenchRecord:
    """Validate one result (a dict from JSON) into a :class:`BenchRecord`.

    Raises:
        RunError: one line naming ``source`` and the first invalid field, or a newer schema version.
    """
    if isinstance(data, dict):
        if data.get("schema") != SCHEMA:
            raise RunError(
                f"{source} is not a dsk-compress bench result (schema {data.get('schema')!r})",
                hint="it must come from a bundle's run.py or the bench worker",
            )
        version = data.get("schema_version")
        if isinstance(version, int) and version > SCHEMA_VERSION:
            raise RunError(
                f"{source} has bench-result schema_version {version}, newer than the supported {SCHEMA_VERSION}",
                hint="upgrade dsk-compress on this machine",
            )
    try:
        return BenchRecord.model_validate(data)
    except ValidationError as e:
        raise _invalid(e, source, "re-run the measurement with this version of dsk-compress") from None


def _invalid(e: ValidationError, source: str, hint: str) -> RunError:
    """One line naming ``source``, the first invalid field and the value it had."""
    err = e.errors(include_url=False)[0]
    where = ".".join(str(p) for p in err["loc"]) or "the top level"
    got = "" if err["type"] == "missing" else f", got {str(err.get('input'))[:60]!r}"
    return RunError(f"{source}: {where}: {err['msg']}{got}", hint=hint)


class DeviceResults(_Strict):
    """``RUN/devices/<device>/results.json``: every record measured on one device (or on the run's host)."""

    schema_: Literal["dsk-compress/device-results"] = Field("dsk-compress/device-results", alias="schema")
    schema_version: int = Field(1, ge=1)
    device: str = Field(description="the section name in the report: a device profile name, or a hostname for local runs")
    records: list[BenchRecord] = Field(default_factory=list)

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    def merged(self, new: list[BenchRecord]) -> DeviceResults:
        """These records with ``new`` ones added; a new record replaces an older one with the same :attr:`BenchRecord.key`."""
        keys = {r.key for r in new}
        return self.model_copy(update={"records": [r for r in self.records if r.key not in keys] + list(new)})

    def to_dict(self) -> dict[str, Any]:
        """The file's JSON object."""
        return self.model_dump(by_alias=True, mode="json")


def read_device_results(path: str | Path) -> DeviceResults:
    """Read and validate a ``results.json`` of ``RUN/devices/<device>/``.

    Raises:
        RunError: the file is not JSON or not a device-results file (one line naming the field).
    """
    import json

    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise RunError(f"cannot read {path}: {e}", hint="delete it and measure the device again") from None
    try:
        return DeviceResults.model_validate(data)
    except ValidationError as e:
        raise _invalid(e, str(path), "delete it and measure the device again") from None
