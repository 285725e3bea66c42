"""The bench stage: measure every exported artifact on THIS host, then write the report.

Story: for each artifact the export stage left, and for each runtime this host offers it
(:func:`runtime_plans`: ONNX Runtime on the CPU always; each execution provider the device profile names
and the onnxruntime build has, XNNPACK on ARM; torch eager and ``torch.compile`` in bf16 and a built
TensorRT engine where there is a CUDA GPU), score it with the task *in that runtime*, so the accuracy
reported is the accuracy of what ships, and time it with the shared method
(:mod:`dsk_compress.runtimes.measure`: session creation, first inference, warm-up, timed runs at the
latency batch and throughput at batch 8 and 64 where the model allows, peak memory) in a fresh process;
time greedy decoding with its KV-cache graph when it has one. Each measurement is a
:class:`~dsk_compress.runtimes.result.BenchRecord` saved to ``bench/results.json`` as it completes; the
rows go to :func:`dsk_compress.report.build_report`.

Every row is labelled with this host (its name, CPU and the runtime), never with a device: the profile
named by ``bench.device`` only says which threads and execution providers to use here, and a profile of
another CPU architecture (``rpi5`` on an x86 host) is refused. Boards are measured where they are, with
``dsk-compress bench RUN --device D --host H``.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator

from dsk_compress.artifacts import Artifact, read_artifacts
from dsk_compress.progress import step, step_progress
from dsk_compress.recipes.base import STAGES, RunContext, Stage, StageConfig, StageResult
from dsk_compress.recipes.limits import MAX_BATCH, MAX_RUNS, check_device_name, check_threads_fit

RESULTS = "results.json"


@dataclass(frozen=True)
class Plan:
    """One way to run an artifact: ``kind`` onnx | torch | tensorrt, the file or folder (relative to the run), and
    the runtime's settings."""

    kind: str
    path: str
    providers: tuple[str, ...] = ()
    device: str = "cpu"
    dtype: str = "float32"
    compile: bool = False
    extra: dict = field(default_factory=dict)


def check_profile_fits_host(profile) -> None:
    """Refuse a device profile of another CPU architecture: the bench stage measures this host only."""
    from dsk_compress.devices import _normalize_arch
    from dsk_compress.errors import DeviceError

    here = _normalize_arch(platform.machine()) or platform.machine()
    if profile.arch != here:
        raise DeviceError(
            f"bench.device {profile.name} is an {profile.arch} device and this host is {here}: the bench stage measures this host, "
            "and its numbers must not carry a device's name",
            hint=f"use bench.device: host-cpu here, then measure the board where it is: dsk-compress bench RUN --device {profile.name} "
            "--host user@board",
        )


def wants_gpu(profile) -> bool:
    """A profile for a GPU machine: it prefers TensorRT or torch, or names a CUDA / TensorRT execution provider."""
    return profile.preferred_runtime in ("tensorrt", "torch") or any(
        p in ("CUDAExecutionProvider", "TensorrtExecutionProvider") for p in profile.execution_providers
    )


def runtime_plans(art: Artifact | dict, profile, available: list[str], machine: str, cuda: bool, tensorrt: bool) -> list[Plan]:
    """The runtimes to measure one export artifact with on this host, the reference first.

    Args:
        art: the export stage's entry (``path`` of the ONNX file or None, ``model_dir``, ``tensorrt.engine``).
        profile: the bench stage's device profile.
        available: ``onnxruntime.get_available_providers()``.
        machine: ``platform.machine()``.
        cuda: ``torch.cuda.is_available()``.
        tensorrt: the ``tensorrt`` package is importable.
    """
    from dsk_compress.runtimes.onnxruntime import provider_sets

    art = Artifact.of("", art) if not isinstance(art, Artifact) else art
    plans: list[Plan] = []
    if art.path:
        plans += [Plan("onnx", art.path, tuple(p)) for p in provider_sets(profile.execution_providers, available, machine)]
        if art.engine and cuda and tensorrt:
            plans.append(Plan("tensorrt", art.engine, device="cuda"))
    mdir = art.model_dir
    if mdir and cuda and wants_gpu(profile) and art.precision == "fp32":
        plans += [Plan("torch", mdir, device="cuda", dtype="bfloat16", compile=c) for c in (False, True)]
    if not plans and mdir:  # a teacher that did not export: eager torch on the CPU, in the dtype it was saved in (no fp32 copy)
        plans.append(Plan("torch", mdir, dtype="bfloat16" if art.precision == "bf16" else "float32"))
    return plans


