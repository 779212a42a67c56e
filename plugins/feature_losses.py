"""Feature-based distillation on feature taps: attention transfer, relational KD, FitNet hints.

Each loss declares ``student_taps`` / ``teacher_taps``; the engine fills
``out.student.features`` / ``out.teacher.features`` with those modules' outputs. Math
runs in float32 whatever the autocast dtype. The teacher side never gets a gradient.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from kdforge import StepOutputs, full_precision, hookimpl

TapList = Annotated[list[str], Field(min_length=1)]


def _feature(out_features: dict[str, torch.Tensor], tap: str, side: str) -> torch.Tensor:
    try:
        return out_features[tap]
    except KeyError:
        raise ValueError(f"no {side} feature {tap!r} was captured (taps seen: {sorted(out_features)})") from None


def pool_to_match(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Adaptive-average-pool the larger of two feature maps to the other's spatial size."""
    if a.shape[2:] == b.shape[2:]:
        return a, b
    size = tuple(min(x, y) for x, y in zip(a.shape[2:], b.shape[2:]))
    if a.shape[2:] != size:
        a = F.adaptive_avg_pool2d(a, size)
    if b.shape[2:] != size:
        b = F.adaptive_avg_pool2d(b, size)
    return a, b


def _power(x: torch.Tensor, p: float) -> torch.Tensor:
    # x^p as written for integer p (x^2 for the usual p = 2); |x|^p where x^p is undefined.
    return x.pow(int(p)) if float(p).is_integer() else x.abs().pow(p)


def attention_map(x: torch.Tensor, p: float = 2.0, mode: str = "code") -> torch.Tensor:
    """Spatial attention of a (N, C, H, W) map: L2-normalized channel mean (code) or sum (paper) of x^p."""
    powered = _power(x.float(), p)
    reduced = powered.mean(dim=1) if mode == "code" else powered.sum(dim=1)
    return F.normalize(reduced.flatten(1), p=2, dim=1)


class AttentionTransfer(nn.Module):
    """Attention transfer (Zagoruyko & Komodakis 2017): match spatial attention maps of tap pairs.

    ``mode: code`` (the authors' code): a = normalize(mean_c x^p), loss = sum_pairs w * mean((a_s - a_t)^2).
    ``mode: paper``: a = normalize(sum_c x^p), loss = sum_pairs w * mean_batch ||a_s - a_t||_2.
    Pairs with different spatial sizes are pooled to the smaller size (``pool: true``).
    """

    teacher_required = True

    def __init__(
        self,
        student_taps: TapList,
        teacher_taps: TapList,
        pair_weights: list[Annotated[float, Field(ge=0.0)]] | None = None,
        p: Annotated[float, Field(gt=0.0)] = 2.0,
        mode: Literal["code", "paper"] = "code",
        pool: bool = True,
    ) -> None:
        super().__init__()
        if len(student_taps) != len(teacher_taps):
            raise ValueError(f"student_taps ({len(student_taps)}) and teacher_taps ({len(teacher_taps)}) "
                             "are paired by position and must have the same length")
        if pair_weights is not None and len(pair_weights) != len(student_taps):
            raise ValueError(f"pair_weights needs one weight per tap pair ({len(student_taps)}), got {len(pair_weights)}")
        self.student_taps, self.teacher_taps = list(student_taps), list(teacher_taps)
        self.pair_weights = list(pair_weights) if pair_weights is not None else [1.0] * len(student_taps)
        self.p, self.mode, self.pool = p, mode, pool

    @full_precision
    def forward(self, out: StepOutputs) -> torch.Tensor:
        if out.teacher is None:
            raise ValueError("the attention loss needs a teacher")
        total = out.student.logits.new_zeros((), dtype=torch.float32)
        for s_tap, t_tap, weight in zip(self.student_taps, self.teacher_taps, self.pair_weights):
            fs = _feature(out.student.features, s_tap, "student")
            ft = _feature(out.teacher.features, t_tap, "teacher").detach()
            if fs.ndim != 4 or ft.ndim != 4:
                raise ValueError(f"attention needs (N, C, H, W) maps; got {s_tap} {tuple(fs.shape)} and {t_tap} {tuple(ft.shape)}")
            if fs.shape[2:] != ft.shape[2:]:
                if not self.pool:
                    raise ValueError(f"spatial sizes differ: {s_tap} {tuple(fs.shape)} vs {t_tap} {tuple(ft.shape)}; "
                                     "set pool: true to pool the larger map")
                fs, ft = pool_to_match(fs, ft)
            a_s, a_t = attention_map(fs, self.p, self.mode), attention_map(ft, self.p, self.mode)
            if self.mode == "code":
                term = (a_s - a_t).pow(2).mean()
            else:
                term = (a_s - a_t).norm(p=2, dim=1).mean()
            total = total + weight * term
        return total


