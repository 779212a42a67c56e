"""Contrastive representation distillation: ``crd`` (Tian, Krishnan & Isola, ICLR 2020).

Student and teacher embeddings (a linear head and L2 normalization on each side) are
contrasted against momentum memory banks of every training sample's embedding, keyed by
the sample's position in the train split (``out.index``). The banks and the NCE
normalization constants are buffers: checkpointed and restored by ``--resume``.
Negatives are drawn with torch's random generator, whose state Accelerate restores on
resume. No labels are used, so unlabeled samples take part like labeled ones.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from kdforge import StepOutputs, all_gather, full_precision, hookimpl


def _side(features: dict[str, torch.Tensor], tap: str | None, logits: torch.Tensor, side: str) -> torch.Tensor:
    if tap is None:
        return logits.flatten(1)
    try:
        return features[tap].flatten(1)
    except KeyError:
        raise ValueError(f"no {side} feature {tap!r} was captured (taps seen: {sorted(features)})") from None


@full_precision
def unit(x: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` scaled to unit L2 norm, in float32."""
    return F.normalize(x.float(), dim=1)


@full_precision
def bank_logits(bank: torch.Tensor, indices: torch.Tensor, anchor: torch.Tensor, temperature: float) -> torch.Tensor:
    """<bank[indices], anchor> / T: (B, K+1) logits of each anchor against its positive (column 0) and negatives."""
    rows = bank[indices].detach()  # (B, K+1, D)
    return torch.bmm(rows, anchor.float().unsqueeze(2)).squeeze(2) / temperature


@full_precision
def nce_loss(scores: torch.Tensor, num_samples: int, eps: float) -> torch.Tensor:
    """CRD's NCE objective on normalized scores (column 0 the positive): -[log h(pos) + sum log(1 - h(neg))] / B.

    h(x) = x / (x + K / N): the probability that a pair came from the data, not the noise.
    """
    k = scores.shape[1] - 1
    noise = k / float(num_samples)
    positive = torch.log(scores[:, 0] / (scores[:, 0] + noise + eps))
    negative = torch.log(noise / (scores[:, 1:] + noise + eps))
    return -(positive.sum() + negative.sum()) / scores.shape[0]


