"""Nothing outside what a command owns is written or deleted (issue 23).

Each case a tester found becomes a test here: ``export --out`` at a non-empty folder, at the run or around it; a device
profile named ``..`` (or a path); a bundle whose card names ``../../x`` or ``/etc/passwd``; every damaged input of the
bundle's own ``run.py``; a tampered ``report.json``; ``--remote-dir ../../etc``; the dry run refusing what the run
refuses; resume hints that work from any folder; ``bench`` of a bundle by a relative path; the gpu-server fp16 hint.
The refusals assert exit code 2, one ``error:`` line and that the folder around the command (run, bundle, neighbours)
hashes the same before and after. A hypothesis property feeds generated names and paths (``..``, absolute, empty,
NUL, very long, unicode) through every place a name becomes a path.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import posixpath
import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
import yaml
from conftest import one_line_error, run_main, tiny_llama_recipe, tiny_mixtral_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

DEVICE = "rpi4"  # an fp32 device profile: the tiny run's student ships to it


def tree_hash(root: Path, skip: Path | None = None) -> dict[str, str]:
    """``{relative path: sha256 | 'dir' | 'link -> target'}`` of everything under ``root`` (except ``skip``)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if skip is not None and (p == skip or skip in p.parents):
            continue
        rel = str(p.relative_to(root))
        out[rel] = f"link -> {os.readlink(p)}" if p.is_symlink() else "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def refused(capsys, args: list[str], cwd: Path | None = None) -> str:
    return one_line_error(*run_main(args, capsys, cwd=cwd)[::2])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A finished tiny run (distill, fp32 export with decoder graphs, bench), its recipe loaded by a relative path."""
    from dsk_compress import run_recipe

    d = tmp_path_factory.mktemp("safety")
    tiny_llama_recipe(
        d,
        "tiny-safety",
        [
            {"stage": "distill", "steps": 2, "batch_size": 4, "lr": 3e-3},
            {"stage": "export", "precisions": ["fp32"], "ptq_baselines": False, "kv_cache": True},
            {"stage": "bench", "runs": 2, "warmup": 1, "throughput_batches": []},
        ],
    )
    old = os.getcwd()
    os.chdir(d)
    try:
        return run_recipe("tiny.yaml", out=d / "runs").resolve()
    finally:
        os.chdir(old)


@pytest.fixture
def run(tiny_run, tmp_path) -> Path:
    """A copy of the tiny run in ``tmp_path/work`` (the surrounding tree the tests hash is ``tmp_path``)."""
    rd = tmp_path / "work" / tiny_run.name
    shutil.copytree(tiny_run, rd, symlinks=True)
    return rd


@pytest.fixture(scope="module")
def bundle(tiny_run, tmp_path_factory) -> Path:
    from dsk_compress.export.bundle import make_bundle

    return make_bundle(tiny_run, DEVICE, tmp_path_factory.mktemp("bundle") / "b")


# ---- 1. export --out never deletes or overwrites what it did not write ------------------------------------------------


def test_export_out_refuses_a_non_empty_folder_it_did_not_write(run, tmp_path, capsys):
    x = tmp_path / "x"
    x.mkdir()
    (x / "keep.txt").write_text("k\n")
    before = tree_hash(tmp_path)
    line = refused(capsys, ["export", str(run), "--device", DEVICE, "--out", str(x)])
    assert "is not empty and was not written by dsk-compress export" in line
    assert tree_hash(tmp_path) == before


@pytest.mark.parametrize("where", [".", "..", "export", "export/b", "distill/model"])
def test_export_out_at_the_run_around_it_or_inside_it_is_refused(run, tmp_path, capsys, where):
    before = tree_hash(tmp_path)
    line = refused(capsys, ["export", str(run), "--device", DEVICE, "--out", str(run / where)])
    assert "holds the run" in line or "is inside the run" in line, line
    assert tree_hash(tmp_path) == before


@pytest.mark.parametrize("out", ["/proc/nope", "/proc/1/nope", "/sys/nope/b"])
def test_export_out_where_nothing_can_be_written_is_one_line(run, tmp_path, capsys, out):
    before = tree_hash(tmp_path)
    line = refused(capsys, ["export", str(run), "--device", DEVICE, "--out", out])
    assert out in line and ("cannot write" in line or "permission denied" in line or "read-only" in line), line
    assert tree_hash(tmp_path) == before


def test_export_again_replaces_only_the_files_it_wrote(run, tmp_path, capsys):
    out = tmp_path / "b"
    assert run_main(["export", str(run), "--device", DEVICE, "--out", str(out)], capsys)[0] == 0
    written = json.loads((out / ".dsk-bundle.json").read_text())["files"]
    model = json.loads((out / "model_card.json").read_text())["model"]
    assert model == "model.fused.onnx"  # a CPU-only device gets the fused decoder graph alone: one copy of the weights
    assert {model, "model_card.json", "run.py", "eval_windows.npy"} <= set(written) and "model.onnx" not in written
    (out / "results.json").write_text("{}")  # what run.py and a venv leave in a bundle on the device
    (out / ".venv" / "bin").mkdir(parents=True)
    (out / ".venv" / "bin" / "python").write_text("#!")
    (out / "README.md").write_text("edited")
    mine = {k: v for k, v in tree_hash(out).items() if k.startswith((".venv", "results"))}
    code, _, err = run_main(["export", str(run), "--device", DEVICE, "--out", str(out)], capsys)
    assert code == 0, err
    after = tree_hash(out)
    assert {k: after[k] for k in mine} == mine  # the user's files stay
    assert (out / "README.md").read_text() != "edited"  # its own are written anew
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_export_into_an_empty_folder_writes_the_bundle_there(run, tmp_path, capsys):
    out = tmp_path / "empty"
    out.mkdir()
    assert run_main(["export", str(run), "--device", DEVICE, "--out", str(out)], capsys)[0] == 0
    assert (out / "model_card.json").is_file() and (out / ".dsk-bundle.json").is_file()


# ---- 2. a device profile's name is a name, not a path ------------------------------------------------------------------


def _profile(tmp_path: Path, name) -> Path:
    from dsk_compress.devices import DEVICES_DIR

    data = yaml.safe_load((DEVICES_DIR / f"{DEVICE}.yaml").read_text())
    data["name"] = name
    p = tmp_path / "prof" / "board.yaml"
    p.parent.mkdir(exist_ok=True)
    p.write_text(yaml.safe_dump(data))
    return p


BAD_NAMES = ["..", ".", "../../../elsewhere", "/tmp/abs-bundle", "", "a/b", "x\x00y", "n" * 101, "\u00e9" * 101]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_export_with_a_profile_whose_name_is_a_path_is_refused_and_touches_nothing(run, tmp_path, capsys, name):
    prof = _profile(tmp_path, name)
    before = tree_hash(tmp_path)
    line = refused(capsys, ["export", str(run), "--device", str(prof)])
    assert f"device profile {prof}: field 'name'" in line, line
    assert tree_hash(tmp_path) == before


@pytest.mark.parametrize("name", ["..", "../../../elsewhere", "/tmp/abs-bundle"])
def test_bench_over_ssh_with_such_a_profile_is_refused_before_connecting(run, tmp_path, capsys, name):
    prof = _profile(tmp_path, name)
    before = tree_hash(tmp_path)
    line = refused(capsys, ["bench", str(run), "--device", str(prof), "--host", "pi@nowhere.invalid"])
    assert "field 'name'" in line
    assert tree_hash(tmp_path) == before


# ---- 3. a bundle's files are not trusted ---------------------------------------------------------------------------------


def _card(b: Path, **changes) -> None:
    card = json.loads((b / "model_card.json").read_text())
    for k, v in changes.items():
        if v is None:
            card.pop(k, None)
        else:
            card[k] = v
    (b / "model_card.json").write_text(json.dumps(card))


@pytest.mark.parametrize(
    "change, says",
    [
        ({"variant": "../../../../x"}, "field 'variant'"),
        ({"variant": ".."}, "field 'variant'"),
        ({"variant": "/abs"}, "field 'variant'"),
        ({"variant": None}, "field 'variant' is missing"),
        ({"variant": 3}, "field 'variant'"),
        ({"device": "../x"}, "field 'device'"),
        ({"model": "/etc/passwd"}, "field 'model'"),
        ({"model": "../../model.onnx"}, "field 'model'"),
        ({"source_run": "../.."}, "field 'source_run'"),
        ("truncated", "cannot read"),
        ("list", "not a model card"),
    ],
)
def test_bench_of_a_tampered_bundle_is_one_line_and_writes_nothing(bundle, tmp_path, capsys, change, says):
    b = tmp_path / "deep" / "a" / "b" / "bundle"
    shutil.copytree(bundle, b)
    if change == "truncated":
        p = b / "model_card.json"
        p.write_bytes(p.read_bytes()[:100])
    elif change == "list":
        (b / "model_card.json").write_text("[1, 2]")
    else:
        _card(b, **change)
    before = tree_hash(tmp_path)
    line = refused(capsys, ["bench", str(b), "--runs", "1"])
    assert says in line and "model_card.json" in line, line
    assert tree_hash(tmp_path) == before


@pytest.mark.parametrize("remote_dir", ["../../etc", "~/../x", "a/../../b", "~root/x", "-rf", "x\ny", "", "dsk/../../.."])
def test_remote_dir_outside_the_device_users_home_is_refused_before_connecting(bundle, tmp_path, capsys, remote_dir):
    before = tree_hash(tmp_path)
    line = refused(capsys, ["bench", str(bundle), "--host", "pi@nowhere.invalid", "--remote-dir", remote_dir])
    assert "--remote-dir" in line, line
    assert tree_hash(tmp_path) == before


@pytest.mark.parametrize(
    "given, on_device", [("~/dsk", "~/dsk"), ("dsk/x", "~/dsk/x"), ("~", "~"), ("/opt/dsk", "/opt/dsk"), ("./dsk//x/", "~/dsk/x")]
)
def test_remote_dir_is_the_users_home_unless_absolute(given, on_device):
    from dsk_compress.paths import remote_dir
    from dsk_compress.runtimes.remote import confined

    assert remote_dir(given) == confined(given) == on_device


def _tokenizer_missing(b):
    _card(b, tokenizer="tokenizer.json")


def _tokenizer_garbage(b):
    _card(b, tokenizer="tokenizer.json")
    (b / "tokenizer.json").write_text("{garbage")


def _model(b):
    return b / json.loads((b / "model_card.json").read_text())["model"]


def _model_link_out(b):
    _model(b).unlink()
    _model(b).symlink_to("/etc/passwd")


RUN_PY_CASES = {  # the 12 inputs the tester saw end in a traceback, and a few more of the same kinds
    "card truncated": lambda b: (b / "model_card.json").write_bytes((b / "model_card.json").read_bytes()[:200]),
    "card missing": lambda b: (b / "model_card.json").unlink(),
    "card without model": lambda b: _card(b, model=None),
    "card not an object": lambda b: (b / "model_card.json").write_text("[1]"),
    "model missing": lambda b: _model(b).unlink(),
    "model truncated": lambda b: _model(b).write_bytes(_model(b).read_bytes()[:500]),
    "model is /etc/passwd": lambda b: _card(b, model="/etc/passwd"),
    "model climbs out": lambda b: _card(b, model="../../../../etc/passwd"),
    "model links out": _model_link_out,
    "eval_windows missing": lambda b: (b / "eval_windows.npy").unlink(),
    "eval_windows pickled object array": lambda b: np.save(
        b / "eval_windows.npy", np.array([{"x": 1}, None], dtype=object), allow_pickle=True
    ),
    "eval_windows a pickle": lambda b: (b / "eval_windows.npy").write_bytes(pickle.dumps([1, 2, 3])),
    "eval_windows 1-D": lambda b: np.save(b / "eval_windows.npy", np.arange(8)),
    "unknown graph_optimization": lambda b: _card(b, graph_optimization="ludicrous"),
    "unknown runtime": lambda b: _card(b, runtime="nope"),
    "seq_len not a number": lambda b: _card(b, seq_len="x"),
    "tokenizer missing": _tokenizer_missing,
    "tokenizer garbage": _tokenizer_garbage,
    "tokenizer outside": lambda b: _card(b, tokenizer="/etc/passwd"),
    "fused model outside": lambda b: _card(b, fused_model="/etc/hostname"),
}
NEEDS_PROMPT = {"tokenizer missing", "tokenizer garbage", "tokenizer outside", "fused model outside"}


@pytest.mark.parametrize("case", sorted(RUN_PY_CASES))
def test_bundle_run_py_says_one_line_and_exits_2_for_every_damaged_input(bundle, tmp_path, case):
    b = tmp_path / "b"
    shutil.copytree(bundle, b)
    RUN_PY_CASES[case](b)
    before = tree_hash(tmp_path)
    args = ["--runs", "1", "--warmup", "0"] + (["--generate", "2", "--prompt", "def "] if case in NEEDS_PROMPT else [])
    proc = subprocess.run([sys.executable, "run.py", *args], cwd=b, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert tree_hash(tmp_path) == before  # checked before anything is measured: no results.json


def test_bundle_run_py_still_runs_an_intact_bundle_with_a_prompt(bundle, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(bundle, b)
    proc = subprocess.run(
        [sys.executable, "run.py", "--runs", "1", "--warmup", "0", "--generate", "2", "--prompt", "def "],
        cwd=b,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((b / "results.json").read_text())["decode"]["new_tokens"] == 2


# ---- 5. a tampered report.json; the dry run refuses what the run refuses; hints that work anywhere -----------------------


@pytest.mark.parametrize(
    "variants, says",
    [
        ([{"name": "x"}], "has no role"),
        ([{"name": "../../x", "role": "student", "precision": "fp32", "artifact": "export/student-distill.onnx"}], "variants.0.name"),
        ([{"name": "student", "role": "student", "precision": "fp32", "artifact": "/etc/passwd"}], "variants.0.artifact"),
        ([{"name": "student", "role": "student", "precision": "fp32", "artifact": "../../elsewhere.onnx"}], "variants.0.artifact"),
    ],
)
@pytest.mark.parametrize("command", [["report"], ["export", "--device", DEVICE]])
def test_tampered_report_json_is_one_line_for_report_and_export(run, tmp_path, capsys, variants, says, command):
    rep = json.loads((run / "report.json").read_text())
    rep["variants"] = variants
    (run / "report.json").write_text(json.dumps(rep))
    before = tree_hash(tmp_path)
    line = refused(capsys, [command[0], str(run), *command[1:]])
    assert "report.json" in line and says in line, line
    assert tree_hash(tmp_path) == before


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory) -> Path:
    from transformers import MixtralForCausalLM

    d = tmp_path_factory.mktemp("mixtral")
    MixtralForCausalLM(tiny_mixtral_config()).save_pretrained(d, safe_serialization=True)
    return d


def _teacher(mixtral_dir: Path, tmp_path: Path, change) -> Path:
    t = tmp_path / "teacher"
    shutil.copytree(mixtral_dir, t)
    cfg = json.loads((t / "config.json").read_text())
    change(cfg)
    (t / "config.json").write_text(json.dumps(cfg))
    return t


@pytest.mark.parametrize(
    "change, layers, says",
    [
        (lambda c: None, [0, 0], "give distinct, non-empty layer indices (repeated: [0])"),
        (lambda c: c.pop("model_type"), [0, 2], "Should have a `model_type` key"),
        (lambda c: c.update(model_type="bogus"), [0, 2], "model type `bogus`"),
        (lambda c: c.update(quantization_config={"quant_method": "fp8"}), [0, 2], "is quantized"),
        (lambda c: c.update(num_local_experts=0), [0, 2], "num_local_experts is 0"),
        (lambda c: c.update(vocab_size=1000), [0, 2], "teacher's vocab_size is 1000"),
        (lambda c: c.update(model_type="gpt2"), [0, 2], "is not supported"),
    ],
)
def test_dry_run_refuses_what_the_run_refuses_with_the_same_line(mixtral_dir, tmp_path, capsys, change, layers, says):
    t = _teacher(mixtral_dir, tmp_path, change)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "name": "dry",
                "teacher": {"hf": str(t)},
                "student": {"from_teacher": {"layers": layers, "ffn_init": "top", "calibration_batches": 1}},
                "task": {"name": "code-lm", "seq_len": 32, "eval_sequences": 8},
                "stages": [{"stage": "distill", "steps": 2, "batch_size": 2}],
            }
        )
    )
    dry = refused(capsys, ["recipe", str(recipe), "--dry-run"])
    assert says in dry, dry
    real = refused(capsys, ["recipe", str(recipe), "--out", str(tmp_path / "runs")])
    assert real == dry and not (tmp_path / "runs").exists()


def test_dry_run_refuses_a_config_the_installed_transformers_would_misread(mixtral_dir, tmp_path, capsys):
    import transformers
    from packaging.version import Version

    if Version(transformers.__version__).major >= 5:
        pytest.skip("transformers 5 reads configs of both lines")
    t = _teacher(mixtral_dir, tmp_path, lambda c: c.update(transformers_version="5.25.0"))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "name": "dry",
                "teacher": {"hf": str(t)},
                "student": {"from_teacher": {"layers": [0]}},
                "task": {"name": "code-lm", "seq_len": 32},
                "stages": [{"stage": "distill", "steps": 2}],
            }
        )
    )
    dry = refused(capsys, ["recipe", str(recipe), "--dry-run"])
    assert dry.startswith("error: teacher.hf: ") and "was written by transformers 5.25.0" in dry, dry
    assert refused(capsys, ["recipe", str(recipe), "--out", str(tmp_path / "runs")]) == dry


def test_resume_hints_name_the_recipe_and_run_by_absolute_paths(tmp_path, monkeypatch):
    from dsk_compress.recipes import load_recipe
    from dsk_compress.recipes.runner import resume_command

    tiny_llama_recipe(tmp_path, "tiny-hint", [{"stage": "distill", "steps": 1}])
    monkeypatch.chdir(tmp_path)
    spec = load_recipe("tiny.yaml", ["seed=3"])
    assert resume_command(spec, Path("runs/x")) == (
        f"dsk-compress recipe {tmp_path / 'tiny.yaml'} --set seed=3 --run-dir {tmp_path / 'runs/x'} --resume"
    )
    bundled = load_recipe("quant-prune-distill")
    assert resume_command(bundled, tmp_path / "r").startswith("dsk-compress recipe quant-prune-distill --run-dir")


def test_a_runs_manifest_names_its_recipe_file_by_its_absolute_path(tiny_run):
    from dsk_compress.integrity import rebuild_command

    manifest = json.loads((tiny_run / "manifest.json").read_text())
    assert manifest["source"]["recipe"] == str(tiny_run.parent.parent / "tiny.yaml")  # it was loaded as "tiny.yaml"
    assert f"recipe {tiny_run.parent.parent / 'tiny.yaml'} " in rebuild_command(tiny_run, manifest, "export")


# ---- issue 20: bench of a bundle by a relative path; the gpu-server hint is a command that works ------------------------


def test_bench_of_a_bundle_given_by_a_relative_path_runs(run, tmp_path, capsys):
    assert run_main(["export", str(run), "--device", DEVICE], capsys)[0] == 0
    rel = Path("work") / run.name / "bundles" / DEVICE
    code, out, err = run_main(["bench", str(rel), "--runs", "1"], capsys, cwd=tmp_path)
    assert code == 0, err[-3000:]
    recs = [r for host in (run / "devices").iterdir() for r in json.loads((host / "results.json").read_text())["records"]]
    assert [r["provenance"]["tool"] for r in recs] == ["run.py"]


def test_gpu_server_hint_is_a_command_that_works(run, capsys):
    import shlex

    line = refused(capsys, ["export", str(run), "--device", "gpu-server"])
    assert "the run has no fp16 student artifact to bundle" in line
    cmd = line.split("start a new run with an fp16 export: ", 1)[1].split(", then dsk-compress export", 1)[0]
    argv = shlex.split(cmd)
    assert argv[:2] == ["dsk-compress", "recipe"] and Path(argv[2]).is_absolute()
    code, out, err = run_main([*argv[1:], "--dry-run"], capsys, cwd=Path("/"))
    assert code == 0, err
    assert '"precisions": ["fp32", "fp16"]' in out
    # what the old hint said (rerun the export stage of this run with other precisions) is refused: the recipe differs
    again = refused(capsys, [*argv[1:], "--run-dir", str(run), "--resume", "--rerun-from", "export"])
    assert "the recipe differs" in again


# ---- the property: every place a name or a path from a file becomes a path ------------------------------------------------


NASTY = [
    "",
    ".",
    "..",
    "...",
    "../x",
    "a/../b",
    "/abs",
    "/",
    "//x",
    "~",
    "~/x",
    "~root",
    "a\\b",
    "C:\\x",
    "x\x00y",
    "x\ny",
    "-rf",
    " ",
    "up",
    "up/x",
    "bundles/x",
    "bundles",
    "n" * 100,
    "n" * 101,
    "\u00e9" * 100,
    "\U0001d4b3" * 60,
    "a" * 255,
    "a" * 256,
    "ok-name",
    "model.onnx",
    "a/b/c",
]
names = st.one_of(
    st.sampled_from(NASTY), st.text(max_size=40), st.text(st.characters(blacklist_categories=("Cs",)), min_size=60, max_size=300)
)


def _makes_one_folder(root: Path, name: str) -> None:
    """``root / name`` is exactly one new folder directly under ``root``, and the filesystem accepts it."""
    p = root / name
    assert p.parent == root and p.resolve().parent == root.resolve()
    p.mkdir()
    p.rmdir()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=names)
def test_every_name_that_becomes_a_folder_is_one_folder_or_refused(tmp_path, name):
    from pydantic import ValidationError

    from dsk_compress.devices import DEVICES_DIR, DeviceProfile
    from dsk_compress.paths import check_component
    from dsk_compress.recipes.limits import check_run_name
    from dsk_compress.report.model import Variant

    root = tmp_path / "root"
    root.mkdir(exist_ok=True)
    try:  # a run name: <out>/<name>-<time>
        check_run_name(name)
    except ValueError:
        pass
    else:
        _makes_one_folder(root, f"{name}-20261207-134650")
    try:  # a device profile: RUN/bundles/<name>, RUN/devices/<name>, <remote>/bundles/<run>-<name>
        DeviceProfile.model_validate({**yaml.safe_load((DEVICES_DIR / "rpi4.yaml").read_text()), "name": name})
    except ValidationError:
        pass
    else:
        _makes_one_folder(root, name)
    try:  # a report row / card variant: RUN/devices/<host>/raw/<variant>
        Variant.model_validate({"name": name})
    except ValidationError:
        pass
    else:
        _makes_one_folder(root, name)
    try:  # a card's source_run, a hostname
        check_component(name)
    except ValueError:
        pass
    else:
        _makes_one_folder(root, name)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rel=names)
def test_every_path_a_file_names_stays_inside_its_folder_or_is_refused(tmp_path, rel):
    from pydantic import ValidationError

    from dsk_compress.benchmark import read_card
    from dsk_compress.errors import RunError
    from dsk_compress.paths import inside, is_within, remote_dir
    from dsk_compress.report.model import Variant

    root = tmp_path / "bundle"
    root.mkdir(exist_ok=True)
    (tmp_path / "outside").mkdir(exist_ok=True)
    if not (root / "up").is_symlink():
        (root / "up").symlink_to(tmp_path / "outside")
    try:  # a card's model / eval_windows / tokenizer; a report's artifact (RUN/<artifact>)
        p = inside(root, rel)
    except ValueError:
        pass
    else:
        assert is_within(p, root)
    try:
        Variant.model_validate({"name": "v", "artifact": rel})
    except ValidationError:
        pass
    else:
        assert not PurePosixPath(rel).is_absolute() and ".." not in PurePosixPath(rel).parts
    (root / "model_card.json").write_text(json.dumps({"variant": "v", "device": "rpi4", "precision": "fp32", "model": rel}))
    try:
        read_card(root)
    except RunError:
        pass
    else:
        assert is_within(root / rel, root)
    try:  # --remote-dir
        on_device = remote_dir(rel)
    except ValueError:
        pass
    else:
        if rel.startswith("/"):
            assert on_device == posixpath.normpath(on_device) and ".." not in PurePosixPath(on_device).parts
        else:
            home = "/home/pi"
            full = posixpath.normpath(home + on_device[1:]) if on_device.startswith("~") else None
            assert full is not None and (full == home or full.startswith(home + "/")), (rel, on_device)
            assert not any(part.startswith("-") for part in PurePosixPath(on_device[2:]).parts)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rel=names)
def test_export_out_is_never_the_run_above_it_or_inside_it(tmp_path, rel):
    from dsk_compress.errors import RunError
    from dsk_compress.export.bundle import _claim
    from dsk_compress.paths import is_within

    run = tmp_path / "runs" / "r"
    (run / "bundles").mkdir(parents=True, exist_ok=True)
    (run / "manifest.json").write_text("{}")
    if "\x00" in rel:
        return  # not a path any shell can pass
    dest = run / rel
    try:
        owned = _claim(dest, run, "--out")
    except RunError:
        return
    assert not is_within(run, dest)
    assert not is_within(dest, run) or (run / "bundles").resolve() in dest.resolve().parents
    assert owned == set() or dest.is_dir()
