"""Shared fixtures: tiny random models saved to temp dirs (nothing from a hub)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def _import_installed_package() -> None:
    """Import ``dsk_compress`` from where it is installed, not from this checkout's ``dsk_compress/`` folder.

    ``python -m pytest`` puts the working directory first on ``sys.path``; in the checkout's root that folder shadows
    a non-editable install (and lacks compress/, recipes/, ... which pyproject maps into the package). With an
    editable install, or none, the checkout is the package and nothing changes.
    """
    import importlib
    import importlib.util
    import sys

    root = Path(__file__).resolve().parents[1]
    shadow = [p for p in sys.path if Path(p or ".").resolve() == root]
    if not shadow or "dsk_compress" in sys.modules:
        return
    saved = sys.path[:]
    sys.path[:] = [p for p in saved if p not in shadow]
    try:
        spec = importlib.util.find_spec("dsk_compress")
        if spec is not None and spec.origin is not None and Path(spec.origin).resolve().parent != root / "dsk_compress":
            importlib.import_module("dsk_compress")  # its subpackages are then found beside it
    finally:
        sys.path[:] = saved  # tests import examples/ from the working directory


_import_installed_package()

import torch  # noqa: E402

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))

try:  # `pytest --hypothesis-profile=campaign`: the long fuzzing campaign of tests/unit/test_recipe_properties.py
    from hypothesis import settings as _hypothesis_settings

    _hypothesis_settings.register_profile("campaign", max_examples=4000)
except ImportError:  # the dev extra is not installed
    pass


def tiny_mixtral_config(**kw):
    from transformers import MixtralConfig

    cfg = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    cfg.update(kw)
    return MixtralConfig(**cfg)


def kept_rows(orig, pruned) -> list[int]:
    """Index in ``orig`` of every row of ``pruned`` (each must occur exactly once): which channels pruning kept."""
    idx = []
    for row in pruned:
        hits = (orig == row).all(dim=1).nonzero()
        assert len(hits) == 1
        idx.append(int(hits[0]))
    return idx


def tiny_llama(**kw):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=16,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    cfg.update(kw)
    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(**cfg)).eval()
    m.config._attn_implementation = "eager"
    return m


def qat_llama(share_inputs: bool = True, train_steps: int = 0, activations: str = "asymmetric", ckpt_dir: Path | None = None, **kw):
    """A tiny_llama (``kw``) made QAT (lm_head float), calibrated on 3 seeded batches, then ``train_steps`` of LSQ training on
    random tokens (so quantizers that are not shared drift apart, as in a real QAT run); weight scales not frozen.
    Returns ``(model, quantized layer names, train result or None)``."""
    from dsk_compress.compress.qat import calibrate, prepare_qat
    from dsk_compress.compress.trainer import TrainConfig, train
    from dsk_compress.models.zoo import lm_loss

    m = tiny_llama(**kw)
    names = prepare_qat(m, 8, True, ["lm_head"], activations=activations)
    g = torch.Generator().manual_seed(1)
    calibrate(m, [torch.randint(0, 256, (4, 32), generator=g) for _ in range(3)], share_inputs=share_inputs)
    res = None
    if train_steps:

        def loss_fn(model, x, step):
            return lm_loss(model(input_ids=x, use_cache=False).logits, x), {}

        def batch(step, bs):
            return torch.randint(0, 256, (bs, 16), generator=torch.Generator().manual_seed(step))

        cfg = TrainConfig(steps=train_steps, batch_size=2, lr=2e-3, warmup=1, ckpt_every=max(1, train_steps // 2))
        res = train(m, loss_fn, batch, cfg, ckpt_dir=ckpt_dir)
        m.eval()
    return m, names, res


def int4_qat_llama(train_steps: int = 30, head_bits: int | None = 8, embedding_bits: int | None = 8, scale_init: str = "mse", **kw):
    """A tiny_llama (``kw``) made int4 QAT (MatMulNBits scheme: 4-bit blocks of 32, LM head at ``head_bits``, int8 embedding),
    then ``train_steps`` of training on a learnable token pattern (trained logits are larger than a random model's, so one
    activation rounding flip between torch and ONNX Runtime does not dominate the SQNR). Returns ``(model, quantized names)``."""
    from dsk_compress.compress.qat import prepare_int4_qat
    from dsk_compress.compress.trainer import TrainConfig, train
    from dsk_compress.models.zoo import lm_loss

    m = tiny_llama(**kw)
    names = prepare_int4_qat(m, scale_init=scale_init, head_bits=head_bits, embedding_bits=embedding_bits)
    if train_steps:

        def loss_fn(model, x, step):
            return lm_loss(model(input_ids=x, use_cache=False).logits, x), {}

        def batch(step, bs):
            return torch.randint(0, 16, (bs, 16), generator=torch.Generator().manual_seed(step)) * 7 % 256

        train(m, loss_fn, batch, TrainConfig(steps=train_steps, batch_size=4, lr=3e-3, warmup=1, ckpt_every=10_000))
    return m.eval(), names


def bpe_tokenizer(texts: list[str], vocab_size: int = 300):
    """A byte-level BPE tokenizer trained on ``texts`` (``<unk>``, ``</s>`` special), as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "</s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")


