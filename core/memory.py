"""The memory estimate of ``kdforge validate --dry-run``: what a training step holds besides activations.

Counted per process, for one training batch of ``trainer.batch_size`` samples, at the
dtypes the dry run saw: the parameters of the student and the teacher, the student's
gradients, the optimizer's state (measured by stepping the recipe's optimizer on
meta-device copies of the trainable parameters, so nothing is allocated), the logits of
both models (the student's twice: autograd keeps their gradient too), and whatever each
loss that implements ``kdforge.EstimatesMemory`` reports for itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import nn

from .extensions import estimates_memory
from .optim import check_optimizer
from .outputs import StepOutputs
from .recipe import OptimizerSpec

#: elements of the real probe parameter used when an optimizer cannot step on the meta device
_PROBE_ELEMENTS = 1024


@dataclass(frozen=True)
class MemoryLine:
    """One item of the estimate: what it is, and its bytes."""

    label: str
    bytes: int


def _unique_parameters(modules: Iterable[nn.Module | None]) -> list[nn.Parameter]:
    seen: set[int] = set()
    params = []
    for module in modules:
        if module is None:
            continue
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of ``tensors`` (their elements, at their dtypes)."""
    return sum(t.numel() * t.element_size() for t in tensors)


def _state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return tensor_bytes(v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor))


def optimizer_state_bytes(spec: OptimizerSpec, params: list[nn.Parameter]) -> int | None:
    """Bytes of the optimizer's state over ``params`` after one step (``None`` when it cannot be measured).

    The optimizer steps on meta-device copies with zero gradients, which allocate nothing.
    An optimizer that reads values on the host (``.item()``) is instead stepped on a small
    real parameter and scaled per element per dtype (exact for element-wise optimizers).
    """
    trainable = [p for p in params if p.requires_grad]
    if not trainable:
        return 0
    cls, kwargs, _ = check_optimizer(spec)
    kwargs = {k: v for k, v in kwargs.items() if k not in ("foreach", "fused", "capturable")}

    def stepped(probe: list[torch.Tensor]) -> torch.optim.Optimizer:
        for p in probe:
            p.grad = torch.zeros_like(p)
        optimizer = cls(probe, **kwargs)
        optimizer.step()
        return optimizer

    try:
        return _state_bytes(stepped([nn.Parameter(torch.empty_like(p, device="meta")) for p in trainable]))
    except (RuntimeError, NotImplementedError, TypeError, ValueError):
        pass
    total = 0.0
    try:
        for dtype in {p.dtype for p in trainable}:
            probe = nn.Parameter(torch.zeros(_PROBE_ELEMENTS, dtype=dtype))
            per_element = _state_bytes(stepped([probe])) / _PROBE_ELEMENTS
            total += per_element * sum(p.numel() for p in trainable if p.dtype == dtype)
    except (RuntimeError, NotImplementedError, TypeError, ValueError):
        return None
    return int(total)


def _count(params: list[nn.Parameter]) -> str:
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    return f"{total:,}" if trainable == total else f"{total:,}, {trainable:,} trainable"


def _logits_shape(logits: torch.Tensor, batch_size: int) -> str:
    return " x ".join(str(d) for d in (batch_size, *logits.shape[1:]))


def estimate_memory(built: Any, out: StepOutputs, batch_size: int) -> list[MemoryLine]:
    """The estimate's lines for a run (``built``) whose dry run produced ``out``; the total is not included.

    ``out`` holds the dry run's batch (fewer samples than ``batch_size``); logits are scaled
    from it to ``batch_size`` samples.
    """
    lines: list[MemoryLine] = []
    loss_modules = [t.module for t in built.losses]
    student = _unique_parameters([built.student, *loss_modules])
    own = _unique_parameters([built.student])
    trainable = [p for p in student if p.requires_grad]
    lines.append(MemoryLine(f"student parameters ({_count(own)})", tensor_bytes(own)))
    own_ids = {id(p) for p in own}
    extra = [p for p in student if id(p) not in own_ids]
    if extra:
        lines.append(MemoryLine(f"loss parameters ({_count(extra)})", tensor_bytes(extra)))
    lines.append(MemoryLine("gradients of the trainable parameters", tensor_bytes(trainable)))
    state = optimizer_state_bytes(built.recipe.optimizer, trainable)
    name = built.recipe.optimizer.name
    lines.append(MemoryLine(f"optimizer state ({name})" if state is not None
                            else f"optimizer state ({name}: not measurable, counted as 0)", state or 0))
    if built.teacher is not None:
        teacher = _unique_parameters([built.teacher])
        lines.append(MemoryLine(f"teacher parameters ({_count(teacher)})", tensor_bytes(teacher)))
    rows = max(int(out.student.logits.shape[0]), 1)
    scale = batch_size / rows
    logits = out.student.logits
    lines.append(MemoryLine(f"student logits and their gradient ({_logits_shape(logits, batch_size)}, {logits.dtype})",
                            int(2 * tensor_bytes([logits]) * scale)))
    if out.teacher is not None and isinstance(out.teacher.logits, torch.Tensor):
        t_logits = out.teacher.logits
        lines.append(MemoryLine(f"teacher logits ({_logits_shape(t_logits, batch_size)}, {t_logits.dtype})",
                                int(tensor_bytes([t_logits]) * scale)))
    for term in built.losses:
        if estimates_memory(term.module):
            for label, size in term.module.memory_estimate(out, batch_size).items():
                lines.append(MemoryLine(f"loss {term.label}: {label}", int(size)))
    return lines