def host_provenance(profile_name: str, source_run: str | None, gpu: str | None = None) -> dict:
    """The provenance of a measurement on this host (:class:`~dsk_compress.runtimes.result.Provenance` fields)."""
    from dsk_compress.runtimes.measure import machine_facts, now_utc

    return {
        "measurement": "measured",
        "location": "host",
        "device_profile": profile_name,
        **machine_facts(),
        "gpu": gpu,
        "source_run": source_run,
        "tool": "bench_worker",
        "created": now_utc(),
    }


def _predict(plan: Plan, run_dir: Path, threads: int | None):
    """The task's ``predict`` for the plan's runtime (the same runtime and settings the timing uses)."""
    path = run_dir / plan.path
    if plan.kind == "onnx":
        from dsk_compress.runtimes.onnxruntime import make_session, session_predict

        return session_predict(make_session(path, threads=threads, providers=list(plan.providers)))
    if plan.kind == "tensorrt":
        from dsk_compress.runtimes.tensorrt import trt_predict

        return trt_predict(path)
    if plan.device == "cpu":
        from dsk_compress.models.source import load_hf_dir
        from dsk_compress.models.zoo import torch_predict

        return torch_predict(load_hf_dir(path, dtype="auto"))
    from dsk_compress.runtimes.torch import load_hf_model, torch_forward

    return torch_forward(load_hf_model(path, dtype=plan.dtype, device=plan.device))


def _time(plan: Plan, run_dir: Path, inputs, bcfg):
    path = run_dir / plan.path
    if plan.kind == "onnx":
        from dsk_compress.runtimes.onnxruntime import benchmark_onnx

        return benchmark_onnx(path, inputs, bcfg, providers=list(plan.providers))
    if plan.kind == "tensorrt":
        from dsk_compress.runtimes.tensorrt import benchmark_tensorrt

        return benchmark_tensorrt(path, inputs, bcfg)
    from dsk_compress.runtimes.torch import benchmark_torch

    return benchmark_torch(path, inputs, bcfg, dtype=plan.dtype, device=plan.device, compile=plan.compile)


def _size(path: Path) -> int:
    from dsk_compress.export import graph_files

    return graph_files.size(path) if path.is_file() else sum(f.stat().st_size for f in path.glob("*.safetensors"))


def measure_plan(run_dir: Path, name: str, art: Artifact, plan: Plan, task, bcfg, provenance: dict):
    """Measure one artifact in one runtime: timing (worker process) and accuracy (the task, same runtime); decode is
    measured for all artifacts together (:func:`measure_decodes`).

    Returns:
        The :class:`~dsk_compress.runtimes.result.BenchRecord`.
    """
    from dsk_compress.runtimes.result import Accuracy, BenchRecord

    timing = _time(plan, run_dir, task.example_inputs(1), bcfg)
    metrics = task.evaluate(_predict(plan, run_dir, bcfg.threads)).as_dict()
    n_tokens = metrics.pop("eval_tokens", None)
    acc = Accuracy(task=getattr(task, "name", None), metrics=metrics, tokens=None if n_tokens is None else int(n_tokens))
    prov = {**provenance, "gpu": timing.gpu or provenance.get("gpu")}
    return BenchRecord(
        variant=name,
        role=art.role,
        precision=art.precision,
        artifact=plan.path,
        size_bytes=_size(run_dir / plan.path),
        runtime=timing.runtime,
        provenance=prov,
        timing=timing.timing,
        memory=timing.memory,
        accuracy=acc,
        notes=art.notes,
    )