def tiny_llama_recipe(d: Path, name: str, stages: list[dict]) -> Path:
    """A recipe YAML in ``d``: a saved tiny_llama teacher, a one-layer student cut from it, code-lm at seq 32."""
    import yaml

    from dsk_compress.models.hf import save_hf_dir

    save_hf_dir(tiny_llama(), d / "teacher")  # quiet: tests read the CLI's stderr, where transformers 5 draws its bars
    data = {
        "name": name,
        "teacher": {"hf": str(d / "teacher")},
        "student": {"from_teacher": {"layers": [0], "ffn_init": "top", "calibration_batches": 1}},
        "task": {"name": "code-lm", "seq_len": 32, "eval_sequences": 8},
        "stages": stages,
    }
    p = d / "tiny.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


@pytest.fixture(scope="session")
def tiny_moe_dir(tmp_path_factory) -> Path:
    """A tiny Mixtral, briefly trained on code-lm so distillation has a signal, saved as an HF directory."""
    from transformers import MixtralForCausalLM

    from dsk_compress.compress.trainer import TrainConfig, train
    from dsk_compress.models.zoo import lm_loss
    from dsk_compress.tasks.code_lm import CodeLMTask

    torch.manual_seed(0)
    model = MixtralForCausalLM(tiny_mixtral_config())
    model.config._attn_implementation = "eager"
    task = CodeLMTask(seq_len=64, eval_sequences=16)
    train(
        model,
        lambda m, x, s: (lm_loss(m(input_ids=x, use_cache=False).logits, x), {}),
        task.train_batch,
        TrainConfig(steps=60, batch_size=16, lr=3e-3, warmup=5),
        desc="tiny teacher",
    )
    from dsk_compress.models.hf import save_hf_dir

    return save_hf_dir(model, tmp_path_factory.mktemp("tiny-moe") / "teacher")


def run_main(args: list[str], capsys, cwd: Path | None = None) -> tuple[int, str, str]:
    """``dsk-compress ARGS`` through the console entry point, in this process: (exit code, stdout, stderr)."""
    import sys

    from dsk_compress.cli.main import main

    old_argv, old_cwd = sys.argv, os.getcwd()
    sys.argv = ["dsk-compress", *args]
    if cwd is not None:
        os.chdir(cwd)
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = old_argv
        os.chdir(old_cwd)
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code: int, err: str) -> str:
    """The single ``error: ...`` line of a refused command (exit code 2, no traceback)."""
    assert code == 2, err[-3000:]
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), err[-3000:]
    return lines[0]
