"""Knowledge review: ``reviewkd`` (Chen, Liu, Zhao & Jia, CVPR 2021).

The student's stage features are fused top-down by attention-based fusion (ABF) modules,
so each output mixes its own stage with every deeper one (the "review"), and each output
is compared with the teacher's feature of its stage by the hierarchical context loss
(HCL): an L2 at full resolution and over a pyramid of pooled levels. The ABF modules are
built on the first call from the tapped shapes and trained with the student.
"""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from kdforge import StepOutputs, full_precision, hookimpl
from kdforge.plugins.hint_losses import as_map, check_pairs, read_tap, tap_modules

TapList = Annotated[list[str], Field(min_length=1)]


class AttentionFusion(nn.Module):
    """One ABF module: 1x1 conv + BN to ``mid`` channels, fused with the deeper level's residual by a
    two-channel sigmoid attention map, then a 3x3 conv + BN to the teacher's channels."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool) -> None:
        super().__init__()
        self.reduce = nn.Sequential(nn.Conv2d(in_channels, mid_channels, 1, bias=False), nn.BatchNorm2d(mid_channels))
        self.output = nn.Sequential(nn.Conv2d(mid_channels, out_channels, 3, padding=1, bias=False),
                                    nn.BatchNorm2d(out_channels))
        self.attention = nn.Sequential(nn.Conv2d(2 * mid_channels, 2, 1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(self.reduce[0].weight, a=1)
        nn.init.kaiming_uniform_(self.output[0].weight, a=1)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, out_size: tuple[int, int]
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(output at ``out_size`` with the teacher's channels, residual passed to the next shallower level)."""
        x = self.reduce(x)
        if self.attention is not None and residual is not None:
            residual = F.interpolate(residual, size=tuple(x.shape[2:]), mode="nearest")
            weights = self.attention(torch.cat([x, residual], dim=1))
            x = x * weights[:, 0:1] + residual * weights[:, 1:2]
        if tuple(x.shape[2:]) != tuple(out_size):
            x = F.interpolate(x, size=tuple(out_size), mode="nearest")
        return self.output(x), x


@full_precision
def hierarchical_context_loss(fs: torch.Tensor, ft: torch.Tensor, levels: list[int]) -> torch.Tensor:
    """HCL of one stage: (mse + sum_l w_l mse(pool_l(fs), pool_l(ft))) / (1 + sum_l w_l).

    Levels l (pooled to l x l) smaller than the map's height take part, in the given order,
    with weights 1/2, 1/4, ... (the full-resolution term weighs 1).
    """
    fs, ft = fs.float(), ft.float()
    loss = F.mse_loss(fs, ft)
    weight, total = 1.0, 1.0
    for level in levels:
        if level >= fs.shape[2]:
            continue
        weight /= 2.0
        loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(fs, level), F.adaptive_avg_pool2d(ft, level))
        total += weight
    return loss / total


class ReviewKD(nn.Module):
    """Knowledge review (Chen et al. 2021): ABF-fused student stages against teacher stages with HCL.

    ``student_taps`` / ``teacher_taps`` are stage features ordered shallow to deep and paired
    by position (the last is usually the pooled embedding). From the deepest level up, ABF_i
    turns student stage i (and the residual of level i+1) into a map with the teacher's
    channels and size; loss = sum over stages of HCL(ABF_i, F_t,i).
    """

    teacher_required = True

    def __init__(
        self,
        student_taps: TapList,
        teacher_taps: TapList,
        mid_channels: Annotated[int, Field(ge=1)] | None = None,
        max_mid_channels: Annotated[int, Field(ge=1)] = 512,
        levels: list[Annotated[int, Field(ge=1)]] = [4, 2, 1],  # noqa: B006 - never mutated
    ) -> None:
        super().__init__()
        check_pairs(student_taps, teacher_taps, None)
        self.student_specs, self.teacher_specs = list(student_taps), list(teacher_taps)
        self.student_taps, self.teacher_taps = tap_modules(student_taps), tap_modules(teacher_taps)
        self.mid_channels, self.max_mid_channels, self.levels = mid_channels, max_mid_channels, list(levels)
        self.fusions = nn.ModuleList()  # shallow to deep, like the taps

    def _build(self, student: list[torch.Tensor], teacher: list[torch.Tensor]) -> None:
        mid = self.mid_channels or min(self.max_mid_channels, student[-1].shape[1])
        last = len(student) - 1
        for i, (fs, ft) in enumerate(zip(student, teacher)):
            self.fusions.append(AttentionFusion(fs.shape[1], mid, ft.shape[1], fuse=i < last).to(fs.device))

    def forward(self, out: StepOutputs) -> torch.Tensor:
        if out.teacher is None:
            raise ValueError("the reviewkd loss needs a teacher")
        student = [as_map(read_tap(out.student.features, s, "student"), s, "student") for s in self.student_specs]
        teacher = [as_map(read_tap(out.teacher.features, t, "teacher"), t, "teacher").detach() for t in self.teacher_specs]
        if not len(self.fusions):
            self._build(student, teacher)
        for fs, ft, fusion, s_spec, t_spec in zip(student, teacher, self.fusions, self.student_specs, self.teacher_specs):
            built_in, built_out = fusion.reduce[0].in_channels, fusion.output[0].out_channels
            if fs.shape[1] != built_in or ft.shape[1] != built_out or fs.shape[0] != ft.shape[0]:
                raise ValueError(f"reviewkd was built for {built_in} -> {built_out} channels here, got student "
                                 f"{s_spec!r} {tuple(fs.shape)} and teacher {t_spec!r} {tuple(ft.shape)}")
        total = out.student.logits.new_zeros((), dtype=torch.float32)
        residual = None
        for i in reversed(range(len(student))):
            fused, residual = self.fusions[i](student[i], residual, tuple(teacher[i].shape[2:]))
            total = total + hierarchical_context_loss(fused, teacher[i], self.levels)
        return total


@hookimpl
def register_losses(register) -> None:
    """Register ``reviewkd``."""
    register("reviewkd", ReviewKD)
