"""Print the recipe field reference of docs/recipes.md from the recipe schema (pydantic models).

Walks ``RecipeSpec`` and every model it contains (teacher, student, task kinds, stage configs and
their nested settings) and prints one markdown table per model: field, type, default, range or
choices, description, followed by a YAML example that is validated against that model here, so a
stale example fails. Descriptions come from the schema's ``Field(description=...)``; the few fields
the schema leaves undescribed take a line from ``FALLBACK`` below (better: describe them in
``recipes/schema.py``, which then wins).

    .venv/bin/python docs/gen_recipe_reference.py            # print the generated section
    .venv/bin/python docs/gen_recipe_reference.py --write    # replace it in docs/recipes.md

``tests/unit/test_doc_commands.py`` fails when docs/recipes.md differs from this output.
"""

from __future__ import annotations

import argparse
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from annotated_types import Ge, Gt, Le, Lt, MaxLen, MinLen
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

BEGIN = "<!-- BEGIN GENERATED FIELDS -->"
END = "<!-- END GENERATED FIELDS -->"
DOC = Path(__file__).with_name("recipes.md")

# One line for fields the schema does not describe, keyed "ClassName.field" (the class that declares
# the field). A description in the schema always wins; the test flags entries whose field is gone.
FALLBACK = {
    "RecipeSpec.version": "recipe format version; a recipe newer than this dsk-compress is refused",
    "RecipeSpec.name": "names the run directory (runs/<name>-<time>) and the report",
    "StageConfig.stage": "which stage this is (the key that selects this table)",
    "RecipeSpec.description": "free text, shown by `dsk-compress recipes`",
    "RecipeSpec.seed": "seed of the student initialisation, the training data order and every baseline",
    "RecipeSpec.teacher": "the model to compress and the KD teacher",
    "RecipeSpec.student": "the model that is trained, pruned, quantized and shipped",
    "RecipeSpec.task": "data and metric; a torch task needs no `name`",
    "RecipeSpec.stages": "the chain, in the order distill -> prune -> qat -> export -> bench (each optional, bench needs export)",
    "RecipeSpec.logit_cache": "cache the teacher's top-k logits on disk for every KD stage",
    "RecipeSpec.distributed": "how a torchrun job holds the teacher",
    "RecipeSpec.report": "what the report may recommend",
    "StudentSpec.from_teacher": "cut a dense student from the teacher (layers, width, FFN init)",
    "StudentSpec.zoo": "a built-in zoo model as the student",
    "StudentSpec.hf": "a local Hugging Face model directory as the student (dense, or MoE for expert pruning)",
    "TaskSpec.name": "the built-in byte-level code task",
    "TaskSpec.seq_len": "bytes per training and validation window",
    "TaskSpec.eval_sequences": "validation windows scored for accuracy and bits per byte",
    "TextTaskSpec.name": "your own text",
    "TextTaskSpec.text_field": "JSONL key that holds the text",
    "TextTaskSpec.seq_len": "tokens per training and validation window",
    "TextTaskSpec.eval_sequences": "validation windows scored for token accuracy and perplexity",
    "TorchTaskSpec.name": "your own task (may be left out when `torch` is given)",
    "_TrainSettings.batch_size": "global batch in sequences (under torchrun it is split across ranks and must divide by their number)",
    "_TrainSettings.lr": "peak learning rate (AdamW)",
    "_TrainSettings.warmup": "linear warm-up steps (at most a fifth of the steps)",
    "QATConfig.weight_bits": "weight quantizer bits",
    "QATConfig.activation_bits": "activation quantizer bits",
    "ExportConfig.opset": "ONNX opset",
    "ExportConfig.optimization": "ONNX Runtime offline optimization level of the shipped graphs (extended is portable across CPUs)",
    "BenchStageConfig.warmup": "untimed runs before timing",
    "BenchStageConfig.runs": "timed runs per model",
    "BenchStageConfig.threads": "ONNX Runtime threads (default: the device profile's)",
    "LogitCacheSpec.enabled": "write the teacher's top-k logits once and read them in every KD stage",
}