def measure_decodes(run_dir: Path, artifacts: dict[str, Artifact], task, bcfg, new_tokens: int | None = None) -> dict:
    """Greedy decode with every artifact's :attr:`Artifact.decoder_graph`, all in one ONNX Runtime worker in interleaved rounds (a
    slow spell of the machine falls on every graph alike, so their tokens/s compare): prefill the first half of the
    task's example window, then ``new_tokens`` (default ``DEFAULT_NEW_TOKENS``) single-token steps.

    Returns:
        ``{artifact name: DecodeStats}`` for the artifacts that have a decoder graph.
    """
    graphs = {n: g for n, art in read_artifacts(artifacts).items() if (g := art.decoder_graph)}
    if not graphs:
        return {}
    from dsk_compress.runtimes.decode import DEFAULT_NEW_TOKENS, benchmark_decodes
    from dsk_compress.runtimes.result import DecodeStats

    prompt = task.example_inputs(1)[0][: max(1, task.seq_len // 2)]
    res = benchmark_decodes(
        [run_dir / g for g in graphs.values()],
        prompt,
        new_tokens or DEFAULT_NEW_TOKENS,
        bcfg.threads,
        repeats=max(3, min(bcfg.runs, 10)),
        warmup=max(1, min(bcfg.warmup, 2)),
    )
    keep = (
        "prompt_tokens",
        "new_tokens",
        "repeats",
        "prefill_ms",
        "prefill_ms_runs",
        "decode_ms_p50",
        "decode_ms_p90",
        "decode_tokens_per_s",
        "decode_tokens_per_s_runs",
        "peak_memory_mb",
    )
    return {
        n: DecodeStats(**{k: r[k] for k in keep if k in r}, execution_provider="CPUExecutionProvider", artifact=g)
        for (n, g), r in zip(graphs.items(), res)
    }


def host_rows(records, artifacts: dict[str, Artifact]) -> list[dict]:
    """The report's host rows: one per record, the artifact's entry supplying role, stage, parameters and notes."""
    from dsk_compress.report.devices import record_row, row_names

    artifacts = read_artifacts(artifacts)
    rows = []
    for rec, name in zip(records, row_names(records)):
        art = artifacts.get(rec.variant) or Artifact(name=rec.variant)
        base = {
            "role": art.role,
            "stage": art.stage or rec.variant,
            "params": art.params,
            "artifact": art.path or rec.artifact,
            "notes": art.notes,
        }
        if art.fused_ops:
            base["fused_ops"] = art.fused_ops
        row = record_row(rec, name, base)
        if rec.decode is not None:  # the bench stage's decode figures name the decoder graph they ran, and its fused ops
            ops = art.decoder_fused_ops if rec.decode.artifact == art.fused_path else None
            row["decode"] = {"artifact": rec.decode.artifact, **row.get("decode", {}), **({"fused_ops": ops} if ops else {})}
        rows.append(row)
    return rows


def latency_rounds(run_dir: Path, records: list, refs: dict[str, tuple[int, Plan]], task, bcfg, rounds: int) -> list:
    """Time each variant's reference runtime ``rounds - 1`` more times at the latency batch, in interleaved rounds (each
    round starts one variant further along, every timing in a fresh worker), so a slow spell of the machine falls on
    every variant alike. Each record's latency-batch p50, p90 and p99 become the medians of its rounds' own (so
    p50 <= p90 <= p99 still holds), min and max those over every round, mean the rounds' mean; the record keeps the
    rounds' p50s (``p50_rounds``).

    Args:
        records: the bench records so far (the first round).
        refs: ``{variant: (index of its reference record, its plan)}``.
    """
    import statistics
    from dataclasses import replace

    latency_only = replace(bcfg, throughput_batches=())
    names = list(refs)
    stats = {n: [records[i].timing.batches[0]] for n, (i, _) in refs.items()}
    for r in range(1, rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            stats[name].append(_time(refs[name][1], run_dir, task.example_inputs(1), latency_only).timing.batches[0])
    out = list(records)
    for name, (i, _) in refs.items():
        rec, rs = out[i], stats[name]
        first = rs[0]
        mean = statistics.fmean(s.mean for s in rs)
        merged = first.model_copy(
            update={
                **{k: statistics.median(getattr(s, k) for s in rs) for k in ("p50", "p90", "p99")},
                "min": min(s.min for s in rs),
                "max": max(s.max for s in rs),
                "mean": mean,
                "items_per_s": first.batch_size * 1000 / mean,
                "tokens_per_s": None if first.tokens_per_s is None else first.tokens_per_s * first.mean / mean,
                "p50_rounds": [s.p50 for s in rs],
            }
        )
        out[i] = rec.model_copy(update={"timing": rec.timing.model_copy(update={"batches": [merged, *rec.timing.batches[1:]]})})
    return out


def measure_artifacts(
    run_dir: Path,
    artifacts: dict[str, Artifact],
    task,
    profile,
    bcfg,
    source_run: str | None,
    results_path: Path,
    device_name: str = "host",
    new_tokens: int | None = None,
    rounds: int = 1,
) -> tuple[list, list[str]]:
    """Measure every artifact in every runtime of :func:`runtime_plans`, saving each record to ``results_path`` as it
    completes (an interrupted run keeps what it measured). A failing reference runtime (the first) raises; a failing
    extra runtime is reported and skipped. With ``rounds`` > 1 the reference runtimes' p50 latencies are medians of
    interleaved rounds (:func:`latency_rounds`).

    Returns:
        ``(records, errors)``.
    """
    import importlib.util

    import onnxruntime
    import torch

    from dsk_compress.errors import DskError
    from dsk_compress.io import atomic_write_json
    from dsk_compress.runtimes.result import DeviceResults

    cuda = torch.cuda.is_available()
    gpu = torch.cuda.get_device_name(0) if cuda else None
    prov = host_provenance(profile.name, source_run, gpu)
    available = onnxruntime.get_available_providers()
    trt = importlib.util.find_spec("tensorrt") is not None
    artifacts = read_artifacts(artifacts)  # the export stage's mappings (from a manifest) or Artifacts
    saved = DeviceResults(device=device_name)
    records, errors, first, plans_of = [], [], {}, {}
    for name, art in artifacts.items():
        plans = runtime_plans(art, profile, available, platform.machine(), cuda, trt)
        for i, plan in enumerate(plans):
            step(f"{name}: accuracy and latency in {plan.kind}")
            try:
                rec = measure_plan(run_dir, name, art, plan, task, bcfg, prov)
            except DskError as e:
                if i == 0:
                    raise
                errors.append(f"{name} in {plan.kind} {' '.join(plan.providers) or plan.device}: {e.message}")
                continue
            first.setdefault(name, len(records))  # the reference runtime's record carries the decode figures
            plans_of.setdefault(name, plan)
            records.append(rec)
            saved = saved.merged([rec])
            atomic_write_json(results_path, saved.to_dict())
    if rounds > 1 and len(first) > 1:
        step(f"p50 latency of every variant, {rounds - 1} more interleaved rounds")
        records = latency_rounds(run_dir, records, {n: (first[n], plans_of[n]) for n in first}, task, bcfg, rounds)
        atomic_write_json(results_path, saved.merged(records).to_dict())
    if any(artifacts[n].decoder_graph for n in first):
        step("greedy decode of every variant with a decoder graph, interleaved rounds")
    for name, stats in measure_decodes(run_dir, {n: artifacts[n] for n in first}, task, bcfg, new_tokens).items():
        records[first[name]] = records[first[name]].model_copy(update={"decode": stats})
    atomic_write_json(results_path, saved.merged(records).to_dict())
    return records, errors


class BenchStageConfig(StageConfig):
    stage: Literal["bench"] = "bench"
    device: str = Field(
        "host-cpu",
        description="device profile whose threads and execution providers apply on this host (see "
        "`dsk-compress devices`); rows are labelled with this host, and a profile of another CPU architecture is "
        "refused: measure a board with `dsk-compress bench RUN --device D --host H`",
    )
    batch_size: int = Field(1, ge=1, le=MAX_BATCH, description="the latency batch (p50/p90/p99 in the report)")
    throughput_batches: list[Annotated[int, Field(ge=1, le=MAX_BATCH)]] = Field(
        default_factory=lambda: [8, 64],
        max_length=8,
        description="further batch sizes timed for throughput (items/s) where the model allows; each stops after 10 s once it has 3 runs",
    )
    warmup: int = Field(5, ge=0, le=MAX_RUNS)
    runs: int = Field(30, ge=1, le=MAX_RUNS)
    threads: int | None = Field(None, ge=1, description="ONNX Runtime threads (default: the device's); at most 4x this machine's CPUs")
    rounds: int = Field(
        3,
        ge=1,
        le=20,
        description="latency rounds: each variant's p50 is the median over this many timings in "
        "interleaved rounds (a fresh worker each; the report shows their range), so a slow spell of the machine "
        "falls on every variant alike; 1 times each variant once",
    )

    @field_validator("device")
    @classmethod
    def _known_device(cls, v: str) -> str:
        return check_device_name(v)

    @field_validator("threads")
    @classmethod
    def _threads_fit(cls, v: int | None) -> int | None:
        return check_threads_fit(v)


@STAGES.register("bench")
class BenchStage(Stage[BenchStageConfig]):
    """Measure every exported variant on this host: accuracy of the artifact in its runtime, latency, throughput, memory."""

    requires = ("artifacts",)  # what the export stage wrote: nothing to measure without it
    provides = ("report",)

    ranks = "main"  # under torchrun: rank 0 alone, the other ranks wait for its result

    def uses_teacher(self, spec) -> bool:
        return False  # the teacher's row runs what the export stage wrote (ONNX, or its saved PyTorch folder)

    def run(self, ctx: RunContext) -> StageResult:
        from dsk_compress.devices import load_device
        from dsk_compress.report import build_report
        from dsk_compress.runtimes import BenchConfig
        from dsk_compress.runtimes.measure import machine_facts

        c = self.config
        profile = load_device(c.device)
        check_profile_fits_host(profile)
        threads = c.threads or profile.threads
        artifacts = read_artifacts(ctx.latest_output("artifacts"), "the export stage's artifacts")
        bcfg = BenchConfig(
            warmup=c.warmup,
            runs=c.runs,
            batch_size=c.batch_size,
            throughput_batches=tuple(c.throughput_batches),
            threads=threads,
            seq_len=getattr(ctx.task, "seq_len", None),
        )
        with step_progress("bench"):  # minutes of measurements: say which one is under way
            records, errors = measure_artifacts(
                ctx.run_dir, artifacts, ctx.task, profile, bcfg, ctx.run_dir.name, ctx.stage_dir("bench") / RESULTS, rounds=c.rounds
            )
        variants = host_rows(records, artifacts)
        td = ctx.task.describe()
        inputs = ctx.task.example_inputs(1)
        if getattr(ctx.task, "seq_len", None) is not None:
            task_str, shape_str = (
                f"{td['name']} (seq {td['seq_len']}, {td.get('eval_tokens', '?')} validation tokens)",
                f"seq {ctx.task.seq_len}",
            )
        else:  # your own task: no sequence length
            shape_str = "input " + "x".join(str(n) for n in tuple(inputs.shape)[1:])
            task_str = f"{td['name']} ({td.get('eval_samples', '?')} validation samples, {shape_str})"
        facts = machine_facts()
        meta = {
            "run": ctx.run_dir.name,
            "recipe": ctx.spec.name,
            "task": task_str,
            "host": f"{facts['hostname']} ({facts['machine']}, {facts['cpu'] or 'unknown CPU'}): {threads} threads "
            f"(profile {profile.name}), batch {c.batch_size}, {shape_str}",
            "max_accuracy_drop": ctx.spec.report.max_accuracy_drop,
        }
        from dsk_compress.sanity import chance_accuracy, flag_teacher_rows

        meta["chance_accuracy"] = chance = chance_accuracy(ctx.task)  # the report recommends nothing near chance
        flag_teacher_rows(variants, chance)  # a teacher near chance or below a student is flagged in its row
        report = build_report(ctx.run_dir, variants, meta)
        return StageResult(
            outputs={"report": "report.json", "results": f"bench/{RESULTS}"},
            metrics={
                "variants": variants,
                "summary": report.get("summary"),
                "runtime_errors": errors,
                "onnxruntime_threads": {"threads": threads, "source": "bench.threads" if c.threads else f"device profile {profile.name}"},
            },
        )
