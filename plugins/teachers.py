"""Teacher plugins that are not plain models: ``checkpoint`` (a previous kdforge run)."""

from __future__ import annotations

from torch import nn

from kdforge import hookimpl, load_student


def checkpoint_teacher(path: str) -> nn.Module:
    """The student of a finished kdforge run, rebuilt from that run's recipe and weights.

    ``path`` is the run directory (it holds ``recipe.yaml`` and ``student.safetensors``).
    To distill from the teacher a run used instead (an ensemble, an EMA), see
    ``kdforge.load_teacher``.
    """
    return load_student(path, key=".path")


@hookimpl
def register_teachers(register) -> None:
    """Register ``checkpoint``."""
    register("checkpoint", checkpoint_teacher)
