"""Data-parallel training under ``torchrun``: process group, rank-0-only side effects, batch shards.

``torchrun --nproc_per_node N ...`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` in each
process. When ``WORLD_SIZE > 1`` the trainer joins the process group (NCCL on CUDA, Gloo on CPU),
wraps the model in ``DistributedDataParallel`` and gives each rank a disjoint, equal slice of every
global batch, so N processes take the same optimizer steps as one process with the same global
batch. Outside ``torchrun`` every helper here is a no-op for a single process.

Control messages (object broadcasts, barriers, :func:`on_main`) go over a separate Gloo group with a
long timeout (``DSK_DIST_WAIT_S``, default 7200 s): ranks that wait while rank 0 validates, writes a
checkpoint or exports a model must not hit NCCL's short collective timeout, and they stay off the GPU.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

T = TypeVar("T")
_CTRL = None  # the Gloo group for control messages (see the module docstring)
_SOLO = False  # True on rank 0 inside on_main(): the other ranks are not listening, so collectives are no-ops


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job: ``rank`` of ``world_size``, ``local_rank`` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env() -> DistEnv:
    """The job layout from torchrun's environment variables (a single process when they are absent, and
    on rank 0 inside :func:`on_main`, where it works alone)."""
    from dsk_compress.errors import RunError

    if _SOLO:
        return DistEnv()
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise RunError("RANK / WORLD_SIZE / LOCAL_RANK must be integers", hint="launch with torchrun, which sets them") from None
    if world < 1 or not 0 <= rank < world:
        raise RunError(f"RANK {rank} is not within WORLD_SIZE {world}", hint="launch with torchrun, which sets them")
    return DistEnv(rank=rank, world_size=world, local_rank=local)


def is_initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _wait_timeout() -> datetime.timedelta:
    from dsk_compress.errors import RunError

    raw = os.environ.get("DSK_DIST_WAIT_S", "7200")
    try:
        return datetime.timedelta(seconds=float(raw))
    except ValueError:
        raise RunError(f"DSK_DIST_WAIT_S={raw!r} is not a number of seconds", hint="e.g. DSK_DIST_WAIT_S=7200") from None


def init() -> DistEnv:
    """Join the process group once per process when launched by torchrun with more than one process.

    NCCL with one GPU per process (``cuda:LOCAL_RANK``) when CUDA is available, Gloo on CPU; plus a
    Gloo group for control messages.
    """
    e = env()
    if not e.enabled or is_initialized():
        return e
    from dsk_compress.errors import RunError

    if not torch.distributed.is_available():
        raise RunError("this torch build has no torch.distributed", hint="install a torch build with distributed support")
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RunError(f"WORLD_SIZE={e.world_size} but {', '.join(missing)} is not set", hint="launch with torchrun, which sets them")
    if torch.cuda.is_available():
        if e.local_rank >= torch.cuda.device_count():
            raise RunError(
                f"LOCAL_RANK {e.local_rank} but this node has {torch.cuda.device_count()} GPUs",
                hint="use --nproc_per_node at most the number of GPUs",
            )
        torch.cuda.set_device(e.local_rank)
        torch.distributed.init_process_group("nccl", device_id=torch.device("cuda", e.local_rank))
    else:
        torch.distributed.init_process_group("gloo")
    global _CTRL
    _CTRL = torch.distributed.new_group(backend="gloo", timeout=_wait_timeout())
    atexit.register(_shutdown)
    return e


def _shutdown() -> None:
    global _CTRL
    if is_initialized():
        torch.distributed.destroy_process_group()
    _CTRL = None


def _active() -> bool:
    """A multi-process job whose other ranks take part in the next collective."""
    return is_initialized() and not _SOLO


def device(e: DistEnv, fallback: torch.device) -> torch.device:
    """The device a rank trains on: its own GPU under a multi-process CUDA job, else ``fallback``."""
    if e.enabled and torch.cuda.is_available():
        return torch.device("cuda", e.local_rank)
    return fallback


def _blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of ``model`` (a Hugging Face decoder's layers, else the first ModuleList with more than one entry)."""
    inner = getattr(model, "model", None)
    if isinstance(getattr(inner, "layers", None), torch.nn.ModuleList):
        return list(inner.layers)
    return next((list(m) for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 1), [])


