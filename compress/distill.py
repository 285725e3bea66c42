"""Knowledge distillation: logit KD with temperature plus hard-label cross-entropy, optional hidden-state MSE
through learned projections, and the vocabulary checks that must pass before a teacher can teach a student."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    input_ids: torch.Tensor,
    temperature: float = 2.0,
    kd_weight: float = 0.8,
    reverse_kl: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """``kd_weight * T^2 * [KL(teacher_T || student_T) + reverse_kl * KL(student_T || teacher_T)] + (1 - kd_weight) * CE``.

    Logits are ``[B, T, V]`` for causal LMs; position t predicts token t+1. The reverse (mode-seeking)
    KL term is optional.
    """
    s = student_logits[:, :-1].float()
    t = teacher_logits[:, :-1].float()
    v = s.shape[-1]
    ce = F.cross_entropy(s.reshape(-1, v), input_ids[:, 1:].reshape(-1))
    if kd_weight == 0:
        return ce, {"ce": float(ce.detach())}
    log_ps = F.log_softmax(s / temperature, dim=-1)
    log_pt = F.log_softmax(t / temperature, dim=-1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1).mean() * temperature**2
    logs = {"ce": float(ce.detach()), "kl": float(kl.detach())}
    if reverse_kl > 0:
        rkl = (log_ps.exp() * (log_ps - log_pt)).sum(-1).mean() * temperature**2
        kl = kl + reverse_kl * rkl
        logs["reverse_kl"] = float(rkl.detach())
    loss = kd_weight * kl + (1 - kd_weight) * ce
    return loss, logs


def topk_kd_loss(
    student_logits: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    input_ids: torch.Tensor,
    temperature: float = 2.0,
    kd_weight: float = 0.8,
) -> tuple[torch.Tensor, dict[str, float]]:
    """KD against cached top-k teacher logits: the teacher distribution is renormalised over its top k."""
    s = student_logits[:, :-1].float()
    v = s.shape[-1]
    ce = F.cross_entropy(s.reshape(-1, v), input_ids[:, 1:].reshape(-1))
    log_ps = F.log_softmax(s / temperature, dim=-1).gather(-1, indices[:, :-1])
    log_pt = F.log_softmax(values[:, :-1] / temperature, dim=-1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1).mean() * temperature**2
    return kd_weight * kl + (1 - kd_weight) * ce, {"ce": float(ce.detach()), "kl": float(kl.detach())}


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder blocks of a Hugging Face causal LM (``model.model.layers``), through a DDP wrapper."""
    from torch.nn.parallel import DistributedDataParallel

    m = model.module if isinstance(model, DistributedDataParallel) else model
    inner = getattr(m, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        from dsk_compress.errors import ModelSourceError

        raise ModelSourceError(
            f"{type(m).__name__} has no decoder layers at .model.layers for hidden-state distillation",
            hint="set hidden_mse: 0 for this model",
        )
    return layers


@contextlib.contextmanager
def capture_layer_outputs(model: torch.nn.Module, layers: list[int]):
    """Yield a dict ``layer index -> output of that decoder layer``, filled by forward hooks while the model runs."""
    blocks = decoder_layers(model)
    out: dict[int, torch.Tensor] = {}
    handles = []
    for i in sorted(set(layers)):

        def hook(_mod, _inp, o, i=i):
            out[i] = o[0] if isinstance(o, tuple) else o

        handles.append(blocks[i].register_forward_hook(hook))
    try:
        yield out
    finally:
        for h in handles:
            h.remove()


class HiddenStateMSE(torch.nn.Module):
    """MSE between projected student and teacher decoder-layer outputs on chosen layer pairs.

    Pair ``(s, t)`` compares the output of student decoder layer ``s`` (before the final norm),
    mapped by a learned ``Linear(student_hidden, teacher_hidden)``, with the output of teacher layer
    ``t``. Each projection starts as the identity when the widths match. The loss is the mean over
    pairs of the mean squared error over positions and channels. The projections are trained with
    the student (pass this module as the trainer's ``aux``) and are not part of the student model.
    """

    def __init__(self, pairs: list[tuple[int, int]], student_hidden: int, teacher_hidden: int, seed: int = 0) -> None:
        super().__init__()
        if not pairs:
            raise ValueError("HiddenStateMSE needs at least one (student_layer, teacher_layer) pair")
        self.pairs = [(int(s), int(t)) for s, t in pairs]
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        self.proj = torch.nn.ModuleList(torch.nn.Linear(student_hidden, teacher_hidden) for _ in self.pairs)
        torch.random.set_rng_state(gen_state)  # building the projections does not move the caller's RNG
        if student_hidden == teacher_hidden:
            with torch.no_grad():
                for p in self.proj:
                    p.weight.copy_(torch.eye(teacher_hidden))
                    p.bias.zero_()

    def forward(self, student_states: dict[int, torch.Tensor], teacher_states: dict[int, torch.Tensor]) -> torch.Tensor:
        terms = []
        for (s, t), proj in zip(self.pairs, self.proj):
            terms.append(F.mse_loss(proj(student_states[s]).float(), teacher_states[t].float()))
        return torch.stack(terms).mean()


def check_hidden_pairs(pairs: list[tuple[int, int]], n_student: int, n_teacher: int) -> None:
    """Every pair names an existing student and teacher decoder layer."""
    from dsk_compress.errors import InvalidArgument

    for s, t in pairs:
        if not (0 <= s < n_student and 0 <= t < n_teacher):
            raise InvalidArgument(
                f"hidden_pairs: pair [{s}, {t}] is out of range (student layers 0..{n_student - 1}, teacher layers 0..{n_teacher - 1})",
                "hidden_pairs",
                hint="give [[student_layer, teacher_layer], ...] with existing layer indices",
            )


def make_kd_loss_fn(
    teacher: torch.nn.Module,
    temperature: float,
    kd_weight: float,
    cache=None,
    reverse_kl: float = 0.0,
    hidden: HiddenStateMSE | None = None,
    hidden_weight: float = 0.0,
):
    """A trainer ``loss_fn``: the teacher runs online (no grad), or its top-k logits come from ``cache``.

    With ``hidden`` and ``hidden_weight > 0`` the loss adds ``hidden_weight * hidden(student, teacher)``
    on the paired decoder-layer outputs; that needs the online teacher.
    """
    use_hidden = hidden is not None and hidden_weight > 0
    if use_hidden and cache is not None:
        from dsk_compress.errors import InvalidArgument

        raise InvalidArgument(
            "hidden_weight needs the online teacher's hidden states, but a logit cache is given", "hidden_weight", hint="pass cache=None"
        )
    s_layers = [s for s, _ in hidden.pairs] if use_hidden else []
    t_layers = [t for _, t in hidden.pairs] if use_hidden else []

    def loss_fn(model, x, index):
        if use_hidden:
            with capture_layer_outputs(model, s_layers) as s_states:
                s_logits = model(input_ids=x, use_cache=False).logits
        else:
            s_logits = model(input_ids=x, use_cache=False).logits
        if kd_weight == 0 and not use_hidden:
            return kd_loss(s_logits, s_logits.detach(), x, temperature, 0.0)
        if cache is not None:
            values, indices = cache.get(index, x)
            return topk_kd_loss(s_logits, values, indices, x, temperature, kd_weight)
        with torch.no_grad():
            if use_hidden:
                with capture_layer_outputs(teacher, t_layers) as t_states:
                    t_logits = teacher(input_ids=x, use_cache=False).logits
            else:
                t_logits = teacher(input_ids=x, use_cache=False).logits
        loss, logs = kd_loss(s_logits, t_logits, x, temperature, kd_weight, reverse_kl)
        if use_hidden:
            h = hidden(s_states, t_states)
            loss = loss + hidden_weight * h
            logs["hidden_mse"] = float(h.detach())
        return loss, logs

    return loss_fn


def _special_ids(obj) -> dict[str, int | list | None]:
    return {k: getattr(obj, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")}


def _same_id(a, b) -> bool:
    """Special-token ids agree, or one side does not set it (a config may list several eos ids)."""
    if a is None or b is None:
        return True
    a = set(a) if isinstance(a, (list, tuple)) else {a}
    b = set(b) if isinstance(b, (list, tuple)) else {b}
    return bool(a & b)


def vocab_padding(vocab_size: int) -> int:
    """How many more embedding rows than tokenizer entries a model may have: padding to a multiple of 64 or 128, and
    reserved tokens, stay below max(128, 2% of the vocabulary) (Qwen2: 271 of 151,936; Phi-2: 905 of 51,200)."""
    return max(128, vocab_size // 50)


def check_vocab(teacher_config, student_config=None, task_tokenizer=None, teacher_tokenizer=None, task_vocab: int | None = None) -> None:
    """Refuse a teacher / student / task tokenizer combination whose vocabularies differ, before any training.

    Compared: ``vocab_size`` of teacher and student; the task tokenizer's size against the teacher's
    embedding rows (it may be smaller: embeddings are often padded); special-token ids (bos, eos,
    pad, unk) wherever both sides set them; and, when the teacher directory has its own tokenizer,
    the task tokenizer's full token -> id map.
    """
    from dsk_compress.errors import InvalidArgument

    tv = getattr(teacher_config, "vocab_size", None)
    if student_config is not None:
        sv = getattr(student_config, "vocab_size", None)
        if sv != tv:
            raise InvalidArgument(
                f"student vocab_size ({sv}) differs from the teacher's vocab_size ({tv})",
                "student",
                hint="distill into a student with the teacher's vocabulary (a student cut from the teacher has it)",
            )
        for k, a in _special_ids(teacher_config).items():
            b = getattr(student_config, k, None)
            if not _same_id(a, b):
                raise InvalidArgument(
                    f"student {k} ({b}) differs from the teacher's {k} ({a})",
                    "student",
                    hint="student and teacher must share the tokenizer; fix the student's config.json",
                )
    if task_tokenizer is not None and task_vocab is None:
        task_vocab = len(task_tokenizer)
    if task_vocab is not None and tv is not None and task_vocab > tv:
        raise InvalidArgument(
            f"task_tokenizer has {task_vocab} tokens but the teacher's vocab_size is {tv}",
            "task_tokenizer",
            hint="use the teacher's own tokenizer (the teacher's directory)",
        )
    if task_vocab is not None and tv is not None and tv - task_vocab > vocab_padding(tv):
        # embeddings are padded by a little (to a multiple of 64 or 128); a tokenizer far smaller is another tokenizer
        raise InvalidArgument(
            f"task_tokenizer has {task_vocab} tokens but the teacher's vocab_size is {tv}: {tv - task_vocab} embedding rows "
            f"would never be used, more than padding explains (at most {vocab_padding(tv)})",
            "task_tokenizer",
            hint="use the tokenizer the teacher was trained with (the teacher's directory)",
        )
    if task_tokenizer is None:
        return
    for k, a in _special_ids(teacher_config).items():
        b = getattr(task_tokenizer, k, None)
        if not _same_id(a, b):
            raise InvalidArgument(
                f"task_tokenizer {k} is {b} but the teacher's config has {k} {a}",
                "task_tokenizer",
                hint="use the teacher's own tokenizer (the teacher's directory)",
            )
    if teacher_tokenizer is not None:
        for k in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
            a, b = getattr(teacher_tokenizer, k, None), getattr(task_tokenizer, k, None)
            if a != b:
                raise InvalidArgument(
                    f"task_tokenizer {k} is {b} but the teacher's tokenizer has {a}",
                    "task_tokenizer",
                    hint="use the teacher's own tokenizer (the teacher's directory)",
                )
        if len(teacher_tokenizer) != len(task_tokenizer) or teacher_tokenizer.get_vocab() != task_tokenizer.get_vocab():
            ta, tb = teacher_tokenizer.get_vocab(), task_tokenizer.get_vocab()
            diff = sorted(set(ta.items()) ^ set(tb.items()), key=lambda kv: kv[1])[:3]
            raise InvalidArgument(
                f"task_tokenizer maps tokens to other ids than the teacher's tokenizer ({len(tb)} vs {len(ta)} tokens; e.g. {diff})",
                "task_tokenizer",
                hint="use the teacher's own tokenizer (the teacher's directory)",
            )
