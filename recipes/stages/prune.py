"""The prune stage: structured pruning of the student, in slices, each followed by a KD fine-tune.

Story: load the student the earlier stages left; turn the config into a final shape: fixed ratios (FFN
channels, attention heads in whole KV groups, decoder layers; uniform per layer), a params / MACs target
solved for up front, or an MoE student's expert ratio; measure the student; then prune toward it in
``iterations`` slices (importance re-measured each slice, a KD fine-tune after each; ``_schedule``) or, for
a latency target, step by step until the p50 measured on this host meets the budget (``_latency_schedule``);
save ``prune/model`` and its before/after structure, params and MACs. The optional ``oneshot`` baseline
prunes to the same final shape in one slice with the same total fine-tune budget. The algorithms
(importance, surgery, shapes and targets) live in ``compress/prune`` and ``compress/moe.py``.
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from dsk_compress.io import read_json
from dsk_compress.recipes.base import STAGES, RunContext, Stage, StageConfig, StageResult, StrictModel
from dsk_compress.recipes.limits import MAX_CALIBRATION_BATCHES, MAX_RUNS, MAX_STEPS, MAX_WIDTH
from dsk_compress.recipes.stages.common import (  # your own torch model
    _TrainSettings,
    agreed,
    evaluate,
    is_torch_run,
    kd_train,
    rank0,
    student_model,
    torch_evaluate,
    torch_kd_train,
    torch_student,
    torch_train_summary,
    train_summary,
)


class PruneTargetSpec(StrictModel):
    """Prune to a budget instead of fixed ratios: exactly one of ``params``, ``macs`` or ``latency_ms``."""

    params: float | None = Field(None, gt=0, lt=1, description="keep at most this fraction of the parameters, e.g. 0.5")
    macs: float | None = Field(
        None, gt=0, lt=1, description="keep at most this fraction of the MACs of one forward pass (batch 1, the task's seq_len)"
    )
    latency_ms: float | None = Field(
        None, gt=0, description="p50 latency budget in ms: ONNX Runtime on this host, batch 1, the task's seq_len"
    )
    device: str = Field("host-cpu", description="where latency_ms is measured; only host-cpu (this machine) can be measured during pruning")
    structures: list[Literal["ffn", "heads", "layers"]] = Field(
        default_factory=lambda: ["ffn"],
        min_length=1,
        description="what the target prunes, all by one common ratio (heads go in whole KV groups)",
    )
    max_ratio: float = Field(0.9, gt=0, lt=1, description="largest fraction of each structure the target may remove")
    step: float = Field(0.1, gt=0, lt=1, description="latency_ms: ratio added per progressive step (export + measure + fine-tune)")
    runs: int = Field(20, ge=1, le=MAX_RUNS, description="latency_ms: timed runs per measurement")
    warmup: int = Field(3, ge=0, le=MAX_RUNS, description="latency_ms: untimed runs per measurement")

    @model_validator(mode="after")
    def _one_budget(self):
        given = [k for k in ("params", "macs", "latency_ms") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"target: give exactly one of params, macs, latency_ms (got {', '.join(given) or 'none'})")
        if self.device != "host-cpu":
            raise ValueError(
                f"target.device {self.device!r}: latency is measured on this host while pruning; use device: host-cpu "
                "(measure a device with `dsk-compress export RUN --device D` and its run.py)"
            )
        if len(set(self.structures)) != len(self.structures):
            raise ValueError(f"target.structures {self.structures} names a structure twice")
        return self


class PruneConfig(StageConfig, _TrainSettings):
    stage: Literal["prune"] = "prune"
    ffn_ratio: float | None = Field(
        None,
        ge=0,
        lt=1,
        description="fraction of FFN channels removed (default 0.5 when nothing else is pruned; 0 when head_ratio, "
        "layers_removed, depth_ratio, expert_ratio or target is given)",
    )
    head_ratio: float = Field(0.0, ge=0, lt=1, description="fraction of attention heads removed, in whole KV groups with their query heads")
    channel_ratio: float | None = Field(
        None, ge=0, lt=1, description="torch (non-Hugging Face) student: fraction of each conv's output channels removed (default 0.5)"
    )
    layers_removed: int = Field(
        0,
        ge=0,
        le=MAX_WIDTH,
        description="decoder layers removed, lowest block influence (1 - cos(input, output) on calibration data) first",
    )
    depth_ratio: float = Field(
        0.0, ge=0, lt=1, description="fraction of decoder layers removed (rounded down); alternative to layers_removed"
    )
    expert_ratio: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="MoE students: fraction of routed experts removed from every MoE layer, least used on calibration data first",
    )
    importance: Literal["l1", "l2", "taylor", "activation"] = Field(
        "l2", description="channel/head importance: weight magnitude (l1, l2), first-order Taylor, or mean |activation| on calibration data"
    )
    calibration_batches: int = Field(
        8,
        ge=1,
        le=MAX_CALIBRATION_BATCHES,
        description="batches of 8 training windows for activation importance, layer block influence and expert router frequencies",
    )
    target: PruneTargetSpec | None = Field(
        None, description="prune to a budget instead of ratios: {params: F}, {macs: F} or {latency_ms: X, device: host-cpu}"
    )
    iterations: int = Field(1, ge=1, le=1000, description="progressive pruning: prune a slice, fine-tune, repeat")
    round_to: int = Field(8, ge=1, le=4096, description="channel counts rounded to a multiple of this")
    steps: int = Field(100, ge=0, le=MAX_STEPS, description="KD fine-tune steps after each pruning step")
    timeout_s: float = Field(300, gt=0, le=7 * 86400, description="abort pruning a model that takes longer (torch-pruning GQA hang)")
    baselines: list[Literal["oneshot"]] = Field(
        default_factory=list, description="also prune one-shot to the same size with the same total fine-tune budget (role pruned-oneshot)"
    )

    @model_validator(mode="after")
    def _ratios_or_target(self):
        if self.layers_removed and self.depth_ratio:
            raise ValueError("give layers_removed or depth_ratio, not both")
        if self.expert_ratio:
            given = [k for k in ("ffn_ratio", "head_ratio", "layers_removed", "depth_ratio", "target") if getattr(self, k)]
            if given:
                raise ValueError(
                    f"expert_ratio prunes the experts of an MoE student and cannot be combined with {', '.join(given)}; "
                    "prune experts here and distill to a dense student for the rest"
                )
        if self.target is not None:
            given = [k for k in ("ffn_ratio", "head_ratio", "layers_removed", "depth_ratio") if getattr(self, k)]
            if given:
                raise ValueError(
                    f"give either target or ratios, not both (got target and {', '.join(given)}); remove target or set {given[0]}: 0"
                )
            if self.target.latency_ms is not None and self.iterations != 1:
                raise ValueError("target.latency_ms prunes in steps of target.step until the budget is met; remove iterations")
        return self

    @property
    def effective_ffn_ratio(self) -> float:
        """``ffn_ratio``, or its default: 0.5 when nothing else is pruned, 0 next to head, depth or expert pruning or a target."""
        if self.ffn_ratio is not None:
            return self.ffn_ratio
        return 0.0 if (self.target is not None or self.head_ratio or self.layers_removed or self.depth_ratio or self.expert_ratio) else 0.5


@STAGES.register("prune")
class PruneStage(Stage[PruneConfig]):
    """Structured pruning (FFN channels, heads in whole KV groups, decoder layers; uniform per layer) to fixed
    ratios or to a params / MACs / measured-latency target, with a KD fine-tune after each step."""

    consumes = ("model",)  # the latest student (else the recipe's own)
    provides = ("model",)
    repeatable = True  # prune, then prune again (e.g. heads after FFN channels)
    # library arguments that are this stage's fields under another name (what an InvalidArgument names)
    arguments = {
        "structures": "target.structures",
        "params": "target.params",
        "macs": "target.macs",
        "max_ratio": "target.max_ratio",
        "drop": "layers_removed",
        "widths": "channel_ratio",
    }

    def run(self, ctx: RunContext) -> StageResult:
        import torch

        if is_torch_run(ctx):  # your own torch model: conv channels (below)
            return run_torch(self, ctx)
        from dsk_compress.compress.moe import expert_structure
        from dsk_compress.compress.prune import count_macs, layers_to_remove, ratio_shape, shape_of, solve_target, structure
        from dsk_compress.models.source import count_params, save_hf_dir

        c = self.config
        t = c.target
        d = ctx.stage_dir("prune")
        model = student_model(ctx, "prune")
        example = torch.as_tensor(ctx.task.example_inputs(1))
        seq = int(example.shape[1])
        moe = self._moe_start(model)
        describe = expert_structure if moe else structure
        macs = (lambda m: None) if moe else (lambda m: count_macs(m, seq))  # MoE MACs depend on the routing of each input
        start, final = moe or (shape_of(model),) * 2
        target_info = None
        if not moe and t is None:
            removed = layers_to_remove(start.layers, c.layers_removed, c.depth_ratio)
            final = ratio_shape(model.config, c.effective_ffn_ratio, c.head_ratio, removed, c.round_to)
        elif not moe and t.latency_ms is None:
            kind = "params" if t.params is not None else "macs"
            final, target_info = solve_target(model, kind, getattr(t, kind), t.structures, c.round_to, seq, t.max_ratio)
        calib = self._calibration(ctx)
        macs0, params0 = macs(model), count_params(model)
        before = describe(model)
        acc_before = evaluate(ctx, model)
        start_state = {k: v.clone() for k, v in model.state_dict().items()} if c.baselines else None
        if t is not None and t.latency_ms is not None:
            model, log, target_info = self._latency_schedule(ctx, model, start, d, example, calib)
            final, n_steps = shape_of(model), len(log)
        else:
            model, log = self._schedule(ctx, model, c.iterations, c.steps, d, self._slices(ctx, start, final, example, calib))
            n_steps = c.iterations
        macs1, params1 = macs(model), count_params(model)
        rank0(save_hf_dir, model, d / "model")
        metrics = {
            "structure_before": before,
            "structure_after": describe(model),
            "accuracy_before": acc_before["accuracy"],
            "params_before": int(params0),
            "params_after": int(params1),
            "macs_before": macs0,
            "macs_after": macs1,
            "mac_reduction": round(1 - macs1 / macs0, 4) if macs0 else None,
            "macs_counted": "not counted for an MoE student (its MACs depend on each input's routing)"
            if moe
            else f"torch FlopCounterMode over one forward pass, batch 1, seq {seq}: every matmul incl. attention scores, MACs = FLOPs / 2",
            "importance": c.importance,
            "iterations": log,
            **evaluate(ctx, model),
        }
        if target_info is not None:
            metrics["target"] = target_info
        baselines = {}
        if "oneshot" in c.baselines:  # same final structure, one slice, the same total fine-tune budget
            one = student_model(ctx, "prune")
            one.load_state_dict(start_state)
            one, one_log = self._schedule(
                ctx, one, 1, c.steps * n_steps, d / "baselines" / "oneshot", self._slices(ctx, start, final, example, calib)
            )
            rank0(save_hf_dir, one, d / "baselines" / "oneshot" / "model")
            baselines["oneshot"] = ctx.rel(d / "baselines" / "oneshot" / "model")
            metrics["baseline_oneshot"] = {"iterations": one_log, **evaluate(ctx, one)}
        return StageResult(outputs={"model": ctx.rel(d / "model"), "baselines": baselines}, metrics=metrics)

    def _moe_start(self, model) -> tuple:
        """``(start, final)`` for ``_slices`` on an MoE student, or None for a dense one; refuses settings that do not fit."""
        import copy

        from dsk_compress.compress.moe import experts_keep, is_moe
        from dsk_compress.errors import InvalidArgument

        c = self.config
        if not is_moe(model):
            if c.expert_ratio:
                raise InvalidArgument(
                    f"expert_ratio {c.expert_ratio}: the student ({type(model).__name__}) has no MoE layers",
                    "expert_ratio",
                    hint="remove expert_ratio, or prune FFN channels, heads or layers of a dense student",
                )
            return None
        if not c.expert_ratio:
            raise InvalidArgument(
                f"expert_ratio is needed: the student ({type(model).__name__}) is an MoE, whose experts this stage prunes "
                "(FFN channels, heads, layers and targets are for dense students)",
                "expert_ratio",
                hint="set expert_ratio (e.g. 0.5) and no other ratio, or distill to a dense student first",
            )
        experts_keep(model.config, c.expert_ratio)
        return copy.deepcopy(model.config), None

    def _calibration(self, ctx: RunContext):
        """Calibration batches for activation importance, block influence and router frequencies (None when unused)."""
        import torch

        c = self.config
        depth = c.layers_removed or c.depth_ratio or (c.target is not None and "layers" in c.target.structures)
        if c.importance != "activation" and not depth and not c.expert_ratio:
            return None
        return [torch.as_tensor(b) for b in ctx.task.calibration_batches(c.calibration_batches)]

    def _schedule(self, ctx: RunContext, model, iterations: int, steps: int, d: Path, prune) -> tuple:
        """``iterations`` slices of ``prune(model, it, iterations)``, each followed by ``steps`` KD fine-tune steps."""
        from dsk_compress.io import atomic_write_json
        from dsk_compress.models.source import load_hf_dir, save_hf_dir

        c = self.config
        log = []
        for it in range(iterations):
            step_dir = d / f"iter{it}"
            if agreed((step_dir / "model" / "config.json").is_file()):  # resume: this iteration is complete
                model = load_hf_dir(step_dir / "model")
                log.append(read_json(step_dir / "metrics.json"))
                continue
            after = prune(model, it, iterations)
            pruned_acc = evaluate(ctx, model)
            res = kd_train(ctx, model, c, "prune", step_dir / "checkpoint", steps=steps, data_offset=it * 100_000)
            entry = {
                "iteration": it,
                "structure": after,
                "accuracy_after_prune": pruned_acc["accuracy"],
                "train": train_summary(res),
                **evaluate(ctx, model),
            }
            rank0(save_hf_dir, model, step_dir / "model")
            rank0(atomic_write_json, step_dir / "metrics.json", entry)
            log.append(entry)
        return model, log

    def _slices(self, ctx: RunContext, start, final, example, calib):
        """``prune(model, it, iterations)`` for ``_schedule``. Llama-family students (``start``/``final`` Shapes): widths
        shrink geometrically toward ``final``, importance re-measured each slice. MoE students (``start`` the unpruned
        config, ``final`` None): ``expert_ratio`` is removed linearly, router frequencies re-measured each slice."""
        from dsk_compress.compress.prune import interpolate

        if final is None:
            from dsk_compress.compress.moe import expert_structure, experts_keep, prune_experts

            def prune(model, it, iterations):
                keep = experts_keep(start, self.config.expert_ratio * (it + 1) / iterations)
                routing = prune_experts(model, keep, calib) if keep < expert_structure(model)["experts"][0] else {}
                return {**expert_structure(model), "routing": routing}

            return prune
        return lambda model, it, iterations: self._prune(
            ctx, model, interpolate(start, final, (it + 1) / iterations, self.config.round_to, model.config), example, calib, it
        )

    def _prune(self, ctx: RunContext, model, shape, example, calib, it: int) -> dict:
        import torch

        from dsk_compress.compress.distill import kd_loss
        from dsk_compress.compress.prune import prune_to

        c = self.config
        x = torch.as_tensor(ctx.task.train_batch(3_000_000 + it, 8))

        def taylor_loss(m):
            s = m(input_ids=x, use_cache=False).logits
            with torch.no_grad():
                teacher = ctx.kd_teacher()  # sharded: every rank prunes, so every rank runs this forward
                t = teacher(input_ids=x.to(next(teacher.parameters()).device), use_cache=False).logits.to(s.device)
            return kd_loss(s, t, x, c.temperature, c.kd_weight)[0]

        return prune_to(model, shape, c.importance, c.timeout_s, example, calib, taylor_loss)

    def _latency_schedule(self, ctx: RunContext, model, start, d: Path, example, calib) -> tuple:
        """Prune ``target.step`` more of the chosen structures per step, export the candidate to ONNX and time it on
        this host, fine-tune, and stop once the p50 meets ``target.latency_ms`` (error at ``target.max_ratio``)."""
        from dsk_compress.compress.prune import measure_latency, shape_of, uniform_shape
        from dsk_compress.devices import load_device
        from dsk_compress.errors import InvalidArgument
        from dsk_compress.io import atomic_write_json
        from dsk_compress.models.source import load_hf_dir, save_hf_dir

        c = self.config
        t = c.target
        threads = load_device("host-cpu").threads
        seq = int(example.shape[1])
        info = {
            "kind": "latency_ms",
            "budget_ms": t.latency_ms,
            "device": t.device,
            "structures": list(t.structures),
            "measured_on": f"this host ({platform.node()}, {platform.machine()}, {threads} threads), not the target device",
            "how": f"ONNX export of each candidate, ONNX Runtime CPU (extended optimizations), batch 1, seq {seq}, "
            f"p50 of {t.runs} runs after {t.warmup} warm-up runs in a fresh process",
            "steps": [],
        }

        def measure(m):  # timed on rank 0 alone under torchrun and shared, so every rank prunes the same way
            from dsk_compress.compress import dist

            return dist.on_main(
                lambda: measure_latency(m, example, d / "latency", threads=threads, runs=t.runs, warmup=t.warmup), "latency measurement"
            )

        ref_file = d / "latency_before.json"
        if agreed(ref_file.is_file()):
            ref = read_json(ref_file)
        else:
            ref = measure(model)
            rank0(atomic_write_json, ref_file, ref)
        info["before"] = ref
        info["before_p50_ms"] = ref["p50_ms"]
        log: list[dict] = []
        if ref["p50_ms"] <= t.latency_ms:
            info.update(met=True, stopped="the unpruned model already meets the budget; nothing pruned")
            rank0(atomic_write_json, d / "latency.json", info)
            return model, log, info
        k = 0
        while True:
            k += 1
            ratio = min(round(k * t.step, 6), t.max_ratio)
            step_dir = d / f"step{k}"
            if agreed((step_dir / "model" / "config.json").is_file()):  # resume: this step is complete
                model = load_hf_dir(step_dir / "model")
                entry = read_json(step_dir / "metrics.json")
            else:
                shape = uniform_shape(start, ratio, t.structures, c.round_to, model.config)
                if shape == shape_of(model) and ratio < t.max_ratio:
                    continue  # channel rounding: nothing new to remove at this ratio
                if shape == shape_of(model):
                    entry = None
                else:
                    after = self._prune(ctx, model, shape, example, calib, k)
                    lat = measure(model)
                    pruned_acc = evaluate(ctx, model)
                    res = kd_train(ctx, model, c, "prune", step_dir / "checkpoint", steps=c.steps, data_offset=k * 100_000)
                    entry = {
                        "step": k,
                        "ratio": ratio,
                        "structure": after,
                        "latency": lat,
                        "accuracy_after_prune": pruned_acc["accuracy"],
                        "train": train_summary(res),
                        **evaluate(ctx, model),
                    }
                    rank0(save_hf_dir, model, step_dir / "model")
                    rank0(atomic_write_json, step_dir / "metrics.json", entry)
            if entry is not None:
                log.append(entry)
                layers = entry["structure"]["layers"]
                info["steps"].append(
                    {
                        "step": entry["step"],
                        "ratio": entry["ratio"],
                        "structure": {**{kk: layers[0][kk] for kk in ("heads", "kv_heads", "ffn")}, "layers": len(layers)},
                        **{kk: entry["latency"][kk] for kk in ("p50_ms", "p90_ms", "parity_max_abs_diff")},
                    }
                )
                if entry["latency"]["p50_ms"] <= t.latency_ms:
                    info.update(met=True, stopped=f"budget met at step {entry['step']} (ratio {entry['ratio']})")
                    break
            if ratio >= t.max_ratio:
                last = info["steps"][-1]["p50_ms"] if info["steps"] else ref["p50_ms"]
                info.update(met=False, stopped=f"target.max_ratio {t.max_ratio} reached")
                rank0(atomic_write_json, d / "latency.json", info)
                raise InvalidArgument(
                    f"target.latency_ms {t.latency_ms} ms is not met on this host even at target.max_ratio {t.max_ratio}: "
                    f"p50 {last:.3f} ms after {len(info['steps'])} steps (unpruned {ref['p50_ms']:.3f} ms)",
                    "target.latency_ms",
                    hint="raise target.latency_ms or target.max_ratio, or add structures (heads, layers); every step is in prune/latency.json",
                )
        rank0(atomic_write_json, d / "latency.json", info)
        return model, log, info


# ---------------------------------------------------------------------------------------------
# your own torch model: conv output channels, torch-pruning (compress/cnn.py)


def run_torch(stage, ctx: RunContext) -> StageResult:
    """Conv output channels to ``channel_ratio`` (rounded to ``round_to``), in ``iterations`` slices with KD after each."""
    import torch

    from dsk_compress.compress.cnn import conv_widths, count_macs, output_layers, target_widths
    from dsk_compress.models.source import count_params, save_model_dir

    c = stage.config
    d = ctx.stage_dir("prune")
    model = torch_student(ctx, "prune")
    example = torch.as_tensor(ctx.task.example_inputs(1))
    outs = {id(m) for m in output_layers(model, example)}
    start = {n: w for n, w in conv_widths(model).items() if id(model.get_submodule(n)) not in outs}
    ratio = 0.5 if c.channel_ratio is None else c.channel_ratio
    final = target_widths(start, ratio, c.round_to)
    macs0, params0 = count_macs(model, example), count_params(model)
    acc_before = torch_evaluate(ctx, model)
    model, log = _torch_schedule(stage, ctx, model, start, final, c.iterations, c.steps, d, example)
    macs1, params1 = count_macs(model, example), count_params(model)
    save_model_dir(model, d / "model")
    after = {n: w for n, w in conv_widths(model).items() if n in start}
    metrics = {
        "structure_before": {"conv_channels": start},
        "structure_after": {"conv_channels": after},
        "channel_ratio": ratio,
        "round_to": c.round_to,
        "accuracy_before": acc_before["accuracy"],
        "params_before": int(params0),
        "params_after": int(params1),
        "macs_before": int(macs0),
        "macs_after": int(macs1),
        "mac_reduction": round(1 - macs1 / macs0, 4),
        "macs_counted": f"torch FlopCounterMode over one forward pass on one example input {list(example.shape)}, MACs = FLOPs / 2",
        "importance": c.importance,
        "iterations": log,
        **torch_evaluate(ctx, model),
    }
    baselines = {}
    if "oneshot" in c.baselines:  # same final widths in one slice, the same total fine-tune budget
        bdir = d / "baselines" / "oneshot"
        one, one_log = _torch_schedule(stage, ctx, torch_student(ctx, "prune"), start, final, 1, c.steps * c.iterations, bdir, example)
        save_model_dir(one, bdir / "model")
        baselines["oneshot"] = ctx.rel(bdir / "model")
        metrics["baseline_oneshot"] = {"iterations": one_log, **torch_evaluate(ctx, one)}
    return StageResult(outputs={"model": ctx.rel(d / "model"), "baselines": baselines}, metrics=metrics)


def _torch_schedule(stage, ctx: RunContext, model, start: dict, final: dict, iterations: int, steps: int, d: Path, example) -> tuple:
    """``iterations`` slices from the ``start`` conv widths toward ``final`` (Taylor importance on a task batch), each
    followed by ``steps`` KD fine-tune steps; a completed slice (its model saved) is reloaded on resume."""
    import torch.nn.functional as F

    from dsk_compress.compress.cnn import interpolate_widths, prune_channels
    from dsk_compress.io import atomic_write_json
    from dsk_compress.models.source import TORCH_DIR_FILE, load_model_dir, save_model_dir

    c = stage.config
    hard = getattr(ctx.task, "loss", None)
    log = []
    for it in range(iterations):
        step_dir = d / f"iter{it}"
        if (step_dir / "model" / TORCH_DIR_FILE).is_file():  # resume: this iteration is complete
            model = load_model_dir(step_dir / "model")
            log.append(read_json(step_dir / "metrics.json"))
            continue
        widths = interpolate_widths(start, final, (it + 1) / iterations, c.round_to)
        batch = ctx.task.train_batch(3_000_000 + it, 32)

        def taylor_loss(m, batch=batch):
            out = m(batch[0])
            return hard(out, batch) if hard is not None else F.cross_entropy(out, batch[1])

        after = prune_channels(model, widths, example, c.importance, taylor_loss)
        pruned_acc = torch_evaluate(ctx, model)
        res = torch_kd_train(ctx, model, c, "prune", step_dir / "checkpoint", steps=steps, data_offset=it * 100_000)
        entry = {
            "iteration": it,
            "structure": {"conv_channels": after},
            "accuracy_after_prune": pruned_acc["accuracy"],
            "train": torch_train_summary(res),
            **torch_evaluate(ctx, model),
        }
        save_model_dir(model, step_dir / "model")
        atomic_write_json(step_dir / "metrics.json", entry)
        log.append(entry)
    return model, log
