"""Property: whatever recipe or ``--set`` a user types, ``dsk-compress recipe ... --dry-run`` ends in exactly one of
(exit 0 with a plan) or (exit 2 with one ``error:`` line) -- never a traceback, another exit code or a hang.

Recipes are generated as mutations of the two shipped ones (the bundled quant-prune-distill and
examples/digits/recipe.yaml): a field set to a value of the wrong type, out of range, extreme, NaN or
infinite, an unknown key, a removed key, a hostile name, a deep or aliased YAML document, corrupted
YAML text, or the same as ``--set`` overrides. They run through the console entry point in this process.

``--hypothesis-profile=campaign`` runs thousands of cases; with ``DSK_FUZZ_STATS=FILE`` the counts of
each outcome are written there (the figures in docs/recipes.md come from that). The ``slow`` test runs
a few generated recipes for real on a tiny model, for what only a run can reveal.
"""

from __future__ import annotations

import json
import math
import os
import string
from collections import Counter
from pathlib import Path

import pytest
import yaml
from conftest import run_main, tiny_llama_recipe
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[2]
COMMON = dict(deadline=10_000, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
OUTCOMES: Counter = Counter()


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, dict]:
    """The shipped recipes as data; the digits one points at an (untrained) checkpoint that exists."""
    import sys

    sys.path.insert(0, str(ROOT))
    from dsk_compress.io import save_state_dict
    from examples.digits.model import make_cnn

    ck = save_state_dict(make_cnn().state_dict(), tmp_path_factory.mktemp("ck") / "cnn.safetensors")
    digits = yaml.safe_load((ROOT / "examples" / "digits" / "recipe.yaml").read_text())
    digits["teacher"]["checkpoint"] = digits["student"]["checkpoint"] = str(ck)
    return {"bundled": yaml.safe_load((ROOT / "recipes" / "quant-prune-distill.yaml").read_text()), "digits": digits}


@pytest.fixture(scope="module", autouse=True)
def _stats():
    yield
    if os.environ.get("DSK_FUZZ_STATS"):
        Path(os.environ["DSK_FUZZ_STATS"]).write_text(json.dumps(dict(OUTCOMES), indent=2, sort_keys=True) + "\n")


# ---- values a user (or an attacker) might type ------------------------------------------------------------------------

EXTREME_NUMBERS = [0, -1, 1, 2**31, 2**32, 2**63, -(2**63), 10**30, 1e-300, 1e300, -0.0, 0.5, 1.0, 1e7, 1e10, math.nan, math.inf, -math.inf]
NASTY_TEXT = [
    "",
    " ",
    "..",
    "../../escape",
    "a/b",
    "a\\b",
    "x\ny",
    "bad\x00name",
    "nope",
    "host-cpu",
    "rpi5",
    "code-lm",
    "text-lm",
    "torch",
    "distill",
    "{",
    "[1, 2",
    "*alias",
    "&a",
    "!!python/object:os.system",
    "~",
    "null",
    "🙂",
    "é" * 200,
    "a" * 5000,
]

scalars = st.one_of(
    st.sampled_from(EXTREME_NUMBERS),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.none(),
    st.sampled_from(NASTY_TEXT),
    st.text(string.printable, max_size=20),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(string.ascii_lowercase + "_", max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)


def _paths(node, prefix=()):
    """Every key path in a recipe (dict keys and list indices)."""
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*prefix, i))


def _get(data, path):
    for p in path:
        data = data[p]
    return data


def _set(data, path, value, delete=False):
    node = data
    for p in path[:-1]:
        node = node[p]
    if delete:
        if isinstance(node, dict):
            node.pop(path[-1], None)
        elif len(node) > 1:
            node.pop(path[-1])
    else:
        node[path[-1]] = value


@st.composite
def mutated(draw, bases):
    """(recipe text, --set arguments, {path: number} set to plausible values) drawn from a shipped recipe."""
    import copy

    data = copy.deepcopy(bases[draw(st.sampled_from(sorted(bases)))])
    paths = [p for p in _paths(data) if p]
    sets: list[str] = []
    plausible: dict[tuple, float] = {}
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["set", "set", "delete", "unknown", "override", "override-raw", "plausible", "plausible"]))
        path = draw(st.sampled_from(paths))
        old = _get(data, path)
        # whatever this mutation touches no longer holds the plausible value set before
        plausible = {p: v for p, v in plausible.items() if p[: len(path)] != path and path[: len(p)] != p}
        if kind == "plausible" and isinstance(old, (int, float)) and not isinstance(old, bool) and math.isfinite(old):
            # a value near the shipped one, of its type: mostly accepted, and then it must reach the plan unchanged
            top = abs(old)
            new = draw(st.integers(0, 2 * int(top) + 2)) if isinstance(old, int) else draw(st.floats(0, min(2 * top, 1e6) + 1e-3))
            _set(data, path, new)
            plausible[path] = new
        elif kind in ("set", "plausible"):
            _set(data, path, draw(values))
        elif kind == "delete":
            _set(data, path, None, delete=True)
            plausible.clear()  # list items may have shifted
        elif kind == "unknown":
            parent = path if isinstance(_get(data, path), dict) else path[:-1]
            if isinstance(_get(data, parent), dict):
                _set(data, (*parent, draw(st.text(string.ascii_lowercase + "_.", min_size=1, max_size=12))), draw(values))
        else:
            key = ".".join(str(p) for p in path)
            if kind == "override":
                raw = yaml.safe_dump(draw(values), default_flow_style=True, width=10**6).strip()
                raw = raw.removesuffix("\n...").removesuffix("...").strip()
            else:
                raw = draw(st.text(string.printable, max_size=30))
            sets.append(f"{key}={raw}")
        paths = [p for p in _paths(data) if p] or paths
    text = yaml.safe_dump(data, allow_unicode=True, sort_keys=False)
    shape = draw(st.sampled_from(["plain"] * 6 + ["garble", "alias-bomb", "deep", "anchors"]))
    if shape == "garble":
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.text(string.printable, min_size=1, max_size=8)) + text[at:]
    elif shape == "alias-bomb":
        levels = draw(st.integers(3, 9))
        lines = [f"a0: &a0 [{', '.join(['lol'] * 9)}]"] + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels)]
        text = text + "\n".join(lines) + "\n"
    elif shape == "deep":
        depth = draw(st.sampled_from([10, 63, 65, 1000, 50_000]))
        text = text + "deep: " + "[" * depth + "]" * depth + "\n"
    elif shape == "anchors":
        text = text.replace("teacher:", "teacher: &t", 1) + "student_copy: *t\n"
    return text, sets, (plausible if shape == "plain" and not sets else {})


