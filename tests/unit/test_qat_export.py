"""QAT fake-quant numerics and the INT8 ONNX export: integer ops per Linear, SQNR, int8 storage."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_llama


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from dsk_compress.compress.qat import calibrate, freeze_for_export, prepare_qat
    from dsk_compress.export.onnx import export_causal_lm, fold_weight_quantizers, ort_optimize, simplify

    d = tmp_path_factory.mktemp("qat")
    m = tiny_llama()
    fp = export_causal_lm(m, np.zeros((1, 16), np.int64), d / "fp32.onnx")
    names = prepare_qat(m, 8, True, ["lm_head"])
    g = torch.Generator().manual_seed(1)
    calibrate(m, [torch.randint(0, 256, (4, 32), generator=g) for _ in range(3)])
    freeze_for_export(m)
    x = np.random.default_rng(0).integers(0, 256, (2, 40))
    raw = export_causal_lm(m, x, d / "raw.onnx")
    simplify(raw)
    folded = fold_weight_quantizers(raw)
    opt = ort_optimize(raw, d / "int8.onnx")
    return {"model": m, "names": names, "raw": raw, "opt": opt, "fp32": fp, "folded": folded, "x": x}


def test_weight_fake_quant_uses_avx2_safe_range():
    from dsk_compress.compress.qat import QuantLinear

    lin = torch.nn.Linear(16, 8, bias=False)
    q = QuantLinear(lin, 8, avx2_safe=True)
    wq = q.quantized_weight()
    levels = (wq / q.weight_scale()[:, None]).round()
    assert q.qmax == 63 and levels.abs().max() == 63
    assert torch.allclose(levels * q.weight_scale()[:, None], wq, atol=1e-6)
    assert QuantLinear(lin, 8, avx2_safe=False).qmax == 127
    assert QuantLinear(lin, 4, avx2_safe=True).qmax == 7


def test_every_quantized_linear_becomes_an_integer_op(exported):
    from dsk_compress.export.onnx import INTEGER_MATMULS, op_histogram

    hist = op_histogram(exported["opt"])
    assert len(exported["names"]) == 14  # 2 layers x (q, k, v, o, gate, up, down)
    assert sum(v for k, v in hist.items() if k in INTEGER_MATMULS) == 14
    assert exported["folded"] == 14


def test_int8_onnx_matches_fake_quant_torch_sqnr(exported):
    from dsk_compress.compress.qat import sqnr_db
    from dsk_compress.export.onnx import ort_predict

    x = exported["x"]
    with torch.no_grad():
        ref = exported["model"](input_ids=torch.as_tensor(x)).logits.numpy()
    got = ort_predict(exported["opt"])(x)
    assert sqnr_db(ref, got) > 40.0  # optimizations ON: u8s8 kernels must not saturate


def test_int8_weights_are_stored_as_int8(exported):
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(exported["raw"]))
    int8 = [i for i in m.graph.initializer if numpy_helper.to_array(i).dtype == np.int8 and len(i.dims) == 2]
    assert len(int8) == 14
    assert all(np.abs(numpy_helper.to_array(i)).max() <= 63 for i in int8)
    assert exported["opt"].stat().st_size < 0.6 * exported["fp32"].stat().st_size


def test_fp32_export_parity_with_dynamic_shapes(tmp_path):
    from dsk_compress.export.onnx import export_causal_lm, ort_predict

    m = tiny_llama()
    p = export_causal_lm(m, np.zeros((1, 8), np.int64), tmp_path / "m.onnx")
    for shape in [(1, 5), (3, 33)]:
        x = np.random.default_rng(0).integers(0, 256, shape)
        with torch.no_grad():
            ref = m(input_ids=torch.as_tensor(x)).logits.numpy()
        assert np.abs(ort_predict(p)(x) - ref).max() < 1e-4


def test_moe_teacher_exports_with_dense_routing(tmp_path):
    from transformers import MixtralForCausalLM

    from conftest import tiny_mixtral_config
    from dsk_compress.compress.moe import densify_moe
    from dsk_compress.export.onnx import export_causal_lm, ort_predict

    torch.manual_seed(0)
    m = MixtralForCausalLM(tiny_mixtral_config()).eval()
    m.config._attn_implementation = "eager"
    densify_moe(m)
    p = export_causal_lm(m, np.zeros((1, 8), np.int64), tmp_path / "t.onnx")
    x = np.random.default_rng(1).integers(0, 256, (2, 30))  # other inputs route to other experts
    with torch.no_grad():
        ref = m(input_ids=torch.as_tensor(x)).logits.numpy()
    assert np.abs(ort_predict(p)(x) - ref).max() < 1e-4