# Examples per model, each a YAML mapping validated against the model when this script runs. Between
# them they use every field of the model (the test checks that too).
EXAMPLES: dict[str, list[str]] = {
    "RecipeSpec": [
        """\
version: 1
name: my-recipe
description: distill, prune, quantize and benchmark
seed: 0
threads: 2
teacher: {zoo: code-lm-moe}
student: {from_teacher: {layers: [0, 2, 4, 5], intermediate_size: 768}}
task: {name: code-lm, seq_len: 256}
stages:
  - {stage: distill, steps: 450}
  - {stage: prune, ffn_ratio: 0.5}
  - {stage: qat, steps: 100}
  - {stage: export}
  - {stage: bench}
logit_cache: {enabled: false}
distributed: {teacher: replicate}
report: {max_accuracy_drop: 3.0}
keep_checkpoints: false""",
    ],
    "ModelSourceSpec": [
        "zoo: code-lm-moe",
        "hf: ./checkpoints/my-mixtral",
        "hf: ./checkpoints/Qwen3-30B-A3B\ndtype: bf16",
        'torch: "examples.digits.model:make_cnn"\ncheckpoint: examples/digits/cnn.safetensors',
    ],
    "StudentSpec": [
        "from_teacher: {keep_every: 2}",
        "zoo: code-lm-moe",
        "hf: ./checkpoints/my-dense-student",
        'torch: "examples.digits.model:make_cnn"\ncheckpoint: examples/digits/cnn.safetensors',
    ],
    "FromTeacherSpec": [
        "layers: [0, 2, 4, 5]\nintermediate_size: 768\nffn_init: merge\ncalibration_batches: 8",
        "keep_every: 2\nffn_init: top",
    ],
    "TaskSpec": ["name: code-lm\nseq_len: 256\neval_sequences: 128"],
    "TextTaskSpec": [
        "name: text-lm\ntrain: [data/train.jsonl]\neval: [data/valid.jsonl]\ntokenizer: ./checkpoints/my-mixtral\n"
        "text_field: text\nformat: auto\nencoding: utf-8\nseq_len: 512\neval_sequences: 64",
    ],
    "TorchTaskSpec": ['name: torch\ntorch: "examples.digits.task:make_task"\noptions: {}'],
    "_TrainSettings": [
        "steps: 450\nbatch_size: 16\nlr: 2.0e-3\nwarmup: 20\ntemperature: 1.0\nkd_weight: 0.8\nreverse_kl: 0.1\n"
        "eval_every: 50\nearly_stop_patience: 3\nprecision: auto",
    ],
    "DistillConfig": [
        "stage: distill\nsteps: 450\nbaselines: [nokd, random-init, random-init-nokd]",
        "stage: distill\nhidden_mse: 0.5\nhidden_pairs: [[0, 1], [3, 5]]",
    ],
    "PruneConfig": [
        "stage: prune\nffn_ratio: 0.25\nhead_ratio: 0.5\nimportance: activation\ncalibration_batches: 8\n"
        "iterations: 2\nround_to: 8\nsteps: 100\ntimeout_s: 300\nbaselines: [oneshot]",
        "stage: prune\nlayers_removed: 1",
        "stage: prune\ndepth_ratio: 0.25",
        "stage: prune\nexpert_ratio: 0.5",
        "stage: prune\nchannel_ratio: 0.5",
        "stage: prune\ntarget: {params: 0.6, structures: [ffn, heads]}",
    ],
    "PruneTargetSpec": [
        "params: 0.5",
        "macs: 0.5\nstructures: [ffn, heads, layers]\nmax_ratio: 0.8",
        "latency_ms: 8\ndevice: host-cpu\nstep: 0.1\nruns: 20\nwarmup: 3",
    ],
    "QATConfig": [
        "stage: qat\nsteps: 100\nlr: 2.0e-4\nweight_bits: 8\nactivation_bits: 8\navx2_safe: true\n"
        "activations: symmetric\nobserver_steps: 20\nshare_input_quantizers: true\nembedding_bits: 8\n"
        "skip: [lm_head]   # keep the LM head float (default: int8 like every Linear)",
        "stage: qat\nsteps: 100\nprecisions: [int8, int4]   # one QAT student per precision, from the same float student\n"
        "int4: {block_size: 32, scale_init: mse, head_bits: 8, embedding_bits: 8}",
    ],
    "Int4QATSettings": ["block_size: 32\nscale_init: mse\nhead_bits: 8\nembedding_bits: 8\nsteps: 200"],
    "ExportConfig": [
        "stage: export\nopset: 17\noptimization: extended\nparity_atol: 1.0e-3\nqdq_min_sqnr_db: 30\nptq_baselines: true\n"
        "ptq_calibration_batches: 16\nprecisions: [fp32, fp16, int8]\nfp16_max_rel_err: 0.01\nkv_cache: true",
        "stage: export\ndevice: jetson-orin-nano\ntensorrt: {workspace_gb: 1, max_batch: 8, opt_batch: 1}",
        "stage: export\nteacher: torch   # a teacher ONNX cannot export: measured in PyTorch eager, no speed-up against it",
    ],
    "TensorRTBuildSpec": ["build_engine: true\nworkspace_gb: 2\nmax_batch: 8\nopt_batch: 1\nmax_seq_len: 512"],
    "BenchStageConfig": [
        "stage: bench\ndevice: host-cpu\nbatch_size: 1\nthroughput_batches: [8, 64]\nwarmup: 5\nruns: 30\nrounds: 3\nthreads: 2"
    ],
    "LogitCacheSpec": ["enabled: true\ntop_k: 32"],
    "DistributedSpec": ["teacher: fsdp"],
    "ReportSpec": ["max_accuracy_drop: 3.0"],
}


