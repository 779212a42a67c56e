"""Schedule plugins: values over the run's progress, warm-up, and their param checks."""

from __future__ import annotations

import math

import pytest

import kdforge


def make(name: str, **params):
    return kdforge.create("schedule", name, **params)


def test_constant() -> None:
    s = make("constant", value=0.7)
    assert [s(p) for p in (0.0, 0.3, 1.0)] == [0.7, 0.7, 0.7]


def test_linear() -> None:
    s = make("linear", start=1.0, end=3.0)
    assert s(0.0) == 1.0 and s(0.25) == 1.5 and s(1.0) == 3.0


def test_cosine_hits_start_middle_and_end() -> None:
    s = make("cosine", start=0.1, end=0.0)
    assert s(0.0) == pytest.approx(0.1)
    assert s(0.5) == pytest.approx(0.05)
    assert s(1.0) == pytest.approx(0.0, abs=1e-12)
    assert s(0.25) == pytest.approx(0.05 * (1 + math.cos(math.pi / 4)))


def test_step_decays_at_each_milestone() -> None:
    # The CRD CIFAR-100 setting: lr 0.05, x0.1 at epochs 150, 180, 210 of 240.
    s = make("step", value=0.05, milestones=[150 / 240, 180 / 240, 210 / 240], gamma=0.1)
    assert s(0.0) == pytest.approx(0.05)
    assert s(149 / 240) == pytest.approx(0.05)
    assert s(150 / 240) == pytest.approx(0.005)
    assert s(200 / 240) == pytest.approx(0.0005)
    assert s(1.0) == pytest.approx(0.00005)


def test_progressive_stages_equal_by_default() -> None:
    s = make("progressive", values=[10.0, 5.0, 1.0])
    assert [s(p) for p in (0.0, 0.32, 0.34, 0.66, 0.67, 1.0)] == [10.0, 10.0, 5.0, 5.0, 1.0, 1.0]


def test_progressive_with_explicit_boundaries() -> None:
    s = make("progressive", values=[10.0, 5.0, 1.0], boundaries=[0.5, 0.9])
    assert [s(p) for p in (0.1, 0.5, 0.89, 0.95)] == [10.0, 5.0, 5.0, 1.0]


def test_warmup_ramps_linearly_into_the_schedule() -> None:
    s = make("cosine", start=1.0, end=0.0, warmup=0.1)
    assert s(0.0) == 0.0
    assert s(0.05) == pytest.approx(0.5 * make("cosine", start=1.0, end=0.0)(0.1))
    assert s(0.1) == pytest.approx(make("cosine", start=1.0, end=0.0)(0.1))
    assert s(0.6) == pytest.approx(make("cosine", start=1.0, end=0.0)(0.6))


def test_progress_outside_the_run_is_clamped() -> None:
    s = make("linear", start=0.0, end=1.0)
    assert s(-1.0) == 0.0 and s(2.0) == 1.0


@pytest.mark.parametrize(
    ("name", "params", "fragment"),
    [
        ("progressive", {"values": [1.0, 2.0], "boundaries": [0.2, 0.4]}, "boundaries"),
        ("progressive", {"values": []}, "values"),
        ("step", {"value": 1.0, "milestones": [1.5]}, "milestones"),
        ("cosine", {"start": 1.0, "warmup": 1.0}, "warmup"),
        ("linear", {"start": 0.0}, "end"),
    ],
)
def test_bad_schedule_params_are_recipe_errors(name: str, params: dict, fragment: str) -> None:
    with pytest.raises(kdforge.RecipeError, match=fragment):
        make(name, **params)
