"""Scheduled recipe values: building them from ``{schedule, params}`` and checking them over a run.

A loss weight, a loss param or the learning rate may follow a schedule plugin. Before any
data exists a schedule is probed every 0.5% of the run; once the number of optimizer steps
is known, every value it will take is checked exactly (``check_over_run``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from pydantic import ValidationError

from .errors import RecipeError
from .params import check_params, describe_error, loc_to_key
from .recipe import ScheduledValue
from .registry import call_factory, get_registry

Schedule = Callable[[float], float]
PROBES = tuple(i / 200 for i in range(201))  # before the step count is known: every 0.5% of the run


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
    setattr_safe(schedule, "_kdforge_name", value.schedule)
    for probe in PROBES:
        value_at(schedule, probe, key)
    return schedule


def setattr_safe(obj: Any, name: str, value: Any) -> None:
    """Set an attribute where the object allows it (closures and most objects do)."""
    try:
        setattr(obj, name, value)
    except (AttributeError, TypeError):
        pass


def schedule_name(schedule: Schedule) -> str:
    """The plugin name a schedule was built from."""
    return str(getattr(schedule, "_kdforge_name", type(schedule).__name__))


def value_at(schedule: Schedule, progress: float, key: str) -> float:
    """``schedule(progress)`` as a finite float, or a ``RecipeError`` naming the key."""
    try:
        number = float(schedule(progress))
    except Exception as exc:  # noqa: BLE001 - third-party schedules may raise anything
        raise RecipeError(f"schedule {schedule_name(schedule)!r} failed at progress {progress}: {exc}", key=key) from None
    if not math.isfinite(number):
        raise RecipeError(f"schedule {schedule_name(schedule)!r} gives {number} at progress {progress}", key=key)
    return number


def split_scheduled(params: dict[str, Any], key: str) -> tuple[dict[str, Any], dict[str, Schedule]]:
    """Replace scheduled values by their value at progress 0; return the schedules separately."""
    plain, schedules = {}, {}
    for name, value in params.items():
        if is_scheduled(value):
            schedules[name] = build_schedule(value, f"{key}.{name}")
            plain[name] = schedules[name](0.0)
        else:
            plain[name] = value
    return plain, schedules


def refuse_schedules(params: dict[str, Any], key: str) -> None:
    """Schedules drive loss params, loss weights and the lr; anywhere else they are an error."""
    for name, value in params.items():
        if is_scheduled(value):
            raise RecipeError("only loss params, loss weights and optimizer.params.lr can follow a schedule",
                              key=f"{key}.{name}")


@dataclass
class ScheduledParam:
    """A loss param that follows a schedule, with what it takes to check its values."""

    name: str
    schedule: Schedule
    factory: Callable[..., Any]
    plain: dict[str, Any]
    key: str
    provided: dict[str, Any] | None = None

    def check(self, progress_values: Iterable[float]) -> None:
        """Every value the schedule takes at these points must be a valid param value."""
        seen: set[float] = set()
        for progress in progress_values:
            value = value_at(self.schedule, progress, self.key)
            if value in seen:
                continue
            seen.add(value)
            try:
                check_params(self.factory, {**self.plain, self.name: value}, key=self.key.rsplit(".", 1)[0],
                             provided_context=self.provided)
            except RecipeError as exc:
                raise RecipeError(
                    f"schedule {schedule_name(self.schedule)!r} gives {value:g} at progress {progress:.6g}, which "
                    f"this param does not accept: {exc.detail}", key=self.key) from None


def check_nonnegative(schedule: Schedule, progress_values: Iterable[float], key: str, what: str) -> None:
    """A weight or learning-rate schedule must stay >= 0 everywhere it is used."""
    for progress in progress_values:
        value = value_at(schedule, progress, key)
        if value < 0:
            raise RecipeError(f"{what}'s schedule {schedule_name(schedule)!r} goes below 0 ({value:g} at progress "
                              f"{progress:.6g})", key=key)


def run_progress(total_steps: int) -> list[float]:
    """The progress of every optimizer step of a run of ``total_steps`` steps (and its end)."""
    total = max(int(total_steps), 1)
    return [step / total for step in range(total + 1)]
