"""Turning a validated recipe into objects: data, models, losses, schedules, optimizer.

Every failure here is a ``RecipeError`` naming the recipe key, raised before training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from pydantic import ValidationError
from torch import nn

from .errors import RecipeError, did_you_mean, valid_list
from .outputs import DataSplits
from .params import check_params, describe_error, loc_to_key
from .recipe import LossRef, OptimizerSpec, PluginRef, Recipe, ScheduledValue
from .registry import call_factory, get_registry

#: values the engine fills into model factories that accept them (and the recipe left out)
CONTEXT_NAMES = ("num_classes", "in_channels", "input_shape")
_PROBES = tuple(i / 200 for i in range(201))  # every 0.5% of the run: catches short stages
_PLACEHOLDER_CONTEXT = {"num_classes": 2, "in_channels": 1, "input_shape": [1, 1, 1]}

Schedule = Callable[[float], float]


def is_scheduled(value: Any) -> bool:
    """Whether a raw recipe value is a ``{schedule: ..., params: ...}`` mapping."""
    return isinstance(value, ScheduledValue) or (isinstance(value, dict) and "schedule" in value)


def build_schedule(value: Any, key: str) -> Schedule:
    """Build the schedule plugin a ``{schedule, params}`` value names; check it returns numbers."""
    if not isinstance(value, ScheduledValue):
        try:
            value = ScheduledValue.model_validate(value)
        except ValidationError as exc:
            err = exc.errors()[0]
            raise RecipeError(describe_error(err, ["schedule", "params"]), key=loc_to_key(key, tuple(err["loc"]))) from None
    record = get_registry().get("schedule", value.schedule, key=f"{key}.schedule")
    params = check_params(record.factory, value.params, key=f"{key}.params")
    schedule = call_factory(record, params, key=f"{key}.params")
    if not callable(schedule):
        raise RecipeError(f"schedule {value.schedule!r} did not build a callable", key=key)
    for probe in _PROBES:
        try:
            number = float(schedule(probe))
        except Exception as exc:  # noqa: BLE001 - third-party schedules may raise anything
            raise RecipeError(f"schedule {value.schedule!r} failed at progress {probe}: {exc}", key=key) from None
        if not math.isfinite(number):
            raise RecipeError(f"schedule {value.schedule!r} gives {number} at progress {probe}", key=key)
    return schedule


def split_scheduled(params: dict[str, Any], key: str) -> tuple[dict[str, Any], dict[str, Schedule]]:
    """Replace scheduled values by their value at progress 0; return them separately."""
    plain, schedules = {}, {}
    for name, value in params.items():
        if is_scheduled(value):
            schedules[name] = build_schedule(value, f"{key}.{name}")
            plain[name] = schedules[name](0.0)
        else:
            plain[name] = value
    return plain, schedules


# -- static checks ------------------------------------------------------------------------
def refuse_schedules(params: dict[str, Any], key: str) -> None:
    """Schedules drive loss params, loss weights and the lr; anywhere else they are an error."""
    for name, value in params.items():
        if is_scheduled(value):
            raise RecipeError("only loss params, loss weights and optimizer.params.lr can follow a schedule",
                              key=f"{key}.{name}")


def check_plugin_ref(kind: str, ref: PluginRef, key: str, context: dict[str, Any] | None = None) -> dict[str, Any]:
    """Check a ``{name, params}`` reference: the plugin exists and takes these params."""
    record = get_registry().get(kind, ref.name, key=f"{key}.name")
    if kind != "loss":
        refuse_schedules(dict(ref.params), f"{key}.params")
        return check_params(record.factory, ref.params, key=f"{key}.params", provided_context=context)
    plain, schedules = split_scheduled(dict(ref.params), f"{key}.params")
    checked = check_params(record.factory, plain, key=f"{key}.params", provided_context=context)
    # a scheduled param must stay valid over the whole run, not just at its start
    for name, schedule in schedules.items():
        for probe in _PROBES:
            check_params(record.factory, {**plain, name: schedule(probe)}, key=f"{key}.params")
    return checked


def check_recipe(recipe: Recipe) -> None:
    """Every check that needs no data and no compute: names, params, schedules, optimizer."""
    check_plugin_ref("dataset", recipe.data, "data")
    check_plugin_ref("student", recipe.student, "student", _PLACEHOLDER_CONTEXT)
    if recipe.teacher is not None:
        check_plugin_ref("teacher", recipe.teacher, "teacher", _PLACEHOLDER_CONTEXT)
    for i, loss in enumerate(recipe.losses):
        check_plugin_ref("loss", loss, f"losses[{i}]")
        factory = get_registry().get("loss", loss.name).factory
        if getattr(factory, "teacher_required", False) and recipe.teacher is None:
            raise RecipeError(f"loss {loss.name!r} needs a teacher, and the recipe has no `teacher`", key=f"losses[{i}]")
        if isinstance(loss.weight, ScheduledValue):
            weight = build_schedule(loss.weight, f"losses[{i}].weight")
            negative = [p for p in _PROBES if weight(p) < 0]
            if negative:
                raise RecipeError(f"the weight's schedule goes below 0 (at progress {negative[0]})",
                                  key=f"losses[{i}].weight")
    build_optimizer(recipe.optimizer, [nn.Linear(2, 2, bias=False)], total_steps=1)


# -- data and models ----------------------------------------------------------------------
def build_data(recipe: Recipe) -> DataSplits:
    """Build the dataset plugin and check what it returned."""
    record = get_registry().get("dataset", recipe.data.name, key="data.name")
    params = check_params(record.factory, recipe.data.params, key="data.params")
    splits = call_factory(record, params, key="data.params")
    if not isinstance(splits, DataSplits):
        raise RecipeError(f"dataset {recipe.data.name!r} returned {type(splits).__name__}, not kdforge.DataSplits", key="data")
    if splits.num_classes < 1:
        raise RecipeError(f"dataset {recipe.data.name!r} reports {splits.num_classes} classes", key="data")
    try:
        size = len(splits.train)  # type: ignore[arg-type]
    except TypeError:
        size = None
    if size == 0:
        raise RecipeError(f"dataset {recipe.data.name!r} has an empty train split", key="data")
    return splits


def data_context(splits: DataSplits) -> dict[str, Any]:
    """What model factories may be given from the data."""
    shape = list(splits.input_shape)
    return {"num_classes": splits.num_classes, "in_channels": shape[0] if shape else 1, "input_shape": shape}


def build_model(kind: str, ref: PluginRef, key: str, context: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    """Build a student or teacher; return it with the params used (context values included)."""
    record = get_registry().get(kind, ref.name, key=f"{key}.name")
    params = check_params(record.factory, ref.params, key=f"{key}.params", provided_context=context)
    model = call_factory(record, params, key=f"{key}.params")
    if not isinstance(model, nn.Module):
        raise RecipeError(f"{kind} {ref.name!r} built a {type(model).__name__}, not a torch.nn.Module", key=key)
    return model, params


# -- losses -------------------------------------------------------------------------------
@dataclass
class LossTerm:
    """One weighted loss of the recipe, with the schedules that drive it."""

    label: str
    module: nn.Module
    weight: float | Schedule
    param_schedules: dict[str, Schedule] = field(default_factory=dict)

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


def build_losses(recipe: Recipe) -> list[LossTerm]:
    """Build every loss term; scheduled params must be attributes of the loss module."""
    terms = []
    for i, (loss, label) in enumerate(zip(recipe.losses, _term_labels(recipe.losses))):
        key = f"losses[{i}]"
        record = get_registry().get("loss", loss.name, key=f"{key}.name")
        plain, schedules = split_scheduled(dict(loss.params), f"{key}.params")
        params = check_params(record.factory, plain, key=f"{key}.params")
        module = call_factory(record, params, key=f"{key}.params")
        if not isinstance(module, nn.Module):
            raise RecipeError(f"loss {loss.name!r} built a {type(module).__name__}, not a torch.nn.Module", key=key)
        for name in schedules:
            if not hasattr(module, name):
                raise RecipeError(
                    f"loss {loss.name!r} keeps no attribute {name!r}, so that param cannot follow a schedule",
                    key=f"{key}.params.{name}",
                )
        weight = build_schedule(loss.weight, f"{key}.weight") if isinstance(loss.weight, ScheduledValue) else loss.weight
        if getattr(module, "teacher_required", False) and recipe.teacher is None:
            raise RecipeError(f"loss {loss.name!r} needs a teacher, and the recipe has no `teacher`", key=key)
        terms.append(LossTerm(label, module, weight, schedules))
    return terms


# -- optimizer ----------------------------------------------------------------------------
_UNSUPPORTED_OPTIMIZERS = {
    "LBFGS": "it needs a closure that re-evaluates the loss, which a streaming training loop does not have",
    "SparseAdam": "it needs sparse gradients, and kdforge's models produce dense ones",
}


def optimizer_classes() -> dict[str, type[torch.optim.Optimizer]]:
    """``torch.optim`` optimizers by lower-case name (sgd, adam, adamw, ...)."""
    return {
        name.lower(): cls
        for name, cls in vars(torch.optim).items()
        if isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer) and cls is not torch.optim.Optimizer
    }


def _default_weight_decay(cls: type) -> float | None:
    """The optimizer's own default weight decay (``None`` if it has no such param)."""
    import inspect

    param = inspect.signature(cls).parameters.get("weight_decay")
    if param is None or not isinstance(param.default, (int, float)):
        return None
    return float(param.default)


