"""Relation-based distillation: PKT, similarity-preserving KD (SP) and correlation congruence (CC).

Each loss compares how the samples of a batch relate to each other in the student and in the
teacher (similarities, Gram matrices, kernel matrices), on a tapped feature or the logits.
Relations are taken within each process's share of the batch (under DDP, a batch of 64 per
process is 64 samples' relations, as in the papers' single-GPU training). Math runs in
float32; the teacher never gets a gradient.
"""

from __future__ import annotations

import math
from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from kdforge import StepOutputs, full_precision, hookimpl

TapList = Annotated[list[str], Field(min_length=1)]


def _side(out: StepOutputs, tap: str | None, side: str) -> torch.Tensor:
    outputs = out.student if side == "student" else out.teacher
    if tap is None:
        return outputs.logits
    try:
        return outputs.features[tap]
    except KeyError:
        raise ValueError(f"no {side} feature {tap!r} was captured (taps seen: {sorted(outputs.features)})") from None


def _pair(out: StepOutputs, s_tap: str | None, t_tap: str | None, loss: str) -> tuple[torch.Tensor, torch.Tensor]:
    if out.teacher is None:
        raise ValueError(f"the {loss} loss needs a teacher: add a `teacher` to the recipe")
    s, t = _side(out, s_tap, "student"), _side(out, t_tap, "teacher").detach()
    if s.shape[0] != t.shape[0]:
        raise ValueError(f"{loss}: student and teacher batches differ ({s.shape[0]} vs {t.shape[0]} samples)")
    return s.flatten(1), t.flatten(1)


