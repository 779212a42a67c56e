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
        self._updates: int | None = 0
        # after load_state_dict (--resume), read the restored counter at the next update
        self.register_load_state_dict_post_hook(lambda module, _keys: setattr(module, "_updates", None))

    def bind(self, student: nn.Module) -> None:
        """Start from a copy of the student (called by the engine before training)."""
        self.model = copy.deepcopy(student).requires_grad_(False).eval()
        self.num_updates.zero_()
        self._updates = 0

    def get_submodule(self, target: str) -> nn.Module:
        """Taps use the student's module names (``features.1``), as on the student."""
        if self.model is not None and target:
            try:
                return self.model.get_submodule(target)
            except AttributeError:
                pass
        return super().get_submodule(target)

    def tap_names(self) -> list[str]:
        """The student's module names (what ``get_submodule`` accepts)."""
        return [name for name, _ in self.model.named_modules() if name] if self.model is not None else []

    def forward(self, inputs: Any) -> torch.Tensor:
        if self.model is None:
            raise RuntimeError("the ema teacher is not bound to a student yet")
        return self.model(inputs)

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        """Move the average towards the student's current weights: foreach ops, no host sync."""
        if self._updates is None:  # once per run (and after a resume): the counter as a Python int
            self._updates = int(self.num_updates)
        weight = 1.0 - self.decay
        if self.warmup:
            weight = 1.0 - min(self.decay, 1.0 - 1.0 / (self._updates + 1.0))
        mine = [p for p in self.model.parameters()]
        theirs = [p.detach().to(m.dtype) for p, m in zip(student.parameters(), mine)]
        torch._foreach_lerp_(mine, theirs, weight)
        buffers = list(self.model.buffers())
        if buffers:
            torch._foreach_copy_(buffers, list(student.buffers()))
        self._updates += 1
        self.num_updates.fill_(self._updates)



@hookimpl
def register_teachers(register) -> None:
    """Register ``ema``."""
    register("ema", EMATeacher)