def parameter_groups(modules: list[nn.Module], weight_decay: float | None, decay_norm_and_bias: bool) -> list[dict[str, Any]]:
    """Trainable params in two groups: with weight decay, and without (biases and norm weights)."""
    decay, no_decay, seen = [], [], set()
    for module in modules:
        for param in module.parameters():
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            (no_decay if param.ndim <= 1 and not decay_norm_and_bias else decay).append(param)
    if weight_decay is None:
        return [{"params": decay + no_decay}]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(
    spec: OptimizerSpec, modules: list[nn.Module], total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """The optimizer over ``modules`` and a LambdaLR that follows the (maybe scheduled) lr.

    The scheduler is stepped once per optimizer step; its multiplier is the lr itself
    (the groups' base lr is 1) when ``lr`` is a schedule, and 1 otherwise.
    """
    classes = optimizer_classes()
    cls = classes.get(spec.name.lower())
    if cls is None:
        raise RecipeError(f"unknown optimizer {spec.name!r}.{did_you_mean(spec.name.lower(), classes)} ({valid_list(classes)})", key="optimizer.name")
    if cls.__name__ in _UNSUPPORTED_OPTIMIZERS:
        raise RecipeError(f"{cls.__name__} is not supported: {_UNSUPPORTED_OPTIMIZERS[cls.__name__]}", key="optimizer.name")
    if "params" in spec.params:
        raise RecipeError("the optimizer's parameters come from the student and losses; remove `params`", key="optimizer.params.params")
    plain, schedules = split_scheduled(dict(spec.params), "optimizer.params")
    unknown_schedules = [n for n in schedules if n != "lr"]
    if unknown_schedules:
        raise RecipeError("only `lr` may follow a schedule here", key=f"optimizer.params.{unknown_schedules[0]}")
    kwargs = check_params(cls, plain, key="optimizer.params", provided_context={"params": []})
    kwargs.pop("params", None)
    lr_schedule = schedules.get("lr")
    if lr_schedule is not None:
        negative = [p for p in _PROBES if lr_schedule(p) < 0]
        if negative:
            raise RecipeError(f"the learning rate's schedule goes below 0 (at progress {negative[0]})",
                              key="optimizer.params.lr")
        kwargs["lr"] = 1.0
    weight_decay = kwargs.pop("weight_decay", _default_weight_decay(cls))
    groups = parameter_groups(modules, weight_decay, spec.decay_norm_and_bias)
    if not any(g["params"] for g in groups):
        raise RecipeError("nothing to train: the student has no trainable parameters", key="student")
    try:
        optimizer = cls(groups, **kwargs)
    except (ValueError, TypeError) as exc:
        raise RecipeError(str(exc), key="optimizer.params") from None
    steps = max(int(total_steps), 1)
    if lr_schedule is None:
        factor: Callable[[int], float] = lambda _step: 1.0  # noqa: E731
    else:
        def factor(step: int) -> float:
            return float(lr_schedule(min(step / steps, 1.0)))
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
