"""Real sizes through the whole chain: a shaped Qwen3-MoE teacher (random weights, its own BPE tokenizer, bf16
safetensors shards) and a dense student cut from it, run as a user would, each stage's wall time, peak RSS of the
process tree, preflight estimate and disk written to ``benchmarks/results/scale.json``.

At ``--scale 1`` the teacher is a realistically shaped one: hidden 2048, 12 layers, 16 query / 4 KV heads of 128, 16 experts
top-4 of width 768, vocabulary 32,000 (1.16B parameters, 2.2 GB in bf16, 4 shards); the student keeps every second layer
with a merged FFN of 4096 (375M). ``--scale 0.05`` builds the same shape family small (minutes on 2 cores), for testing.

    .venv/bin/python benchmarks/scale.py --scale 0.05              # small, to check the chain
    .venv/bin/python benchmarks/scale.py --scale 1 --steps 3        # the real size (about 10 minutes on 2 quiet cores)

Chain: ``dsk-compress recipe`` (distill -> prune -> qat -> export -> bench, the logit cache on, a few steps each), then
``dsk-compress report RUN`` and ``dsk-compress export RUN --device rpi5`` (int8) and ``--device rpi4`` (fp32), each a subprocess sampled every 0.2 s
(RSS summed over its process tree from /proc). Stage boundaries come from the recipe's ``[i/n] stage:`` headers.
No asserts on time (STYLE.md 10): this measures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GIB = 1024**3


def _round(x: float, m: int) -> int:
    return max(m, int(round(x / m)) * m)


def shape(scale: float) -> dict:
    """The teacher's config at ``scale`` (1: a 1.16B Qwen3-MoE)."""
    heads, kv = 16, 4
    head_dim = 128 if scale >= 1 else _round(128 * scale**0.5, 8)
    return {
        "model_type": "qwen3_moe",
        "architectures": ["Qwen3MoeForCausalLM"],
        "hidden_size": _round(2048 * scale, 64),
        "num_hidden_layers": 12 if scale >= 0.5 else 4,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "head_dim": head_dim,
        "num_experts": 16,
        "num_experts_per_tok": 4,
        "moe_intermediate_size": _round(768 * scale, 16),
        "intermediate_size": _round(6144 * scale, 16),
        "vocab_size": 32000 if scale >= 0.5 else 2000,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1_000_000.0,
        "tie_word_embeddings": False,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "bos_token_id": 1,
        "eos_token_id": 2,
    }


def corpus(out: Path, megabytes: float) -> tuple[Path, Path]:
    """Train / eval text: this interpreter's standard-library ``.py`` files, concatenated (no download)."""
    src = sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py"))
    want = int(megabytes * 1e6)
    parts, n = [], 0
    for p in src:
        if "test" in p.parts:
            continue
        try:
            t = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        parts.append(t)
        n += len(t)
        if n >= want:
            break
    text = "\n".join(parts)
    cut = int(len(text) * 0.95)
    (out / "train.txt").write_text(text[:cut])
    (out / "eval.txt").write_text(text[cut:])
    return out / "train.txt", out / "eval.txt"


