"""Teacher plugins that are not plain models: ``checkpoint`` (a previous kdforge run)."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from kdforge import RecipeError, hookimpl
from kdforge.weights import load_weights


def checkpoint_teacher(path: str) -> nn.Module:
    """The student of a finished kdforge run, rebuilt from that run's recipe and weights.

    ``path`` is the run directory (it holds ``recipe.yaml`` and ``student.safetensors``).
    """
    from kdforge.recipe import load_yaml_file
    from kdforge.params import check_params
    from kdforge.registry import call_factory, get_registry

    run_dir = Path(path)
    recipe_file, weights_file = run_dir / "recipe.yaml", run_dir / "student.safetensors"
    if not run_dir.is_dir():
        raise RecipeError(f"no run directory at {path!r}; train the teacher first (kdforge run ...)",
                          key=".path")
    if not recipe_file.is_file() or not weights_file.is_file():
        missing = "recipe.yaml" if not recipe_file.is_file() else "student.safetensors"
        raise RecipeError(f"{path!r} is not a finished kdforge run (no {missing}); did its training complete?",
                          key=".path")
    spec = load_yaml_file(recipe_file).get("student") or {}
    record = get_registry().get("student", spec.get("name"), key=f"student of {path}")
    params = dict(spec.get("params") or {})
    if params.get("pretrained"):
        params["pretrained"] = False  # the run's own weights replace them: never download
    params = check_params(record.factory, params, key=f"student of {path}")
    model = call_factory(record, params, key=f"student of {path}")
    load_weights(model, weights_file)
    return model


@hookimpl
def register_teachers(register) -> None:
    """Register ``checkpoint``."""
    register("checkpoint", checkpoint_teacher)
