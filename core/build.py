"""Building a run: recipe in, built objects out (``BuiltRun``), with no side effects.

Every failure here is a ``RecipeError`` naming the recipe key, raised before training.
``check_recipe`` does the checks that need no data; ``build_run`` builds the task, data,
models and losses under a private RNG seeded from the recipe.
"""

from __future__ import annotations

import random
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch
import yaml
from torch import nn

from .compose import BuildContext, build_plugin_with_params, check_plugin
from .errors import RecipeError
from .extensions import Task, check_extension_points
from .optim import check_optimizer
from .outputs import DataSplits
from .params import check_params
from .recipe import LossRef, PluginRef, Recipe, ScheduledValue
from .registry import call_factory, get_registry
from .schedules import (
    PROBES,
    Schedule,
    ScheduledParam,
    build_schedule,
    check_nonnegative,
    refuse_schedules,
    split_scheduled,
)

DEFAULT_TASK = "classification"
_TASK_METHODS = ("to_batch", "forward", "check_outputs", "batch_weight", "has_labels", "eval_batch", "eval_result")


@dataclass
class LossTerm:
    """One weighted loss of the recipe, with the schedules that drive it."""

    label: str
    module: nn.Module
    weight: float | Schedule
    param_schedules: dict[str, Schedule] = field(default_factory=dict)
    key: str = ""
    scheduled_params: list[ScheduledParam] = field(default_factory=list)

    def weight_at(self, progress: float) -> float:
        """The term's weight at this point of the run."""
        return float(self.weight(progress)) if callable(self.weight) else float(self.weight)

    def update(self, target: nn.Module, progress: float) -> None:
        """Set scheduled params on the loss module for this point of the run."""
        for name, schedule in self.param_schedules.items():
            setattr(target, name, schedule(progress))

    @property
    def trainable(self) -> bool:
        """Whether the loss owns parameters that train with the student."""
        return any(p.requires_grad for p in self.module.parameters())

    def check_schedules(self, progress_values: list[float]) -> None:
        """Check the weight and every scheduled param at each of these points of the run."""
        if callable(self.weight):
            check_nonnegative(self.weight, progress_values, f"{self.key}.weight", "the weight")
        for scheduled in self.scheduled_params:
            scheduled.check(progress_values)


@dataclass
class BuiltRun:
    """What a recipe builds, before Accelerate prepares anything."""

    recipe: Recipe
    task: Task
    task_name: str
    splits: DataSplits
    context: BuildContext
    student: nn.Module
    teacher: nn.Module | None
    losses: list[LossTerm]
    resolved: dict[str, Any]


# -- static checks ------------------------------------------------------------------------
def check_recipe(recipe: Recipe) -> None:
    """Every check that needs no data and no compute: names, params, schedules, optimizer."""
    if recipe.task is not None:
        refuse_schedules(dict(recipe.task.params), "task.params")
        check_plugin("task", recipe.task, BuildContext.placeholder(), key="task")
    refuse_schedules(dict(recipe.data.params), "data.params")
    check_plugin("dataset", recipe.data, key="data")
    for kind in ("student", "teacher"):
        ref = getattr(recipe, kind)
        if ref is not None:
            refuse_schedules(dict(ref.params), f"{kind}.params")
            check_plugin(kind, ref, BuildContext.placeholder(), key=kind)
    for i, loss in enumerate(recipe.losses):
        term = check_loss(loss, f"losses[{i}]", BuildContext.placeholder())
        factory = get_registry().get("loss", loss.name).factory
        if getattr(factory, "teacher_required", False) is True and recipe.teacher is None:
            raise RecipeError(f"loss {loss.name!r} needs a teacher, and the recipe has no `teacher`", key=f"losses[{i}]")
        term.check_schedules(list(PROBES))
    lr = recipe.optimizer.params.get("lr")
    if isinstance(lr, dict) and "schedule" in lr:
        check_nonnegative(build_schedule(lr, "optimizer.params.lr"), PROBES, "optimizer.params.lr", "the learning rate")
    check_optimizer(recipe.optimizer)


def check_loss(loss: LossRef, key: str, context: BuildContext) -> LossTerm:
    """Check one loss term's params and schedules; the returned term has no module yet."""
    record = get_registry().get("loss", loss.name, key=f"{key}.name")
    plain, schedules = split_scheduled(dict(loss.params), f"{key}.params")
    provided = context.params()
    scheduled = [ScheduledParam(name, schedule, record.factory, plain, f"{key}.params.{name}", provided)
                 for name, schedule in schedules.items()]
    for item in scheduled:  # first, so a bad scheduled value is reported as the schedule's
        item.check([0.0])
    check_params(record.factory, plain, key=f"{key}.params", provided_context=provided)
    weight = build_schedule(loss.weight, f"{key}.weight") if isinstance(loss.weight, ScheduledValue) else loss.weight
    return LossTerm(loss.name, nn.Identity(), weight, schedules, key, scheduled)