def pairwise_distances(e: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Euclidean distances between rows of ``e`` (zero diagonal, finite gradient everywhere)."""
    squared = e.pow(2).sum(dim=1)
    d2 = (squared.unsqueeze(0) + squared.unsqueeze(1) - 2.0 * e @ e.t()).clamp_min(eps)
    d = d2.sqrt()
    return d * (1.0 - torch.eye(len(e), device=e.device, dtype=e.dtype))


def _normalized_distances(e: torch.Tensor) -> torch.Tensor:
    d = pairwise_distances(e)
    positive = d > 0
    mean = (d * positive).sum() / positive.sum().clamp_min(1)
    return d / mean.clamp_min(1e-12)


def triplet_angles(e: torch.Tensor) -> torch.Tensor:
    """cos of the angle at every anchor j between every pair (i, k): <unit(e_i - e_j), unit(e_k - e_j)>."""
    diff = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)  # [j, i] = unit(e_i - e_j)
    return torch.bmm(diff, diff.transpose(1, 2)).flatten()


class RelationalKD(nn.Module):
    """Relational KD (Park et al. 2019, RKD): match distances and angles between samples' embeddings.

    loss = distance_weight * smoothL1(psi_D(s), psi_D(t)) + angle_weight * smoothL1(psi_A(s), psi_A(t)),
    psi_D: pairwise distances divided by their mean over positive entries; psi_A: cosines of
    every triplet's angle. Taps default to the logits (``None``).
    """

    teacher_required = True

    def __init__(
        self,
        student_tap: str | None = None,
        teacher_tap: str | None = None,
        distance_weight: Annotated[float, Field(ge=0.0)] = 25.0,
        angle_weight: Annotated[float, Field(ge=0.0)] = 50.0,
    ) -> None:
        super().__init__()
        self.student_tap, self.teacher_tap = student_tap, teacher_tap
        self.student_taps = [student_tap] if student_tap else []
        self.teacher_taps = [teacher_tap] if teacher_tap else []
        self.distance_weight, self.angle_weight = distance_weight, angle_weight

    @full_precision  # distances and angles are matmuls: autocast would run them in half precision
    def forward(self, out: StepOutputs) -> torch.Tensor:
        if out.teacher is None:
            raise ValueError("the relational loss needs a teacher")
        s = _feature(out.student.features, self.student_tap, "student") if self.student_tap else out.student.logits
        t = _feature(out.teacher.features, self.teacher_tap, "teacher") if self.teacher_tap else out.teacher.logits
        s, t = s.float().flatten(1), t.detach().float().flatten(1)
        loss = s.new_zeros(())
        if self.distance_weight:
            with torch.no_grad():
                t_d = _normalized_distances(t)
            loss = loss + self.distance_weight * F.smooth_l1_loss(_normalized_distances(s), t_d)
        if self.angle_weight:
            with torch.no_grad():
                t_a = triplet_angles(t)
            loss = loss + self.angle_weight * F.smooth_l1_loss(triplet_angles(s), t_a)
        return loss


def make_connector(student_shape: torch.Size, teacher_shape: torch.Size) -> nn.Module:
    """1x1 conv + BN from student to teacher channels for maps, a linear layer for vectors."""
    if len(student_shape) == 4 and len(teacher_shape) == 4:
        return nn.Sequential(nn.Conv2d(student_shape[1], teacher_shape[1], 1, bias=False), nn.BatchNorm2d(teacher_shape[1]))
    if len(student_shape) == 2 and len(teacher_shape) == 2:
        return nn.Linear(student_shape[1], teacher_shape[1])
    raise ValueError(f"cannot connect a student feature of shape {tuple(student_shape)} "
                     f"to a teacher feature of shape {tuple(teacher_shape)}")


@full_precision
def mse_float32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean squared error in float32, whatever the autocast dtype."""
    return F.mse_loss(a.float(), b.float())


class FitNet(nn.Module):
    """FitNet hints (Romero et al. 2015): MSE between a connector(student feature) and the teacher's.

    The trainable connector (1x1 conv + BN for maps, linear for vectors) is built from the
    tapped shapes on the first batch (kdforge's dry run, before the optimizer exists), is
    trained with the student and saved in checkpoints. Maps of different spatial sizes are
    pooled to the smaller size.
    """

    teacher_required = True

    def __init__(self, student_tap: str, teacher_tap: str) -> None:
        super().__init__()
        self.student_tap, self.teacher_tap = student_tap, teacher_tap
        self.student_taps, self.teacher_taps = [student_tap], [teacher_tap]
        self.connector: nn.Module | None = None

    def forward(self, out: StepOutputs) -> torch.Tensor:
        if out.teacher is None:
            raise ValueError("the fitnet loss needs a teacher")
        fs = _feature(out.student.features, self.student_tap, "student")
        ft = _feature(out.teacher.features, self.teacher_tap, "teacher").detach()
        if self.connector is None:
            self.connector = make_connector(fs.shape, ft.shape).to(fs.device)
        hint = self.connector(fs)
        if hint.ndim == 4:
            hint, ft = pool_to_match(hint, ft)
        return mse_float32(hint, ft)


@hookimpl
def register_losses(register) -> None:
    """Register ``attention``, ``relational`` and ``fitnet``."""
    register("attention", AttentionTransfer)
    register("relational", RelationalKD)
    register("fitnet", FitNet)
