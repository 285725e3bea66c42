"""Device profiles: what a target machine can do, with the source of every figure.

A profile is a YAML file validated by :class:`DeviceProfile`. Bundled profiles live next to this
module (``host-cpu``, ``rpi4``, ``rpi5``, ``jetson-orin-nano``, ``jetson-agx-orin``, ``gpu-server``);
``load_device`` also accepts a path to your own YAML file.

Conventions: ``peak_gflops`` is a *dense* theoretical peak (no structured sparsity) in the precision
named by ``peak_gflops_precision`` (GOPS for int8); ``memory_bandwidth_gbs`` is the theoretical
bandwidth of the memory the model runs from (unified LPDDR on Jetson, HBM on a discrete GPU).
"""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dsk_compress.errors import DeviceError

DEVICES_DIR = Path(__file__).parent

#: figures every profile must name a source for
REQUIRED_SOURCES = ("peak_gflops", "memory_bandwidth_gbs")

__all__ = [
    "DEVICES_DIR",
    "DeviceProfile",
    "device_names",
    "host_profile",
    "list_devices",
    "load_device",
]


class DeviceProfile(BaseModel):
    """One target device. Frozen; unknown keys are rejected so a typo cannot pass silently."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1)
    description: str
    arch: Literal["x86_64", "aarch64"]
    cores: int = Field(gt=0)
    memory_gb: float = Field(gt=0)
    preferred_runtime: Literal["onnxruntime", "tensorrt", "torch"]
    preferred_precision: Literal["fp32", "fp16", "int8"]
    threads: int = Field(gt=0)
    execution_providers: list[str] = Field(min_length=1)
    peak_gflops: float = Field(gt=0)
    peak_gflops_precision: Literal["fp32", "fp16", "bf16", "int8"]
    memory_bandwidth_gbs: float = Field(gt=0)
    sources: dict[str, str]
    notes: str = ""

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        from dsk_compress.paths import check_name

        return check_name(v, "device name", "(bundles and results are written to RUN/bundles/<name>, RUN/devices/<name>)")

    @field_validator("execution_providers")
    @classmethod
    def _providers_named(cls, v: list[str]) -> list[str]:
        bad = [p for p in v if not p.endswith("ExecutionProvider")]
        if bad:
            raise ValueError(f"not an onnxruntime execution provider name: {bad} (e.g. CPUExecutionProvider)")
        return v

    @model_validator(mode="after")
    def _sources_cover_figures(self) -> DeviceProfile:
        missing = [k for k in REQUIRED_SOURCES if not self.sources.get(k, "").strip()]
        if missing:
            raise ValueError(f"sources must say where {', '.join(missing)} come(s) from")
        return self

    @property
    def ridge_point(self) -> float:
        """Roofline ridge point in FLOP (or OP) per byte: below it a kernel is memory bound."""
        return self.peak_gflops / self.memory_bandwidth_gbs

    def as_dict(self) -> dict:
        return self.model_dump()


def device_names() -> list[str]:
    """Names of the bundled profiles, sorted."""
    return sorted(p.stem for p in DEVICES_DIR.glob("*.yaml"))


def list_devices() -> list[DeviceProfile]:
    """All bundled profiles; ``host-cpu`` is read off this machine (see :func:`host_profile`)."""
    return [load_device(n) for n in device_names()]


def load_device(name_or_path: str | os.PathLike) -> DeviceProfile:
    """A bundled profile by name (``rpi5``) or a profile YAML by path."""
    s = str(name_or_path)
    p = Path(s).expanduser()
    looks_like_path = s.endswith((".yaml", ".yml")) or "/" in s or os.sep in s
    if looks_like_path or (p.is_file() and s not in device_names()):
        if not p.is_file():
            raise DeviceError(f"device profile file not found: {p}", hint=f"or use a bundled name: {', '.join(device_names())}")
        return _load_file(p)
    if s == "host-cpu":  # the machine running this code, not generic figures
        return host_profile()
    bundled = DEVICES_DIR / f"{s}.yaml"
    if not bundled.is_file():
        raise DeviceError(
            f"unknown device {s!r}",
            hint=f"valid: {', '.join(device_names())}, or a path to a profile .yaml",
        )
    return _load_file(bundled)


def _load_file(path: Path) -> DeviceProfile:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise DeviceError(f"device profile {path} is not valid YAML{where}: {getattr(e, 'problem', None) or e}") from None
    except OSError as e:
        raise DeviceError(f"cannot read device profile {path}: {e.strerror or e}") from None
    if not isinstance(data, dict):
        raise DeviceError(f"device profile {path} must be a YAML mapping of fields, got {type(data).__name__}")
    try:
        return DeviceProfile.model_validate(data)
    except ValidationError as e:
        raise DeviceError(
            f"device profile {path}: {_describe_errors(e)}",
            hint=f"valid fields: {', '.join(DeviceProfile.model_fields)}",
        ) from None


def _describe_errors(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"])
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown field {loc!r}")
        elif loc:
            parts.append(f"field {loc!r}: {err['msg'].removeprefix('Value error, ')}")
        else:
            parts.append(err["msg"].removeprefix("Value error, "))
    return "; ".join(parts)


# --------------------------------------------------------------------------- host


def host_profile() -> DeviceProfile:
    """The ``host-cpu`` profile with what can be read off the running machine filled in.

    ``cores`` is ``os.cpu_count()``; ``threads`` the CPUs this process may run on (affinity);
    ``arch`` from ``platform.machine()``; ``memory_gb`` from ``/proc/meminfo`` (capped by a cgroup
    limit); ``peak_gflops`` re-estimated from the physical core count, SIMD flags and max clock.
    Anything that cannot be read keeps the generic value.
    """
    base = _load_file(DEVICES_DIR / "host-cpu.yaml")
    data = base.model_dump()
    sources = dict(base.sources)

    cores = os.cpu_count() or base.cores
    data["cores"] = cores
    data["threads"] = _usable_cpus() or cores
    sources["cores"] = "os.cpu_count() on this host"

    arch = _normalize_arch(platform.machine())
    if arch:
        data["arch"] = arch

    mem = _host_memory_gb()
    if mem:
        data["memory_gb"] = round(mem, 2)
        sources["memory_gb"] = "MemTotal in /proc/meminfo, capped by the cgroup memory limit"

    cpuinfo = _read_text("/proc/cpuinfo")
    est = _estimate_peak_gflops(data["arch"], cpuinfo, cores)
    if est:
        gflops, how = est
        data["peak_gflops"] = round(gflops, 1)
        sources["peak_gflops"] = f"Estimate for this host, not a datasheet figure: {how}"

    model = _cpu_model_name(cpuinfo)
    data["description"] = f"This machine ({model or platform.processor() or data['arch']}, {cores} CPUs, {data['memory_gb']:g} GB)"
    data["sources"] = sources
    return DeviceProfile.model_validate(data)


def _read_text(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def _normalize_arch(machine: str) -> str | None:
    m = machine.lower()
    if m in ("x86_64", "amd64", "x64"):
        return "x86_64"
    if m in ("aarch64", "arm64", "armv8l"):
        return "aarch64"
    return None


def _usable_cpus() -> int | None:
    fn = getattr(os, "process_cpu_count", None)  # Python 3.13+
    if fn is not None:
        return fn()
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


def _host_memory_gb() -> float | None:
    total = None
    m = re.search(r"^MemTotal:\s+(\d+)\s*kB", _read_text("/proc/meminfo"), re.M)
    if m:
        total = int(m.group(1)) * 1024
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        raw = _read_text(limit_file).strip()
        if raw.isdigit():
            limit = int(raw)
            if limit < (1 << 60) and (total is None or limit < total):
                total = limit
            break
    return total / (1 << 30) if total else None


def _cpu_model_name(cpuinfo: str) -> str | None:
    m = re.search(r"^(?:model name|Model|Hardware)\s*:\s*(.+)$", cpuinfo, re.M)
    return m.group(1).strip() if m else None


def _physical_cores(cpuinfo: str) -> int | None:
    pairs = set()
    phys = core = None
    for line in cpuinfo.splitlines() + [""]:
        if not line.strip():
            if phys is not None and core is not None:
                pairs.add((phys, core))
            phys = core = None
            continue
        key, _, val = line.partition(":")
        key = key.strip()
        if key == "physical id":
            phys = val.strip()
        elif key == "core id":
            core = val.strip()
    return len(pairs) or None


def _max_clock_ghz(cpuinfo: str) -> float | None:
    raw = _read_text("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").strip()
    if raw.isdigit():
        return int(raw) / 1e6  # kHz
    m = re.search(r"@\s*([\d.]+)\s*GHz", cpuinfo)
    if m:
        return float(m.group(1))
    mhz = [float(x) for x in re.findall(r"^cpu MHz\s*:\s*([\d.]+)", cpuinfo, re.M)]
    return max(mhz) / 1000 if mhz else None


def _estimate_peak_gflops(arch: str, cpuinfo: str, logical: int) -> tuple[float, str] | None:
    flags_m = re.search(r"^(?:flags|Features)\s*:\s*(.+)$", cpuinfo, re.M)
    flags = set(flags_m.group(1).split()) if flags_m else set()
    if arch == "x86_64":
        if "avx512f" in flags:
            fpc, why = 64, "AVX-512, assuming two 512-bit FMA units (an upper bound; some parts have one)"
        elif "avx2" in flags and "fma" in flags:
            fpc, why = 32, "AVX2, two 256-bit FMA units"
        elif flags:
            fpc, why = 8, "SSE, 4-lane add + 4-lane multiply"
        else:
            return None
    else:
        fpc, why = 16, "two 128-bit NEON FMA pipes (Cortex-A76 class; Cortex-A72 class does 8)"
    ghz = _max_clock_ghz(cpuinfo)
    if not ghz:
        return None
    cores = _physical_cores(cpuinfo) or logical
    return cores * fpc * ghz, f"{cores} physical cores x {fpc} FP32 FLOP/cycle ({why}) x {ghz:.2f} GHz"
