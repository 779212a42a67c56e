"""Output losses: cross-entropy with the labels (``ce``) and Hinton's soft-target KD (``kd``)."""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field

from kdforge import UNLABELED, StepOutputs, hookimpl


def kd_divergence(student_logits: torch.Tensor, teacher_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(teacher_probs || softmax(student/T)), averaged over the batch, in float32.

    ``teacher_probs`` are the teacher's already-softened probabilities (so an ensemble
    can hand over a mean of distributions rather than logits).
    """
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    p = teacher_probs.float()
    # p * log p with the 0 * log 0 = 0 convention
    plogp = torch.where(p > 0, p * torch.log(p.clamp_min(torch.finfo(p.dtype).tiny)), torch.zeros_like(p))
    kl = (plogp - p * log_q).sum(dim=-1)
    return kl.mean() * (temperature**2)


class CrossEntropy(torch.nn.Module):
    """Cross-entropy of the student's logits with the labels (unlabeled samples ignored).

    Samples whose target is -1 do not count; a batch without any label gives 0.
    """

    def __init__(self, label_smoothing: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, out: StepOutputs) -> torch.Tensor:
        logits = out.student.logits.float()
        if out.targets is None:
            return logits.sum() * 0.0
        targets = out.targets.long()
        per_sample = F.cross_entropy(
            logits, targets.clamp_min(0), reduction="none", label_smoothing=self.label_smoothing
        )
        labeled = (targets != UNLABELED).to(per_sample.dtype)
        # Divide on the device: no host sync to count the labeled samples.
        return (per_sample * labeled).sum() / labeled.sum().clamp_min(1.0)


class HintonKD(torch.nn.Module):
    """Hinton et al. 2015: T^2 * KL(softmax(teacher/T) || softmax(student/T)), batch mean.

    Computed in float32 whatever the autocast dtype. ``temperature`` may be driven by a
    schedule. When the teacher view carries ``probs`` (an ensemble averaging
    distributions), those are distilled from instead of the teacher logits.
    """

    teacher_required = True

    def __init__(self, temperature: Annotated[float, Field(gt=0.0)] = 4.0) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(self, out: StepOutputs) -> torch.Tensor:
        if out.teacher is None:
            raise ValueError("the kd loss needs a teacher: add a `teacher` to the recipe")
        t = float(self.temperature)
        teacher_probs = F.softmax(out.teacher.logits.float() / t, dim=-1)
        return kd_divergence(out.student.logits, teacher_probs, t)


@hookimpl
def register_losses(register) -> None:
    """Register ``ce`` and ``kd``."""
    register("ce", CrossEntropy)
    register("kd", HintonKD)
