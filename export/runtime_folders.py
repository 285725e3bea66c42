"""``dsk-compress export RUN --format genai|optimum``: a run's decoder as a model folder another runtime loads as it is.

- ``genai``: onnxruntime-genai's folder (:mod:`dsk_compress.export.genai`): ``genai_config.json``, ``model.onnx``, tokenizer.
- ``optimum``: Hugging Face Optimum's (:mod:`dsk_compress.export.optimum`): ``config.json``, ``generation_config.json``,
  ``model.onnx`` with past key values, tokenizer; ``optimum.onnxruntime.ORTModelForCausalLM.from_pretrained(folder)``.

Both come from the decoder graph the export stage wrote for one variant (``--variant``, default ``final``, the QAT
student, else the last float student): its fused graph where it has one (what a bundle's ``run.py --generate`` decodes),
else its plain KV-cache graph. The folder is written like a deploy bundle (:func:`dsk_compress.export.bundle.make_bundle`):
staged beside the destination and moved in whole, a marker naming the files written, and the same rules for ``--out``
(a new or empty folder, or one an earlier export wrote; never the run or a folder inside it other than ``RUN/bundles/<name>``).
"""

from __future__ import annotations

from pathlib import Path

from dsk_compress.errors import ExportError, RunError
from dsk_compress.export.genai import DecoderSource

FORMATS = ("genai", "optimum")
"""Folder formats besides the deploy bundle (``bundle``, the export command's default)."""


def default_variant(artifacts: dict) -> str:
    """``final`` (the QAT student) when the run has it, else the last float student with a decoder graph."""
    if "final" in artifacts:
        return "final"
    students = [n for n, a in artifacts.items() if a.role == "student" and a.decoder_graph]
    if not students:
        raise RunError("the run has no student with a decoder graph", hint="run a recipe whose export stage has kv_cache: true")
    return students[-1]


def decoder_source(run_dir: str | Path, variant: str | None = None) -> DecoderSource:
    """The decoder graph, config and tokenizer of ``variant`` of a finished run (checked: recorded hashes match, graphs load)."""
    from dsk_compress.export.bundle import _export_artifacts, _in_run
    from dsk_compress.export.genai import decoder_shape
    from dsk_compress.integrity import check_run_artifacts

    run_dir = Path(run_dir)
    manifest = check_run_artifacts(run_dir)
    arts = _export_artifacts(manifest)
    if not arts:
        raise RunError(f"{run_dir} has no export stage output", hint="run a recipe with an export stage (kv_cache: true)")
    name = variant or default_variant(arts)
    if name not in arts:
        raise RunError(
            f"the run has no variant {name!r}", hint=f"valid: {', '.join(n for n, a in arts.items() if a.decoder_graph) or 'none'}"
        )
    art = arts[name]
    rel, kind = (art.fused_path, "fused") if art.fused_path else (art.kv_cache_path, "kv")
    if not rel:
        why = (art.fused or {}).get("error") or (art.kv_cache or {}).get("error")
        raise RunError(
            f"variant {name!r} has no decoder graph" + (f" ({why})" if why else ""),
            hint="export with kv_cache: true"
            if not why
            else f"choose another --variant: {', '.join(n for n, a in arts.items() if a.decoder_graph) or 'none has one'}",
        )
    graph = _in_run(run_dir, rel, f"manifest.json: the export stage's {kind} graph of {name!r}")
    config = _model_config(run_dir, manifest, art)
    shape = decoder_shape(graph)
    if not shape["heads"]:
        shape["heads"] = int(config.get("num_attention_heads") or 0)
    task = (manifest.get("recipe") or {}).get("task") or {}
    tname = task.get("name")
    if tname not in ("code-lm", "text-lm"):
        raise RunError(f"genai and Optimum folders are written for language-model runs, and this run's task is {tname or 'your own'}")
    special: dict[str, int | None] = {}
    tok_dir = None
    if tname == "text-lm":
        from dsk_compress.tasks.text_lm import load_tokenizer

        tok_dir = Path(task["tokenizer"])
        tok = load_tokenizer(tok_dir)
        special = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    return DecoderSource(
        variant=name,
        precision=art.precision,
        kind=kind,
        graph=graph,
        config=config,
        shape=shape,
        run_name=run_dir.resolve().name,
        byte_level=tname == "code-lm",
        tokenizer_dir=tok_dir,
        special=special,
    )


def _model_config(run_dir: Path, manifest: dict, art) -> dict:
    """The Hugging Face ``config.json`` of the model a variant was exported from: its ``model_dir``, else (the QAT student) the
    qat stage's model folder."""
    from dsk_compress.export.bundle import _in_run
    from dsk_compress.io import read_json

    rel = art.model_dir
    if not rel:
        for st in manifest.get("stages", []):
            out = st.get("outputs") if isinstance(st, dict) else None
            if isinstance(out, dict) and isinstance(out.get("qat_model"), str):
                rel = out["qat_model"]
    if not rel:
        raise RunError(f"manifest.json: variant {art.name!r} names no model folder", hint="the run's manifest is damaged; rerun the recipe")
    path = _in_run(run_dir, rel, f"manifest.json: the model folder of {art.name!r}") / "config.json"
    if not path.is_file():
        raise RunError(f"{path} is missing", hint="the run's files were altered; rerun the recipe")
    cfg = read_json(path)
    if not isinstance(cfg, dict) or "model_type" not in cfg:
        raise RunError(f"{path} is not a Hugging Face model config", hint="the run's files were altered; rerun the recipe")
    return cfg


def export_runtime_folder(run_dir: str | Path, fmt: str, out: str | Path | None = None, variant: str | None = None) -> Path:
    """Write ``fmt`` (:data:`FORMATS`) folder of one variant of a finished run and return it.

    The folder goes to ``out`` (default ``RUN/bundles/<fmt>-<variant>``) under the deploy bundle's rules (see the module
    docstring).

    Raises:
        RunError: the run or its artifacts are damaged, the variant has no decoder graph, the destination is refused,
            or the disk is full.
        ExportError: the model cannot be expressed in that runtime's folder (the message says why).
    """
    from dsk_compress.export.bundle import BUNDLE_MARKER, _claim, _install, staging_folder
    from dsk_compress.io import atomic_write_json

    if fmt not in FORMATS:
        raise ExportError(f"unknown folder format {fmt!r}", hint=f"valid: {', '.join(FORMATS)}")
    run_dir = Path(run_dir)
    src = decoder_source(run_dir, variant)
    dest = Path(out) if out is not None else run_dir / "bundles" / f"{fmt}-{src.variant}"
    owned = _claim(dest, run_dir, "--out" if out is not None else "the folder")
    if fmt == "optimum":
        from dsk_compress.export.optimum import check_optimum

        check_optimum(src)  # before anything is written
    from dsk_compress.export import graph_files

    needed = graph_files.size(src.graph) + (1 << 20)
    with staging_folder(dest, needed, "the folder", probe=dest.parent if dest.parent.exists() else run_dir) as tmp:
        if fmt == "genai":
            from dsk_compress.export.genai import write_genai

            written = write_genai(src, tmp)
        else:
            from dsk_compress.export.optimum import write_optimum

            written = write_optimum(src, tmp)
        atomic_write_json(
            tmp / BUNDLE_MARKER, {"written_by": f"dsk-compress export --format {fmt}", "variant": src.variant, "files": written}
        )
        _install(tmp, dest, owned, [*written, BUNDLE_MARKER])
    return dest
