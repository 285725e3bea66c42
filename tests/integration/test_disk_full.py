"""A full disk during a run or an export (issue 23): the stage is recorded as failed, its temp files are removed, one
line says the free space (and, for a bundle, the space it needs), exit 2; nothing outside the command's own output
changes; after space is freed, ``--resume`` finishes byte-identical to a run that never stopped.

Two ways to fill a disk, both fast: a real 20 MB ext4 filesystem on a loop device (root only; skipped where mounting is
not permitted), nearly filled by a ballast file so the tiny run stops mid-way; and fault injection (ENOSPC raised where
a write happens, or by the library writers' own messages) for the paths a real disk cannot reach deterministically.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import one_line_error, run_main, tiny_llama_recipe

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
STAGES = [
    {"stage": "distill", "steps": 6, "batch_size": 2},
    {"stage": "prune", "ffn_ratio": 0.5, "steps": 2, "batch_size": 2},
    {"stage": "qat", "steps": 2, "batch_size": 2, "observer_steps": 1},
    {"stage": "export", "ptq_baselines": False, "kv_cache": False},
    {"stage": "bench", "runs": 2, "warmup": 1, "throughput_batches": []},
]
MODELS = ("distill/model/model.safetensors", "prune/model/model.safetensors", "qat/model/qat_state.safetensors")


def tree_hash(root: Path, skip: Path | None = None) -> dict[str, str]:
    """``{relative path: sha256 | 'dir'}`` of everything under ``root`` except ``skip`` (the command's own output)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if skip is not None and (p == skip or skip in p.parents):
            continue
        out[str(p.relative_to(root))] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def temp_files(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.name.endswith((".tmp", ".part"))]


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dsk_compress.cli.main", *args], cwd=cwd, capture_output=True, text=True, timeout=600, env=ENV
    )


