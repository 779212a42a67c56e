"""Output losses: cross-entropy with the labels (``ce``) and Hinton's soft-target KD (``kd``)."""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field

from kdforge import UNLABELED, StepOutputs, full_precision, hookimpl


@full_precision
def kd_divergence(student_logits: torch.Tensor, teacher_log_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(p_teacher || softmax(student/T)), averaged over the batch, in float32.

    Takes the teacher's softened distribution as log-probabilities (``log_softmax`` of
    logits / T, or the log of an ensemble's mean distribution): working in log space
    keeps float32 accurate when probabilities are close to 1.
    """
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p = teacher_log_probs.float()
    kl = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(dim=-1)
    return kl.mean() * (temperature**2)


def standardize_logits(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Logit standardization (Sun et al. 2024): per sample ``(z - mean(z)) / (std(z) + eps)``, in float32.

    ``std`` is torch's default unbiased standard deviation over the classes, as in the
    authors' code.
    """
    z = logits.float()
    return (z - z.mean(dim=-1, keepdim=True)) / (z.std(dim=-1, keepdim=True) + eps)


@full_precision
def masked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor | None, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy over the labeled samples (target -1 is skipped), in float32; 0 without labels."""
    logits = logits.float()
    if targets is None:
        return logits.sum() * 0.0
    targets = targets.long()
    per_sample = F.cross_entropy(logits, targets.clamp_min(0), reduction="none", label_smoothing=label_smoothing)
    labeled = (targets != UNLABELED).to(per_sample.dtype)
    # Divide on the device: no host sync to count the labeled samples.
    return (per_sample * labeled).sum() / labeled.sum().clamp_min(1.0)


class CrossEntropy(torch.nn.Module):
    """Cross-entropy of the student's logits with the labels (unlabeled samples ignored).

    Samples whose target is -1 do not count; a batch without any label gives 0.
    """

    def __init__(self, label_smoothing: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, out: StepOutputs) -> torch.Tensor:
        return masked_cross_entropy(out.student.logits, out.targets, self.label_smoothing)


class HintonKD(torch.nn.Module):
    """Hinton et al. 2015: T^2 * KL(softmax(teacher/T) || softmax(student/T)), batch mean.

    Computed in float32 whatever the autocast dtype. ``temperature`` may be driven by a
    schedule. With an ensemble teacher it distills from the ensemble's combined
    distribution at this temperature (``ModelOutputs.log_probs``). ``standardize: true``
    applies logit standardization (Sun et al., CVPR 2024) to both sides' logits before
    the temperature; an ensemble teacher's combined logits are then standardized.
    """

    teacher_required = True

    def __init__(self, temperature: Annotated[float, Field(gt=0.0)] = 4.0, standardize: bool = False) -> None:
        super().__init__()
        self.temperature = temperature
        self.standardize = standardize

    def forward(self, out: StepOutputs) -> torch.Tensor:
        if out.teacher is None:
            raise ValueError("the kd loss needs a teacher: add a `teacher` to the recipe")
        t = float(self.temperature)
        if self.standardize:
            return _standardized_kd(out.student.logits, out.teacher.logits, t)
        # log_probs: log_softmax(logits / T), or an ensemble's own combination at this T
        return kd_divergence(out.student.logits, out.teacher.log_probs(t), t)


@full_precision
def _standardized_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    teacher_log_probs = F.log_softmax(standardize_logits(teacher_logits.detach()) / temperature, dim=-1)
    return kd_divergence(standardize_logits(student_logits), teacher_log_probs, temperature)


@hookimpl
def register_losses(register) -> None:
    """Register ``ce`` and ``kd``."""
    register("ce", CrossEntropy)
    register("kd", HintonKD)