# -- PKT ----------------------------------------------------------------------------------
def cosine_conditional(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Row-normalized cosine kernel (cos + 1) / 2 between the rows of ``x``: p(j | i), diagonal included."""
    unit = x / (x.norm(dim=1, keepdim=True) + eps)
    kernel = (unit @ unit.t() + 1.0) / 2.0
    return kernel / kernel.sum(dim=1, keepdim=True)


@full_precision
def pkt_divergence(student: torch.Tensor, teacher: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """mean over (i, j) of p_t(j|i) * log((p_t(j|i) + eps) / (p_s(j|i) + eps)), in float32."""
    p_s, p_t = cosine_conditional(student.float(), eps), cosine_conditional(teacher.float(), eps)
    return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()


class ProbabilisticKT(nn.Module):
    """PKT (Passalis & Tefas, ECCV 2018): match the cosine-kernel conditional distributions of a batch.

    p(j|i) = K(x_i, x_j) / sum_k K(x_i, x_k) with K = (cos + 1) / 2 on one feature (``None``:
    the logits); loss = KL(p_t || p_s) averaged over all B^2 pairs (the authors' code).
    """

    teacher_required = True

    def __init__(self, student_tap: str | None = None, teacher_tap: str | None = None,
                 eps: Annotated[float, Field(gt=0.0)] = 1e-7) -> None:
        super().__init__()
        self.student_tap, self.teacher_tap, self.eps = student_tap, teacher_tap, eps
        self.student_taps = [student_tap] if student_tap else []
        self.teacher_taps = [teacher_tap] if teacher_tap else []

    def forward(self, out: StepOutputs) -> torch.Tensor:
        s, t = _pair(out, self.student_tap, self.teacher_tap, "pkt")
        return pkt_divergence(s, t, self.eps)


# -- SP -----------------------------------------------------------------------------------
def normalized_gram(x: torch.Tensor) -> torch.Tensor:
    """The (B, B) Gram matrix of the flattened rows, each of its rows L2-normalized."""
    return F.normalize(x @ x.t(), p=2, dim=1)


@full_precision
def similarity_preserving(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """||G_s - G_t||_F^2 / B^2 of the row-normalized batch Gram matrices, in float32."""
    g_s, g_t = normalized_gram(student.float()), normalized_gram(teacher.float())
    return (g_s - g_t).pow(2).sum() / student.shape[0] ** 2


class SimilarityPreserving(nn.Module):
    """Similarity-preserving KD (Tung & Mori, ICCV 2019): match batch similarity matrices of tap pairs.

    For each pair (l, l'): G = F F^T on the flattened features, rows L2-normalized; loss =
    sum_pairs w * ||G_s - G_t||_F^2 / B^2 (the paper's gamma is the term's weight).
    """

    teacher_required = True

    def __init__(self, student_taps: TapList, teacher_taps: TapList,
                 pair_weights: list[Annotated[float, Field(ge=0.0)]] | None = None) -> None:
        super().__init__()
        if len(student_taps) != len(teacher_taps):
            raise ValueError(f"student_taps ({len(student_taps)}) and teacher_taps ({len(teacher_taps)}) "
                             "are paired by position and must have the same length")
        if pair_weights is not None and len(pair_weights) != len(student_taps):
            raise ValueError(f"pair_weights needs one weight per tap pair ({len(student_taps)}), got {len(pair_weights)}")
        self.student_taps, self.teacher_taps = list(student_taps), list(teacher_taps)
        self.pair_weights = list(pair_weights) if pair_weights is not None else [1.0] * len(student_taps)

    def forward(self, out: StepOutputs) -> torch.Tensor:
        total = out.student.logits.new_zeros((), dtype=torch.float32)
        for s_tap, t_tap, weight in zip(self.student_taps, self.teacher_taps, self.pair_weights):
            s, t = _pair(out, s_tap, t_tap, "sp")
            total = total + weight * similarity_preserving(s, t)
        return total


# -- CC -----------------------------------------------------------------------------------
def taylor_rbf(e: torch.Tensor, gamma: float, order: int) -> torch.Tensor:
    """exp(-2 gamma) * sum_{p=0}^{order} (2 gamma)^p / p! * (e_i . e_j)^p: the Gaussian RBF's Taylor series.

    For unit rows exp(-gamma ||e_i - e_j||^2) = exp(-2 gamma) exp(2 gamma e_i . e_j).
    """
    dots = e @ e.t()
    series = torch.ones_like(dots)
    for p in range(1, order + 1):
        series = series + (2.0 * gamma) ** p / math.factorial(p) * dots.pow(p)
    return math.exp(-2.0 * gamma) * series


@full_precision
def correlation_congruence(student: torch.Tensor, teacher: torch.Tensor, gamma: float, order: int,
                           normalize: bool) -> torch.Tensor:
    """||k(E_s) - k(E_t)||_F^2 / B^2 with the Taylor-approximated RBF kernel matrices, in float32."""
    e_s, e_t = student.float(), teacher.float()
    if normalize:
        e_s, e_t = F.normalize(e_s, p=2, dim=1), F.normalize(e_t, p=2, dim=1)
    diff = taylor_rbf(e_s, gamma, order) - taylor_rbf(e_t, gamma, order)
    return diff.pow(2).sum() / e_s.shape[0] ** 2


class CorrelationCongruence(nn.Module):
    """Correlation congruence (Peng et al., ICCV 2019): match the batch correlation (kernel) matrices.

    Features (``None``: logits) are projected to ``embed_dim`` by a linear embedding on each
    side (the student's trained; the teacher's fixed at its random initialization unless
    ``learn_teacher_embedding``), L2-normalized (``normalize``), and compared through the
    order-``order`` Taylor expansion of the Gaussian RBF kernel exp(-gamma ||x - y||^2):
    loss = ||K_s - K_t||_F^2 / B^2. ``embed_dim: null`` compares the features themselves.
    """

    teacher_required = True

    def __init__(
        self,
        student_tap: str | None = None,
        teacher_tap: str | None = None,
        gamma: Annotated[float, Field(gt=0.0)] = 0.4,
        order: Annotated[int, Field(ge=0, le=8)] = 2,
        embed_dim: Annotated[int, Field(ge=1)] | None = 128,
        learn_teacher_embedding: bool = False,
        normalize: bool = True,
    ) -> None:
        super().__init__()
        self.student_tap, self.teacher_tap = student_tap, teacher_tap
        self.student_taps = [student_tap] if student_tap else []
        self.teacher_taps = [teacher_tap] if teacher_tap else []
        self.gamma, self.order, self.embed_dim = gamma, order, embed_dim
        self.learn_teacher_embedding, self.normalize = learn_teacher_embedding, normalize
        self.embed_student: nn.Linear | None = None
        self.embed_teacher: nn.Linear | None = None

    def _build(self, s: torch.Tensor, t: torch.Tensor) -> None:
        assert self.embed_dim is not None
        self.embed_student = nn.Linear(s.shape[1], self.embed_dim).to(s.device)
        self.embed_teacher = nn.Linear(t.shape[1], self.embed_dim).to(t.device)
        self.embed_teacher.requires_grad_(self.learn_teacher_embedding)

    def forward(self, out: StepOutputs) -> torch.Tensor:
        s, t = _pair(out, self.student_tap, self.teacher_tap, "cc")
        if self.embed_dim is not None:
            if self.embed_student is None:
                self._build(s, t)
            s, t = self.embed_student(s), self.embed_teacher(t)
            if not self.learn_teacher_embedding:
                t = t.detach()
        return correlation_congruence(s, t, self.gamma, self.order, self.normalize)


@hookimpl
def register_losses(register) -> None:
    """Register ``pkt``, ``sp`` and ``cc``."""
    register("pkt", ProbabilisticKT)
    register("sp", SimilarityPreserving)
    register("cc", CorrelationCongruence)