@full_precision
def softmax_contrastive_loss(logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the positive (column 0) among the K+1 logits <v, bank> / T."""
    logits = logits.float()
    return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device))


class CRD(nn.Module):
    """Contrastive representation distillation (Tian et al. 2020): NCE between student and teacher
    embeddings against momentum memory banks.

    v_s = normalize(W_s f_s), v_t = normalize(W_t f_t) (heads built on the first call). For
    each sample i, K indices are drawn uniformly from the train split; with the teacher
    bank M_t and the student bank M_s, s_ij = exp(<v_s,i, M_t[j]> / T) / Z_s (and the mirror
    image for v_t against M_s). ``objective: nce`` (the paper's): Z estimated on the first
    batch as mean(s) * N, loss = sum over both sides of -[log h(s_ii) + sum_j log(1 - h(s_ij))] / B
    with h(x) = x / (x + K/N). ``objective: softmax``: cross-entropy of the positive among the
    K+1 logits. After each call the banks move: M[i] <- normalize(m M[i] + (1 - m) v_i).
    """

    teacher_required = True

    def __init__(
        self,
        num_samples: Annotated[int, Field(ge=1)],
        student_tap: str | None = None,
        teacher_tap: str | None = None,
        feat_dim: Annotated[int, Field(ge=1)] = 128,
        nce_k: Annotated[int, Field(ge=1)] = 16384,
        nce_t: Annotated[float, Field(gt=0.0)] = 0.07,
        nce_m: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.5,
        objective: Literal["nce", "softmax"] = "nce",
        eps: Annotated[float, Field(gt=0.0)] = 1e-7,
    ) -> None:
        super().__init__()
        self.student_tap, self.teacher_tap = student_tap, teacher_tap
        self.student_taps = [student_tap] if student_tap else []
        self.teacher_taps = [teacher_tap] if teacher_tap else []
        self.num_samples, self.feat_dim, self.nce_k = num_samples, feat_dim, nce_k
        self.nce_t, self.nce_m, self.objective, self.eps = nce_t, nce_m, objective, eps
        bound = 1.0 / math.sqrt(feat_dim / 3.0)  # the reference's uniform initialization of both banks
        self.register_buffer("memory_student", torch.rand(num_samples, feat_dim) * 2 * bound - bound)
        self.register_buffer("memory_teacher", torch.rand(num_samples, feat_dim) * 2 * bound - bound)
        # NCE normalization constants; negative: not estimated yet (the first training batch does)
        self.register_buffer("z_student", torch.tensor(-1.0))
        self.register_buffer("z_teacher", torch.tensor(-1.0))
        self.embed_student: nn.Linear | None = None
        self.embed_teacher: nn.Linear | None = None

    def _embeddings(self, out: StepOutputs) -> tuple[torch.Tensor, torch.Tensor]:
        if out.teacher is None:
            raise ValueError("the crd loss needs a teacher")
        fs = _side(out.student.features, self.student_tap, out.student.logits, "student")
        ft = _side(out.teacher.features, self.teacher_tap, out.teacher.logits, "teacher").detach()
        if self.embed_student is None:
            self.embed_student = nn.Linear(fs.shape[1], self.feat_dim).to(fs.device)
            self.embed_teacher = nn.Linear(ft.shape[1], self.feat_dim).to(ft.device)
        if fs.shape[1] != self.embed_student.in_features or ft.shape[1] != self.embed_teacher.in_features:
            raise ValueError(f"crd was built for {self.embed_student.in_features}-d student and "
                             f"{self.embed_teacher.in_features}-d teacher features, got student "
                             f"{self.student_tap or 'logits'} {tuple(fs.shape)} and teacher "
                             f"{self.teacher_tap or 'logits'} {tuple(ft.shape)}")
        return unit(self.embed_student(fs)), unit(self.embed_teacher(ft))

    def _index(self, out: StepOutputs, batch: int) -> torch.Tensor:
        index = out.index
        if index is None:
            raise ValueError("crd needs each sample's index in the train split (out.index)")
        index = index.to(self.memory_student.device).long().view(-1)
        if len(index) != batch:
            raise ValueError(f"crd: {len(index)} indices for a batch of {batch}")
        if len(index) and (index.min() < 0 or index.max() >= self.num_samples):
            raise ValueError(f"crd: sample index {int(index.max())} is outside the memory bank of "
                             f"num_samples={self.num_samples}")
        return index

    @torch.no_grad()
    def _normalizer(self, z: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        # Z = mean score * N, estimated once (z < 0 until then), the same on every process (the mean over
        # all of them); torch.where rather than an `if` keeps the step free of host syncs
        estimate = all_gather(scores.detach().mean().reshape(1)).mean() * self.num_samples
        z.copy_(torch.where(z < 0, estimate, z))
        return z.clone()

    @torch.no_grad()
    def _update_banks(self, index: torch.Tensor, vs: torch.Tensor, vt: torch.Tensor) -> None:
        # every process applies every process's samples, so the banks stay identical under DDP
        index, vs, vt = all_gather(index), all_gather(vs.detach()), all_gather(vt.detach())
        for bank, v in ((self.memory_student, vs), (self.memory_teacher, vt)):
            moved = bank[index] * self.nce_m + v * (1.0 - self.nce_m)
            bank.index_copy_(0, index, F.normalize(moved, dim=1))

    @full_precision
    def _nce(self, logits: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        scores = torch.exp(logits.float())
        return nce_loss(scores / self._normalizer(z, scores), self.num_samples, self.eps)

    def forward(self, out: StepOutputs) -> torch.Tensor:
        vs, vt = self._embeddings(out)
        index = self._index(out, len(vs))
        contrast = torch.randint(0, self.num_samples, (len(index), self.nce_k + 1), device=index.device)
        contrast[:, 0] = index
        t = float(self.nce_t)
        student_logits = bank_logits(self.memory_teacher, contrast, vs, t)  # student anchor, teacher bank
        teacher_logits = bank_logits(self.memory_student, contrast, vt, t)  # teacher anchor, student bank
        if self.objective == "nce":
            loss = self._nce(student_logits, self.z_student) + self._nce(teacher_logits, self.z_teacher)
        else:
            loss = softmax_contrastive_loss(student_logits) + softmax_contrastive_loss(teacher_logits)
        self._update_banks(index, vs, vt)
        return loss


@hookimpl
def register_losses(register) -> None:
    """Register ``crd``."""
    register("crd", CRD)