# -- building -----------------------------------------------------------------------------
@contextmanager
def private_rng(seed: int) -> Iterator[None]:
    """Seed torch, numpy and ``random`` for a block, then put their previous states back."""
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)  # seeds every CUDA device too
        random.seed(seed)
        np.random.seed(seed % 2**32)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def build_task(recipe: Recipe, splits: DataSplits | None) -> tuple[Task, str, PluginRef]:
    """The recipe's task, else the one the dataset names, else ``classification``."""
    ref = recipe.task or PluginRef(name=(splits.task if splits is not None and splits.task else DEFAULT_TASK))
    key = "task" if recipe.task is not None else "data"
    context = BuildContext.from_splits(splits) if splits is not None else BuildContext.placeholder()
    task, _ = build_plugin_with_params("task", ref, context, key=key)
    missing = [m for m in _TASK_METHODS if not callable(getattr(task, m, None))]
    missing += [a for a in ("headline", "higher_is_better") if not hasattr(task, a)]
    if missing:
        raise RecipeError(f"task {ref.name!r} does not implement {', '.join(missing)} of kdforge.Task "
                          f"(subclass kdforge.TaskBase for the defaults)", key=key)
    metrics = task.eval_result({})
    if task.headline not in metrics:
        raise RecipeError(f"task {ref.name!r} leads with {task.headline!r}, a metric its eval_result does not give "
                          f"(it gives {', '.join(map(repr, metrics)) or 'none'})", key=key)
    return task, ref.name, ref


def build_data(recipe: Recipe) -> DataSplits:
    """Build the dataset plugin and check what it returned."""
    splits, _ = build_plugin_with_params("dataset", recipe.data, key="data")
    name = recipe.data.name
    if not isinstance(splits, DataSplits):
        raise RecipeError(f"dataset {name!r} returned {type(splits).__name__}, not kdforge.DataSplits", key="data")
    if splits.num_classes < 1:
        raise RecipeError(f"dataset {name!r} reports {splits.num_classes} classes", key="data")
    try:
        size = len(splits.train)  # type: ignore[arg-type]
    except TypeError:
        size = None
    if size == 0:
        raise RecipeError(f"dataset {name!r} has an empty train split", key="data")
    return splits


def build_losses(recipe: Recipe, context: BuildContext, resolved: dict[str, Any]) -> list[LossTerm]:
    """Build every loss term; scheduled params must be attributes of the loss module.

    Params filled in from ``context`` are recorded in ``resolved`` (the run's recipe.yaml).
    """
    terms = []
    for i, (loss, label) in enumerate(zip(recipe.losses, _term_labels(recipe.losses))):
        key = f"losses[{i}]"
        term = check_loss(loss, key, context)
        record = get_registry().get("loss", loss.name, key=f"{key}.name")
        plain = {**dict(loss.params), **{s.name: s.schedule(0.0) for s in term.scheduled_params}}
        params = check_params(record.factory, plain, key=f"{key}.params", provided_context=context.params())
        filled = {k: v for k, v in params.items() if k not in loss.params}
        if filled:
            resolved["losses"][i]["params"] = _jsonable({**resolved["losses"][i].get("params", {}), **filled})
        module = call_factory(record, params, key=f"{key}.params")
        if not isinstance(module, nn.Module):
            raise RecipeError(f"loss {loss.name!r} built a {type(module).__name__}, not a torch.nn.Module", key=key)
        check_extension_points(module, "loss", f"loss {loss.name!r}", key=key)
        for name in term.param_schedules:
            if not hasattr(module, name):
                raise RecipeError(f"loss {loss.name!r} keeps no attribute {name!r}, so that param cannot follow a schedule",
                                  key=f"{key}.params.{name}")
        if getattr(module, "teacher_required", False) and recipe.teacher is None:
            raise RecipeError(f"loss {loss.name!r} needs a teacher, and the recipe has no `teacher`", key=key)
        term.label, term.module = label, module
        terms.append(term)
    return terms


def _term_labels(losses: list[LossRef]) -> list[str]:
    counts: dict[str, int] = {}
    for loss in losses:
        counts[loss.name] = counts.get(loss.name, 0) + 1
    labels, seen = [], {}
    for loss in losses:
        if counts[loss.name] == 1:
            labels.append(loss.name)
        else:
            seen[loss.name] = seen.get(loss.name, 0) + 1
            labels.append(f"{loss.name}_{seen[loss.name]}")
    return labels


def build_run(recipe: Recipe) -> BuiltRun:
    """Build task, data, student, teacher and losses from a checked recipe; nothing is written."""
    with private_rng(recipe.seed):
        splits = build_data(recipe)
        task, task_name, _ = build_task(recipe, splits)
        context = BuildContext.from_splits(splits)
        student, student_params = build_plugin_with_params("student", recipe.student, context, key="student")
        resolved = recipe.model_dump(mode="json")
        resolved["student"]["params"] = _jsonable({**recipe.student.params, **student_params})
        teacher = None
        if recipe.teacher is not None:
            teacher, teacher_params = build_plugin_with_params("teacher", recipe.teacher, context, key="teacher")
            resolved["teacher"]["params"] = _jsonable({**recipe.teacher.params, **teacher_params})
            if callable(getattr(teacher, "bind", None)):
                teacher.bind(student)  # a teacher that follows the student starts from it
        losses = build_losses(recipe, context, resolved)
    return BuiltRun(recipe, task, task_name, splits, context, student, teacher, losses, resolved)


def _jsonable(params: dict[str, Any]) -> dict[str, Any]:
    return yaml.safe_load(yaml.safe_dump(_plain(params)))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