def one_line(proc: subprocess.CompletedProcess) -> str:
    """The one ``error:`` line a refused or failed command ends with (a run's progress lines come before it), exit 2."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr + proc.stdout
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and proc.stderr.strip().splitlines()[-1] == errors[0], proc.stderr[-3000:]
    return errors[0]


@pytest.fixture
def small_disk(tmp_path):
    """A 20 MB ext4 filesystem mounted at ``tmp_path / 'disk'`` (no blocks reserved for root, so root fills it as anyone
    would); skipped where loop mounts are not permitted (not root, no loop device, a container without CAP_SYS_ADMIN)."""
    if os.geteuid() != 0 or not shutil.which("mkfs.ext4"):
        pytest.skip("a loop mount needs root and mkfs.ext4 (e2fsprogs)")
    img, mnt = tmp_path / "disk.img", tmp_path / "disk"
    mnt.mkdir()
    with open(img, "wb") as f:
        f.truncate(20 << 20)
    mk = subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", str(img)], capture_output=True, text=True)
    mount = subprocess.run(["mount", "-o", "loop", str(img), str(mnt)], capture_output=True, text=True) if mk.returncode == 0 else mk
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a loop filesystem here: {(mount.stderr or mount.stdout).strip()[:200]}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill(disk: Path, leave: int) -> Path:
    """A ballast file that leaves about ``leave`` bytes free on ``disk``."""
    ballast = disk / "ballast.bin"
    free = shutil.disk_usage(disk).free
    with open(ballast, "wb") as f:
        chunk = b"\1" * (1 << 20)
        left = max(0, free - leave)
        try:
            while left > 0:
                left -= f.write(chunk[: min(len(chunk), left)])
                f.flush()
            os.fsync(f.fileno())
        except OSError as e:  # asked to fill it all: the file's own metadata took the last blocks
            assert e.errno == errno.ENOSPC
    return ballast


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, Path]:
    """(recipe, run) of the tiny distill -> prune -> qat -> export run on an ordinary disk: what a resumed run must equal."""
    d = tmp_path_factory.mktemp("full-ref")
    recipe = tiny_llama_recipe(d, "tiny-full", STAGES)
    res = cli("recipe", str(recipe), "--run-dir", str(d / "ref"), cwd=d)
    assert res.returncode == 0, res.stderr[-3000:]
    return recipe, d / "ref"


def written(run: Path) -> int:
    return sum(p.stat().st_size for p in run.rglob("*") if p.is_file())


@pytest.mark.slow
@pytest.mark.parametrize("share", [0.4, 0.8])
def test_full_disk_mid_run_is_one_line_recorded_failed_and_resumes_byte_identical(reference, small_disk, share):
    recipe, ref = reference
    # room for a share of what the finished run holds (about 5 MB): it stops in an early stage, or a late one (export)
    ballast = fill(small_disk, int(share * written(ref)))
    ballast_size = ballast.stat().st_size
    before = set(small_disk.iterdir())
    proc = cli("recipe", str(recipe), "--out", str(small_disk), cwd=small_disk)  # the filesystem as --out, as the tester ran it
    (rd,) = set(small_disk.iterdir()) - before
    line = one_line(proc)
    assert "the disk is full" in line and "free of" in line and f"--run-dir {rd} --resume" in line, line
    m = json.loads((rd / "manifest.json").read_text())
    failed = [s for s in m["stages"] if s["status"] == "failed"]
    assert m["status"] == "failed" and len(failed) == 1 and "the disk is full" in failed[0]["error"], m["stages"]
    assert f"stage {failed[0]['stage']!r}: the disk is full" in line
    print(f"share {share}: {line}")  # which stage (pytest -s)
    assert "traceback" not in failed[0]
    assert not temp_files(rd), temp_files(rd)
    assert set(small_disk.iterdir()) == before | {rd} and ballast.stat().st_size == ballast_size  # only the run's folder is new
    ballast.unlink()
    res = cli("recipe", str(recipe), "--run-dir", str(rd), "--resume", cwd=small_disk)
    assert res.returncode == 0, res.stderr[-3000:]
    assert [s["status"] for s in json.loads((rd / "manifest.json").read_text())["stages"]] == ["done"] * 5
    for f in MODELS:
        assert (rd / f).read_bytes() == (ref / f).read_bytes(), f
    assert not temp_files(rd)


def test_a_disk_full_before_the_run_starts_is_one_line(reference, small_disk):
    recipe, _ = reference
    fill(small_disk, 0)
    before = tree_hash(small_disk)
    line = one_line(cli("recipe", str(recipe), "--out", str(small_disk / "runs"), cwd=small_disk))
    assert "the disk is full" in line and "free of" in line, line
    assert {k: v for k, v in tree_hash(small_disk).items() if not k.startswith("runs")} == before


@pytest.mark.slow
def test_export_to_a_full_disk_is_one_line_naming_the_space_needed_and_leaves_nothing(reference, small_disk):
    recipe, ref = reference
    fill(small_disk, 300_000)
    around = tree_hash(small_disk)
    run_before = tree_hash(ref)
    proc = cli("export", str(ref), "--device", "rpi5", "--out", str(small_disk / "bundle"), cwd=small_disk)
    line = one_line(proc)
    assert "the disk is full" in line and "the bundle needs about" in line and "MB" in line, line
    assert tree_hash(small_disk) == around and tree_hash(ref) == run_before


# ---- fault injection: where a real disk cannot be made to fail at a chosen write --------------------------------------


@pytest.fixture
def tiny_recipe(tmp_path) -> Path:
    return tiny_llama_recipe(tmp_path, "tiny-enospc", [{"stage": "distill", "steps": 2, "batch_size": 2}])


def _enospc_in_distill(monkeypatch, exc: BaseException):
    from dsk_compress.recipes.stages.distill import DistillStage

    def run(self, ctx):
        d = ctx.stage_dir("distill")
        (d / ".optim.pt.tmp").write_bytes(b"x" * 4096)  # what torch.save leaves when the disk fills mid-write
        (d / "model").mkdir(exist_ok=True)
        (d / "model" / ".model.safetensors.abc123.tmp").write_bytes(b"y" * 100)
        raise exc

    monkeypatch.setattr(DistillStage, "run", run)


@pytest.mark.parametrize(
    "exc",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        RuntimeError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'),
    ],
)
def test_enospc_in_a_stage_is_recorded_failed_temp_files_removed_one_line(tmp_path, tiny_recipe, monkeypatch, capsys, exc):
    _enospc_in_distill(monkeypatch, exc)
    rd = tmp_path / "run"
    around = tree_hash(tmp_path, skip=rd)
    code, _, err = run_main(["recipe", str(tiny_recipe), "--run-dir", str(rd)], capsys)
    line = one_line_error(code, err)
    assert "stage 'distill': the disk is full:" in line and "free of" in line and "4.2 kB of temporary files" in line, line
    assert f"continue with: dsk-compress recipe {tiny_recipe} --run-dir {rd} --resume" in line
    m = json.loads((rd / "manifest.json").read_text())
    assert m["stages"][0]["status"] == "failed" and "the disk is full" in m["stages"][0]["error"]
    assert not temp_files(rd)
    assert tree_hash(tmp_path, skip=rd) == around


def test_a_write_failure_without_a_cause_counts_as_full_only_on_a_nearly_full_disk(tmp_path, monkeypatch):
    from collections import namedtuple

    from dsk_compress import io

    torch_says = RuntimeError(
        "[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file data/3: file write failed"
    )
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(io.shutil, "disk_usage", lambda p: usage(20 << 20, 20 << 20, 4096))
    err = io.storage_error(torch_says, tmp_path, "stage 'qat'")
    assert err is not None and err.message == f"stage 'qat': the disk is full: 4.1 kB free of 21.0 MB on {tmp_path}"
    monkeypatch.setattr(io.shutil, "disk_usage", lambda p: usage(20 << 30, 1 << 30, 19 << 30))
    assert io.storage_error(torch_says, tmp_path, "stage 'qat'") is None  # plenty free: some other failure, kept as it is
    assert io.storage_error(ValueError("shape mismatch"), tmp_path, "x") is None


def test_manifest_is_recorded_in_place_when_even_its_temp_file_has_no_room(tmp_path, tiny_recipe, monkeypatch, capsys):
    from dsk_compress.recipes import runner

    _enospc_in_distill(monkeypatch, OSError(errno.ENOSPC, "No space left on device"))
    real = runner.atomic_write_json
    calls = {"n": 0}

    def atomic(path, obj):
        if Path(path).name == "manifest.json" and obj["stages"][0]["status"] == "failed":
            calls["n"] += 1
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, obj)

    monkeypatch.setattr(runner, "atomic_write_json", atomic)
    rd = tmp_path / "run"
    code, _, err = run_main(["recipe", str(tiny_recipe), "--run-dir", str(rd)], capsys)
    assert "the disk is full" in one_line_error(code, err) and calls["n"] == 1
    assert json.loads((rd / "manifest.json").read_text())["stages"][0]["status"] == "failed"


def test_bundle_write_that_fills_the_disk_removes_its_temp_folder(tmp_path, monkeypatch, capsys):
    """The space check passes, then the disk fills while the files are copied (another writer): one line, no leftovers."""
    from dsk_compress.export import bundle

    recipe = tiny_llama_recipe(
        tmp_path,
        "tiny-bundle-full",
        [
            {"stage": "distill", "steps": 2, "batch_size": 2},
            {"stage": "export", "precisions": ["fp32"], "ptq_baselines": False, "kv_cache": False},
            {"stage": "bench", "runs": 2, "warmup": 1, "throughput_batches": []},
        ],
    )
    from dsk_compress import run_recipe

    rd = run_recipe(str(recipe), run_dir=tmp_path / "run")
    capsys.readouterr()  # the run's progress lines

    def copy(src, dst):
        Path(dst).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", str(dst))

    monkeypatch.setattr(bundle.shutil, "copyfile", copy)
    out = tmp_path / "out"
    around = tree_hash(tmp_path)
    code, _, err = run_main(["export", str(rd), "--device", "rpi4", "--out", str(out)], capsys)
    line = one_line_error(code, err)
    assert f"export to {out}: the disk is full:" in line and "it needs about" in line, line
    assert tree_hash(tmp_path) == around and not out.exists()
