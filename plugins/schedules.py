"""Schedules: a value as a function of the run's progress in [0, 1].

One plugin kind drives loss weights, loss params (e.g. the KD temperature) and the
learning rate. Every built-in schedule takes an optional linear warm-up: for
``progress < warmup`` the value ramps from ``warmup_start`` to the schedule's own
value at ``progress == warmup``; after that the schedule runs on the absolute progress.
"""

from __future__ import annotations

import bisect
import math
from typing import Annotated, Callable

from pydantic import Field

from kdforge import hookimpl

Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
WarmUp = Annotated[float, Field(ge=0.0, lt=1.0)]


class Schedule:
    """A named value(progress) callable with a readable repr."""

    def __init__(self, fn: Callable[[float], float], warmup: float, warmup_start: float, label: str) -> None:
        self._fn = fn
        self.warmup = warmup
        self.warmup_start = warmup_start
        self.label = label

    def __call__(self, progress: float) -> float:
        p = min(max(float(progress), 0.0), 1.0)
        if p < self.warmup:
            target = self._fn(self.warmup)
            return self.warmup_start + (target - self.warmup_start) * (p / self.warmup)
        return float(self._fn(p))

    def __repr__(self) -> str:
        return f"Schedule({self.label})"


def constant(value: float, warmup: WarmUp = 0.0, warmup_start: float = 0.0) -> Schedule:
    """The same value over the whole run."""
    return Schedule(lambda p: value, warmup, warmup_start, f"constant {value}")


def linear(start: float, end: float, warmup: WarmUp = 0.0, warmup_start: float = 0.0) -> Schedule:
    """Straight line from ``start`` at progress 0 to ``end`` at progress 1."""
    return Schedule(lambda p: start + (end - start) * p, warmup, warmup_start, f"linear {start}->{end}")


def cosine(start: float, end: float = 0.0, warmup: WarmUp = 0.0, warmup_start: float = 0.0) -> Schedule:
    """Half-cosine from ``start`` to ``end`` (Loshchilov & Hutter 2017, no restarts)."""

    def value(p: float) -> float:
        return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * p))

    return Schedule(value, warmup, warmup_start, f"cosine {start}->{end}")


def step(
    value: float,
    milestones: list[Fraction],
    gamma: Annotated[float, Field(gt=0.0)] = 0.1,
    warmup: WarmUp = 0.0,
    warmup_start: float = 0.0,
) -> Schedule:
    """``value``, multiplied by ``gamma`` at each milestone (fractions of the run) passed.

    E.g. epochs 150/180/210 of 240 are milestones [0.625, 0.75, 0.875].
    """
    points = sorted(milestones)

    def at(p: float) -> float:
        return value * gamma ** bisect.bisect_right(points, p)

    return Schedule(at, warmup, warmup_start, f"step {value} x{gamma} at {points}")


def progressive(
    values: Annotated[list[float], Field(min_length=1)],
    boundaries: list[Fraction] | None = None,
) -> Schedule:
    """Staged values, e.g. temperature 10 -> 5 -> 1: ``values[i]`` holds until ``boundaries[i]``.

    Without ``boundaries`` the run is cut into equal stages.
    """
    if boundaries is None:
        boundaries = [i / len(values) for i in range(1, len(values))]
    if len(boundaries) != len(values) - 1:
        raise ValueError(
            f"boundaries needs len(values) - 1 = {len(values) - 1} entries, got {len(boundaries)}"
        )
    if list(boundaries) != sorted(boundaries):
        raise ValueError(f"boundaries must be increasing, got {boundaries}")
    cuts = list(boundaries)

    def at(p: float) -> float:
        return values[bisect.bisect_right(cuts, p)]

    return Schedule(at, 0.0, 0.0, f"progressive {values} at {cuts}")


@hookimpl
def register_schedules(register) -> None:
    """Register ``constant``, ``linear``, ``cosine``, ``step`` and ``progressive``."""
    register("constant", constant)
    register("linear", linear)
    register("cosine", cosine)
    register("step", step)
    register("progressive", progressive)
