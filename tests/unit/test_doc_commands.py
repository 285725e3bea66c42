"""The documentation cannot rot: every ``dsk-compress`` and ``python`` line in README.md and docs/*.md runs on a fresh
clone as written, every YAML snippet validates, links between the pages land on a heading, the README lists every
page, the pages read as documentation (no clock times or issue numbers), and the recipe field reference equals what
docs/gen_recipe_reference.py generates.

Command lines (in shell code blocks and inline code spans) run in-process with Typer's CliRunner:
``recipe`` lines whose recipe exists (a bundled name or a file) with ``--dry-run`` (the recipe,
its ``--set`` overrides and every option are validated, nothing runs), every other line with
``--help`` (Click still rejects an option that does not exist, so a stale option fails). ``python`` lines that
run a script or module of this repository run it with ``--help`` and check that it knows every option the line
uses (a bundle's ``run.py``: every option must be one that ``export/bundle_run.py`` defines).
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
    return None if idx is None else tokens[idx + 1 :]


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


def _tracked_files() -> set[str] | None:
    """The files a fresh clone has (``git ls-files``), or None outside a git checkout."""
    import shutil
    import subprocess

    if shutil.which("git") is None or not (ROOT / ".git").exists():
        return None
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.decode()
    return set(filter(None, out.split("\0")))


def test_doc_recipes_need_only_files_a_fresh_clone_has():
    """A recipe file a doc command runs, and every file it names (checkpoints, factories' modules), is tracked: the
    digits example's --dry-run used to fail until `python -m examples.digits.train` had written its checkpoint."""
    tracked = _tracked_files()
    if tracked is None:
        pytest.skip("not a git checkout")
    recipes = {a[1] for _, a in COMMANDS if a[:1] == ["recipe"] and len(a) > 1 and (ROOT / a[1]).is_file()}
    assert "examples/digits/recipe.yaml" in recipes
    for rel in sorted(recipes):
        assert rel in tracked, rel
        data = yaml.safe_load((ROOT / rel).read_text())
        for role in ("teacher", "student"):
            src = data.get(role) or {}
            if src.get("checkpoint"):
                assert src["checkpoint"] in tracked, f"{rel}: {role}.checkpoint {src['checkpoint']} is not in the repository"
            if src.get("torch"):
                module = src["torch"].split(":")[0].replace(".", "/") + ".py"
                assert module in tracked, f"{rel}: {role}.torch {src['torch']}"


@pytest.mark.parametrize("args", [a for _, a in COMMANDS], ids=[c for c, _ in COMMANDS])
def test_doc_command_runs(args, monkeypatch):
    monkeypatch.chdir(ROOT)  # recipe paths and `torch:` factories in the docs are relative to the repository root
    inv = _invocation(args)
    res = CliRunner().invoke(app, inv)
    assert res.exit_code == 0, f"`dsk-compress {shlex.join(inv)}` exited {res.exit_code}:\n{res.output}\n{res.exception!r}"


def test_recipe_reference_is_generated_from_the_schema():
    gen = _gen()
    doc = gen.DOC.read_text()
    assert gen.BEGIN in doc and gen.END in doc
    assert gen.current_section(doc) == gen.generate(), (
        "docs/recipes.md's field reference differs from recipes/schema.py: run `.venv/bin/python docs/gen_recipe_reference.py --write`"
    )


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


# ----------------------------------------------------------------------------- python lines: scripts and modules


PYTHONS = ("python", "python3", ".venv/bin/python")


def python_commands() -> list[tuple[str, list[str]]]:
    """``("file:line: command", [script-or--m, target, args...])`` for every line in a shell block that runs python
    on a script or module of this repository (or a bundle's run.py)."""
    found = []
    for path in DOCS:
        rel = path.relative_to(ROOT)
        for n, lang, text in _blocks(path):
            if lang not in SHELL_FENCES or lang is None:
                continue
            lines, k = text.splitlines(), 0
            while k < len(lines):
                first, line = n + k, lines[k].strip().removeprefix("$ ")
                while line.endswith("\\") and k + 1 < len(lines):
                    k += 1
                    line = line[:-1].rstrip() + " " + lines[k].strip()
                k += 1
                try:
                    tokens = shlex.split(line, comments=True)
                except ValueError:
                    continue
                if not tokens or tokens[0] not in PYTHONS or len(tokens) < 2:
                    continue
                if tokens[1] == "-m" and len(tokens) > 2 and tokens[2].split(".")[0] in ("examples", "dsk_compress", "benchmarks"):
                    found.append((f"{rel}:{first}: {line}", tokens[1:]))
                elif tokens[1].endswith(".py") and ((ROOT / tokens[1]).is_file() or tokens[1] == "run.py"):
                    found.append((f"{rel}:{first}: {line}", tokens[1:]))
    return found


PY_COMMANDS = python_commands()


def _options(args: list[str]) -> list[str]:
    return sorted({re.sub(r"[\[\]]", "", a).split("=")[0] for a in args if re.sub(r"[\[\]]", "", a).startswith("--")})


def test_docs_have_python_lines_including_the_digits_example():
    assert any(a[:2] == ["-m", "examples.digits.train"] for _, a in PY_COMMANDS), [c for c, _ in PY_COMMANDS]
    assert sum(a[0].startswith("benchmarks/") for _, a in PY_COMMANDS) >= 8


@pytest.mark.parametrize("args", [a for _, a in PY_COMMANDS], ids=[c for c, _ in PY_COMMANDS])
def test_doc_python_line_knows_its_options(args):
    import subprocess
    import sys

    if args[0] == "run.py":  # runs inside a deploy bundle; its source is export/bundle_run.py
        source = (ROOT / "export" / "bundle_run.py").read_text()
        missing = [o for o in _options(args[1:]) if f'"{o}"' not in source]
        assert not missing, f"run.py has no option {missing}"
        return
    target = args[:2] if args[0] == "-m" else args[:1]
    source = ROOT / (args[1].replace(".", "/") + ".py" if args[0] == "-m" else args[0])
    if source.is_file() and "argparse" not in source.read_text():  # no --help to ask: it would just run
        assert not _options(args[len(target) :]), f"{source.relative_to(ROOT)} parses no options"
        return
    res = subprocess.run([sys.executable, *target, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, f"`python {' '.join(target)} --help` exited {res.returncode}: {res.stderr[-2000:]}"
    missing = [o for o in _options(args[len(target) :]) if o not in res.stdout]
    assert not missing, f"`python {' '.join(target)}` has no option {missing}:\n{res.stdout}"


# ----------------------------------------------------------------------------- pages: links, index, no lab notebook


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = path.read_text()
    heads = {_slug(m) for m in re.findall(r"^#{1,6} (.+)$", "\n".join(t for _, lang, t in _blocks(path) if lang is None), re.M)}
    return heads | set(re.findall(r'<a id="([^"]+)"', text))


def test_links_between_pages_land_on_a_heading():
    broken = []
    for path in DOCS:
        for n, lang, text in _blocks(path):
            if lang is not None:
                continue
            for target, anchor in re.findall(r"\]\(([^)#\s]*\.md)?#([^)\s]+)\)", text):
                dest = (path.parent / target).resolve() if target else path
                if not dest.is_file() or anchor not in _anchors(dest):
                    broken.append(f"{path.relative_to(ROOT)}:{n}: {target}#{anchor}")
    assert not broken, broken


def test_readme_lists_every_docs_page():
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Documentation") :]
    missing = [p.name for p in sorted((ROOT / "docs").glob("*.md")) if f"](docs/{p.name})" not in table]
    assert not missing, f"add these pages to the README's documentation table: {missing}"


NOTEBOOK = re.compile(r"[0-9]{2}:[0-9]{2} UTC|\bissues? #?[0-9]+\b|\bthe [0-9]{4}-[0-9]{2}-[0-9]{2} run\b|\brun above\b", re.I)


@pytest.mark.parametrize("path", DOCS, ids=[str(p.relative_to(ROOT)) for p in DOCS])
def test_docs_read_as_documentation_not_a_lab_notebook(path):
    """No clock times, issue numbers or "the <date> run above": measured figures live in docs/benchmarks.md (machine and
    date once per table) and benchmarks/results/."""
    hits = [f"{n}: {line.strip()[:100]}" for n, line in enumerate(path.read_text().splitlines(), 1) if NOTEBOOK.search(line)]
    assert not hits, hits


def test_benchmark_tables_name_their_date():
    """Every section of docs/benchmarks.md with a table of figures says when (and the intro where) it was measured."""
    doc = (ROOT / "docs" / "benchmarks.md").read_text()
    sections = re.split(r"^## ", doc, flags=re.M)[1:]
    undated = [
        s.splitlines()[0] for s in sections if re.search(r"^\|.*\|$", s, re.M) and not re.search(r"\b20[0-9]{2}-[0-9]{2}-[0-9]{2}\b", s)
    ]
    assert not undated, undated
