"""Running the models on a batch: the teacher view (members combined), the student, ``StepOutputs``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .extensions import Task, teacher_members
from .outputs import Batch, ModelOutputs, StepOutputs
from .taps import FeatureTaps


def teacher_outputs(task: Task, teacher: nn.Module, batch: Batch,
                    taps: FeatureTaps | None) -> tuple[ModelOutputs, list[ModelOutputs]]:
    """The teacher's view of a batch and each member's outputs (a plain teacher: itself).

    Call under ``no_grad``. A ``CompositeTeacher`` runs member by member and is combined;
    features tapped inside member ``i`` (``members.<i>.<name>``) reach its outputs as ``<name>``.
    """
    members = teacher_members(teacher)
    if not members:
        out = ModelOutputs(task.forward(teacher, batch), taps.take() if taps is not None else {})
        return out, [out]
    outputs = []
    for i, member in enumerate(members):
        logits = task.forward(member, batch)
        captured = taps.take() if taps is not None else {}
        prefix = f"members.{i}."
        outputs.append(ModelOutputs(logits, {k[len(prefix):]: v for k, v in captured.items() if k.startswith(prefix)}))
    return teacher.combine(outputs, batch.targets), outputs


@dataclass
class Models:
    """The models of a run as the loop uses them, with their taps and the task that calls them."""

    task: Task
    student: nn.Module
    teacher: nn.Module | None
    student_taps: FeatureTaps
    teacher_taps: FeatureTaps | None
    autocast: Any  # a callable returning the mixed-precision context
    classes: int = 0  # size of the outputs' last dimension (for top-k cached outputs)

    def teacher_view(self, batch: Batch) -> tuple[ModelOutputs | None, list[ModelOutputs]]:
        """The teacher outputs for a training step (none without a teacher; from the cache when it is used)."""
        from .cache import BATCH_FIELD, teacher_outputs_from_cache

        if self.teacher is None:
            return None, []
        if BATCH_FIELD in batch.extras:
            return teacher_outputs_from_cache(self.teacher, batch, self.classes)
        with torch.no_grad(), self.autocast():
            return teacher_outputs(self.task, self.teacher, batch, self.teacher_taps)

    def student_view(self, batch: Batch) -> ModelOutputs:
        """The student's logits and tapped features (call inside autocast)."""
        return ModelOutputs(self.task.forward(self.student, batch), self.student_taps.take())


def step_outputs(student: ModelOutputs, teacher: ModelOutputs | None, teachers: list[ModelOutputs],
                 batch: Batch, **position: Any) -> StepOutputs:
    """``StepOutputs`` for a batch; ``position`` holds progress, step, epoch and the run's totals."""
    return StepOutputs(student=student, teacher=teacher, teachers=teachers, targets=batch.targets,
                       inputs=batch.inputs, batch=batch, index=batch.index, **position)
