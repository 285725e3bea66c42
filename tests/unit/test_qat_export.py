"""QAT fake-quant numerics, one activation quantizer per input tensor (saved, loaded, resumed exactly), and the INT8 ONNX
export: integer ops per Linear, SQNR, int8 storage."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import qat_llama, tiny_llama


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tied QAT tiny Llama after a few LSQ steps (trained scales, not calibration's), exported to Q/DQ and ORT-optimized."""
    from dsk_compress.compress.qat import freeze_for_export
    from dsk_compress.export.onnx import export_causal_lm, fold_weight_quantizers, ort_optimize, simplify

    d = tmp_path_factory.mktemp("qat")
    fp = export_causal_lm(tiny_llama(), np.zeros((1, 16), np.int64), d / "fp32.onnx")
    m, names, _ = qat_llama(train_steps=6)
    freeze_for_export(m)
    x = np.random.default_rng(0).integers(0, 256, (2, 40))
    raw = export_causal_lm(m, x, d / "raw.onnx")
    simplify(raw)
    folded = fold_weight_quantizers(raw)
    opt = ort_optimize(raw, d / "int8.onnx")
    return {"model": m, "names": names, "raw": raw, "opt": opt, "fp32": fp, "folded": folded, "x": x}


def _logits(m, x):
    with torch.no_grad():
        return m(input_ids=torch.as_tensor(x)).logits


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
    from conftest import tiny_mixtral_config
    from transformers import MixtralForCausalLM

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


# --------------------------------------------------------------------------- one activation quantizer per input tensor


def _quantizer_of(m, layer: int, proj: str):
    block = m.model.layers[layer]
    return getattr(block.self_attn if proj in ("q_proj", "k_proj", "v_proj", "o_proj") else block.mlp, proj).input_quantizer


def test_calibrate_gives_linears_that_read_one_tensor_one_quantizer():
    from dsk_compress.compress.qat import activation_quantizers, shared_input_groups

    m, names, _ = qat_llama()
    assert shared_input_groups(m) == [
        [f"model.layers.{i}.{p}" for p in ps]
        for i in range(2)
        for ps in (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj"))
    ]
    for i in range(2):
        q = _quantizer_of(m, i, "q_proj")
        assert _quantizer_of(m, i, "k_proj") is q and _quantizer_of(m, i, "v_proj") is q
        assert _quantizer_of(m, i, "up_proj") is _quantizer_of(m, i, "gate_proj") is not q
        assert _quantizer_of(m, i, "o_proj") is not q and _quantizer_of(m, i, "down_proj") is not _quantizer_of(m, i, "gate_proj")
    # one learned scale parameter per tensor: q/k/v, o, gate/up, down per layer (7 Linears per layer)
    scales = [n for n, _ in m.named_parameters() if n.endswith("input_quantizer.scale")]
    assert len(names) == 14 and len(scales) == len(activation_quantizers(m)) == 8
    untied, _, _ = qat_llama(share_inputs=False)
    assert shared_input_groups(untied) == [] and len(activation_quantizers(untied)) == 14
    # the shared quantizer observed the same tensor the separate ones did: calibration gives the same scales
    for i in range(2):
        for p in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "o_proj", "down_proj"):
            assert torch.equal(_quantizer_of(m, i, p).scale, _quantizer_of(untied, i, p).scale)


def test_tied_quantizer_stays_one_through_training_where_separate_ones_drift_apart():
    m, _, _ = qat_llama(train_steps=6)
    untied, _, _ = qat_llama(share_inputs=False, train_steps=6)
    calibrated, _, _ = qat_llama(share_inputs=False)
    for i in range(2):
        q = _quantizer_of(m, i, "q_proj")
        assert _quantizer_of(m, i, "k_proj") is q and _quantizer_of(m, i, "v_proj") is q
        assert q.scale.item() != _quantizer_of(calibrated, i, "q_proj").scale.item()  # it was trained
        sep = [_quantizer_of(untied, i, p).scale.item() for p in ("q_proj", "k_proj", "v_proj")]
        assert len(set(sep)) == 3  # what tying prevents: three scales for one tensor


