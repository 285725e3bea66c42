"""A disk cache of the teacher's top-k logits per training batch, shared by every KD stage of a run.

Each batch of the data stream is keyed by its index; values are stored as fp16 and indices as int16
/ int32 in one safetensors file per batch. The cache records a hash of the teacher's weights and
of the task, and refuses to serve another teacher's logits. Under torchrun each rank caches its own
slice of every global batch (``b<index>-r<rank>of<world>.safetensors``).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from dsk_compress.errors import RunError
from dsk_compress.io import atomic_write_json, read_json


def teacher_hash(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to(torch.float32).cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class TeacherLogitCache:
    """Top-``k`` teacher logits per batch index under ``root``."""

    def __init__(
        self,
        root: str | Path,
        teacher: torch.nn.Module,
        task_fingerprint: str,
        k: int = 32,
        online: torch.nn.Module | None = None,
        loader=None,
    ) -> None:
        """``teacher`` is hashed; ``online`` (default ``teacher``) computes the batches not yet cached, e.g. an
        FSDP-sharded copy whose forward is a collective: then every rank computes a batch when any rank must.
        ``loader()`` gives the teacher back after the run released it (``self.teacher = None``) and a batch misses."""
        self.root = Path(root)
        self.teacher = teacher if online is None else online
        self.loader = loader
        self.collective = online is not None
        self.k = k
        self.hits = 0
        self.misses = 0
        meta = {"version": 1, "teacher": teacher_hash(teacher), "task": task_fingerprint, "k": k}
        mpath = self.root / "cache.json"
        if mpath.is_file():
            old = read_json(mpath)
            if old.get("teacher") != meta["teacher"]:
                raise RunError(
                    f"the logit cache {mpath} was made by another teacher (weights hash {old.get('teacher')}, this teacher {meta['teacher']})",
                    hint=f"delete {self.root} to rebuild it with this teacher, or use --resume with the teacher it was made with",
                )
            if old != meta:
                what = ", ".join(f"{k} {old.get(k)!r} -> {v!r}" for k, v in meta.items() if old.get(k) != v)
                raise RunError(
                    f"the logit cache {mpath} was made with other settings ({what})",
                    hint=f"delete {self.root} to rebuild it, or use --resume with the recipe it was made with",
                )
        else:
            from dsk_compress.compress import dist

            self.root.mkdir(parents=True, exist_ok=True)
            if dist.env().is_main:  # torchrun: one writer
                atomic_write_json(mpath, meta)
        self.meta = meta

    def _path(self, index: int) -> Path:
        from dsk_compress.compress import dist

        # under torchrun each rank sees its own slice of the global batch and caches that slice
        e = dist.env()
        return self.root / (f"b{index:08d}.safetensors" if not e.enabled else f"b{index:08d}-r{e.rank}of{e.world_size}.safetensors")

    def cached(self, index: int) -> bool:
        """Whether batch ``index`` has a file (``get`` still checks its tokens against the batch it is given)."""
        return self._path(index).is_file()

    @torch.no_grad()
    def get(self, index: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(values [B, T, k] float32, indices [B, T, k] int64) of the teacher's logits on batch ``index``."""
        from safetensors.torch import load_file, save_file

        from dsk_compress.compress import dist

        p = self._path(index)
        d = load_file(str(p)) if p.is_file() else None
        hit = d is not None and d["input_ids"].shape == x.shape and torch.equal(d["input_ids"].to(x.device, torch.long), x)
        if self.collective:  # the sharded teacher runs on all ranks or none
            hit = all(dist.all_gather_object(hit))
        if hit:
            self.hits += 1
            return d["values"].to(x.device, torch.float32), d["indices"].to(x.device, torch.long)
        self.misses += 1
        if self.teacher is None:  # released by the run once the cache held what it expected
            self.teacher = self.loader()
        if not self.collective and next(self.teacher.parameters()).device != x.device:
            self.teacher.to(x.device)
        logits = self.teacher(input_ids=x, use_cache=False).logits.float()
        values, indices = logits.topk(self.k, dim=-1)
        idx_dtype = torch.int16 if logits.shape[-1] < 2**15 else torch.int32
        tmp = p.with_name(p.name + ".tmp")
        save_file(
            {
                "values": values.half().cpu().contiguous(),
                "indices": indices.to(idx_dtype).cpu().contiguous(),
                "input_ids": x.to(torch.int32 if logits.shape[-1] >= 2**15 else torch.int16).cpu().contiguous(),
            },
            str(tmp),
        )
        tmp.replace(p)
        return values.half().float(), indices
