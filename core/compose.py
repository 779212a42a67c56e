"""The public composition API: build plugins from recipe fragments, load earlier runs' models.

A plugin that builds other plugins (a teacher of teachers, a wrapper) uses these names,
as the built-in ``ensemble`` and ``checkpoint`` teachers do:

- ``build_plugin(kind, fragment, context, key=...)`` / ``build_teacher(fragment, ...)``:
  a ``{name, params}`` mapping built exactly as a recipe's would be (params validated,
  data-derived values filled in, extension points checked);
- ``load_student(run_dir)`` / ``load_teacher(run_dir)``: a finished run's trained student,
  or the teacher it distilled from (a teacher that followed the student included);
- ``kdforge.load_weights`` / ``save_weights`` / ``load_state_dict`` (``weights.py``).

Error keys: pass ``key`` relative to your own params with a leading dot
(``key=".teachers[0]"``); kdforge prefixes it with where your plugin sits in the recipe,
so the user reads ``teacher.params.teachers[0].params.path: ...``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from torch import nn

from .errors import RecipeError
from .extensions import check_extension_points, follows_student
from .params import check_params
from .registry import call_factory, get_registry

#: values the engine fills into student, teacher and loss factories that accept them (and the recipe left out)
CONTEXT_NAMES = ("num_classes", "in_channels", "input_shape", "num_samples")
TEACHER_WEIGHTS = "teacher.safetensors"


@dataclass(frozen=True)
class BuildContext:
    """What student, teacher and loss factories may be given from the data.

    ``num_classes`` (the models' output size), ``in_channels`` and ``input_shape`` of one
    input, and ``num_samples``, the size of the train split (for a memory bank keyed by
    the sample index). A factory gets each one it names as a param, unless the recipe sets it.
    """

    num_classes: int | None = None
    in_channels: int | None = None
    input_shape: tuple[int, ...] | None = None
    num_samples: int | None = None

    @classmethod
    def from_splits(cls, splits: Any) -> "BuildContext":
        """The context of a dataset plugin's ``DataSplits``."""
        shape = tuple(int(d) for d in splits.input_shape)
        try:
            size = len(splits.train)
        except TypeError:
            size = None
        return cls(splits.num_classes, shape[0] if shape else 1, shape, size)

    @classmethod
    def placeholder(cls) -> "BuildContext":
        """Stand-in values for checking params before any data exists."""
        return cls(2, 1, (1, 1, 1), 2)

    def params(self) -> dict[str, Any]:
        """The context as factory params (``input_shape`` as a list), leaving out unknown values."""
        values = {"num_classes": self.num_classes, "in_channels": self.in_channels,
                  "input_shape": list(self.input_shape) if self.input_shape is not None else None,
                  "num_samples": self.num_samples}
        return {k: v for k, v in values.items() if v is not None}


def _join(key: str | None, suffix: str) -> str:
    if not key:
        return suffix
    return f"{key}.{suffix}" if not suffix.startswith("[") else key + suffix


def read_fragment(fragment: Any, key: str | None = None) -> tuple[str, dict[str, Any]]:
    """``(name, params)`` of a ``{name, params}`` mapping, or a ``RecipeError`` naming ``key``."""
    if hasattr(fragment, "model_dump"):
        fragment = {k: v for k, v in fragment.model_dump().items() if k in ("name", "params")}
    if not isinstance(fragment, Mapping):
        raise RecipeError(f"expected a plugin reference {{name, params}}, got {type(fragment).__name__}", key=key)
    unknown = sorted(str(k) for k in fragment if k not in ("name", "params"))
    if unknown:
        raise RecipeError(f"unknown key {unknown[0]!r} in a plugin reference (valid keys: name, params)",
                          key=_join(key, unknown[0]))
    name, params = fragment.get("name"), fragment.get("params") or {}
    if not isinstance(name, str) or not name:
        raise RecipeError("is required: the plugin's name", key=_join(key, "name"))
    if not isinstance(params, Mapping):
        raise RecipeError(f"must be a mapping, got {type(params).__name__}", key=_join(key, "params"))
    return name, dict(params)


def check_plugin(kind: str, fragment: Any, context: BuildContext | None = None, *, key: str | None = None) -> dict[str, Any]:
    """Validate a ``{name, params}`` fragment without building it; return the params it would get."""
    name, params = read_fragment(fragment, key)
    record = get_registry().get(kind, name, key=_join(key, "name"))
    provided = (context or BuildContext()).params() if kind in ("student", "teacher", "loss", "task") else None
    return check_params(record.factory, params, key=_join(key, "params"), provided_context=provided)


def build_plugin_with_params(kind: str, fragment: Any, context: BuildContext | None = None, *,
                             key: str | None = None) -> tuple[Any, dict[str, Any]]:
    """``build_plugin``, also returning the params the factory was called with."""
    name, _ = read_fragment(fragment, key)
    record = get_registry().get(kind, name, key=_join(key, "name"))
    params = check_plugin(kind, fragment, context, key=key)
    obj = call_factory(record, params, key=_join(key, "params"))
    label = f"{record.kind} {name!r}"
    if kind in ("student", "teacher", "loss") and not isinstance(obj, nn.Module):
        raise RecipeError(f"{label} built a {type(obj).__name__}, not a torch.nn.Module", key=key)
    check_extension_points(obj, kind, label, key=key)
    return obj, params


def build_plugin(kind: str, fragment: Any, context: BuildContext | None = None, *, key: str | None = None) -> Any:
    """Build the plugin a recipe fragment ``{name, params}`` names, validated as in a recipe.

    ``context`` supplies ``num_classes``, ``in_channels`` and ``input_shape`` to student and
    teacher factories that take them and whose params leave them out.
    """
    return build_plugin_with_params(kind, fragment, context, key=key)[0]


def build_teacher(fragment: Any, context: BuildContext | None = None, *, key: str | None = None) -> nn.Module:
    """Build a teacher from ``{name, params}`` (any teacher plugin), validated as in a recipe."""
    return build_plugin("teacher", fragment, context, key=key)


def _run_recipe(run_dir: str | os.PathLike[str], key: str | None, need: str) -> tuple[Path, dict[str, Any]]:
    from .recipe import load_yaml_file

    path = Path(run_dir)
    if not path.is_dir():
        raise RecipeError(f"no run directory at {str(run_dir)!r}; train it first (kdforge run ...)", key=key)
    recipe_file = path / "recipe.yaml"
    if not recipe_file.is_file() or not (path / need).is_file():
        missing = "recipe.yaml" if not recipe_file.is_file() else need
        raise RecipeError(f"{str(run_dir)!r} is not a finished kdforge run (no {missing}); did its training complete?",
                          key=key)
    return path, load_yaml_file(recipe_file)


def load_student(run_dir: str | os.PathLike[str], *, key: str | None = None) -> nn.Module:
    """The trained student of a finished run: rebuilt from its ``recipe.yaml``, weights loaded.

    Never downloads: a ``pretrained`` param is turned off, since the run's weights replace it.
    """
    from .weights import load_weights

    path, recipe = _run_recipe(run_dir, key, "student.safetensors")
    spec = recipe.get("student") or {}
    params = dict(spec.get("params") or {}) if isinstance(spec, Mapping) else {}
    if params.get("pretrained"):
        params["pretrained"] = False
    where = f"student of {str(run_dir)!r}"
    model = build_plugin("student", {"name": spec.get("name") if isinstance(spec, Mapping) else None,
                                     "params": params}, key=where)
    load_weights(model, path / "student.safetensors")
    return model


def load_teacher(run_dir: str | os.PathLike[str], *, key: str | None = None) -> nn.Module:
    """The teacher a finished run distilled from, as it was at the end of that run.

    Rebuilt from the run's ``recipe.yaml``; a teacher that followed the student (an EMA of
    it) is bound to the run's student and gets the weights the run saved for it. Any other
    teacher is checked against the fingerprint of its weights that the run recorded
    (``teacher/fingerprint``): a teacher whose own run was retrained since is refused.
    Relative paths in the recipe are relative to the current directory, as in a recipe.
    """
    from .weights import load_weights

    path, recipe = _run_recipe(run_dir, key, "student.safetensors")
    if not recipe.get("teacher"):
        raise RecipeError(f"the run in {str(run_dir)!r} had no teacher", key=key)
    fragment = {k: v for k, v in recipe["teacher"].items() if k != "cache"} if isinstance(recipe["teacher"], Mapping) \
        else recipe["teacher"]
    teacher = build_teacher(fragment, key=f"teacher of {str(run_dir)!r}")
    if callable(getattr(teacher, "bind", None)):
        teacher.bind(load_student(path, key=key))
    if follows_student(teacher):
        weights = path / TEACHER_WEIGHTS
        if not weights.is_file():
            raise RecipeError(f"the run in {str(run_dir)!r} trained a teacher that follows the student but holds "
                              f"no {TEACHER_WEIGHTS}", key=key)
        load_weights(teacher, weights)
        return teacher
    expected = _summary(path).get("teacher/fingerprint")
    if isinstance(expected, str):
        from .weights import fingerprint

        if fingerprint(teacher) != expected:
            raise RecipeError(f"the teacher rebuilt from the recipe of {str(run_dir)!r} is not the one that run "
                              f"distilled from (its weights differ: was a teacher run retrained, or does a relative "
                              f"path point elsewhere from this directory?)", key=key)
    return teacher


def _summary(run_dir: Path) -> dict[str, Any]:
    import json

    try:
        data = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}
