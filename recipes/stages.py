"""The built-in stages: distill -> prune -> qat -> export -> bench (each registered by name)."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch

from dsk_compress.errors import ExportError
from dsk_compress.recipes.base import STAGES, RunContext, Stage, StageResult
from dsk_compress.recipes.schema import BenchStageConfig, DistillConfig, ExportConfig, PruneConfig, QATConfig

# each stage reads its own slice of the training stream
_DATA_OFFSETS = {"distill": 0, "prune": 1_000_000, "qat": 2_000_000}


def _rank0(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` on rank 0 alone under torchrun (every rank holds the same model and metrics; one writes them)."""
    from dsk_compress.compress import dist

    return fn(*args, **kwargs) if dist.is_main() else None


def _agreed(value):
    """Rank 0's ``value`` on every rank: a resume decision that ranks must take the same way."""
    from dsk_compress.compress import dist

    return dist.broadcast_object(value)


def _evaluate(ctx: RunContext, model) -> dict:
    from dsk_compress.models.zoo import torch_predict

    model.eval()
    return ctx.task.evaluate(torch_predict(model)).as_dict()


def _train_cfg(c, data_offset: int, seed: int, steps: int | None = None):
    from dsk_compress.compress.trainer import TrainConfig

    return TrainConfig(steps=c.steps if steps is None else steps, batch_size=c.batch_size, lr=c.lr, warmup=min(c.warmup, max(0, (steps or c.steps) // 5)),
                       eval_every=c.eval_every, ckpt_every=50, seed=seed, data_offset=data_offset,
                       early_stop_patience=c.early_stop_patience, precision=c.precision)


def _stage_field(ctx: RunContext, stage: str, name: str) -> str:
    """``stages.<i>.<name>``: how a recipe error names a field of a stage."""
    i = next((i for i, s in enumerate(ctx.spec.stages) if s.stage == stage), None)
    return f"stages.{i}.{name}" if i is not None else name


def _check_kd_settings(ctx: RunContext, c, stage: str) -> None:
    """KD settings that cannot work together, refused before any training."""
    from dsk_compress.errors import RecipeError

    cached = ctx.spec.logit_cache.enabled and c.kd_weight > 0
    if cached and c.reverse_kl > 0:
        raise RecipeError(f"{_stage_field(ctx, stage, 'reverse_kl')} needs the full teacher distribution, but logit_cache is enabled",
                          hint="set logit_cache.enabled: false or reverse_kl: 0")
    if getattr(c, "hidden_mse", 0.0) > 0 and ctx.spec.logit_cache.enabled:
        raise RecipeError(f"{_stage_field(ctx, stage, 'hidden_mse')} needs the online teacher's hidden states, but logit_cache is enabled",
                          hint="set logit_cache.enabled: false or hidden_mse: 0")


def _kd_train(ctx: RunContext, model, c, stage: str, ckpt: Path, steps: int | None = None, data_offset: int = 0, params=None,
              hidden_pairs: list | None = None):
    """Train ``model`` with KD from the run's teacher; ``hidden_pairs`` are the (student, teacher) layers for ``c.hidden_mse``."""
    from dsk_compress.compress import dist
    from dsk_compress.compress.distill import HiddenStateMSE, make_kd_loss_fn
    from dsk_compress.compress.trainer import train

    _check_kd_settings(ctx, c, stage)
    hidden_w = getattr(c, "hidden_mse", 0.0)
    cache = ctx.logit_cache() if c.kd_weight > 0 else None
    # with a logit cache every KD stage reads the same data stream, so later stages hit the cache
    offset = 0 if cache is not None else _DATA_OFFSETS[stage] + data_offset
    cfg = _train_cfg(c, offset, ctx.spec.seed, steps)
    if cfg.steps == 0:
        return None
    teacher = ctx.kd_teacher()
    sharded = ctx.teacher_sharded()
    hidden = None
    if hidden_w > 0:
        hidden = HiddenStateMSE(hidden_pairs, model.config.hidden_size, teacher.config.hidden_size, seed=ctx.spec.seed)
    loss_fn = make_kd_loss_fn(teacher, c.temperature, c.kd_weight, cache=cache, reverse_kl=c.reverse_kl, hidden=hidden, hidden_weight=hidden_w)
    ev = (lambda m: _evaluate(ctx, m)) if c.eval_every else None
    hits0, misses0 = (cache.hits, cache.misses) if cache else (0, 0)
    # student and online teacher train on the GPU when there is one (each rank's own under torchrun), with precision
    # auto -> bf16 autocast there, and come back to where they were (the CPU) for evaluation, saving and export
    from dsk_compress.compress.trainer import default_device

    dev = dist.device(dist.env(), default_device())
    s_home, t_home = next(model.parameters()).device, next(teacher.parameters()).device
    model.to(dev)
    if not sharded:  # a sharded teacher already lives on the training devices
        teacher.to(dev)
    try:
        res = train(model, loss_fn, ctx.task.train_batch, cfg, ckpt_dir=ckpt, resume=ctx.resume, evaluate=ev, desc=stage, params=params,
                    aux=hidden)
    finally:
        model.to(s_home)
        if not sharded:
            teacher.to(t_home)
        if hidden is not None:
            hidden.to(s_home)
    res.kd = {"teacher": "cached top-%d logits" % cache.k, "cache_hits": cache.hits - hits0, "cache_misses": cache.misses - misses0} if cache else \
        {"teacher": "online" if c.kd_weight > 0 or hidden is not None else "none"}
    if sharded and (cache is not None or res.kd["teacher"] == "online"):
        res.kd["teacher_sharding"] = {"kind": "fsdp", "shards": dist.env().world_size, "params_on_rank0": dist.local_numel(teacher),
                                      "params": sum(p.numel() for p in teacher.parameters())}
    if hidden is not None:
        res.kd.update(hidden_mse=hidden_w, hidden_pairs=[list(p) for p in hidden.pairs], final_hidden_mse=res.final_logs.get("hidden_mse"))
    return res


def _train_summary(res) -> dict:
    if res is None:
        return {"steps": 0}
    return {"steps": res.steps, "tokens": res.tokens, "seconds": round(res.seconds, 1), "tokens_per_s": round(res.tokens_per_s, 1),
            "precision": res.precision, "world_size": res.world_size,
            "final_loss": round(res.final_loss, 4), "kd": getattr(res, "kd", None), "history": res.history}


def _student_model(ctx: RunContext, before: str):
    from dsk_compress.models.source import load_hf_dir, load_model_source

    rel = ctx.latest_output("model", before=before)
    if rel is not None:
        return load_hf_dir(ctx.path(rel))
    st = ctx.spec.student
    if st.from_teacher is not None:
        from dsk_compress.errors import RecipeError

        raise RecipeError(f"the {before!r} stage needs a student: add a 'distill' stage before it or give student: {{hf: DIR}}")
    return load_model_source(st.model_dump(exclude_none=True, exclude={"from_teacher"}))


@STAGES.register("distill")
class DistillStage(Stage[DistillConfig]):
    """Cut a dense student from the teacher and train it with logit KD + hard-label CE (+ optional hidden-state MSE)."""

    def run(self, ctx: RunContext) -> StageResult:
        from dsk_compress.compress.student import build_student
        from dsk_compress.models.source import count_params, load_hf_dir, load_model_source, save_hf_dir

        from dsk_compress.compress import dist

        d = ctx.stage_dir("distill")
        _check_kd_settings(ctx, self.config, "distill")
        teacher = ctx.teacher()
        self._check_task_vocab(ctx, teacher)
        st = ctx.spec.student
        init_dir = d / "init"
        info: dict = {}
        dist.init()  # under torchrun every rank builds the same student; rank 0 alone writes files
        if dist.broadcast_object((init_dir / "config.json").is_file()):
            student = load_hf_dir(init_dir)  # resume: the very same initialisation
            info = json.loads((init_dir / "dsk_compress.json").read_text()) if (init_dir / "dsk_compress.json").is_file() else {}
        elif st.from_teacher is not None:
            ft = st.from_teacher
            student, info = build_student(
                teacher, layers=ft.layers, keep_every=ft.keep_every, intermediate_size=ft.intermediate_size,
                ffn_init=ft.ffn_init, calibration=ctx.task.calibration_batches(ft.calibration_batches), seed=ctx.spec.seed,
            )
            if dist.is_main():
                save_hf_dir(student, init_dir, extra=info)
        else:
            student = load_model_source(st.model_dump(exclude_none=True, exclude={"from_teacher"}))
        from dsk_compress.compress.distill import check_vocab

        check_vocab(teacher.config, student.config)
        pairs = self._hidden_pairs(ctx, student, teacher, info)
        init_metrics = _evaluate(ctx, student)
        res = _kd_train(ctx, student, self.config, "distill", d / "checkpoint", hidden_pairs=pairs)
        metrics = {"init": init_metrics, "student_init": info, "params": count_params(student),
                   "train": _train_summary(res), **_evaluate(ctx, student)}
        if dist.is_main():
            save_hf_dir(student, d / "model")
        dist.barrier()
        baselines = {}
        for name in self.config.baselines:
            baselines[name], metrics[f"baseline_{name}"] = self._baseline(ctx, name, init_dir, d / "baselines" / name)
        return StageResult(outputs={"model": ctx.rel(d / "model"), "baselines": baselines}, metrics=metrics)

    def _check_task_vocab(self, ctx: RunContext, teacher) -> None:
        """The task's tokens must be the teacher's tokens: size, special-token ids, and the teacher directory's own tokenizer."""
        from dsk_compress.compress.distill import check_vocab

        tok = getattr(ctx.task, "tok", None)
        teacher_tok = None
        tdir = ctx.spec.teacher.hf
        if tok is not None and tdir and any((Path(tdir) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
            if Path(tdir).resolve() != Path(getattr(ctx.spec.task, "tokenizer", "")).resolve():
                from dsk_compress.tasks.text_lm import load_tokenizer

                teacher_tok = load_tokenizer(tdir)
        check_vocab(teacher.config, task_tokenizer=tok, teacher_tokenizer=teacher_tok, task_vocab=getattr(ctx.task, "vocab_size", None))

    def _hidden_pairs(self, ctx: RunContext, student, teacher, info: dict) -> list | None:
        """``hidden_pairs`` as given, or each student layer with the teacher layer it was cut from; checked against both models."""
        from dsk_compress.compress.distill import check_hidden_pairs
        from dsk_compress.errors import RecipeError

        c = self.config
        if c.hidden_mse <= 0:
            return None
        field = _stage_field(ctx, "distill", "hidden_pairs")
        if c.hidden_pairs is not None:
            pairs = [tuple(p) for p in c.hidden_pairs]
        elif info.get("layers"):
            pairs = list(enumerate(info["layers"]))
        else:
            raise RecipeError(f"{field} is needed for hidden_mse: the student was not cut from the teacher, so its layers have no teacher counterpart",
                              hint="give hidden_pairs: [[student_layer, teacher_layer], ...]")
        if not pairs:
            raise RecipeError(f"{field} is empty", hint="give at least one [student_layer, teacher_layer] pair or set hidden_mse: 0")
        check_hidden_pairs(pairs, student.config.num_hidden_layers, teacher.config.num_hidden_layers, field)
        return pairs

    def _baseline(self, ctx: RunContext, name: str, init_dir: Path, bdir: Path) -> tuple[str, dict]:
        """The comparison students, same token budget: without KD (same init), KD from a random FFN init, or neither."""
        from dsk_compress.compress import dist
        from dsk_compress.compress.student import build_student
        from dsk_compress.models.source import load_hf_dir, save_hf_dir

        if dist.broadcast_object((bdir / "model" / "config.json").is_file() and (bdir / "metrics.json").is_file()):
            return ctx.rel(bdir / "model"), json.loads((bdir / "metrics.json").read_text())
        c = self.config
        ft = ctx.spec.student.from_teacher
        binfo: dict = {}
        # a 2x2 of (student init) x (KD or hard labels only) around the main student (init ffn_init, with KD)
        if name == "nokd":
            model = load_hf_dir(init_dir)
        else:
            if ft is None:
                from dsk_compress.errors import RecipeError

                raise RecipeError(f"the {name} baseline needs student.from_teacher")
            model, binfo = build_student(ctx.teacher(), layers=ft.layers, keep_every=ft.keep_every,
                                     intermediate_size=ft.intermediate_size, ffn_init="random", seed=ctx.spec.seed)
        cfg = c.model_copy(update={"kd_weight": 0.0, "hidden_mse": 0.0}) if name.endswith("nokd") else c
        init = _evaluate(ctx, model)
        pairs = self._hidden_pairs(ctx, model, ctx.teacher(), binfo) if cfg.hidden_mse > 0 else None
        res = _kd_train(ctx, model, cfg, "distill", bdir / "checkpoint", hidden_pairs=pairs)
        metrics = {"init": init, "train": _train_summary(res), **_evaluate(ctx, model)}
        if dist.is_main():
            from dsk_compress.io import atomic_write_json

            save_hf_dir(model, bdir / "model")
            atomic_write_json(bdir / "metrics.json", metrics)
        dist.barrier()
        return ctx.rel(bdir / "model"), metrics


@STAGES.register("prune")
class PruneStage(Stage[PruneConfig]):
    """Structured pruning (FFN channels, heads in whole KV groups, decoder layers; uniform per layer) to fixed
    ratios or to a params / MACs / measured-latency target, with a KD fine-tune after each step."""

    def _field(self, ctx: RunContext, e):
        """The RecipeError ``e`` (whose message starts with a field name) as ``stages.<i>.<field> ...``."""
        from dsk_compress.errors import RecipeError

        i = next((i for i, s in enumerate(ctx.spec.stages) if s is self.config), None)
        if i is None:
            i = next((i for i, s in enumerate(ctx.spec.stages) if s.stage == "prune"), None)
        fields = ("ffn_ratio", "head_ratio", "layers_removed", "depth_ratio", "expert_ratio", "target.", "importance")
        if i is None or not e.message.startswith(fields):
            return e
        return RecipeError(f"stages.{i}.{e.message}", hint=e.hint)

    def _calibration(self, ctx: RunContext):
        """Calibration batches for activation importance, block influence and router frequencies (None when unused)."""
        c = self.config
        depth = c.layers_removed or c.depth_ratio or (c.target is not None and "layers" in c.target.structures)
        if c.importance != "activation" and not depth and not c.expert_ratio:
            return None
        return [torch.as_tensor(b) for b in ctx.task.calibration_batches(c.calibration_batches)]

    def _prune(self, ctx: RunContext, model, shape, example, calib, it: int) -> dict:
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
        return lambda model, it, iterations: self._prune(ctx, model, interpolate(start, final, (it + 1) / iterations, self.config.round_to),
                                                         example, calib, it)

    def _schedule(self, ctx: RunContext, model, iterations: int, steps: int, d: Path, prune) -> tuple:
        """``iterations`` slices of ``prune(model, it, iterations)``, each followed by ``steps`` KD fine-tune steps."""
        from dsk_compress.io import atomic_write_json
        from dsk_compress.models.source import load_hf_dir, save_hf_dir

        c = self.config
        log = []
        for it in range(iterations):
            step_dir = d / f"iter{it}"
            if _agreed((step_dir / "model" / "config.json").is_file()):  # resume: this iteration is complete
                model = load_hf_dir(step_dir / "model")
                log.append(json.loads((step_dir / "metrics.json").read_text()))
                continue
            after = prune(model, it, iterations)
            pruned_acc = _evaluate(ctx, model)
            res = _kd_train(ctx, model, c, "prune", step_dir / "checkpoint", steps=steps, data_offset=it * 100_000)
            entry = {"iteration": it, "structure": after, "accuracy_after_prune": pruned_acc["accuracy"],
                     "train": _train_summary(res), **_evaluate(ctx, model)}
            _rank0(save_hf_dir, model, step_dir / "model")
            _rank0(atomic_write_json, step_dir / "metrics.json", entry)
            log.append(entry)
        return model, log

    def _latency_schedule(self, ctx: RunContext, model, start, d: Path, example, calib) -> tuple:
        """Prune ``target.step`` more of the chosen structures per step, export the candidate to ONNX and time it on
        this host, fine-tune, and stop once the p50 meets ``target.latency_ms`` (error at ``target.max_ratio``)."""
        from dsk_compress.compress.prune import measure_latency, shape_of, uniform_shape
        from dsk_compress.devices import load_device
        from dsk_compress.errors import RecipeError
        from dsk_compress.io import atomic_write_json
        from dsk_compress.models.source import load_hf_dir, save_hf_dir

        c = self.config
        t = c.target
        threads = load_device("host-cpu").threads
        seq = int(example.shape[1])
        info = {"kind": "latency_ms", "budget_ms": t.latency_ms, "device": t.device, "structures": list(t.structures),
                "measured_on": f"this host ({platform.node()}, {platform.machine()}, {threads} threads), not the target device",
                "how": f"ONNX export of each candidate, ONNX Runtime CPU (extended optimizations), batch 1, seq {seq}, "
                       f"p50 of {t.runs} runs after {t.warmup} warm-up runs in a fresh process",
                "steps": []}

        def measure(m):  # timed on rank 0 alone under torchrun and shared, so every rank prunes the same way
            from dsk_compress.compress import dist

            return dist.on_main(lambda: measure_latency(m, example, d / "latency", threads=threads, runs=t.runs, warmup=t.warmup),
                                "latency measurement")

        ref_file = d / "latency_before.json"
        if _agreed(ref_file.is_file()):
            ref = json.loads(ref_file.read_text())
        else:
            ref = measure(model)
            _rank0(atomic_write_json, ref_file, ref)
        info["before"] = ref
        info["before_p50_ms"] = ref["p50_ms"]
        log: list[dict] = []
        if ref["p50_ms"] <= t.latency_ms:
            info.update(met=True, stopped="the unpruned model already meets the budget; nothing pruned")
            _rank0(atomic_write_json, d / "latency.json", info)
            return model, log, info
        k = 0
        while True:
            k += 1
            ratio = min(round(k * t.step, 6), t.max_ratio)
            step_dir = d / f"step{k}"
            if _agreed((step_dir / "model" / "config.json").is_file()):  # resume: this step is complete
                model = load_hf_dir(step_dir / "model")
                entry = json.loads((step_dir / "metrics.json").read_text())
            else:
                shape = uniform_shape(start, ratio, t.structures, c.round_to)
                if shape == shape_of(model) and ratio < t.max_ratio:
                    continue  # channel rounding: nothing new to remove at this ratio
                if shape == shape_of(model):
                    entry = None
                else:
                    after = self._prune(ctx, model, shape, example, calib, k)
                    lat = measure(model)
                    pruned_acc = _evaluate(ctx, model)
                    res = _kd_train(ctx, model, c, "prune", step_dir / "checkpoint", steps=c.steps, data_offset=k * 100_000)
                    entry = {"step": k, "ratio": ratio, "structure": after, "latency": lat, "accuracy_after_prune": pruned_acc["accuracy"],
                             "train": _train_summary(res), **_evaluate(ctx, model)}
                    _rank0(save_hf_dir, model, step_dir / "model")
                    _rank0(atomic_write_json, step_dir / "metrics.json", entry)
            if entry is not None:
                log.append(entry)
                layers = entry["structure"]["layers"]
                info["steps"].append({"step": entry["step"], "ratio": entry["ratio"],
                                      "structure": {**{kk: layers[0][kk] for kk in ("heads", "kv_heads", "ffn")}, "layers": len(layers)},
                                      **{kk: entry["latency"][kk] for kk in ("p50_ms", "p90_ms", "parity_max_abs_diff")}})
                if entry["latency"]["p50_ms"] <= t.latency_ms:
                    info.update(met=True, stopped=f"budget met at step {entry['step']} (ratio {entry['ratio']})")
                    break
            if ratio >= t.max_ratio:
                last = info["steps"][-1]["p50_ms"] if info["steps"] else ref["p50_ms"]
                info.update(met=False, stopped=f"target.max_ratio {t.max_ratio} reached")
                _rank0(atomic_write_json, d / "latency.json", info)
                raise self._field(ctx, RecipeError(
                    f"target.latency_ms {t.latency_ms} ms is not met on this host even at target.max_ratio {t.max_ratio}: "
                    f"p50 {last:.3f} ms after {len(info['steps'])} steps (unpruned {ref['p50_ms']:.3f} ms)",
                    hint="raise target.latency_ms or target.max_ratio, or add structures (heads, layers); every step is in prune/latency.json"))
        _rank0(atomic_write_json, d / "latency.json", info)
        return model, log, info

    def _moe_start(self, model) -> tuple:
        """``(start, final)`` for ``_slices`` on an MoE student, or None for a dense one; refuses settings that do not fit."""
        import copy

        from dsk_compress.compress.moe import experts_keep, is_moe
        from dsk_compress.errors import RecipeError

        c = self.config
        if not is_moe(model):
            if c.expert_ratio:
                raise RecipeError(f"expert_ratio {c.expert_ratio}: the student ({type(model).__name__}) has no MoE layers",
                                  hint="remove expert_ratio, or prune FFN channels, heads or layers of a dense student")
            return None
        if not c.expert_ratio:
            raise RecipeError(f"expert_ratio is needed: the student ({type(model).__name__}) is an MoE, whose experts this stage prunes "
                              "(FFN channels, heads, layers and targets are for dense students)",
                              hint="set expert_ratio (e.g. 0.5) and no other ratio, or distill to a dense student first")
        experts_keep(model.config, c.expert_ratio)
        return copy.deepcopy(model.config), None

    def run(self, ctx: RunContext) -> StageResult:
        from dsk_compress.recipes.torch_path import is_torch_run, run_prune

        if is_torch_run(ctx):  # your own torch model: conv channels (recipes/torch_path.py)
            return run_prune(self, ctx)
        from dsk_compress.compress.moe import expert_structure
        from dsk_compress.compress.prune import count_macs, layers_to_remove, ratio_shape, shape_of, solve_target, structure
        from dsk_compress.errors import RecipeError
        from dsk_compress.models.source import count_params, save_hf_dir

        c = self.config
        t = c.target
        d = ctx.stage_dir("prune")
        model = _student_model(ctx, "prune")
        example = torch.as_tensor(ctx.task.example_inputs(1))
        seq = int(example.shape[1])
        try:
            moe = self._moe_start(model)
        except RecipeError as e:
            raise self._field(ctx, e) from None
        describe = expert_structure if moe else structure
        macs = (lambda m: None) if moe else (lambda m: count_macs(m, seq))  # MoE MACs depend on the routing of each input
        start, final = moe or (shape_of(model),) * 2
        target_info = None
        try:
            if not moe and t is None:
                removed = layers_to_remove(start.layers, c.layers_removed, c.depth_ratio)
                final = ratio_shape(model.config, c.effective_ffn_ratio, c.head_ratio, removed, c.round_to)
            elif not moe and t.latency_ms is None:
                kind = "params" if t.params is not None else "macs"
                final, target_info = solve_target(model, kind, getattr(t, kind), t.structures, c.round_to, seq, t.max_ratio)
        except RecipeError as e:
            raise self._field(ctx, e) from None
        calib = self._calibration(ctx)
        macs0, params0 = macs(model), count_params(model)
        before = describe(model)
        acc_before = _evaluate(ctx, model)
        start_state = {k: v.clone() for k, v in model.state_dict().items()} if c.baselines else None
        if t is not None and t.latency_ms is not None:
            model, log, target_info = self._latency_schedule(ctx, model, start, d, example, calib)
            final, n_steps = shape_of(model), len(log)
        else:
            model, log = self._schedule(ctx, model, c.iterations, c.steps, d, self._slices(ctx, start, final, example, calib))
            n_steps = c.iterations
        macs1, params1 = macs(model), count_params(model)
        _rank0(save_hf_dir, model, d / "model")
        metrics = {
            "structure_before": before, "structure_after": describe(model), "accuracy_before": acc_before["accuracy"],
            "params_before": int(params0), "params_after": int(params1), "macs_before": macs0, "macs_after": macs1,
            "mac_reduction": round(1 - macs1 / macs0, 4) if macs0 else None,
            "macs_counted": "not counted for an MoE student (its MACs depend on each input's routing)" if moe else f"torch FlopCounterMode over one forward pass, batch 1, seq {seq}: every matmul incl. attention scores, MACs = FLOPs / 2",
            "importance": c.importance, "iterations": log, **_evaluate(ctx, model),
        }
        if target_info is not None:
            metrics["target"] = target_info
        baselines = {}
        if "oneshot" in c.baselines:  # same final structure, one slice, the same total fine-tune budget
            one = _student_model(ctx, "prune")
            one.load_state_dict(start_state)
            one, one_log = self._schedule(ctx, one, 1, c.steps * n_steps, d / "baselines" / "oneshot", self._slices(ctx, start, final, example, calib))
            _rank0(save_hf_dir, one, d / "baselines" / "oneshot" / "model")
            baselines["oneshot"] = ctx.rel(d / "baselines" / "oneshot" / "model")
            metrics["baseline_oneshot"] = {"iterations": one_log, **_evaluate(ctx, one)}
        return StageResult(outputs={"model": ctx.rel(d / "model"), "baselines": baselines}, metrics=metrics)


def save_qat_model(model, path: Path, qat_info: dict) -> Path:
    from dsk_compress.io import atomic_write_json, save_state_dict

    path.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(path)
    save_state_dict(model.state_dict(), path / "qat_state.safetensors")
    atomic_write_json(path / "qat.json", qat_info)
    return path


def load_qat_model(path: Path):
    """Rebuild a QAT model: the config's architecture, QuantLinear layers, then the saved state."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from dsk_compress.compress.qat import prepare_qat
    from dsk_compress.io import load_state_dict

    info = json.loads((path / "qat.json").read_text())
    cfg = AutoConfig.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    prepare_qat(model, info["weight_bits"], info["avx2_safe"], info["skip"], activations=info.get("activations", "asymmetric"))
    model.load_state_dict(load_state_dict(path / "qat_state.safetensors"), strict=False)
    return model.eval()


def _tensorrt_int8_exports(spec) -> list[tuple[int, str]]:
    """``(stage index, device)`` of export stages whose device runs int8 in TensorRT."""
    from dsk_compress.devices import load_device

    out = []
    for i, st in enumerate(spec.stages):
        if st.stage == "export" and st.device:
            prof = load_device(st.device)
            if prof.preferred_runtime == "tensorrt" and prof.preferred_precision == "int8":
                out.append((i, prof.name))
    return out


@STAGES.register("qat")
class QATStage(Stage[QATConfig]):
    """INT8 QAT: observe activation ranges, then KD fine-tune with learned activation scales."""

    def run(self, ctx: RunContext) -> StageResult:
        from dsk_compress.recipes.torch_path import is_torch_run, run_qat

        if is_torch_run(ctx):  # your own torch model: BatchNorm folded, Conv2d + Linear fake quant (recipes/torch_path.py)
            return run_qat(self, ctx)
        from dsk_compress.compress.qat import calibrate, prepare_qat, quant_layers

        c = self.config
        trt = _tensorrt_int8_exports(ctx.spec)
        if trt and c.activations != "symmetric":  # fail before training, not at export
            from dsk_compress.errors import RecipeError

            qi = next(i for i, st in enumerate(ctx.spec.stages) if st.stage == "qat")
            raise RecipeError(f"stages.{trt[0][0]}.device {trt[0][1]!r} runs int8 in TensorRT, which needs symmetric int8 activations, "
                              f"but stages.{qi}.activations is {c.activations!r}", hint=f"set stages.{qi}.activations: symmetric")
        d = ctx.stage_dir("qat")
        model = _student_model(ctx, "qat")
        float_metrics = _evaluate(ctx, model)
        names = prepare_qat(model, c.weight_bits, c.avx2_safe, c.skip, activations=c.activations)
        calibrate(model, ctx.task.calibration_batches(c.observer_steps, c.batch_size))
        ptq_metrics = _evaluate(ctx, model)
        res = _kd_train(ctx, model, c, "qat", d / "checkpoint")
        info = {"version": 1, "weight_bits": c.weight_bits, "activation_bits": 8, "activations": c.activations, "avx2_safe": c.avx2_safe, "skip": c.skip,
                "quantized_layers": names, "weight_qmax": quant_layers(model)[0].qmax if names else None}
        _rank0(save_qat_model, model, d / "model", info)
        metrics = {"float": float_metrics, "after_calibration": ptq_metrics, "quantized_layers": len(names),
                   "train": _train_summary(res), **_evaluate(ctx, model)}
        return StageResult(outputs={"qat_model": ctx.rel(d / "model")}, metrics=metrics)


@STAGES.register("export")
class ExportStage(Stage[ExportConfig]):
    """ONNX for the teacher (dense routing), each student stage (fp32) and the QAT student (INT8 Q/DQ)."""

    ranks = "main"  # under torchrun: rank 0 alone, the other ranks wait for its result

    def _float(self, ctx, model, name: str, d: Path, example, keep_raw: bool = False) -> dict:
        import numpy as np

        from dsk_compress.export.onnx import export_causal_lm, fused_ops, op_histogram, ort_optimize, ort_predict, simplify

        raw = export_causal_lm(model, example, d / f"{name}.raw.onnx", self.config.opset)
        simplify(raw)
        out = ort_optimize(raw, d / f"{name}.onnx", self.config.optimization)
        if not keep_raw:
            raw.unlink()
        with torch.no_grad():
            ref = model(input_ids=torch.as_tensor(example), use_cache=False).logits.numpy()
        diff = float(np.abs(ort_predict(out)(example) - ref).max())
        if diff > self.config.parity_atol:
            raise ExportError(f"{name}: ONNX output differs from torch by {diff:.2e} (> parity_atol {self.config.parity_atol})",
                              hint="raise stages.N.parity_atol or report a bug")
        return {"path": ctx.rel(out), "precision": "fp32", "parity_max_abs_diff": diff, "fused_ops": fused_ops(op_histogram(out))}

    def _ptq(self, ctx, d: Path, raw: Path, params: int, source: str) -> dict:
        """ORT dynamic and static INT8 quantization of the float student: the baselines QAT must beat."""
        from dsk_compress.export.onnx import fused_ops, op_histogram, ort_optimize
        from dsk_compress.export.ptq import quantize_dynamic_int8, quantize_static_int8

        out = {}
        dyn = quantize_dynamic_int8(raw, d / "ptq-dynamic.raw.onnx")
        calib = ctx.task.calibration_batches(self.config.ptq_calibration_batches, 4)
        sta = quantize_static_int8(raw, d / "ptq-static.raw.onnx", calib)
        for name, q, how in (("ptq-dynamic", dyn, "ORT quantize_dynamic"), ("ptq-static", sta, "ORT quantize_static (QDQ, min/max calibration)")):
            final = ort_optimize(q, d / f"{name}.onnx", self.config.optimization)
            q.unlink()
            out[name] = {"path": ctx.rel(final), "role": name, "precision": "int8", "params": params,
                         "fused_ops": fused_ops(op_histogram(final)), "notes": f"{how} of {source}, per-channel int8 weights, no fine-tune"}
        raw.unlink()
        return out

    def run(self, ctx: RunContext) -> StageResult:
        import logging
        import warnings

        with warnings.catch_warnings():
            # TracerWarnings for the constant quantizer scales and ORT's "consider pre-processing" hints are expected
            warnings.simplefilter("ignore")
            level = logging.getLogger().level
            logging.getLogger().setLevel(logging.ERROR)
            try:
                return self._run(ctx)
            finally:
                logging.getLogger().setLevel(level)

    def _fp16(self, ctx, model, raw: Path, d: Path, example, fp32_art: dict) -> dict:
        """fp16 ONNX of a float student (RMSNorm reductions and softmax kept in fp32), checked against torch fp32."""
        import numpy as np

        from dsk_compress.export.onnx import convert_fp16, ort_predict

        out = d / "student-fp16.onnx"
        info = convert_fp16(raw, out)
        with torch.no_grad():
            ref = model(input_ids=torch.as_tensor(example), use_cache=False).logits.float().numpy()
        diff = float(np.abs(ort_predict(out)(example) - ref).max())
        rel = diff / max(float(np.abs(ref).max()), 1e-12)
        if rel > self.config.fp16_max_rel_err:
            raise ExportError(f"student-fp16: fp16 ONNX logits differ from torch fp32 by {diff:.3g} ({rel:.2e} of max |logit|, "
                              f"> fp16_max_rel_err {self.config.fp16_max_rel_err})", hint="raise stages.N.fp16_max_rel_err or export fp32 only")
        return {"path": ctx.rel(out), "role": "student-fp16", "precision": "fp16", "params": fp32_art["params"], "stage": fp32_art["stage"],
                "model_dir": fp32_art["model_dir"], "parity_max_abs_diff": diff, "parity_rel_err": rel, "kept_fp32": info,
                "notes": f"fp16 of student-{fp32_art['stage']} (normalization reductions and softmax in fp32, fp32 inputs/outputs); "
                         "portable graph (no ORT offline optimization), also the TensorRT input"}

    def _kv_cache(self, ctx, model, name: str, d: Path, example, int8: bool = False) -> dict:
        """The KV-cache graph ``<name>.kv.onnx`` of a student, checked by greedy decoding against torch.

        A model the KV exporter cannot handle gets ``kv_cache.error`` (the full-sequence artifact stands);
        a KV graph that disagrees with torch is an ExportError, as for the full-sequence graphs.
        """
        import numpy as np

        from dsk_compress.compress.moe import densify_moe
        from dsk_compress.export.kv_cache import check_kv_parity, export_float_with_past, export_int8_qdq_with_past, is_decoder_lm
        from dsk_compress.export.onnx import INTEGER_MATMULS, op_histogram, ort_optimize

        c = self.config
        if not is_decoder_lm(model):  # e.g. an image classifier: nothing to decode
            return {}
        densify_moe(model)  # MoE students: the exact dense-routing path (routing must not be baked into the trace)
        out = d / f"{name}.kv.onnx"
        try:
            if int8:
                qdq = d / f"{name}.kv.qdq.onnx"
                export_int8_qdq_with_past(model, qdq, c.opset)
                ort_optimize(qdq, out, c.optimization)
                qdq.unlink()
            else:
                export_float_with_past(model, out, c.opset, c.optimization)
        except ExportError as e:
            return {"kv_cache": {"error": e.message}}
        prompt = np.asarray(example)[0, : min(16, np.asarray(example).shape[1])]
        info = {"path": ctx.rel(out), "prompt_tokens": int(prompt.size), **check_kv_parity(model, out, prompt, new_tokens=8)}
        if int8:
            from dsk_compress.compress.qat import quant_layers

            info["integer_matmuls"] = sum(v for k, v in op_histogram(out).items() if k in INTEGER_MATMULS)
            if info["integer_matmuls"] != len(quant_layers(model)) or info["step_logits_sqnr_db"] < c.qdq_min_sqnr_db:
                raise ExportError(f"{name}.kv.onnx: {info['integer_matmuls']} of {len(quant_layers(model))} quantized Linears are integer ops, "
                                  f"step-logit SQNR {info['step_logits_sqnr_db']} dB vs torch fake-quant (min {c.qdq_min_sqnr_db})",
                                  hint="set stages.N.kv_cache: false and report a bug")
        elif info["step_logits_max_abs_diff"] > c.parity_atol:
            raise ExportError(f"{name}.kv.onnx: decode-step logits differ from torch by {info['step_logits_max_abs_diff']:.2e} "
                              f"(> parity_atol {c.parity_atol})", hint="set stages.N.kv_cache: false and report a bug")
        return {"kv_cache_path": info["path"], "kv_cache": info}

    def _tensorrt(self, ctx, device, onnx_path: Path, precision: str, name: str, ref, example) -> dict:
        """Check ``onnx_path`` for TensorRT and build the engine where tensorrt and a GPU are present."""
        import time

        import numpy as np

        from dsk_compress.export.trt_check import check_tensorrt_onnx, format_problems
        from dsk_compress.runtimes.tensorrt import build_engine, lm_profiles, tensorrt_status

        t = self.config.tensorrt
        problems = check_tensorrt_onnx(onnx_path)
        if problems:
            raise ExportError(f"{name} for {device.name} (TensorRT) is not TensorRT-compatible: {format_problems(problems)}",
                              hint="fix the export, or export for a device whose preferred runtime is onnxruntime")
        seq = t.max_seq_len or ctx.task.seq_len
        profile = lm_profiles("input_ids", seq, t.max_batch, t.opt_batch)
        info = {"device": device.name, "onnx": ctx.rel(onnx_path), "precision": precision, "problems": 0, "engine": None,
                "profile": {k: [list(x) for x in v] for k, v in profile.items()}, "workspace_gb": t.workspace_gb}
        ok, why = tensorrt_status()
        if not (ok and t.build_engine):
            why = why if not ok else "tensorrt.build_engine is off"
            info["note"] = (f"engine not built at export ({why}): it must be built on {device.name}; the bundle's run.py builds it "
                            "there on first run with the same precision and profile and caches it next to the model")
            return info
        from dsk_compress.runtimes.tensorrt import TensorRTSession

        engine = onnx_path.with_name(f"{name}.{device.name}.engine")
        t0 = time.perf_counter()
        build_engine(onnx_path, engine, precision=precision, workspace_gb=t.workspace_gb,
                     timing_cache_path=onnx_path.parent / "tensorrt.timing.cache", profiles=profile)
        got = TensorRTSession(engine)(example)
        err = np.asarray(got, np.float64) - ref
        info.update(engine=ctx.rel(engine), tensorrt_version=why, build_seconds=round(time.perf_counter() - t0, 1),
                    engine_max_abs_diff=float(np.abs(err).max()),
                    engine_sqnr_db=round(float(10 * np.log10((ref**2).mean() / max((err**2).mean(), 1e-30))), 2),
                    note="engine built on the export host: it runs only on that GPU model with that TensorRT version")
        return info

    def _run(self, ctx: RunContext) -> StageResult:
        from dsk_compress.recipes.torch_path import is_torch_run, run_export

        if is_torch_run(ctx):  # your own torch model: model(x) -> logits, dynamic batch (recipes/torch_path.py)
            return run_export(self, ctx)
        import numpy as np

        from dsk_compress.compress.moe import densify_moe, is_moe
        from dsk_compress.compress.qat import freeze_for_export, quant_layers, sqnr_db
        from dsk_compress.devices import load_device
        from dsk_compress.export.onnx import INTEGER_MATMULS, export_int8_qdq, fused_ops, op_histogram, ort_optimize, ort_predict
        from dsk_compress.export.trt_check import check_tensorrt_onnx
        from dsk_compress.models.source import count_params, load_hf_dir
        from dsk_compress.runtimes.onnxruntime import make_session, session_predict

        c = self.config
        d = ctx.stage_dir("export")
        example = ctx.task.example_inputs(2)
        target = load_device(c.device) if c.device else None
        precisions = list(dict.fromkeys([*c.precisions, *([target.preferred_precision] if target else [])]))
        trt_target = target is not None and target.preferred_runtime == "tensorrt"
        float_stages = [st for st in ("distill", "prune") if ctx.outputs.get(st, {}).get("model")]
        if "fp16" in precisions and not float_stages:
            raise ExportError("fp16 export needs a float student from a distill or prune stage, and this run has neither",
                              hint="drop fp16 from stages.N.precisions (and export for a device that does not prefer fp16)")
        qrel = ctx.latest_output("qat_model")
        if target is not None and target.preferred_precision == "int8" and qrel is None:
            raise ExportError(f"{target.name} prefers int8, which needs a QAT student, and this run has no qat stage",
                              hint="add a qat stage before export" + (" with activations: symmetric" if trt_target else ""))
        acts = json.loads((ctx.path(qrel) / "qat.json").read_text()).get("activations", "asymmetric") if qrel is not None else None
        if trt_target and target.preferred_precision == "int8" and acts != "symmetric":  # before any export work
            qi = next((i for i, st in enumerate(ctx.spec.stages) if st.stage == "qat"), "N")
            raise ExportError(f"{target.name} runs int8 in TensorRT, which needs symmetric int8 activations (zero point 0), "
                              f"but the QAT model was trained with {acts} (uint8) ones",
                              hint=f"set stages.{qi}.activations: symmetric (qat.activations=symmetric) and rerun the qat stage")
        artifacts: dict[str, dict] = {}
        teacher = ctx.teacher()
        routing = "dense" if is_moe(teacher) else "n/a"
        densify_moe(teacher)
        try:
            artifacts["teacher"] = {**self._float(ctx, teacher, "teacher", d, example), "role": "teacher", "params": count_params(teacher),
                                    "notes": f"{type(teacher).__name__}, {routing} routing (exact)"}
        except ExportError as e:  # fall back to eager torch; the report says so
            from dsk_compress.models.source import save_hf_dir

            tdir = save_hf_dir(teacher, d / "teacher-torch")
            artifacts["teacher"] = {"path": None, "model_dir": ctx.rel(tdir), "role": "teacher", "params": count_params(teacher),
                                    "precision": "fp32", "notes": f"ONNX export failed ({e.message}); measured in PyTorch eager"}
        baseline_roles = {("distill", "nokd"): ("student-nokd", "same init and token budget, trained without KD (hard labels only)"),
                          ("distill", "random-init"): ("student-random-init", "KD with a randomly initialised FFN, same token budget"),
                          ("distill", "random-init-nokd"): ("student-random-init-nokd",
                                                            "randomly initialised FFN, same token budget, trained without KD (hard labels only)"),
                          ("prune", "oneshot"): ("pruned-oneshot", "pruned to the same size in one step, same total fine-tune budget")}
        for stage in ("distill", "prune"):
            for bname, rel in ctx.outputs.get(stage, {}).get("baselines", {}).items():
                m = load_hf_dir(ctx.path(rel))
                role, note = baseline_roles[(stage, bname)]
                artifacts[role] = {**self._float(ctx, m, role, d, example), "role": role, "params": count_params(m), "stage": stage,
                                   "model_dir": rel, "notes": note}
        qat_input = ctx.latest_output("model", before="qat")  # the float student QAT started from
        metrics: dict = {"precisions": precisions, "device": target.name if target else None}
        for stage in float_stages:
            rel = ctx.outputs[stage]["model"]
            m = load_hf_dir(ctx.path(rel))
            name = f"student-{stage}"
            want_ptq = c.ptq_baselines and rel == qat_input and "qat" in ctx.outputs
            want_fp16 = "fp16" in precisions and stage == float_stages[-1]
            artifacts[name] = {**self._float(ctx, m, name, d, example, keep_raw=want_ptq or want_fp16),
                               "role": "student", "params": count_params(m), "stage": stage, "model_dir": rel, "notes": f"after {stage}"}
            if c.kv_cache:
                artifacts[name].update(self._kv_cache(ctx, m, name, d, example))
            raw = d / f"{name}.raw.onnx"
            if want_fp16:
                artifacts["student-fp16"] = self._fp16(ctx, m, raw, d, example, artifacts[name])
                if trt_target and target.preferred_precision == "fp16":
                    with torch.no_grad():
                        ref = m(input_ids=torch.as_tensor(example), use_cache=False).logits.double().numpy()
                    metrics["tensorrt"] = artifacts["student-fp16"]["tensorrt"] = self._tensorrt(
                        ctx, target, ctx.path(artifacts["student-fp16"]["path"]), "fp16", "student-fp16", ref, example)
            if want_ptq:
                artifacts.update(self._ptq(ctx, d, raw, artifacts[name]["params"], name))  # removes raw
            else:
                raw.unlink(missing_ok=True)
        if qrel is not None and "int8" in precisions:
            q = load_qat_model(ctx.path(qrel))
            freeze_for_export(q)
            with torch.no_grad():
                ref = q(input_ids=torch.as_tensor(example), use_cache=False).logits.numpy()
            qdq = d / "student-int8.qdq.onnx"  # portable Q/DQ graph: what TensorRT (or any ORT) loads
            folded = export_int8_qdq(q, example, qdq, c.opset)["folded_weights"]
            out = ort_optimize(qdq, d / "student-int8.onnx", c.optimization)
            got = ort_predict(out)(example)
            sqnr = sqnr_db(ref, got)
            qdq_sqnr = sqnr_db(ref, session_predict(make_session(qdq, optimization="disable"))(example))
            hist = op_histogram(out)
            n_int = sum(v for k, v in hist.items() if k in INTEGER_MATMULS)
            n_q = len(quant_layers(q))
            if sqnr < c.qdq_min_sqnr_db:
                raise ExportError(f"INT8 ONNX vs torch fake-quant SQNR {sqnr:.1f} dB is below {c.qdq_min_sqnr_db} dB")
            if n_int != n_q:
                raise ExportError(f"only {n_int} of {n_q} quantized Linears became integer ops in ONNX Runtime")
            problems = check_tensorrt_onnx(qdq)
            artifacts["final"] = {"path": ctx.rel(out), "role": "final", "precision": "int8", "params": count_params(q),
                                  "qdq_path": ctx.rel(qdq), "activations": acts,
                                  "sqnr_db_vs_fake_quant": round(sqnr, 2), "max_abs_diff_vs_fake_quant": float(np.abs(got - ref).max()),
                                  "qdq_graph_sqnr_db": round(qdq_sqnr, 2),
                                  "integer_matmuls": n_int, "quantized_linears": n_q, "folded_weights": folded,
                                  "tensorrt_problems": len(problems), "tensorrt_problem_examples": [str(p) for p in problems[:3]],
                                  "fused_ops": fused_ops(hist),
                                  "notes": f"INT8 Q/DQ (per-channel weights, per-tensor {acts} activations)"}
            if c.kv_cache:
                artifacts["final"].update(self._kv_cache(ctx, q, "student-int8", d, example, int8=True))
            if trt_target and target.preferred_precision == "int8":
                metrics["tensorrt"] = artifacts["final"]["tensorrt"] = self._tensorrt(ctx, target, qdq, "int8", "student-int8",
                                                                                        ref.astype(np.float64), example)
        elif qrel is not None:
            metrics["int8_skipped"] = "int8 is not in stages.N.precisions"
        metrics["artifacts"] = artifacts
        return StageResult(outputs={"artifacts": artifacts}, metrics=metrics)


@STAGES.register("bench")
class BenchStage(Stage[BenchStageConfig]):
    """Measure every exported variant: accuracy of the artifact in its runtime, latency, size, memory."""

    ranks = "main"  # under torchrun: rank 0 alone, the other ranks wait for its result

    def _decode(self, ctx: RunContext, art: dict, threads: int | None) -> dict:
        """Greedy decode with the artifact's KV-cache graph (none: nothing): prefill the first half of the task's
        example window, then ``DEFAULT_NEW_TOKENS`` single-token steps, in a fresh ONNX Runtime process."""
        if not art.get("kv_cache_path"):
            return {}
        from dsk_compress.runtimes.decode import DEFAULT_NEW_TOKENS, benchmark_decode

        c = self.config
        prompt = ctx.task.example_inputs(1)[0][: max(1, ctx.task.seq_len // 2)]
        r = benchmark_decode(ctx.path(art["kv_cache_path"]), prompt, DEFAULT_NEW_TOKENS, threads, repeats=max(3, min(c.runs, 10)),
                             warmup=max(1, min(c.warmup, 2)))
        keep = ("prompt_tokens", "new_tokens", "repeats", "prefill_ms", "decode_ms_p50", "decode_ms_p90", "decode_tokens_per_s", "peak_memory_mb")
        return {"decode_tokens_per_s": r["decode_tokens_per_s"], "decode": {"artifact": art["kv_cache_path"], **{k: r[k] for k in keep if k in r}}}

    def run(self, ctx: RunContext) -> StageResult:
        from dsk_compress.devices import load_device
        from dsk_compress.export.onnx import file_size, ort_predict
        from dsk_compress.models.zoo import torch_predict
        from dsk_compress.report import build_report
        from dsk_compress.runtimes import BenchConfig
        from dsk_compress.runtimes.onnxruntime import benchmark_onnx

        c = self.config
        device = load_device(c.device)
        threads = c.threads or device.threads
        artifacts = ctx.latest_output("artifacts") or {}
        inputs = ctx.task.example_inputs(c.batch_size)
        bcfg = BenchConfig(warmup=c.warmup, runs=c.runs, batch_size=c.batch_size, threads=threads)
        variants = []
        for name, art in artifacts.items():
            if art.get("path"):
                path = ctx.path(art["path"])
                acc = ctx.task.evaluate(ort_predict(path, threads)).as_dict()
                bench = benchmark_onnx(path, inputs, bcfg)
                size = file_size(path)
                runtime = "onnxruntime-cpu"
            else:  # torch fallback (e.g. a teacher that does not export)
                from dsk_compress.models.source import load_hf_dir
                from dsk_compress.runtimes.torch import benchmark_torch

                mdir = ctx.path(art["model_dir"])
                acc = ctx.task.evaluate(torch_predict(load_hf_dir(mdir))).as_dict()
                bench = benchmark_torch(mdir, inputs, bcfg)
                size = sum(f.stat().st_size for f in mdir.glob("*.safetensors"))
                runtime = "torch-eager-cpu"
            b = bench.as_dict()
            variants.append({
                "name": name, "role": art["role"], "stage": art.get("stage", name), "params": art["params"], "size_bytes": int(size),
                "accuracy": round(acc["accuracy"], 3),
                "bits_per_byte": round(acc["bits_per_byte"], 4) if "bits_per_byte" in acc else None,
                "metrics": {k: round(v, 4) for k, v in acc.items()},
                "latency_ms": {k: round(b[k], 3) for k in ("p50", "p90", "p99", "mean")},
                "throughput": round(b["throughput"], 2), "peak_memory_mb": b.get("peak_memory_mb"),
                "runtime": runtime, "device": device.name, "precision": art.get("precision", "fp32"),
                "artifact": art.get("path"), "notes": art.get("notes", ""),
            })
            variants[-1].update(self._decode(ctx, art, threads))
        td = ctx.task.describe()
        if getattr(ctx.task, "seq_len", None) is not None:
            task_str, shape_str = f"{td['name']} (seq {td['seq_len']}, {td.get('eval_tokens', '?')} validation tokens)", f"seq {ctx.task.seq_len}"
        else:  # your own task: no sequence length
            shape_str = "input " + "x".join(str(n) for n in tuple(inputs.shape)[1:])
            task_str = f"{td['name']} ({td.get('eval_samples', '?')} validation samples, {shape_str})"
        meta = {"run": ctx.run_dir.name, "recipe": ctx.spec.name, "task": task_str,
                "host": f"{device.name}: {platform.node()} {platform.machine()}, {threads} threads, batch {c.batch_size}, {shape_str}",
                "max_accuracy_drop": ctx.spec.report.max_accuracy_drop}
        report = build_report(ctx.run_dir, variants, meta)
        return StageResult(outputs={"report": "report.json"}, metrics={"variants": variants, "summary": report.get("summary")})
