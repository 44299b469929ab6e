"""Knowledge-distillation losses on the teacher's top-k logits (guide §5, "模型蒸馏").

Hinton, Vinyals & Dean 2015 ("Distilling the Knowledge in a Neural Network") train the student on the
teacher's softened distribution p = softmax(z_teacher / T) as well as the hard labels, and scale the soft
term by T^2 so its gradients keep their size as T changes. Which divergence to minimise is a choice:

* ``forward_kl``  KL(p || q): mass-covering, the classic; q is the student's full-vocabulary distribution
  gathered at the teacher's top-k tokens, p the teacher's renormalised over them (its tail is not stored).
* ``reverse_kl``  KL(q || p): mode-seeking (MiniLLM, Gu et al. 2024); both sides are restricted to the top-k
  support and renormalised there, since p is unknown (taken as 0) outside it.
* ``jsd``  generalised Jensen-Shannon with weight beta (GKD, Agarwal et al. 2024): with m = beta p +
  (1 - beta) q, JSD_beta = beta KL(p || m) + (1 - beta) KL(q || m), also over the top-k support; beta -> 0
  behaves like forward KL scaled by beta, beta -> 1 like reverse KL.

Shapes: student logits (N, V) at the N positions that carry loss; teacher ids (N, k) int64 and values (N, k)
(raw logits, any temperature applies here). Every function returns the mean over positions, in nats.
"""

from __future__ import annotations

from typing import Literal

import torch

Divergence = Literal["forward_kl", "reverse_kl", "jsd"]


def teacher_probs(values: torch.Tensor, temperature: float) -> torch.Tensor:
    """The teacher's distribution over its top-k tokens at `temperature`: softmax(values / T), (N, k)."""
    return torch.softmax(values.float() / temperature, dim=-1)


def kd_divergence(student_logits: torch.Tensor, teacher_ids: torch.Tensor, teacher_values: torch.Tensor,
                  kind: Divergence = "forward_kl", temperature: float = 1.0, beta: float = 0.5) -> torch.Tensor:
    """Mean divergence between teacher and student over N positions (see the module docstring), x T^2.

    student_logits (N, V); teacher_ids (N, k) int64; teacher_values (N, k) raw teacher logits.
    """
    if temperature <= 0:
        raise ValueError(f"temperature: must be > 0, got {temperature}")
    if student_logits.size(0) == 0:
        return student_logits.sum() * 0.0
    p = teacher_probs(teacher_values, temperature)
    log_p = torch.log(p.clamp_min(1e-30))
    s = student_logits.float() / temperature
    if kind == "forward_kl":
        log_q = torch.log_softmax(s, dim=-1).gather(-1, teacher_ids)
        per = (p * (log_p - log_q)).sum(-1)
    else:
        log_q = torch.log_softmax(s.gather(-1, teacher_ids), dim=-1)  # student renormalised on the support
        q = log_q.exp()
        if kind == "reverse_kl":
            per = (q * (log_q - log_p)).sum(-1)
        elif kind == "jsd":
            if not 0.0 < beta < 1.0:
                raise ValueError(f"beta: must be in (0, 1) for jsd, got {beta}")
            log_m = torch.logsumexp(torch.stack((log_p + torch.log(torch.tensor(beta)),
                                                 log_q + torch.log(torch.tensor(1.0 - beta)))), dim=0)
            per = beta * (p * (log_p - log_m)).sum(-1) + (1.0 - beta) * (q * (log_q - log_m)).sum(-1)
        else:
            raise ValueError(f"kind: {kind!r} is not one of forward_kl, reverse_kl, jsd")
    return per.mean() * temperature ** 2
