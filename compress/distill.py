"""Knowledge distillation: logit KD with temperature plus hard-label cross-entropy."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, input_ids: torch.Tensor,
            temperature: float = 2.0, kd_weight: float = 0.8, reverse_kl: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
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


def topk_kd_loss(student_logits: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, input_ids: torch.Tensor,
                 temperature: float = 2.0, kd_weight: float = 0.8) -> tuple[torch.Tensor, dict[str, float]]:
    """KD against cached top-k teacher logits: the teacher distribution is renormalised over its top k."""
    s = student_logits[:, :-1].float()
    v = s.shape[-1]
    ce = F.cross_entropy(s.reshape(-1, v), input_ids[:, 1:].reshape(-1))
    log_ps = F.log_softmax(s / temperature, dim=-1).gather(-1, indices[:, :-1])
    log_pt = F.log_softmax(values[:, :-1] / temperature, dim=-1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1).mean() * temperature**2
    return kd_weight * kl + (1 - kd_weight) * ce, {"ce": float(ce.detach()), "kl": float(kl.detach())}


def make_kd_loss_fn(teacher: torch.nn.Module, temperature: float, kd_weight: float, cache=None, reverse_kl: float = 0.0):
    """A trainer ``loss_fn``: the teacher runs online (no grad), or its top-k logits come from ``cache``."""

    def loss_fn(model, x, index):
        s_logits = model(input_ids=x, use_cache=False).logits
        if kd_weight == 0:
            return kd_loss(s_logits, s_logits.detach(), x, temperature, 0.0)
        if cache is not None:
            values, indices = cache.get(index, x)
            return topk_kd_loss(s_logits, values, indices, x, temperature, kd_weight)
        with torch.no_grad():
            t_logits = teacher(input_ids=x, use_cache=False).logits
        return kd_loss(s_logits, t_logits, x, temperature, kd_weight, reverse_kl)

    return loss_fn
