"""The documentation cannot rot: every ``dsk-compress`` line in README.md and docs/*.md runs, every YAML
snippet validates, and the recipe field reference equals what docs/gen_recipe_reference.py generates.

Command lines (in shell code blocks and inline code spans) run in-process with Typer's CliRunner:
``recipe`` lines whose recipe exists (a bundled name or a file) with ``--dry-run`` (the recipe,
its ``--set`` overrides and every option are validated, nothing runs), every other line with
``--help`` (Click still rejects an option that does not exist, so a stale option fails).
"""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from dsk_compress.cli.main import app

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_FENCES = ("", "bash", "sh", "shell", "console")
PLACEHOLDER = re.compile(r"^[A-Z][A-Z0-9_]*$|\.\.\.|<[^>]*>")  # RUN_DIR, NAME, ..., runs/<recipe>-<time>
CLI_ENTRY = ("dsk-compress", "dsk_compress.cli.main")


def _gen():
    spec = importlib.util.spec_from_file_location("gen_recipe_reference", ROOT / "docs" / "gen_recipe_reference.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _blocks(path: Path):
    """``(first line number, fence language, text)`` of every fenced code block, and ``(n, None, line)`` of the other lines."""
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^\s*(```|~~~)\s*([\w-]*)", lines[i])
        if not m:
            yield i + 1, None, lines[i]
            i += 1
            continue
        start, lang, body = i + 1, m.group(2).lower(), []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(m.group(1)):
            body.append(lines[i])
            i += 1
        i += 1
        yield start + 1, lang, "\n".join(body)


def _cli_args(text: str) -> list[str] | None:
    """The arguments after ``dsk-compress`` (or ``-m dsk_compress.cli.main`` under torchrun), or None if ``text`` is no CLI call."""
    try:
        tokens = shlex.split(text, comments=True)
    except ValueError:
        return None
    if not tokens or tokens[0] not in ("dsk-compress", "torchrun"):
        return None
    idx = next((i for i, t in enumerate(tokens) if t in CLI_ENTRY), None)
    return None if idx is None else tokens[idx + 1:]


def doc_commands() -> list[tuple[str, list[str]]]:
    """``("file:line: command", args)`` for every dsk-compress command line in README.md and docs/*.md."""
    found = []
    for path in DOCS:
        rel = path.relative_to(ROOT)
        for n, lang, text in _blocks(path):
            if lang is None:  # prose: inline code spans
                candidates = [(n, span) for span in re.findall(r"`([^`]+)`", text)]
            elif lang in SHELL_FENCES:  # shell block: one command per line, backslash continuations joined
                candidates, lines, k = [], text.splitlines(), 0
                while k < len(lines):
                    first, line = n + k, lines[k].strip().removeprefix("$ ")
                    while line.endswith("\\") and k + 1 < len(lines):
                        k += 1
                        line = line[:-1].rstrip() + " " + lines[k].strip()
                    candidates.append((first, line))
                    k += 1
            else:
                continue
            for line_no, cmd in candidates:
                args = _cli_args(cmd)
                if args is not None:
                    found.append((f"{rel}:{line_no}: {cmd}", args))
    return found


def _invocation(args: list[str]) -> list[str]:
    """``args`` with ``--dry-run`` for a recipe that exists, else with ``--help``."""
    from dsk_compress.recipes import bundled_recipes

    if args == ["--version"]:
        return args
    placeholder = any(PLACEHOLDER.search(a) for a in args)
    if args[:1] == ["recipe"] and len(args) > 1 and not placeholder and (args[1] in bundled_recipes() or (ROOT / args[1]).is_file()):
        return args if "--dry-run" in args else [*args, "--dry-run"]
    return [*args, "--help"]


COMMANDS = doc_commands()


def test_docs_have_command_lines():
    assert len(COMMANDS) >= 20, [c for c, _ in COMMANDS]
    assert any(a[:1] == ["recipe"] and "--dry-run" in _invocation(a) and "--set" in a for _, a in COMMANDS)


@pytest.fixture(scope="module")
def digits_checkpoint(tmp_path_factory) -> Path:
    """An (untrained) digits CNN checkpoint: the recipe's own, examples/digits/cnn.safetensors, exists only after
    ``python -m examples.digits.train``, and ``--dry-run`` checks that a checkpoint exists."""
    import sys

    sys.path.insert(0, str(ROOT))
    from dsk_compress.io import save_state_dict
    from examples.digits.model import make_cnn

    return save_state_dict(make_cnn().state_dict(), tmp_path_factory.mktemp("digits") / "cnn.safetensors")


@pytest.mark.parametrize("args", [a for _, a in COMMANDS], ids=[c for c, _ in COMMANDS])
def test_doc_command_runs(args, monkeypatch, request):
    monkeypatch.chdir(ROOT)  # recipe paths and `torch:` factories in the docs are relative to the repository root
    inv = _invocation(args)
    if "examples/digits/recipe.yaml" in inv and "--dry-run" in inv and not (ROOT / "examples/digits/cnn.safetensors").is_file():
        ck = request.getfixturevalue("digits_checkpoint")
        inv = [*inv, "--set", f"teacher.checkpoint={ck}", "--set", f"student.checkpoint={ck}"]
    res = CliRunner().invoke(app, inv)
    assert res.exit_code == 0, f"`dsk-compress {shlex.join(inv)}` exited {res.exit_code}:\n{res.output}\n{res.exception!r}"


def test_recipe_reference_is_generated_from_the_schema():
    gen = _gen()
    doc = gen.DOC.read_text()
    assert gen.BEGIN in doc and gen.END in doc
    assert gen.current_section(doc) == gen.generate(), (
        "docs/recipes.md's field reference differs from recipes/schema.py: run `.venv/bin/python docs/gen_recipe_reference.py --write`")


def test_recipe_reference_examples_use_every_field():
    gen = _gen()
    missing = {}
    for cls in gen.models():
        shown = set()
        for base in cls.__mro__:
            for ex in gen.EXAMPLES.get(base.__name__, []):
                shown |= set(yaml.safe_load(ex))
        gone = set(cls.model_fields) - shown
        if gone:
            missing[cls.__name__] = sorted(gone)
    assert not missing, f"add examples for these fields to EXAMPLES in docs/gen_recipe_reference.py, then run it with --write: {missing}"


def test_recipe_reference_fallbacks_name_existing_fields():
    gen = _gen()
    by_name = {c.__name__: c for m in gen.models() for c in m.__mro__ if hasattr(c, "model_fields")}
    stale = [k for k in gen.FALLBACK if k.split(".")[0] not in by_name or k.split(".")[1] not in by_name[k.split(".")[0]].model_fields]
    assert not stale, f"remove these from FALLBACK in docs/gen_recipe_reference.py: {stale}"


def _yaml_snippets() -> list[tuple[str, str]]:
    gen = _gen()
    out = []
    for path in DOCS:
        text = path.read_text()
        generated = gen.current_section(text) if gen.BEGIN in text else ""
        for n, lang, body in _blocks(path):
            if lang == "yaml" and not (generated and body in generated):
                out.append((f"{path.relative_to(ROOT)}:{n}", body))
    return out


SNIPPETS = _yaml_snippets()
_BASE = {"name": "doc-snippet", "teacher": {"zoo": "code-lm-moe"}, "student": {"from_teacher": {}}, "stages": [{"stage": "export"}]}


@pytest.mark.parametrize("body", [b for _, b in SNIPPETS], ids=[w for w, _ in SNIPPETS])
def test_doc_yaml_snippet_validates(body, monkeypatch):
    """A list is a list of stages; a mapping is a recipe, or the part of one it shows (merged into a minimal recipe)."""
    from pydantic import TypeAdapter

    from dsk_compress.recipes.schema import AnyStage, RecipeSpec

    monkeypatch.chdir(ROOT)
    data = yaml.safe_load(body)
    if isinstance(data, list):
        for item in data:
            TypeAdapter(AnyStage).validate_python(item)
    else:
        assert isinstance(data, dict), body
        RecipeSpec.model_validate({**_BASE, **data})


def test_benchmarks_doc_names_every_result_and_script():
    """docs/benchmarks.md says how each result in benchmarks/results/ was measured and names every script."""
    doc = (ROOT / "docs" / "benchmarks.md").read_text()
    files = [*sorted((ROOT / "benchmarks" / "results").glob("*.json")), *sorted((ROOT / "benchmarks").glob("*.py"))]
    missing = [str(p.relative_to(ROOT)) for p in files if f"`{p.name}`" not in doc and f"{p.relative_to(ROOT)}" not in doc]
    assert not missing, f"describe these in docs/benchmarks.md (what, how it was measured, how to reproduce): {missing}"
