"""ONNX graphs with external data: every graph kind the export writes, saved as ``<name>.onnx`` + one ``<name>.onnx.data``
(forced here on tiny models by lowering the size threshold), loads in ONNX Runtime with the same outputs as the
single-file graph, and moves, copies and sizes as one unit; a failed write leaves nothing behind."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from conftest import qat_llama, tiny_llama

from dsk_compress.errors import ExportError
from dsk_compress.export import graph_files

X = np.random.default_rng(0).integers(0, 256, (2, 24))


def _outputs(path, x=X):
    from dsk_compress.export.onnx import ort_predict

    return ort_predict(path)(x)


def _export_every_kind(d, m, q):
    """Every graph kind of the export stage, written into ``d``; returns {kind: path}."""
    from dsk_compress.export.fused import export_fused, quantize_int4
    from dsk_compress.export.int8 import export_int8_lm
    from dsk_compress.export.kv_cache import export_kv_cache
    from dsk_compress.export.onnx import export_float, export_fp16, raw_path
    from dsk_compress.export.ptq import ptq_baselines

    out = {"full": export_float(m, X, d / "s.onnx", keep_raw=True)["path"]}
    out["fp16"] = d / "s16.onnx"
    export_fp16(m, raw_path(d / "s.onnx"), out["fp16"], X, max_rel_err=0.05)
    out.update(ptq_baselines(raw_path(d / "s.onnx"), d, [X[:1]]))
    graph_files.remove(raw_path(d / "s.onnx"))
    kv = export_kv_cache(m, d / "s.kv.onnx", X, parity_atol=1e-3, min_sqnr_db=30)
    assert "error" not in kv, kv
    out["kv"] = d / "s.kv.onnx"
    out["fused"] = export_fused(m, d / "s.fused.onnx")
    out["int4"] = quantize_int4(d / "s.onnx", d / "s.int4.onnx")
    r = export_int8_lm(q, X, d / "q.qdq.onnx", d / "q.onnx", min_sqnr_db=30)
    out["int8"], out["int8-qdq"] = r["path"], r["qdq_path"]
    kv8 = export_kv_cache(q, d / "q.kv.onnx", X, parity_atol=1e-3, min_sqnr_db=30, int8=True)
    assert "error" not in kv8, kv8
    out["int8-kv"] = d / "q.kv.onnx"
    out["int8-fused"] = export_fused(q, d / "q.fused.onnx", "int8")
    return out


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    """The same models exported twice: as single files, and with every weight in external data."""
    from dsk_compress.compress.qat import freeze_for_export

    m = tiny_llama(num_key_value_heads=2)
    q, _, _ = qat_llama(train_steps=4)
    freeze_for_export(q)
    small, large = tmp_path_factory.mktemp("single"), tmp_path_factory.mktemp("external")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        single = _export_every_kind(small, m, q)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(graph_files, "EXTERNAL_DATA_ABOVE", 0)
            external = _export_every_kind(large, m, q)
    return single, external, large


def test_every_graph_kind_has_one_data_file_named_after_it(both):
    _, external, d = both
    for kind, path in external.items():
        assert graph_files.data_path(path).is_file(), kind
    names = {p.name for p in d.iterdir()}
    expected = {p.name for path in external.values() for p in graph_files.files(path)}
    assert names == expected, f"orphans: {sorted(names - expected)}"


def test_external_data_graphs_compute_exactly_what_single_files_do(both):
    single, external, _ = both
    for kind in ("full", "fp16", "int8", "int8-qdq", "ptq-dynamic", "ptq-static", "int4"):
        np.testing.assert_array_equal(_outputs(external[kind]), _outputs(single[kind]), err_msg=kind)


def _greedy(session, prompt, n):
    from dsk_compress.runtimes.decoder import decode_steps

    prefill, step = decode_steps(session, prompt, n)
    logits, out = prefill(), []
    for i in range(n):
        out.append(int(np.argmax(logits)))
        logits = step(out[-1], prompt.size + i + 1)
    return out, logits


def test_external_data_decoders_decode_like_single_files(both):
    from dsk_compress.runtimes.decoder import FusedDecoderSession, KVCacheSession

    single, external, _ = both
    prompt = X[0, :8]
    for kind, cls in (
        ("kv", KVCacheSession),
        ("fused", FusedDecoderSession),
        ("int8-kv", KVCacheSession),
        ("int8-fused", FusedDecoderSession),
    ):
        (a, la), (b, lb) = _greedy(cls(external[kind]), prompt, 6), _greedy(cls(single[kind]), prompt, 6)
        assert a == b, kind
        np.testing.assert_array_equal(la, lb, err_msg=kind)


def test_size_counts_the_data_file(both):
    _, external, _ = both
    path = external["full"]
    assert graph_files.size(path) == path.stat().st_size + graph_files.data_path(path).stat().st_size
    assert graph_files.data_path(path).stat().st_size > path.stat().st_size


def test_move_and_copy_carry_the_data_and_rewrite_its_name(both, tmp_path):
    import onnx

    _, external, _ = both
    want = _outputs(external["full"])
    copied = graph_files.copy(external["full"], tmp_path / "a" / "model.onnx")
    moved = graph_files.move(copied, tmp_path / "b.onnx")
    assert not copied.exists() and not graph_files.data_path(copied).exists()
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["b.onnx", "b.onnx.data"]
    locations = {
        e.value for t in onnx.load(str(moved), load_external_data=False).graph.initializer for e in t.external_data if e.key == "location"
    }
    assert locations == {"b.onnx.data"}
    np.testing.assert_array_equal(_outputs(moved), want)
    assert external["full"].is_file() and graph_files.data_path(external["full"]).is_file()  # copy left the source


def test_per_tensor_files_are_gathered_into_one_data_file(both, tmp_path):
    import onnx

    single, _, _ = both
    m = onnx.load(str(single["full"]))
    with graph_files.staged(tmp_path / "g.onnx") as tmp:  # as torch.onnx writes a graph past 2 GB: one file per tensor
        onnx.save_model(
            onnx.load(str(single["full"])), str(tmp), save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=0
        )
        assert len(list(tmp.parent.iterdir())) > 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.onnx", "g.onnx.data"]
    np.testing.assert_array_equal(_outputs(tmp_path / "g.onnx"), _outputs(single["full"]))
    assert len(m.graph.initializer) > 0


def test_failed_write_leaves_the_old_graph_and_no_temp_files(both, tmp_path):
    single, _, _ = both
    target = graph_files.copy(single["full"], tmp_path / "keep.onnx")
    before = target.read_bytes()
    with pytest.raises(RuntimeError), graph_files.staged(target) as tmp:
        tmp.write_bytes(b"half a graph")
        raise RuntimeError("disk full")
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.onnx"]


def test_invalid_external_graph_is_an_export_error(tmp_path):
    from onnx import TensorProto, helper

    node = helper.make_node("Add", ["a", "missing"], ["b"])
    g = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("b", TensorProto.FLOAT, [1])],
    )
    with pytest.raises(ExportError, match="not a valid ONNX graph"):
        graph_files.save(helper.make_model(g), tmp_path / "bad.onnx", external=True)
    assert list(tmp_path.iterdir()) == []
