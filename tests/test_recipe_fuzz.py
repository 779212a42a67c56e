"""Fuzzing the recipe loader: no malformed recipe may end in anything but a RecipeError."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kdforge import RecipeError
from kdforge.runner import validate_recipe_source as validate
from kdforge.recipe import parse_yaml

VALID: dict[str, Any] = {
    "name": "fuzz",
    "seed": 0,
    "data": {"name": "digits", "params": {"labeled": 100}},
    "teacher": {"name": "mlp", "params": {"hidden": [8]}},
    "student": {"name": "mlp", "params": {"hidden": [8]}},
    "losses": [{"name": "ce", "weight": 0.1}, {"name": "kd", "weight": 0.9, "params": {"temperature": 4.0}}],
    "optimizer": {"name": "adamw", "params": {"lr": {"schedule": "cosine", "params": {"start": 0.01}}}},
    "trainer": {"epochs": 1, "batch_size": 8},
    "tracking": {"wandb": {"project": "p"}},
    "output_dir": "/tmp/kdforge-fuzz-never-written",
}

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
)
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.one_of(st.text(max_size=8), st.integers()), inner, max_size=3)),
    max_leaves=8)


def paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    found = [prefix]
    if isinstance(node, dict):
        for key, value in node.items():
            found += paths(value, prefix + (key,))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found += paths(value, prefix + (i,))
    return found


ALL_PATHS = [p for p in paths(VALID) if p]


def mutate(recipe: dict, path: tuple, value: Any, delete: bool) -> dict:
    recipe = copy.deepcopy(recipe)
    node = recipe
    for part in path[:-1]:
        node = node[part]
    if delete and isinstance(node, dict):
        node.pop(path[-1], None)
    else:
        node[path[-1]] = value
    return recipe


def checked(recipe: Any) -> None:
    try:
        validate(recipe)
    except RecipeError as exc:
        message = str(exc)
        assert message and "\n" not in message and "Traceback" not in message


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(ALL_PATHS), values, st.booleans()), min_size=1, max_size=3))
def test_mutated_recipes_fail_cleanly(mutations: list) -> None:
    recipe = VALID
    for path, value, delete in mutations:
        try:
            recipe = mutate(recipe, path, value, delete)
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation removed the path
    checked(recipe)


@settings(max_examples=200, deadline=None)
@given(values)
def test_arbitrary_documents_fail_cleanly(document: Any) -> None:
    checked(document)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_arbitrary_yaml_text_fails_cleanly(text: str) -> None:
    try:
        checked(parse_yaml(text))
    except RecipeError:
        pass


def test_the_fuzz_base_recipe_is_valid() -> None:
    validate(VALID)
    assert not Path(VALID["output_dir"]).exists()