def build_teacher(out: Path, cfg: dict, train_txt: Path) -> int:
    """Random bf16 teacher in 3 safetensors shards + a BPE tokenizer trained on the corpus; returns its parameter count."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train(
        [str(train_txt)],
        trainers.BpeTrainer(
            vocab_size=cfg["vocab_size"], special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", model_max_length=4096
    ).save_pretrained(out)
    # a few MB of text may not fill the asked vocabulary: the embedding gets the tokens it has, padded to 64 rows
    cfg["vocab_size"] = min(cfg["vocab_size"], -(-tok.get_vocab_size() // 64) * 64)
    conf = AutoConfig.for_model(**{k: v for k, v in cfg.items() if k != "architectures"})
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 directly: no fp32 copy of the teacher is ever made
    try:
        model = AutoModelForCausalLM.from_config(conf)
    finally:
        torch.set_default_dtype(torch.float32)
    with torch.no_grad():
        for p in model.parameters():  # HF's init std 0.02; keep it (random, but the shapes and dtype are real)
            if p.dim() == 1:
                p.fill_(1.0)
    n = sum(p.numel() for p in model.parameters())
    bytes_ = n * 2
    model.save_pretrained(out, safe_serialization=True, max_shard_size=f"{max(1, bytes_ // 3 // 10**6 + 1)}MB")
    del model
    return n


def recipe(d: Path, teacher: Path, train: Path, eval_: Path, cfg: dict, steps: int, seq: int) -> Path:
    import yaml

    ffn = _round(4096 * (cfg["hidden_size"] / 2048), 16)
    data = {
        "name": "scale",
        "teacher": {"hf": str(teacher)},
        "student": {"from_teacher": {"keep_every": 2, "intermediate_size": ffn, "calibration_batches": 1}},
        "task": {
            "name": "text-lm",
            "train": [str(train)],
            "eval": [str(eval_)],
            "tokenizer": str(teacher),
            "seq_len": seq,
            "eval_sequences": 4,
        },
        "logit_cache": {"enabled": True},
        "stages": [
            {"stage": "distill", "steps": steps, "batch_size": 1, "warmup": 0},
            {"stage": "prune", "ffn_ratio": 0.25, "steps": steps, "batch_size": 1, "warmup": 0},
            {"stage": "qat", "steps": steps, "batch_size": 1, "warmup": 0, "observer_steps": 1},
            {"stage": "export", "ptq_baselines": False},
            {"stage": "bench", "throughput_batches": [1], "warmup": 1, "runs": 3},
        ],
    }
    p = d / "scale.yaml"
    p.write_text(yaml.safe_dump(data, sort_keys=False))
    return p


def _tree_rss(pid: int) -> int:
    """RSS bytes of ``pid`` and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for e in os.listdir("/proc"):
        if not e.isdigit():
            continue
        try:
            with open(f"/proc/{e}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(e))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            pass
    return total


def run_measured(cmd: list[str], log: Path, marker: str | None = None) -> dict:
    """Run ``cmd``; return wall, exit code, peak tree RSS overall and per section (a section starts at each stdout line
    that starts with ``marker``, e.g. ``[2/5] prune:``)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    sections: list[dict] = [{"name": None, "peak": 0, "t0": t0}]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            r = _tree_rss(proc.pid)
            sections[-1]["peak"] = max(sections[-1]["peak"], r)
            time.sleep(0.2)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    with open(log, "a") as f:
        for line in proc.stdout:
            f.write(line)
            f.flush()
            s = line.strip()
            if marker and s.startswith("[") and "/" in s.split("]")[0] and "]" in s:
                name = s.split("]", 1)[1].split(":", 1)[0].strip()
                sections.append({"name": name, "peak": 0, "t0": time.perf_counter()})
    rc = proc.wait()
    done.set()
    th.join()
    return {
        "rc": rc,
        "wall_s": round(time.perf_counter() - t0, 1),
        "peak": max(s["peak"] for s in sections),
        "sections": [s for s in sections if s["name"]],
    }


def du(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file() and not f.is_symlink()) if p.exists() else 0


def _bundle_facts(folder: Path) -> dict:
    """A bundle's bytes, the graphs it ships (external data counted with its graph) and its size over its largest graph."""
    from dsk_compress.export import graph_files

    card = json.loads((folder / "model_card.json").read_text())
    graphs = {str(p.relative_to(folder)): graph_files.size(p) for p in folder.rglob("*.onnx")}
    total = du(folder)
    return {
        "variant": card["variant"],
        "precision": card["precision"],
        "bytes": total,
        "graphs": graphs,
        "over_largest_graph": round(total / max(graphs.values()), 3),
    }


def _run_dir_budget(rd: Path | None, manifest: dict) -> dict:
    """The run folder against what it must keep: its final artifacts (the export stage's folder) plus the student's
    weights (the last float student's model folder)."""
    if rd is None or not (rd / "export").is_dir():
        return {}
    student = next((rd / e["stage"] / "model" for e in reversed(manifest["stages"]) if e["stage"] in ("prune", "distill")), None)
    keep = du(rd / "export") + (du(student) if student is not None else 0)
    return {"final_artifacts_and_student_gib": round(keep / GIB, 3), "run_dir_over_budget": round(du(rd) / keep, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=float, default=1.0, help="1: a 1.16B teacher / 375M student; 0.05 for a quick check")
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps per training stage")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--text-mb", type=float, default=None, help="corpus size (default 4.7 MB at scale 1, 0.5 MB below)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/dsk-scale"), help="where the models and the run go")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "scale.json")
    a = ap.parse_args()
    work = a.work / f"s{a.scale:g}"
    work.mkdir(parents=True, exist_ok=True)
    cfg = shape(a.scale)
    train, eval_ = corpus(work, a.text_mb if a.text_mb is not None else (4.7 if a.scale >= 0.5 else 0.5))
    t0 = time.perf_counter()
    tdir = work / "teacher"
    if not (tdir / "config.json").is_file():
        tparams = build_teacher(tdir, cfg, train)
    else:
        cfg = json.loads((tdir / "config.json").read_text()) | {"architectures": cfg["architectures"]}
        from safetensors import safe_open

        tparams = 0
        for f in tdir.glob("*.safetensors"):
            with safe_open(str(f), "pt") as g:
                tparams += sum(
                    g.get_slice(k).get_shape().numel()
                    if hasattr(g.get_slice(k).get_shape(), "numel")
                    else __import__("math").prod(g.get_slice(k).get_shape())
                    for k in g.keys()
                )
    build_s = round(time.perf_counter() - t0, 1)
    rfile = recipe(work, tdir, train, eval_, cfg, a.steps, a.seq_len)

    from dsk_compress import load_recipe
    from dsk_compress.recipes.preflight import preflight

    spec = load_recipe(str(rfile))
    est = preflight(spec)
    est_by_index = {s["index"]: s["bytes"] for s in est.get("stages", [])}
    cli = [sys.executable, "-m", "dsk_compress.cli.main"] if False else [str(Path(sys.executable).with_name("dsk-compress"))]
    log = work / "log.txt"
    log.write_text("")
    runs = work / "runs"
    shutil.rmtree(runs, ignore_errors=True)
    res = run_measured([*cli, "recipe", str(rfile), "--out", str(runs)], log, marker="[")
    rd = next(iter(sorted(runs.iterdir())), None) if runs.is_dir() else None
    manifest = json.loads((rd / "manifest.json").read_text()) if rd and (rd / "manifest.json").is_file() else {"stages": []}
    stages = []
    for i, e in enumerate(manifest["stages"]):
        sec = next((s for s in res["sections"] if s["name"] == e["stage"]), None)
        stages.append(
            {
                "name": e["stage"],
                "status": e.get("status"),
                "wall_s": e.get("seconds"),
                "peak_rss_gib": round(sec["peak"] / GIB, 2) if sec else None,
                "estimated_gib": round(est_by_index[i] / GIB, 2) if i in est_by_index else None,
                "disk_gib": round(du(rd / e["stage"]) / GIB, 3),
                **({"error": e["error"]} if e.get("error") else {}),
            }
        )
    bundles = {}
    if rd and manifest.get("status") == "done":
        for name, cmd, folder in (
            ("report", [*cli, "report", str(rd)], None),
            # rpi5 prefers int8 (the QAT student), rpi4 fp32 (the last float student): the int8 bundle against the fp32 one
            ("export --device rpi5", [*cli, "export", str(rd), "--device", "rpi5", "--out", str(work / "bundle-rpi5")], "rpi5"),
            ("export --device rpi4", [*cli, "export", str(rd), "--device", "rpi4", "--out", str(work / "bundle-rpi4")], "rpi4"),
        ):
            if folder:
                shutil.rmtree(work / f"bundle-{folder}", ignore_errors=True)
            r = run_measured(cmd, log)
            stages.append(
                {
                    "name": name,
                    "status": "done" if r["rc"] == 0 else f"failed (exit {r['rc']})",
                    "wall_s": r["wall_s"],
                    "peak_rss_gib": round(r["peak"] / GIB, 2),
                    "estimated_gib": None,
                    "disk_gib": round(du(work / f"bundle-{folder}") / GIB, 3) if folder else 0.0,
                }
            )
            if folder and r["rc"] == 0:
                bundles[folder] = _bundle_facts(work / f"bundle-{folder}")
    student = next(
        (
            e.get("metrics", {}).get("params") or e.get("metrics", {}).get("student_params")
            for e in manifest["stages"]
            if e["stage"] == "distill"
        ),
        None,
    )
    out = {
        "version": 1,
        "machine": f"{platform.node()} {os.cpu_count()} CPUs, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / GIB:.1f} GiB",
        "date": time.strftime("%Y-%m-%d"),
        "scale": a.scale,
        "teacher_config": cfg,
        "teacher_params": tparams,
        "student_params": student or est.get("student_params"),
        "student_params_estimated": est.get("student_params"),
        "teacher_dtype": est.get("teacher_dtype"),
        "steps": a.steps,
        "seq_len": a.seq_len,
        "build_teacher_s": build_s,
        "recipe_wall_s": res["wall_s"],
        "recipe_peak_rss_gib": round(res["peak"] / GIB, 2),
        "run_dir_gib": round(du(rd) / GIB, 3) if rd else None,
        **_run_dir_budget(rd, manifest),
        "bundles": bundles,
        "int8_over_fp32_bundle": round(bundles["rpi5"]["bytes"] / bundles["rpi4"]["bytes"], 3) if len(bundles) == 2 else None,
        "teacher_dir_gib": round(du(tdir) / GIB, 3),
        "stages": stages,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
