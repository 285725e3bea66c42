"""Recipes: load + validate YAML (bundled name or path), apply ``--set`` overrides, list bundled ones."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dsk_compress.errors import RecipeError

RECIPES_DIR = Path(__file__).parent


def bundled_recipes() -> dict[str, Path]:
    return {p.stem: p for p in sorted(RECIPES_DIR.glob("*.yaml"))}


def recipe_descriptions() -> list[tuple[str, str]]:
    import yaml

    out = []
    for name, p in bundled_recipes().items():
        data = yaml.safe_load(p.read_text()) or {}
        out.append((name, str(data.get("description", "")).strip().splitlines()[0] if data.get("description") else ""))
    return out


def _read_raw(name_or_path: str) -> dict:
    import yaml

    from dsk_compress.safe_yaml import MAX_BYTES, YAMLLimitError, safe_load

    p = Path(name_or_path)
    if not p.suffix and name_or_path in bundled_recipes():
        p = bundled_recipes()[name_or_path]
    elif not p.is_file():
        names = ", ".join(bundled_recipes())
        raise RecipeError(f"no recipe named or found at {name_or_path!r}", hint=f"bundled recipes: {names}; or give a path to a .yaml file")
    try:
        if p.stat().st_size > MAX_BYTES:
            raise YAMLLimitError(f"{p.stat().st_size:,} bytes, more than the {MAX_BYTES:,} a recipe may have")
        data = safe_load(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError(f"cannot read {p}: {e}", hint="give a readable UTF-8 YAML file") from None
    except YAMLLimitError as e:
        raise RecipeError(f"{p} is refused: {e}", hint="a recipe is a small YAML mapping; remove the deep nesting or the aliases") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise RecipeError(f"{p} is not valid YAML{where}", hint="fix the syntax") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{p} must contain a mapping at the top level")
    return data


def apply_override(data: dict, assignment: str) -> None:
    """Apply one ``dotted.key=value`` override in place; the value is parsed as YAML (``0.4``, ``true``, ``[1, 2]``)."""
    import yaml

    from dsk_compress.safe_yaml import YAMLLimitError, safe_load

    if "=" not in assignment:
        raise RecipeError(f"bad --set {assignment!r}", hint="use --set key.path=value, e.g. --set stages.1.ffn_ratio=0.4")
    key, _, raw = assignment.partition("=")
    parts = key.strip().split(".")
    if len(parts) > 16 or not all(parts):
        raise RecipeError(f"bad --set key {key.strip()[:80]!r}", hint="use --set key.path=value, e.g. --set stages.1.ffn_ratio=0.4")
    try:
        value = safe_load(raw)
    except YAMLLimitError as e:
        raise RecipeError(f"--set {key.strip()}: the value is refused: {e}") from None
    except yaml.YAMLError:
        value = raw
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        node = _child(node, part, ".".join(parts[: i + 1]), create=True)
    last = parts[-1]
    if isinstance(node, list):
        idx = _index(node, last, key)
        node[idx] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise RecipeError(f"--set {key}: {'.'.join(parts[:-1])} is not a mapping or list")


def _index(node: list, part: str, path: str) -> int:
    try:
        idx = int(part)
    except ValueError:
        raise RecipeError(f"--set {path}: {part!r} is not a list index") from None
    if not -len(node) <= idx < len(node):
        raise RecipeError(f"--set {path}: index {idx} out of range (the list has {len(node)} items)")
    return idx


def _child(node: Any, part: str, path: str, create: bool) -> Any:
    if isinstance(node, list):
        return node[_index(node, part, path)]
    if isinstance(node, dict):
        if part not in node or node[part] is None:
            if not create:
                raise RecipeError(f"--set {path}: no such key")
            node[part] = {}
        return node[part]
    raise RecipeError(f"--set {path}: cannot descend into a {type(node).__name__}")


def format_validation_error(err) -> str:
    """One line per problem: ``stages.1.ffn_ratio: Input should be less than 1``."""
    from dsk_compress.recipes.base import STAGES

    stages = STAGES.order()  # the registered stages, in pipeline order
    lines = []
    for e in err.errors():
        loc = [str(x) for x in e["loc"]]
        # drop the discriminator tag pydantic inserts for unions (e.g. stages.1.prune.ratio)
        if len(loc) >= 3 and loc[0] == "stages" and loc[2] in stages:
            loc.pop(2)
        elif len(loc) >= 2 and loc[0] == "task" and loc[1] in ("code-lm", "text-lm", "torch"):
            loc.pop(1)
        where = ".".join(loc) or "recipe"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see `dsk-compress recipe NAME --dry-run` for valid fields)"
        elif e["type"] == "union_tag_invalid":
            # the error's input is the whole mapping; name only the bad tag
            tag = (e.get("ctx") or {}).get("tag", e.get("input"))
            if loc and loc[0] == "task":
                msg = f"unknown task {tag!r}; valid tasks: code-lm, text-lm, or {{torch: 'pkg.module:make_task'}}"
            else:
                msg = f"unknown stage {tag!r}; valid stages: {', '.join(stages)}"
        lines.append(f"{where}: {msg}")
    return "; ".join(lines)


def load_recipe(name_or_path: str, overrides: list[str] | None = None):
    """Load, override and validate a recipe.

    Args:
        name_or_path: a bundled recipe name (``quant-prune-distill``) or a path to a YAML file.
        overrides: ``key.path=value`` strings applied before validation.

    Returns:
        RecipeSpec: the validated recipe.

    Raises:
        RecipeError: with one line naming each bad field and how to fix it.
    """
    from pydantic import ValidationError

    from dsk_compress.recipes.schema import RecipeSpec

    data = _read_raw(name_or_path)
    for ov in overrides or []:
        apply_override(data, ov)
    try:
        spec = RecipeSpec.model_validate(data)
    except ValidationError as e:
        raise RecipeError(f"invalid recipe {name_or_path!r}: {format_validation_error(e)}") from None
    spec._origin = (str(name_or_path), tuple(overrides or ()))
    return spec