def check_outcome(code: int, out: str, err: str) -> str:
    """The outcome's name; fails the test on anything but a clean error or a valid plan."""
    assert "Traceback" not in out + err
    if code == 0:
        assert "memory:" in out and "1." not in err, (out, err)
        return "valid plan (exit 0)"
    assert code == 2, (code, out[-2000:], err[-2000:])
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    return "clean one-line error (exit 2)"


@settings(max_examples=max(300, settings().max_examples), **COMMON)
@given(data=st.data())
def test_any_generated_recipe_or_override_ends_in_a_plan_or_one_clean_line(tmp_path, capsys, bases, data):
    text, sets, plausible = data.draw(mutated(bases))
    p = tmp_path / "fuzz.yaml"
    p.write_text(text, encoding="utf-8", errors="surrogatepass")
    args = ["recipe", str(p), "--dry-run"]
    for s in sets:
        args += ["--set", s]
    outcome = check_outcome(*run_main(args, capsys, cwd=ROOT))
    OUTCOMES[outcome] += 1
    if outcome.startswith("valid") and plausible:  # no silent wrong result: an accepted value is the value that runs
        from dsk_compress.recipes import load_recipe

        dumped = load_recipe(str(p)).model_dump()
        for path, value in plausible.items():
            try:
                got = _get(dumped, path)
            except (KeyError, IndexError, TypeError):
                continue  # a key the schema maps elsewhere (e.g. a torch task's options)
            assert got == value, (path, value, got)


@settings(max_examples=max(100, settings().max_examples), **COMMON)
@given(key=st.text(string.printable, max_size=40), raw=st.text(max_size=60))
def test_any_set_string_ends_in_a_plan_or_one_clean_line(capsys, key, raw):
    OUTCOMES[check_outcome(*run_main(["recipe", "quant-prune-distill", "--dry-run", "--set", f"{key}={raw}"], capsys))] += 1


# ---- a run-time sample: what only training can reveal -------------------------------------------------------------------


@pytest.mark.slow
@settings(max_examples=6, deadline=None, suppress_health_check=COMMON["suppress_health_check"])
@given(
    lr=st.sampled_from([1e-6, 1e-3, 1.0]),
    temperature=st.sampled_from([0.01, 1.0, 100.0]),
    kd_weight=st.sampled_from([0.0, 0.5, 1.0]),
    steps=st.integers(0, 3),
    batch=st.integers(1, 3),
    head_ratio=st.sampled_from([0.0, 0.5, 0.75]),
    ffn_ratio=st.sampled_from([None, 0.0, 0.5, 0.9]),
    seq=st.sampled_from([8, 16, 33]),
)
def test_generated_tiny_runs_finish_or_stop_with_one_line(
    tmp_path_factory, capsys, lr, temperature, kd_weight, steps, batch, head_ratio, ffn_ratio, seq
):
    d = tmp_path_factory.mktemp("fuzzrun")
    prune = {"stage": "prune", "head_ratio": head_ratio, "steps": steps, "batch_size": batch}
    if ffn_ratio is not None:
        prune["ffn_ratio"] = ffn_ratio
    recipe = tiny_llama_recipe(
        d,
        "fuzz",
        [{"stage": "distill", "steps": steps, "batch_size": batch, "lr": lr, "temperature": temperature, "kd_weight": kd_weight}, prune],
    )
    code, out, err = run_main(["recipe", str(recipe), "--run-dir", str(d / "run"), "--set", f"task.seq_len={seq}"], capsys)
    outcome = check_run(code, err, d / "run")
    OUTCOMES[f"run: {outcome}"] += 1


def check_run(code: int, err: str, rd: Path) -> str:
    assert "Traceback" not in err
    if code == 0:
        m = json.loads((rd / "manifest.json").read_text())
        assert m["status"] == "done"
        for e in m["stages"]:  # no silent wrong result: a finished stage measured a real accuracy
            acc = e["metrics"]["accuracy"]
            assert 0 <= acc <= 100 and math.isfinite(acc)
            assert math.isfinite(e["metrics"].get("train", {}).get("final_loss", 0.0))
        return "finished (exit 0)"
    assert code == 2, (code, err[-3000:])
    last = err.strip().splitlines()[-1]  # progress lines come before it
    assert last.startswith("error:"), err[-3000:]
    return "clean error (exit 2): " + last.removeprefix("error: ")[:40]
