"""Hook specifications: what a kdforge plugin may implement.

Every hook receives one argument, ``register``: call ``register(name, factory)``
once per object the plugin provides. ``factory(**params)`` builds the object
from a recipe's ``params`` mapping, and its signature is what recipe validation
checks those params against (annotate them, with ``typing.Annotated`` and
``pydantic.Field`` for ranges, and kdforge validates them for you).
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import pluggy

hookspec = pluggy.HookspecMarker("kdforge")
hookimpl = pluggy.HookimplMarker("kdforge")


class Register(Protocol):
    """The callback every registration hook receives."""

    def __call__(self, name: str, factory: Callable[..., Any]) -> None: ...


@hookspec
def register_losses(register: Register) -> None:
    """Register loss factories.

    ``factory(**params)`` returns a ``torch.nn.Module`` whose
    ``forward(out: kdforge.StepOutputs)`` returns a 0-d tensor. A loss that needs
    intermediate features sets ``student_taps`` / ``teacher_taps`` (lists of module
    names); a loss may own trainable parameters, which are trained with the student,
    and may implement the extension points of ``kdforge.extensions`` (extra exits,
    exported files, lifecycle callbacks).
    """


@hookspec
def register_teachers(register: Register) -> None:
    """Register teacher factories.

    ``factory(**params)`` returns a ``torch.nn.Module`` mapping a batch's inputs to
    logits. kdforge freezes it, puts it in eval mode and runs it under ``no_grad``.
    A teacher may be a ``kdforge.CompositeTeacher`` (members combined) or follow the
    student (``kdforge.FollowsStudent``).
    """


@hookspec
def register_students(register: Register) -> None:
    """Register student factories.

    ``factory(**params)`` returns a trainable ``torch.nn.Module`` mapping inputs to logits.
    """


@hookspec
def register_datasets(register: Register) -> None:
    """Register dataset factories.

    ``factory(**params)`` returns a ``kdforge.DataSplits`` (train and eval datasets,
    ``num_classes`` and the input shape). Items are ``(inputs, targets)`` pairs, bare
    inputs, or mappings with ``inputs``, ``targets`` and extra fields; every batch also
    gets each sample's ``index``.
    """


@hookspec
def register_schedules(register: Register) -> None:
    """Register schedule factories.

    ``factory(**params)`` returns a callable ``value(progress: float) -> float``,
    with progress in [0, 1] over the run. Schedules drive loss weights, loss
    parameters (e.g. the temperature) and the learning rate.
    """


@hookspec
def register_tasks(register: Register) -> None:
    """Register task factories.

    ``factory(**params)`` returns a ``kdforge.Task``: how a dataset's items become a
    ``kdforge.Batch``, how a model is called on it, what its outputs must look like (the
    dry-run check), how a batch weighs in gradient accumulation, and the evaluation
    metrics with their headline. Subclass ``kdforge.TaskBase`` for the usual batch
    handling. The built-in ``classification`` is the default.
    """


@hookspec
def register_generators(register: Register) -> None:
    """Register generator factories.

    ``factory(**params)`` returns a ``kdforge.Generator``: ``generate(model, batch)``
    returns a batch holding the model's samples. Plugins that sample from a model (on-policy
    distillation, sequence-level distillation) build one with ``kdforge.build_plugin``.
    """
