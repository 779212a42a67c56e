"""Logit-based distillation beyond Hinton's KD: DKD, DIST, CTKD and MLKD.

Every loss reads only the two models' logits, computes in float32 whatever the autocast
dtype, and never sends a gradient into the teacher. ``dkd`` also takes logit
standardization (``standardize``, Sun et al. 2024), as ``kd`` does.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from kdforge import UNLABELED, RecipeError, RunContext, StepOutputs, all_gather, full_precision, hookimpl
from kdforge.plugins.losses import standardize_logits

Positive = Annotated[float, Field(gt=0.0)]
NonNegative = Annotated[float, Field(ge=0.0)]


def _teacher_logits(out: StepOutputs, loss: str) -> torch.Tensor:
    if out.teacher is None:
        raise ValueError(f"the {loss} loss needs a teacher: add a `teacher` to the recipe")
    s, t = out.student.logits, out.teacher.logits
    if s.shape != t.shape or s.ndim != 2:
        raise ValueError(f"{loss} needs student and teacher logits of the same (batch, classes) shape; "
                         f"got {tuple(s.shape)} and {tuple(t.shape)}")
    return t.detach()


def kl_rows(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) of each row, from log-probabilities (0 * log 0 counts as 0)."""
    return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(dim=-1)


# -- DKD ----------------------------------------------------------------------------------
@full_precision
def dkd_terms(student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor,
              temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample TCKD and NCKD (each times T^2) for labeled rows; ``targets`` are valid class indices.

    TCKD: KL between the two-bin [target, all non-target] distributions. NCKD: KL between
    the distributions over the non-target classes alone (target removed, renormalized).
    Both are computed in log space.
    """
    s, t = student.float() / temperature, teacher.float() / temperature
    n, c = s.shape
    target_mask = F.one_hot(targets, c).bool()
    log_ps, log_pt = F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1)
    # two bins: log p(target) and log p(not target) = logsumexp of the other classes' log-probs
    others_s = log_ps.masked_fill(target_mask, float("-inf")).logsumexp(dim=-1)
    others_t = log_pt.masked_fill(target_mask, float("-inf")).logsumexp(dim=-1)
    bins_s = torch.stack([log_ps[target_mask], others_s], dim=-1)
    bins_t = torch.stack([log_pt[target_mask], others_t], dim=-1)
    tckd = kl_rows(bins_t, bins_s)
    # non-target classes only: drop the target column, then renormalize
    keep = ~target_mask
    nckd = kl_rows(F.log_softmax(t[keep].view(n, c - 1), dim=-1), F.log_softmax(s[keep].view(n, c - 1), dim=-1))
    return tckd * temperature**2, nckd * temperature**2


class DecoupledKD(nn.Module):
    """Decoupled KD (Zhao et al., CVPR 2022): alpha * TCKD + beta * NCKD, mean over labeled samples.

    Needs labels: samples labeled -1 do not count, and a batch without labels gives 0
    (connected to the graph). ``standardize`` applies logit standardization first.
    mdistiller's 20-epoch warm-up is a weight schedule in the recipe.
    """

    teacher_required = True

    def __init__(self, alpha: NonNegative = 1.0, beta: NonNegative = 8.0, temperature: Positive = 4.0,
                 standardize: bool = False) -> None:
        super().__init__()
        self.alpha, self.beta, self.temperature, self.standardize = alpha, beta, temperature, standardize

    def forward(self, out: StepOutputs) -> torch.Tensor:
        teacher = _teacher_logits(out, "dkd")
        student = out.student.logits
        if student.shape[-1] < 2:
            raise ValueError("dkd needs at least two classes")
        if out.targets is None:
            return student.float().sum() * 0.0
        targets = out.targets.long()
        labeled = targets != UNLABELED
        if self.standardize:
            student, teacher = standardize_logits(student), standardize_logits(teacher)
        tckd, nckd = dkd_terms(student, teacher, targets.clamp_min(0), float(self.temperature))
        weight = labeled.to(tckd.dtype)
        per_sample = self.alpha * tckd + self.beta * nckd
        # zeroed by where, not by a product: an unlabeled row may hold any (even inf) value
        return torch.where(labeled, per_sample, 0.0).sum() / weight.sum().clamp_min(1.0)


# -- DIST ---------------------------------------------------------------------------------
def pearson_rows(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation of each row of ``a`` with the same row of ``b``."""
    a = a - a.mean(dim=-1, keepdim=True)
    b = b - b.mean(dim=-1, keepdim=True)
    return (a * b).sum(dim=-1) / (a.norm(dim=-1) * b.norm(dim=-1) + eps)


class DIST(nn.Module):
    """DIST (Huang et al., NeurIPS 2022): T^2 * (beta * inter + gamma * intra) on softened distributions.

    inter = 1 - mean over samples of the Pearson correlation between the student's and the
    teacher's class distributions; intra = 1 - mean over classes of the Pearson correlation
    of each class's probabilities across the batch. Under DDP the intra term sees the whole
    batch (``kdforge.all_gather``).
    """

    teacher_required = True

    def __init__(self, beta: NonNegative = 1.0, gamma: NonNegative = 1.0, temperature: Positive = 1.0) -> None:
        super().__init__()
        self.beta, self.gamma, self.temperature = beta, gamma, temperature

    @full_precision
    def forward(self, out: StepOutputs) -> torch.Tensor:
        teacher = _teacher_logits(out, "dist")
        t = float(self.temperature)
        p_s = F.softmax(out.student.logits.float() / t, dim=-1)
        p_t = F.softmax(teacher.float() / t, dim=-1)
        inter = 1.0 - pearson_rows(p_s, p_t).mean()
        intra = p_s.new_zeros(())
        if self.gamma:
            g_s, g_t = all_gather(p_s), all_gather(p_t)
            intra = 1.0 - pearson_rows(g_s.t(), g_t.t()).mean()
        return t * t * (self.beta * inter + self.gamma * intra)


# -- CTKD ---------------------------------------------------------------------------------
class _ReverseGradient(torch.autograd.Function):
    """Identity forward; multiplies the gradient by ``-strength`` backward (Ganin & Lempitsky 2015)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, strength: float) -> torch.Tensor:
        ctx.strength = strength
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return -ctx.strength * grad, None


def reverse_gradient(x: torch.Tensor, strength: float) -> torch.Tensor:
    """``x`` in the forward pass; its gradient times ``-strength`` in the backward pass."""
    return _ReverseGradient.apply(x, strength)


def cosine_ramp(fraction: float, start: float, end: float) -> float:
    """From ``start`` at 0 to ``end`` at ``fraction >= 1`` along a half cosine."""
    f = min(max(fraction, 0.0), 1.0)
    return end + (start - end) * (1.0 + math.cos(math.pi * f)) / 2.0


class CurriculumTemperatureKD(nn.Module):
    """CTKD (Li et al., AAAI 2023): KD with a learnable temperature trained adversarially.

    T = temperature_min + temperature_range * sigmoid(theta), theta a trainable scalar
    (initialized to ``init``) behind a gradient-reversal layer: the student minimizes
    T^2 * KL(softmax(z_t/T) || softmax(z_s/T)) while the temperature maximizes it with
    strength lambda, which rises from ``lambda_min`` to ``lambda_max`` along a cosine over the
    first ``lambda_warmup`` of the epochs (per epoch, as the authors' code).
    """

    teacher_required = True

    def __init__(self, temperature_min: Positive = 1.0, temperature_range: Positive = 20.0, init: float = 1.0,
                 lambda_min: NonNegative = 0.0, lambda_max: NonNegative = 1.0,
                 lambda_warmup: Annotated[float, Field(gt=0.0, le=1.0)] = 10 / 240) -> None:
        super().__init__()
        if lambda_min > lambda_max:
            raise RecipeError(f"lambda_min ({lambda_min}) must not exceed lambda_max ({lambda_max})", key=".lambda_min")
        self.temperature_min, self.temperature_range = temperature_min, temperature_range
        self.lambda_min, self.lambda_max, self.lambda_warmup = lambda_min, lambda_max, lambda_warmup
        self.theta = nn.Parameter(torch.tensor(float(init)))
        self.history: list[float] = []

    def reversal_strength(self, epoch: int, epochs: int) -> float:
        """lambda for a (0-based) epoch: the authors count epochs from 1 and reach the top after the warm-up."""
        return cosine_ramp((epoch + 1) / max(epochs, 1) / self.lambda_warmup, self.lambda_min, self.lambda_max)

    def temperature_of(self, theta: torch.Tensor) -> torch.Tensor:
        """The temperature for a value of the trainable scalar."""
        return self.temperature_min + self.temperature_range * torch.sigmoid(theta.float())

    @property
    def temperature(self) -> float:
        """The current temperature."""
        return float(self.temperature_of(self.theta.detach()))

    @full_precision
    def forward(self, out: StepOutputs) -> torch.Tensor:
        teacher = _teacher_logits(out, "ctkd")
        theta = reverse_gradient(self.theta, self.reversal_strength(out.epoch, out.epochs)) if out.training else self.theta
        t = self.temperature_of(theta)
        log_q = F.log_softmax(out.student.logits.float() / t, dim=-1)
        log_p = F.log_softmax(teacher.float() / t, dim=-1)
        return kl_rows(log_p, log_q).mean() * t * t

    def scalars(self) -> dict[str, torch.Tensor]:
        """The current temperature, logged as ``train/ctkd/temperature`` at every log interval."""
        return {"temperature": self.temperature_of(self.theta.detach())}

    def on_epoch_end(self, run: RunContext) -> None:
        """Keep the temperature reached at the end of each epoch for the summary."""
        self.history.append(round(self.temperature, 6))

    def on_fit_end(self, run: RunContext) -> dict[str, Any]:
        """The final temperature and the temperature after each epoch run in this process."""
        return {"ctkd/temperature": self.temperature, "ctkd/temperature_by_epoch": list(self.history)}


# -- MLKD ---------------------------------------------------------------------------------
@full_precision
def multi_level_terms(student: torch.Tensor, teacher: torch.Tensor,
                      temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Instance, class and batch alignment at one temperature (Jin et al. 2023).

    instance: T^2 * KL(p_t || p_s), batch mean; class: ||P_t^T P_t - P_s^T P_s||_F^2 / C;
    batch: ||P_t P_t^T - P_s P_s^T||_F^2 / B, with P the (B, C) softened predictions.
    """
    log_ps = F.log_softmax(student.float() / temperature, dim=-1)
    log_pt = F.log_softmax(teacher.float() / temperature, dim=-1)
    p_s, p_t = log_ps.exp(), log_pt.exp()
    n, c = p_s.shape
    instance = kl_rows(log_pt, log_ps).mean() * temperature**2
    class_level = (p_t.t() @ p_t - p_s.t() @ p_s).pow(2).sum() / c
    batch_level = (p_t @ p_t.t() - p_s @ p_s.t()).pow(2).sum() / n
    return instance, class_level, batch_level


class MultiLevelKD(nn.Module):
    """MLKD (Jin et al., CVPR 2023): instance-, class- and batch-level alignment over several temperatures.

    loss = sum over T in ``temperatures`` of instance_weight * T^2 KL + class_weight * class
    + batch_weight * batch. Single view: the authors also distill a strongly augmented
    second view of each image, which the data pipeline has to provide (see the docs).
    ``standardize`` applies logit standardization first (as the LS authors' MLKD+Ours).
    """

    teacher_required = True

    def __init__(
        self,
        temperatures: Annotated[list[Positive], Field(min_length=1)] = [2.0, 3.0, 4.0, 5.0, 6.0],  # noqa: B006
        instance_weight: NonNegative = 1.0,
        class_weight: NonNegative = 1.0,
        batch_weight: NonNegative = 1.0,
        standardize: bool = False,
    ) -> None:
        super().__init__()
        self.temperatures = [float(t) for t in temperatures]
        self.instance_weight, self.class_weight, self.batch_weight = instance_weight, class_weight, batch_weight
        self.standardize = standardize

    def forward(self, out: StepOutputs) -> torch.Tensor:
        teacher = _teacher_logits(out, "mlkd")
        student = out.student.logits
        if self.standardize:
            student, teacher = standardize_logits(student), standardize_logits(teacher)
        total = student.new_zeros((), dtype=torch.float32)
        for t in self.temperatures:
            instance, class_level, batch_level = multi_level_terms(student, teacher, t)
            total = total + self.instance_weight * instance + self.class_weight * class_level \
                + self.batch_weight * batch_level
        return total


@hookimpl
def register_losses(register) -> None:
    """Register ``dkd``, ``dist``, ``ctkd`` and ``mlkd``."""
    register("dkd", DecoupledKD)
    register("dist", DIST)
    register("ctkd", CurriculumTemperatureKD)
    register("mlkd", MultiLevelKD)