def test_tied_qat_model_saves_and_loads_exactly(tmp_path):
    from dsk_compress.compress.qat import QAT_INFO_VERSION, load_qat_model, qat_info, save_qat_model, shared_input_groups
    from dsk_compress.io import read_json

    m, names, _ = qat_llama(train_steps=4)
    p = save_qat_model(m, tmp_path / "q", qat_info(m, 8, True, "asymmetric", ["lm_head"], names))
    info = read_json(p / "qat.json")
    assert info["version"] == QAT_INFO_VERSION == 3 and info["scheme"] == "int8"
    assert info["shared_input_quantizers"] == shared_input_groups(m) != []
    back = load_qat_model(p)
    assert shared_input_groups(back) == shared_input_groups(m)
    assert _quantizer_of(back, 1, "v_proj") is _quantizer_of(back, 1, "q_proj")
    x = np.random.default_rng(3).integers(0, 256, (2, 24))
    torch.testing.assert_close(_logits(back, x), _logits(m, x), rtol=0, atol=0)


def test_version_1_qat_model_still_loads_untied_with_the_same_outputs(tmp_path):
    """A qat.json of version 1 (before tying): quantizer state under act_* keys, no shared groups."""
    from safetensors.torch import save_file

    from dsk_compress.compress.qat import activation_quantizers, load_qat_model, shared_input_groups

    m, names, _ = qat_llama(share_inputs=False, train_steps=4)
    d = tmp_path / "v1"
    d.mkdir()
    m.config.save_pretrained(d)
    legacy = {
        "scale": "act_scale",
        "zero_point": "act_zero_point",
        "observed_min": "act_min",
        "observed_max": "act_max",
        "observing": "observing",
    }
    state = {}
    for k, v in m.state_dict().items():
        head, _, leaf = k.rpartition(".input_quantizer.")
        state[f"{head}.{legacy[leaf]}" if head else k] = v.detach().clone().contiguous()
    assert "model.layers.0.self_attn.k_proj.act_scale" in state and not any("input_quantizer" in k for k in state)
    save_file(state, str(d / "qat_state.safetensors"))
    (d / "qat.json").write_text(
        json.dumps(
            {
                "version": 1,
                "weight_bits": 8,
                "activation_bits": 8,
                "activations": "asymmetric",
                "avx2_safe": True,
                "skip": ["lm_head"],
                "quantized_layers": names,
                "weight_qmax": 63,
            }
        )
    )
    back = load_qat_model(d)
    assert shared_input_groups(back) == [] and len(activation_quantizers(back)) == 14
    x = np.random.default_rng(3).integers(0, 256, (2, 24))
    torch.testing.assert_close(_logits(back, x), _logits(m, x), rtol=0, atol=0)


def test_tied_qat_training_resumes_exactly(tmp_path):
    """Interrupted after a checkpoint and resumed (model rebuilt and tied again, then the checkpoint loaded): the same
    parameters as an uninterrupted run, the quantizers still shared."""
    from dsk_compress.compress.trainer import TrainConfig, train
    from dsk_compress.models.zoo import lm_loss

    def loss_fn(m, x, step):
        return lm_loss(m(input_ids=x, use_cache=False).logits, x), {}

    def batch(step, bs):
        return torch.randint(0, 256, (bs, 16), generator=torch.Generator().manual_seed(step))

    cfg = TrainConfig(steps=6, batch_size=2, lr=2e-3, warmup=2, ckpt_every=3)
    a, _, _ = qat_llama()
    train(a, loss_fn, batch, cfg, ckpt_dir=tmp_path / "a")
    c, _, _ = qat_llama()
    calls = {"n": 0}

    def stopping_loss(m, x, step):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return loss_fn(m, x, step)

    with pytest.raises(KeyboardInterrupt):
        train(c, stopping_loss, batch, cfg, ckpt_dir=tmp_path / "c")
    d, _, _ = qat_llama()
    res = train(d, loss_fn, batch, cfg, ckpt_dir=tmp_path / "c")
    assert res.resumed_from == 3
    for (n, p), q in zip(a.named_parameters(), d.parameters(), strict=True):
        assert torch.equal(p, q), n
    assert _quantizer_of(d, 0, "k_proj") is _quantizer_of(d, 0, "q_proj")


def test_sharing_refuses_frozen_quantizers_and_unknown_layers():
    from dsk_compress.compress.qat import share_input_quantizers

    m, _, _ = qat_llama(share_inputs=False)
    with pytest.raises(ValueError, match="before calibration freezes"):
        share_input_quantizers(m, [["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"]])
    with pytest.raises(ValueError, match="not fake-quant layers"):
        share_input_quantizers(m, [["model.layers.0.self_attn.q_proj", "lm_head"]])