def _schema():
    from dsk_compress.recipes import schema

    return schema


# ---- rendering of types, defaults and ranges --------------------------------------------------------


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _strip_annotated(tp: Any) -> tuple[Any, list]:
    meta: list = []
    while typing.get_origin(tp) is typing.Annotated:
        tp, *extra = typing.get_args(tp)
        meta.extend(extra)
    return tp, meta


def _union_args(tp: Any) -> list | None:
    if typing.get_origin(tp) in (Union, types.UnionType):
        return list(typing.get_args(tp))
    return None


def _flow(v: Any) -> str:
    """A value as compact YAML flow style: ``[fp32, int8]``, ``{enabled: false, top_k: 32}``, ``null``."""
    if isinstance(v, BaseModel):
        v = v.model_dump()
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_flow(x)}" for k, x in v.items()) + "}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_flow(x) for x in v) + "]"
    if v == "":
        return '""'
    return yaml.safe_dump(v, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


class Ref:
    """A nested model's table: its class, heading and anchor."""

    def __init__(self, cls: type[BaseModel], path: str, variant: str = "") -> None:
        self.cls, self.path, self.variant = cls, path, variant
        self.anchor = "field-" + "".join(c if c.isalnum() else "-" for c in (path + ("-" + variant if variant else "")).lower()).strip("-")
        while "--" in self.anchor:
            self.anchor = self.anchor.replace("--", "-")

    @property
    def title(self) -> str:
        return (f"`{self.path}`" if self.path else "Top level") + (f" ({self.variant})" if self.variant else "")

    def link(self) -> str:
        return f"[{self.title}](#{self.anchor})"


def _discriminator(cls: type[BaseModel], key: str) -> str:
    """The tag value of one member of a discriminated union (``text-lm`` for ``name: Literal["text-lm"]``)."""
    return str(typing.get_args(_strip_annotated(cls.model_fields[key].annotation)[0])[0])


def _type(tp: Any, path: str, nested: list[Ref], disc: str | None = None) -> tuple[str, str]:
    """``(type, choices)`` of annotation ``tp`` at ``path``; nested models are appended to ``nested``."""
    tp, meta = _strip_annotated(tp)
    for m in meta:
        disc = getattr(m, "discriminator", None) or disc
    args = _union_args(tp)
    if args is not None:
        opts = [a for a in args if a is not type(None)]
        suffix = " or null" if len(opts) < len(args) else ""
        if all(_is_model(_strip_annotated(a)[0]) for a in opts) and len(opts) > 1:
            refs = [Ref(a, path, f"{disc}: {_discriminator(a, disc)}" if disc else a.__name__) for a in opts]
            nested.extend(refs)
            return "mapping, one of " + ", ".join(r.link() for r in refs) + suffix, ""
        if len(opts) == 1:
            t, c = _type(opts[0], path, nested, disc)
            return t + suffix, c
        parts = [_type(a, path, nested, disc) for a in opts]
        return " or ".join(p[0] for p in parts) + suffix, ", ".join(p[1] for p in parts if p[1])
    origin = typing.get_origin(tp)
    if origin is Literal:
        vals = typing.get_args(tp)
        kind = {str: "string", int: "int", bool: "bool", float: "float"}.get(type(vals[0]), type(vals[0]).__name__)
        return kind, ", ".join(f"`{_flow(v)}`" for v in vals)
    if origin is list:
        (item,) = typing.get_args(tp)
        t, c = _type(item, f"{path}.N", nested, disc)
        return f"list of {t}", (f"each one of {c}" if c else "")
    if origin is tuple:
        return "[" + ", ".join(_type(a, path, nested)[0] for a in typing.get_args(tp)) + "]", ""
    if origin is dict:
        return "mapping", ""
    if _is_model(tp):
        ref = Ref(tp, path)
        nested.append(ref)
        return f"mapping, see {ref.link()}", ""
    if tp is Any:
        return "any", ""
    return {str: "string", int: "int", float: "float", bool: "bool"}.get(tp, getattr(tp, "__name__", str(tp))), ""


def _range(meta: list) -> str:
    out = []
    for m in meta:
        for cls, op, attr in ((Ge, ">=", "ge"), (Gt, ">", "gt"), (Le, "<=", "le"), (Lt, "<", "lt")):
            if isinstance(m, cls):
                out.append(f"{op} {_flow(getattr(m, attr))}")
        if isinstance(m, MinLen):
            out.append(f"at least {m.min_length} item" + ("s" if m.min_length != 1 else ""))
        if isinstance(m, MaxLen):
            out.append(f"at most {m.max_length} items")
    return ", ".join(out)


def _default(field) -> str:
    if field.is_required():
        return "**required**"
    if field.default is PydanticUndefined and field.default_factory is None:
        return "**required**"
    return f"`{_flow(field.get_default(call_default_factory=True))}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def describe(cls: type[BaseModel], name: str) -> str:
    """Field ``name``'s description: the schema's (an override without one keeps its base's), else ``FALLBACK``."""
    bases = [b for b in cls.__mro__ if _is_model(b) and name in b.model_fields]
    for b in bases:
        if b.model_fields[name].description:
            return b.model_fields[name].description
    return next((FALLBACK[f"{b.__name__}.{name}"] for b in bases if f"{b.__name__}.{name}" in FALLBACK), "")


def rows(cls: type[BaseModel], path: str, nested: list[Ref]) -> list[tuple[str, str, str, str, str]]:
    """One ``(field, type, default, range / choices, description)`` row per field of ``cls``."""
    out = []
    for name, f in cls.model_fields.items():
        t, choices = _type(f.annotation, f"{path}.{name}" if path else name, nested, f.discriminator)
        rng = _range(f.metadata)
        out.append((f"`{name}`", t, _default(f), "; ".join(x for x in (rng, choices) if x), describe(cls, name)))
    return out


def _table(rows_: list[tuple]) -> list[str]:
    lines = ["| field | type | default | range / choices | description |", "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(_cell(c) for c in r) + " |" for r in rows_]
    return lines


def check_examples(cls: type[BaseModel], name: str) -> list[str]:
    """The examples of ``name``, each validated against ``cls`` (a ValueError names the broken one)."""
    from pydantic import ValidationError

    out = []
    for ex in EXAMPLES.get(name, []):
        try:
            cls.model_validate(yaml.safe_load(ex))
        except ValidationError as e:
            raise ValueError(f"example of {name} in {__file__} does not validate:\n{ex}\n{e}") from None
        out.append(ex)
    return out


def shared_bases(stage_classes: list[type[BaseModel]]) -> list[type[BaseModel]]:
    """Field groups several stage configs inherit (the training settings), other than the stage base itself."""
    schema = _schema()
    found: list[type[BaseModel]] = []
    for cls in stage_classes:
        for base in cls.__mro__[1:]:
            if (
                _is_model(base)
                and base not in (BaseModel, schema.StageConfig)
                and base.model_fields
                and not issubclass(schema.StageConfig, base)
                and base not in found
            ):
                found.append(base)
    return found


def _section(ref: Ref, nested: list[Ref], groups: dict, intro: str = "") -> list[str]:
    """Heading, docstring, table and examples of one model; fields of ``groups`` are listed under their own heading."""
    cls = ref.cls
    doc = (cls.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
    own = rows(cls, ref.path, nested)
    lines = [f'<a id="{ref.anchor}"></a>', "", f"### {ref.title}", ""]
    lines += [x + "\n" for x in (doc, intro) if x]
    inherited = [g for g in groups if issubclass(cls, g)]
    if inherited:
        base_rows = {r[0]: r for g in inherited for r in rows(g, ref.path, [])}
        own = [r for r in own if base_rows.get(r[0]) != r]
        links = ", ".join(groups[g].link() for g in inherited)
        lines += [f"Also takes every field of {links}; a row below that repeats one of them gives this stage's own default.", ""]
    lines += _table(own)
    examples = check_examples(cls, cls.__name__)
    if examples:
        lines += ["", "Example" + ("s" if len(examples) > 1 else "") + ":", "", "```yaml"]
        lines += [("# or\n" if i else "") + ex for i, ex in enumerate(examples)]
        lines += ["```"]
    return lines + [""]


def _sections() -> list[tuple[Ref, dict, str]]:
    """``(ref, groups, intro)`` per table, in document order: walked from ``RecipeSpec``, nested models after their
    parent, the shared training settings before the first stage that takes them."""
    schema = _schema()
    top = Ref(schema.RecipeSpec, "")
    top.anchor = "field-top-level"
    stage_ann = _strip_annotated(typing.get_args(schema.RecipeSpec.model_fields["stages"].annotation)[0])[0]
    stage_union = _union_args(stage_ann) or [stage_ann]
    groups = {g: Ref(g, "stages.N", "training settings") for g in shared_bases(stage_union)}
    out: list[tuple[Ref, dict, str]] = []
    todo: list[Ref] = [top]
    done: set[tuple] = set()
    while todo:
        ref = todo.pop(0)
        if (ref.cls, ref.path, ref.variant) in done:
            continue
        done.add((ref.cls, ref.path, ref.variant))
        for g, gref in groups.items():
            if issubclass(ref.cls, g) and (g, gref.path, gref.variant) not in done:
                done.add((g, gref.path, gref.variant))
                users = ", ".join(f"`{_discriminator(c, 'stage')}`" for c in stage_union if issubclass(c, g))
                out.append((gref, {}, f"Shared by the {users} stages."))
        out.append((ref, groups, ""))
        nested: list[Ref] = []
        rows(ref.cls, ref.path, nested)
        todo[0:0] = nested  # a nested model's table follows its parent's
    return out


def models() -> list[type[BaseModel]]:
    """Every model that has a table, in document order."""
    return list(dict.fromkeys(ref.cls for ref, _, _ in _sections()))


def generate() -> str:
    """The markdown between the markers in docs/recipes.md."""
    out: list[str] = ["<!-- generated by docs/gen_recipe_reference.py from recipes/schema.py; do not edit by hand -->", ""]
    for ref, groups, intro in _sections():
        out += _section(ref, [], groups, intro)
    return "\n".join(out).rstrip() + "\n"


def replace_section(doc: str, generated: str) -> str:
    """``doc`` with the text between the markers replaced by ``generated``."""
    head, sep, rest = doc.partition(BEGIN)
    _, sep2, tail = rest.partition(END)
    if not sep or not sep2:
        raise SystemExit(f"{DOC} lacks the markers {BEGIN} ... {END}")
    return f"{head}{BEGIN}\n{generated}{END}{tail}"


def current_section(doc: str) -> str:
    """The text between the markers of ``doc`` (without the marker lines)."""
    return doc.partition(BEGIN)[2].partition(END)[0].removeprefix("\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help=f"replace the generated section of {DOC}")
    args = ap.parse_args()
    text = generate()
    if args.write:
        DOC.write_text(replace_section(DOC.read_text(), text))
        print(f"wrote {DOC}", file=sys.stderr)
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    main()
