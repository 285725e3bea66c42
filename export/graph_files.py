"""An ONNX graph on disk: one ``<name>.onnx`` file, or, when its weights are large, that file plus one external-data
file beside it named after it (``<name>.onnx.data``).

A protobuf message cannot pass 2 GB, so a graph whose tensors would is saved with its weights in the ``.data`` file
(one file per graph, never torch's one-file-per-tensor). Every graph the project writes, renames, copies, sizes or
deletes goes through this module, so the pair is written atomically (both are staged in a private folder beside the
destination and renamed into place, the graph last), checked with ``onnx.checker`` by path, counted in sizes, and
travels together. A graph's ``.data`` file is referenced from inside the graph by its file name, so renaming or
copying a graph rewrites that reference (:func:`move`, :func:`copy`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from dsk_compress.errors import ExportError

PROTO_LIMIT = 2**31
"""Protobuf's hard limit on one serialized message (2 GiB)."""
EXTERNAL_DATA_ABOVE = 1 << 30
"""Tensor bytes above which a graph is saved with external data (well under :data:`PROTO_LIMIT`: the graph's
structure and the exporters' temporary copies need headroom)."""
SLIM_MAX_BYTES = 1 << 30
"""onnxslim holds about four copies of a graph in memory (9.4 GB for a 2.29 GB graph, measured): graphs with more
tensor bytes than this skip it (ONNX Runtime's own optimizer still runs)."""
_SMALL_TENSOR = 1024  # tensors below this many bytes stay inside the graph file


def data_path(path: str | os.PathLike) -> Path:
    """The external-data file of the graph at ``path``: ``<name>.onnx.data`` beside it."""
    p = Path(path)
    return p.with_name(p.name + ".data")


def files(path: str | os.PathLike) -> list[Path]:
    """The files that make up the graph at ``path``: the graph, and its ``.data`` file when it has one."""
    p = Path(path)
    d = data_path(p)
    return [p, d] if d.is_file() else [p]


def size(path: str | os.PathLike) -> int:
    """Bytes on disk of the graph at ``path``, external data included."""
    return sum(f.stat().st_size for f in files(path))


def tensor_bytes(model) -> int:
    """Bytes of the constant tensors held inside ``model`` (initializers and Constant nodes, subgraphs included)."""
    from onnx import numpy_helper

    def tensor(t) -> int:
        if t.raw_data:
            return len(t.raw_data)
        return int(numpy_helper.to_array(t).nbytes) if t.data_location != 1 else 0  # 1: TensorProto.EXTERNAL

    def graph(g) -> int:
        n = sum(tensor(t) for t in g.initializer)
        for node in g.node:
            for a in node.attribute:
                if a.HasField("t"):
                    n += tensor(a.t)
                n += sum(graph(sub) for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs))
        return n

    return graph(model.graph)


def needs_external_data(model) -> bool:
    """Whether ``model`` must be saved with external data (its tensors pass :data:`EXTERNAL_DATA_ABOVE`)."""
    return tensor_bytes(model) > EXTERNAL_DATA_ABOVE


def is_large(path: str | os.PathLike) -> bool:
    """Whether the graph at ``path`` has its weights in a ``.data`` file or is itself past the external-data size."""
    return data_path(path).is_file() or Path(path).stat().st_size > EXTERNAL_DATA_ABOVE