def shard_frozen(model: torch.nn.Module, dev: torch.device) -> torch.nn.Module:
    """Shard a frozen (inference-only) ``model`` in place across every rank's ``dev`` with FSDP2 (``fully_shard``).

    Each repeated block is its own unit: its full weights exist on a rank only while that block runs
    (all-gathered just before, freed after), so a rank holds ``1 / world_size`` of the weights plus one
    block. Everything else (embeddings, final norm, LM head, tied or not) is the root unit. A forward
    is a collective: every rank must run it on the same schedule (its own batch rows).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(dev.type, (torch.distributed.get_world_size(),))
    model.requires_grad_(False).eval()
    for block in _blocks(model):
        fully_shard(block, mesh=mesh, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, reshard_after_forward=True)
    return model


def local_numel(model: torch.nn.Module) -> int:
    """Parameter elements this rank stores (its shards under FSDP, everything otherwise)."""
    return sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in model.parameters())


def is_main() -> bool:
    """True on rank 0 (and in a single process): the one process that writes files and logs."""
    return not is_initialized() or torch.distributed.get_rank() == 0


def barrier() -> None:
    """Wait until every rank gets here (over the control group, so waiting on rank 0's file writes cannot time out early)."""
    if _active():
        torch.distributed.barrier(group=_CTRL)


def all_reduce_mean_(t: torch.Tensor) -> torch.Tensor:
    """Average ``t`` over ranks in place (a no-op in a single process)."""
    if _active():
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
        t /= torch.distributed.get_world_size()
    return t


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` as rank ``src`` has it, on every rank (picklable objects only)."""
    if not _active():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src, group=_CTRL)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (``[obj]`` in a single process)."""
    if not _active():
        return [obj]
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj, group=_CTRL)
    return out


@contextlib.contextmanager
def _solo() -> Iterator[None]:
    global _SOLO
    _SOLO = True
    try:
        yield
    finally:
        _SOLO = False


def on_main(fn: Callable[[], T], what: str = "rank-0 work") -> T:
    """Run ``fn`` on rank 0 alone and hand its result (or its failure) to every rank.

    The other ranks wait for it (up to ``DSK_DIST_WAIT_S``). Inside ``fn`` rank 0 works as a single
    process: :func:`env` reports one process, so training there is not data-parallel, and collectives
    are no-ops. When ``fn`` raises, rank 0 re-raises the original error and the other ranks raise a
    :class:`RunError` with its message (``KeyboardInterrupt`` stays ``KeyboardInterrupt``), so no rank is
    left waiting. Outside torchrun this is just ``fn()``.
    """
    if not _active():
        return fn()
    from dsk_compress.errors import DskError, RunError

    if torch.distributed.get_rank() == 0:
        try:
            with _solo():
                value = fn()
        except BaseException as e:
            if isinstance(e, KeyboardInterrupt):
                broadcast_object(("interrupted", None, None))
            elif isinstance(e, DskError):
                broadcast_object(("error", e.message, e.hint))
            else:
                broadcast_object(("error", f"{type(e).__name__}: {e}", None))
            raise
        return broadcast_object(("ok", value, None))[1]
    status, value, hint = broadcast_object(None)
    if status == "interrupted":
        raise KeyboardInterrupt
    if status == "error":
        raise RunError(f"{what} failed on rank 0: {value}", hint=hint)
    return value


def shard_size(batch_size: int, e: DistEnv) -> int:
    """Rows of each global batch one rank takes; the global batch must split evenly."""
    if batch_size % e.world_size:
        from dsk_compress.errors import InvalidArgument

        raise InvalidArgument(
            f"batch_size {batch_size} is not divisible by WORLD_SIZE {e.world_size}",
            "batch_size",
            hint=f"set batch_size to a multiple of {e.world_size} (it is the global batch, split across processes)",
        )
    return batch_size // e.world_size


def shard(batch: Any, e: DistEnv) -> Any:
    """This rank's rows ``[rank * n, (rank + 1) * n)`` of a global batch (tensor, array, dict, list or tuple)."""
    if not e.enabled:
        return batch
    if isinstance(batch, dict):
        return {k: shard(v, e) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(shard(v, e) for v in batch)
    n = shard_size(len(batch), e)
    return batch[e.rank * n : (e.rank + 1) * n]
