"""Preference-tuning losses: pure functions of per-sequence summed log-probabilities.

Every function takes tensors of shape (B,) - the log-probability of each response given its prompt, summed over
the response tokens (`pc`/`pr`: the policy on the chosen / rejected response; `rc`/`rr`: the frozen reference
model) - and returns the per-example losses (B,); the recipe averages them. Notation: sigma = the logistic
function, log sigma(z) = -softplus(-z).

| loss | paper | per-example loss |
|---|---|---|
| `dpo`  | Rafailov et al. 2023, "Direct Preference Optimization" | -log sigma(beta m), m = (pc - rc) - (pr - rr) |
| `cdpo` | Mitchell 2023, "A note on DPO with noisy preferences" (conservative DPO, label smoothing eps) | -(1 - eps) log sigma(beta m) - eps log sigma(-beta m) |
| `ipo`  | Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human Preferences" | (m - 1 / (2 tau))^2, tau = beta |
| `orpo` | Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model" | -lc - lambda log sigma(log odds(lc) - log odds(lr)), lc = pc / |y_c|, odds(p) = p / (1 - p) |
| `simpo`| Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward" | -log sigma(beta (pc / |y_c| - pr / |y_r|) - gamma) |
| `kto`  | Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization" | desirable: lambda_D (1 - sigma(beta (r - z0))); undesirable: lambda_U (1 - sigma(beta (z0 - r))), r = p - ref, z0 = max(0, mean KL estimate) |

The DPO family's implicit reward of a response is beta (log pi(y|x) - log pi_ref(y|x)) (`implicit_rewards`).
ORPO and SimPO need no reference model; KTO is unpaired (one response per example with a desirable / undesirable
label) and uses the batch estimate of KL(pi || pi_ref) on mismatched prompt / completion pairs as its reference
point z0 (`kto_reference_point`), through which no gradient flows (as in the paper and TRL).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("dpo", "cdpo", "ipo", "orpo", "simpo", "kto")
REFERENCE_FREE = ("orpo", "simpo")
UNPAIRED = ("kto",)


def dpo_margin(pc: torch.Tensor, pr: torch.Tensor, rc: torch.Tensor, rr: torch.Tensor) -> torch.Tensor:
    """m = (log pi(y_c) - log pi_ref(y_c)) - (log pi(y_r) - log pi_ref(y_r)), per pair."""
    return (pc - rc) - (pr - rr)


def dpo_loss(pc, pr, rc, rr, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """DPO's sigmoid loss -log sigma(beta m) (Rafailov et al. 2023, eq. 7); with label_smoothing = eps > 0 the
    conservative DPO of noisy labels: -(1 - eps) log sigma(beta m) - eps log sigma(-beta m).

    Gradient w.r.t. pc (eps = 0): -beta sigma(-beta m); w.r.t. pr: +beta sigma(-beta m)."""
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing: must be in [0, 0.5), got {label_smoothing}")
    z = beta * dpo_margin(pc, pr, rc, rr)
    return -(1.0 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def ipo_loss(pc, pr, rc, rr, beta: float) -> torch.Tensor:
    """IPO (Azar et al. 2023, eq. 17 with tau = beta): (m - 1/(2 tau))^2, a squared loss that regresses the
    log-likelihood-ratio margin to a finite target instead of pushing it to infinity."""
    return (dpo_margin(pc, pr, rc, rr) - 1.0 / (2.0 * beta)) ** 2


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable near 0 and for very negative x."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_log_odds_ratio(mean_c: torch.Tensor, mean_r: torch.Tensor) -> torch.Tensor:
    """log [odds(y_c) / odds(y_r)] with odds(y) = P(y) / (1 - P(y)) and log P(y) the length-normalised
    log-likelihood (Hong et al. 2024, eq. 4-6)."""
    mean_c = mean_c.clamp(max=-1e-6)
    mean_r = mean_r.clamp(max=-1e-6)
    return (mean_c - mean_r) - (_log1mexp(mean_c) - _log1mexp(mean_r))


def orpo_loss(pc, pr, len_c, len_r, lam: float) -> torch.Tensor:
    """ORPO (Hong et al. 2024, eq. 6): the SFT loss on the chosen response (mean NLL per token, -pc / |y_c|)
    plus lambda x the odds-ratio term -log sigma(log odds ratio). No reference model."""
    mean_c, mean_r = pc / len_c, pr / len_r
    return -mean_c - lam * F.logsigmoid(orpo_log_odds_ratio(mean_c, mean_r))


def simpo_loss(pc, pr, len_c, len_r, beta: float, gamma: float) -> torch.Tensor:
    """SimPO (Meng et al. 2024, eq. 6): -log sigma(beta/|y_c| log pi(y_c) - beta/|y_r| log pi(y_r) - gamma), the
    length-normalised reward with a target margin gamma; no reference model."""
    return -F.logsigmoid(beta * (pc / len_c - pr / len_r) - gamma)


def kto_reference_point(policy_kl: torch.Tensor, reference_kl: torch.Tensor) -> torch.Tensor:
    """KTO's z0 (Ethayarajh et al. 2024, eq. 7): max(0, mean_i [log pi(y'_i|x_i) - log pi_ref(y'_i|x_i)]) over
    mismatched prompt / completion pairs of the batch, an estimate of KL(pi || pi_ref); detached."""
    return (policy_kl - reference_kl).mean().clamp(min=0).detach()


def kto_loss(p, r, desirable: torch.Tensor, beta: float, z0: torch.Tensor | float, lambda_d: float = 1.0,
             lambda_u: float = 1.0) -> torch.Tensor:
    """KTO (Ethayarajh et al. 2024, eq. 8): with reward r = log pi(y|x) - log pi_ref(y|x), a desirable example
    costs lambda_D (1 - sigma(beta (r - z0))), an undesirable one lambda_U (1 - sigma(beta (z0 - r)))."""
    reward = p - r
    desirable = desirable.bool()
    good = lambda_d * (1.0 - torch.sigmoid(beta * (reward - z0)))
    bad = lambda_u * (1.0 - torch.sigmoid(beta * (z0 - reward)))
    return torch.where(desirable, good, bad)


def implicit_rewards(policy: torch.Tensor, reference: torch.Tensor, beta: float) -> torch.Tensor:
    """beta (log pi(y|x) - log pi_ref(y|x)): the reward DPO's policy implicitly assigns (Rafailov et al. §5)."""
    return beta * (policy - reference)
