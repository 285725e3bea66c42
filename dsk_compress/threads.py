"""How many CPU threads torch uses for training and evaluation: chosen on purpose, printed, recorded.

torch's default is every logical CPU, which on a shared or hyper-threaded machine oversubscribes the cores (a
2-core machine shared with another job ran a distill stage at 242 tokens/s instead of 3,772 with one thread).
So a run chooses its intra-op thread count, first match wins:

1. ``--threads N`` on the command line (``dsk-compress recipe`` / ``zoo train``);
2. the recipe's top-level ``threads`` field;
3. the ``OMP_NUM_THREADS`` environment variable (what the user, or ``torchrun`` with more than one process, set);
4. the physical cores this process may run on (hyper-threads not counted).

ONNX Runtime benchmarking keeps its own setting (``bench.threads``, else the device profile's ``threads``).
Importing this module imports neither torch nor anything heavy.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

SOURCES = ("--threads", "recipe", "OMP_NUM_THREADS", "physical cores")
"""Where a thread count came from, strongest first."""


def allowed_cpus() -> set[int] | None:
    """The logical CPUs this process may run on (``os.sched_getaffinity``), or None where the OS cannot say."""
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


def logical_cpus() -> int:
    """Logical CPUs this process may use (its affinity mask, else ``os.cpu_count()``)."""
    cpus = allowed_cpus()
    return len(cpus) if cpus else (os.cpu_count() or 1)


def _sysfs_cores(root: Path, cpus: set[int] | None) -> set[tuple[str, str]]:
    cores = set()
    for topo in root.glob("cpu[0-9]*/topology"):
        cpu = int(topo.parent.name[3:])
        if cpus is not None and cpu not in cpus:
            continue
        try:
            cores.add(((topo / "physical_package_id").read_text().strip(), (topo / "core_id").read_text().strip()))
        except OSError:
            return set()  # a partial view would undercount: let /proc/cpuinfo answer
    return cores


def _cpuinfo_cores(path: Path, cpus: set[int] | None) -> set[tuple[str, str]]:
    cores = set()
    try:
        blocks = path.read_text(errors="replace").split("\n\n")
    except OSError:
        return cores
    for block in blocks:
        fields = {}
        for line in block.splitlines():
            key, sep, value = line.partition(":")
            if sep:
                fields[key.strip()] = value.strip()
        if "processor" not in fields or "core id" not in fields:
            continue  # no topology (some ARM kernels, VMs): the caller falls back to the logical count
        try:
            cpu = int(fields["processor"])
        except ValueError:
            continue
        if cpus is None or cpu in cpus:
            cores.add((fields.get("physical id", "0"), fields["core id"]))
    return cores


def physical_cores(
    sysfs: str | os.PathLike = "/sys/devices/system/cpu", cpuinfo: str | os.PathLike = "/proc/cpuinfo", cpus: set[int] | None = None
) -> int:
    """Physical cores among the CPUs this process may run on: distinct (package, core) pairs.

    Read from Linux's ``sysfs`` topology, else ``/proc/cpuinfo`` (``physical id``, ``core id``); elsewhere, or where
    neither names cores, the logical CPU count. ``cpus`` (default: the affinity mask) limits the CPUs counted.
    """
    if cpus is None:
        cpus = allowed_cpus()
    for cores in (_sysfs_cores(Path(sysfs), cpus), _cpuinfo_cores(Path(cpuinfo), cpus)):
        if cores:
            return len(cores)
    return len(cpus) if cpus else (os.cpu_count() or 1)


def omp_num_threads(env: dict[str, str] | None = None) -> int | None:
    """``OMP_NUM_THREADS`` as a positive count (its first level when it lists several, e.g. ``4,2``), else None."""
    raw = (os.environ if env is None else env).get("OMP_NUM_THREADS", "").split(",")[0].strip()
    try:
        n = int(raw)
    except ValueError:
        return None
    return n if n >= 1 else None


@dataclass(frozen=True)
class ThreadChoice:
    """A run's torch thread count, where it came from, and the machine's cores it was chosen against."""

    torch_threads: int
    source: str
    physical_cores: int
    logical_cpus: int

    def describe(self) -> str:
        """The line printed at the start of a run, e.g. ``threads: 2 (physical cores; --threads to change)``."""
        if self.source == "--threads":
            return f"threads: {self.torch_threads} (--threads)"
        return f"threads: {self.torch_threads} ({self.source}; --threads to change)"

    def as_dict(self) -> dict:
        return asdict(self)


def check_threads(n: int, what: str = "--threads") -> int:
    """``n`` if it is a usable thread count (:func:`~dsk_compress.recipes.limits.threads_problem`), else RecipeError."""
    from dsk_compress.errors import RecipeError
    from dsk_compress.recipes.limits import threads_problem

    problem = threads_problem(n)
    if problem:
        raise RecipeError(f"{what} {problem}", hint=f"or leave it out for the {physical_cores()} physical cores")
    return n


def choose_threads(cli: int | None = None, recipe: int | None = None, env: dict[str, str] | None = None) -> ThreadChoice:
    """The torch thread count by precedence: ``cli`` (``--threads``) > ``recipe`` > ``OMP_NUM_THREADS`` > physical cores."""
    phys, logical = physical_cores(), logical_cpus()
    omp = omp_num_threads(env)
    for n, source in ((cli, "--threads"), (recipe, "recipe"), (omp, "OMP_NUM_THREADS"), (phys, "physical cores")):
        if n is not None:
            if source in ("--threads", "recipe"):
                check_threads(n, "--threads" if source == "--threads" else "threads")
            return ThreadChoice(int(n), source, phys, logical)
    raise AssertionError("unreachable")


def apply_threads(choice: ThreadChoice) -> int:
    """Set torch's intra-op threads to ``choice`` (and its inter-op threads where torch still allows it); returns the
    previous intra-op count, for :func:`restore_threads`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(choice.torch_threads)
    try:  # allowed once per process, before any inter-op parallel work
        torch.set_num_interop_threads(choice.torch_threads)
    except RuntimeError:
        pass
    return before


def restore_threads(before: int) -> None:
    """Set torch's intra-op threads back (a run inside a notebook or test leaves the process as it found it)."""
    import torch

    torch.set_num_threads(before)


@contextmanager
def threads_in_effect(choice: ThreadChoice):
    """:func:`apply_threads` for the ``with`` block, :func:`restore_threads` after it, however it ends."""
    before = apply_threads(choice)
    try:
        yield choice
    finally:
        restore_threads(before)


__all__ = [
    "SOURCES",
    "ThreadChoice",
    "allowed_cpus",
    "apply_threads",
    "check_threads",
    "choose_threads",
    "logical_cpus",
    "omp_num_threads",
    "physical_cores",
    "restore_threads",
    "threads_in_effect",
]
