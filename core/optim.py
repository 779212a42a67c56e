"""The optimizer: any ``torch.optim`` class by name, weight-decay groups, a LambdaLR for a scheduled lr."""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
from torch import nn

from .errors import RecipeError, did_you_mean, valid_list
from .params import check_params
from .recipe import OptimizerSpec
from .schedules import check_nonnegative, run_progress, split_scheduled

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


def check_optimizer(spec: OptimizerSpec, total_steps: int = 1) -> tuple[type, dict[str, Any], Any]:
    """The optimizer class, its checked keyword arguments and the lr schedule (or ``None``), without building it.

    Building one is left to ``build_optimizer``: the first optimizer a process constructs
    imports torch's compiler stack, which ``kdforge validate`` need not pay for.
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
    lr = kwargs.get("lr")
    if isinstance(lr, (int, float)) and not isinstance(lr, bool) and lr < 0:
        raise RecipeError(f"a learning rate must be >= 0 (got {lr})", key="optimizer.params.lr")
    lr_schedule = schedules.get("lr")
    if lr_schedule is not None:
        check_nonnegative(lr_schedule, run_progress(total_steps), "optimizer.params.lr", "the learning rate")
        kwargs["lr"] = 1.0
    return cls, kwargs, lr_schedule


def build_optimizer(
    spec: OptimizerSpec, modules: list[nn.Module], total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """The optimizer over ``modules`` and a LambdaLR that follows the (maybe scheduled) lr.

    The scheduler is stepped once per optimizer step; its multiplier is the lr itself
    (the groups' base lr is 1) when ``lr`` is a schedule, and 1 otherwise. Values only the
    optimizer's own constructor checks (betas in range, say) are recipe errors here.
    """
    cls, kwargs, lr_schedule = check_optimizer(spec, total_steps)
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
