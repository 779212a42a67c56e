"""The ``ema`` teacher: an exponential moving average of the student (a self-distillation teacher).

Mean-teacher style (Tarvainen & Valpola 2017): after every optimizer step,
theta_teacher <- d * theta_teacher + (1 - d) * theta_student. It is never trained by
backprop, is saved in checkpoints and restored by ``--resume``.
"""

from __future__ import annotations

import copy
from typing import Annotated, Any

import torch
from pydantic import Field
from torch import nn

from kdforge import hookimpl


class EMATeacher(nn.Module):
    """A frozen copy of the student that follows it by exponential moving average.

    ``decay`` d in [0, 1). With ``warmup`` the decay used at update n (counting from 0) is
    min(d, 1 - 1 / (n + 1)) as in Tarvainen & Valpola 2017, so the average is not dominated by
    the random initialization early on; without it every update uses d. Buffers (e.g. BatchNorm statistics) are copied from the student.
    Taps name the student's modules (``features.1``), as on the student.
    """

    def __init__(self, decay: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.999, warmup: bool = False) -> None:
        super().__init__()
        self.decay, self.warmup = decay, warmup
        self.model: nn.Module | None = None
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def bind(self, student: nn.Module) -> None:
        """Start from a copy of the student (called by the engine before training)."""
        self.model = copy.deepcopy(student).requires_grad_(False).eval()
        self.num_updates.zero_()

    def get_submodule(self, target: str) -> nn.Module:  # taps use the student's names
        if self.model is not None and target:
            try:
                return self.model.get_submodule(target)
            except AttributeError:
                pass
        return super().get_submodule(target)

    def forward(self, inputs: Any) -> torch.Tensor:
        if self.model is None:
            raise RuntimeError("the ema teacher is not bound to a student yet")
        return self.model(inputs)

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        """Move the average towards the student's current weights (no host sync)."""
        if self.warmup:  # computed on the device from the update counter: no host sync
            n = self.num_updates.to(torch.float32)
            weight: torch.Tensor | float = 1.0 - torch.clamp(1.0 - 1.0 / (n + 1.0), max=self.decay)
        else:
            weight = 1.0 - self.decay
        for mine, theirs in zip(self.model.parameters(), student.parameters()):
            mine.lerp_(theirs.detach().to(mine.dtype), weight)
        for mine, theirs in zip(self.model.buffers(), student.buffers()):
            mine.copy_(theirs)
        self.num_updates += 1


@hookimpl
def register_teachers(register) -> None:
    """Register ``ema``."""
    register("ema", EMATeacher)