@contextlib.contextmanager
def staged(final: str | os.PathLike) -> Iterator[Path]:
    """A path named like ``final`` inside a fresh private folder beside it; on a clean exit the graph written there
    (and its ``.data`` file) replace ``final``; on an error the folder is removed and ``final`` is untouched."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    stage = final.with_name(f".{final.name}.staging")
    shutil.rmtree(stage, ignore_errors=True)  # left by a killed writer of this same graph
    stage.mkdir()
    try:
        yield stage / final.name
        _publish(stage / final.name, final)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _publish(tmp: Path, final: Path) -> None:
    if not tmp.is_file():
        raise ExportError(f"{final.name}: the writer produced no graph")
    strays = [p for p in tmp.parent.iterdir() if p not in (tmp, data_path(tmp))]
    if strays:  # an exporter that wrote one file per tensor: gather them into one .data file
        import onnx

        model = onnx.load(str(tmp))  # reads every tensor into memory
        for p in (tmp, *strays):
            p.unlink()
        _save_proto(model, tmp, external=True)
    if data_path(tmp).is_file():
        os.chmod(data_path(tmp), 0o644)  # ONNX Runtime writes its external data 0600; the graph file is 0644
        os.replace(data_path(tmp), data_path(final))
    else:
        data_path(final).unlink(missing_ok=True)  # a graph that was large before and is small now
    os.replace(tmp, final)


def _save_proto(model, path: Path, external: bool) -> None:
    """Write ``model`` to ``path``, with its large tensors in :func:`data_path` when ``external`` (``path`` carries the
    graph's final name: the graph records its data file by name)."""
    import onnx

    if external:
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data_path(path).name,
            size_threshold=_SMALL_TENSOR,
        )
    else:
        onnx.save_model(model, str(path))


def save(model, path: str | os.PathLike, *, external: bool | None = None, check: bool | None = None) -> Path:
    """Write the ONNX ``model`` to ``path`` atomically and return the path.

    Args:
        model: an ``onnx.ModelProto`` (its tensors in memory).
        path: the graph file; a ``.data`` file beside it holds the weights when ``external``.
        external: save the weights as external data (default: when :func:`needs_external_data`).
        check: run ``onnx.checker`` on the written file by path (default: for graphs saved with external data,
            which in-memory checks cannot hold).
    """
    import onnx

    final = Path(path)
    external = needs_external_data(model) if external is None else external
    with staged(final) as tmp:
        _save_proto(model, tmp, external)
        if check if check is not None else external:
            try:
                onnx.checker.check_model(str(tmp))
            except onnx.checker.ValidationError as e:
                raise ExportError(f"{final.name} is not a valid ONNX graph: {str(e).splitlines()[0][:300]}") from None
    return final


def _relocate(src: Path, dst: Path, move_data) -> None:
    """``dst`` as a graph whose external tensors point at ``dst``'s ``.data`` file; ``move_data(src_data, dst_data)``."""
    import onnx

    m = onnx.load(str(src), load_external_data=False)
    want = dst.name + ".data"

    def point(t) -> None:
        for e in t.external_data:
            if e.key == "location":
                e.value = want

    for t in m.graph.initializer:
        point(t)
    for node in m.graph.node:
        for a in node.attribute:
            if a.HasField("t"):
                point(a.t)
    with staged(dst) as tmp:
        onnx.save_model(m, str(tmp))
        move_data(data_path(src), data_path(tmp))


def move(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Rename the graph at ``src`` (and its ``.data`` file) to ``dst``; return ``dst``."""
    src, dst = Path(src), Path(dst)
    if not data_path(src).is_file():
        dst.parent.mkdir(parents=True, exist_ok=True)
        data_path(dst).unlink(missing_ok=True)
        os.replace(src, dst)
        return dst
    _relocate(src, dst, os.replace)
    src.unlink()
    return dst


def copy(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Copy the graph at ``src`` (and its ``.data`` file) to ``dst``; return ``dst``."""
    src, dst = Path(src), Path(dst)
    if not data_path(src).is_file():
        with staged(dst) as tmp:
            shutil.copyfile(src, tmp)
        return dst
    _relocate(src, dst, shutil.copyfile)
    return dst


def remove(path: str | os.PathLike) -> None:
    """Delete the graph at ``path`` and its ``.data`` file (missing files are fine)."""
    for p in (Path(path), data_path(path)):
        p.unlink(missing_ok=True)


def ort_session_config(dst: str | os.PathLike) -> dict[str, str]:
    """ONNX Runtime session config entries that make an optimized-model save of a large graph write its weights to
    ``dst``'s ``.data`` file (one file, large tensors only)."""
    return {
        "session.optimized_model_external_initializers_file_name": Path(dst).name + ".data",
        "session.optimized_model_external_initializers_min_size_in_bytes": str(_SMALL_TENSOR),
    }
