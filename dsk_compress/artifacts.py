"""What the export stage hands on: one typed :class:`Artifact` per exported variant.

The export stage makes them; the bench stage, ``dsk-compress bench RUN`` and the bundle read them (runtime plans,
decoder graphs, report rows, the files a bundle ships). In ``manifest.json`` an artifact is the same JSON mapping it
always was (``{"path": ..., "role": ..., "fused_path": ..., ...}`` under the export stage's ``outputs.artifacts``), so
runs written before this type existed resume and bundle; a mapping that is not an artifact fails in one line naming
the variant and the field (:func:`read_artifacts`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dsk_compress.errors import RunError


class Artifact(BaseModel):
    """One exported variant: its graphs, what it is, and the numbers its export was checked by.

    Fields not named here (the export checks' parity numbers, e.g. ``max_abs_diff``, ``sqnr_db``, ``integer_ops``)
    are kept as they came, so nothing the export stage records is lost.
    """

    # extra: the checks' own numbers ride along; frozen: readers never change what export wrote
    model_config = ConfigDict(extra="allow", frozen=True)

    name: str = Field("", exclude=True, description="the variant's name (its key in the export stage's artifacts)")
    role: str | None = Field(None, description="teacher, student, final, student-fp16, ptq-static, ... (the report's roles)")
    path: str | None = Field(None, description="the full-sequence ONNX graph, relative to the run directory (None: torch only)")
    precision: str = Field("fp32", description="fp32, fp16, int8 or int4")
    params: int | None = Field(None, ge=0, description="parameter count")
    stage: str | None = Field(None, description="the recipe stage whose model this is (distill, prune, ...)")
    model_dir: str | None = Field(None, description="the torch / Hugging Face model directory it was exported from")
    notes: str = Field("", description="one line for the report")
    qdq_path: str | None = Field(None, description="int8: the portable Q/DQ graph (what TensorRT and a bundle load)")
    kv_cache_path: str | None = Field(None, description="the KV-cache decoder graph (past_key_values in, present out)")
    fused_path: str | None = Field(None, description="the fused decoder graph (GroupQueryAttention, IO binding)")
    kv_cache: dict[str, Any] | None = Field(None, description="the KV-cache graph's export check")
    fused: dict[str, Any] | None = Field(None, description="the fused graph's export check, with its fused_ops")
    fused_ops: dict[str, int] | None = Field(None, description="fused operator counts of the full graph")
    tensorrt: dict[str, Any] | None = Field(None, description="the TensorRT check, and its engine where one was built")
    activations: str | None = Field(None, description="int8: symmetric or asymmetric activation quantizers")

    @classmethod
    def of(cls, name: str, value: Artifact | Mapping[str, Any]) -> Artifact:
        """``value`` as an Artifact named ``name`` (a mapping is validated; raises pydantic's ValidationError)."""
        if isinstance(value, Artifact):
            return value if value.name == name else value.model_copy(update={"name": name})
        return cls.model_validate({**value, "name": name})

    @property
    def decoder_graph(self) -> str | None:
        """The graph greedy decoding runs: the fused one (IO binding, preallocated KV buffers), else the plain KV one."""
        return self.fused_path or self.kv_cache_path

    @property
    def decoder_fused_ops(self) -> dict[str, int] | None:
        """Fused operator counts of the fused decoder graph, when there is one."""
        return (self.fused or {}).get("fused_ops")

    @property
    def engine(self) -> str | None:
        """The TensorRT engine built at export, if any."""
        return (self.tensorrt or {}).get("engine")

    def graphs(self) -> dict[str, str]:
        """The ONNX graphs of this variant by kind: ``full``, ``qdq``, ``kv``, ``fused`` (those that exist)."""
        kinds = {"full": self.path, "qdq": self.qdq_path, "kv": self.kv_cache_path, "fused": self.fused_path}
        return {k: v for k, v in kinds.items() if v}

    def to_json(self) -> dict[str, Any]:
        """The manifest's mapping: the keys export set, nothing added (the name is the mapping's key)."""
        return self.model_dump(exclude_unset=True, exclude={"name"})  # values as export gave them (the manifest writer encodes them)


def read_artifacts(data: Mapping[str, Any] | None, source: str = "manifest.json: the export stage's artifacts") -> dict[str, Artifact]:
    """``{name: Artifact}`` from the export stage's ``artifacts`` mapping (artifacts pass through).

    Raises:
        RunError: one line naming ``source``, the variant and the bad field, with a hint to export again.
    """
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise RunError(
            f"{source} is a {type(data).__name__}, not a mapping of variant names to artifacts",
            hint="run the export stage again (--resume --rerun-from export)",
        )
    out: dict[str, Artifact] = {}
    for name, value in data.items():
        if not isinstance(value, (Mapping, Artifact)):
            raise RunError(
                f"{source}: artifact {name!r} is a {type(value).__name__}, not a mapping",
                hint="run the export stage again (--resume --rerun-from export)",
            )
        try:
            out[str(name)] = Artifact.of(str(name), value)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(x) for x in first["loc"]) or "entry"
            raise RunError(
                f"{source}: artifact {name!r}: {where}: {first['msg']}", hint="run the export stage again (--resume --rerun-from export)"
            ) from None
    return out


def artifacts_json(artifacts: Mapping[str, Artifact]) -> dict[str, dict[str, Any]]:
    """The export stage's ``artifacts`` output as manifest JSON."""
    return {name: art.to_json() for name, art in artifacts.items()}
